"""Synthetic routing traces, each seeded and reproducible.

A generator has two parts. The *routing distribution* gives, for every (step, layer, head), the
probability p[e] that a token-expert slot lands on expert e; the generators below differ only in
that. The *sampler* then draws each shard's counts: a shard's tokens_per_shard * top_k slots are
spread over the experts as a multinomial with probabilities p (the shards of one step and layer
are independent draws from the same p).

A token visits top_k *distinct* experts, so no expert can take more than 1/top_k of the slots:
p is capped at 1/top_k by water-filling (the excess of the capped experts is spread over the rest
in proportion to their weight). An expert at the cap is visited by every token and gets exactly
tokens_per_shard; the other slots are drawn over the other experts, and the rare sampled count
above tokens_per_shard is moved to the experts with the most room. This only matters for very
skewed routing at large top_k (Zipf 1.2 over 64 experts at top-8 caps the hottest expert).

Samplers: "multinomial" is exact; "normal" draws the multinomial's normal approximation with its
exact covariance n(diag(p) - p p^T) and rounds, keeping every shard's total exact. It is ~10x
faster and used by "auto" for traces of more than 2^24 counts, where the expected counts are in
the hundreds and the approximation is good.

The normal draws come from a 2^16-entry inverse-CDF table indexed by 16 random bits (4 draws per
64-bit word of the generator): ~2.5 ns a draw against ~11 ns for numpy's ziggurat, which made
the draws most of the generation time. The table is the standard normal's quantiles at
(i + 1/2) / 2^16, rescaled to unit variance: its CDF is within 2^-16 of the normal's everywhere
and its tails stop at 4.3 sigma (the normal puts 1.5e-5 beyond). Both are far below the error
of the normal approximation itself (Berry-Esseen, O(1/sqrt(n p)): percents at n p ~ 500).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter
from scipy.special import ndtri

from moesim.errors import InputError
from traces.schema import Trace, TraceMeta

AUTO_EXACT_LIMIT = 2**24
CHUNK_CELLS = 2**21  # 8 MB float32 temporaries: reused by malloc, not re-faulted


@dataclass(frozen=True)
class TraceSpec:
    """The shape and routing of a synthetic trace."""

    kind: str = "zipf"
    steps: int = 100
    layers: int = 8
    shards: int = 16
    experts: int = 64
    heads: int = 1
    top_k: int = 8
    tokens_per_shard: int = 4096
    seed: int = 0
    model: str = "synthetic"
    params: dict = field(default_factory=dict)
    sampler: str = "auto"


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def _perms(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Independent random permutations of range(n), one per index of `shape`."""
    return np.argsort(rng.random((*shape, n)), axis=-1)


def uniform(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Every expert equally likely: the balanced routing an auxiliary loss aims for."""
    return np.full((spec.steps, spec.layers, spec.heads, spec.experts), 1.0 / spec.experts)


def zipf(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Zipf-skewed: the expert of popularity rank i gets weight 1/i^exponent (param `exponent`,
    default 1.2). Which expert holds which rank is random per (layer, head), fixed over steps."""
    s = float(spec.params.get("exponent", 1.2))
    w = _zipf_weights(spec.experts, s)
    perm = _perms(rng, (spec.layers, spec.heads), spec.experts)
    p = np.empty((spec.layers, spec.heads, spec.experts))
    np.put_along_axis(p, perm, np.broadcast_to(w, p.shape), axis=-1)
    return np.broadcast_to(p, (spec.steps, *p.shape)).copy()


def drifting(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Zipf-skewed (param `exponent`, default 1.2) with a hot set that moves: every `period`
    steps (default 10) each popularity rank shifts to the next expert of a per-layer random
    cycle, so yesterday's hot expert cools and a new one heats up."""
    s = float(spec.params.get("exponent", 1.2))
    period = int(spec.params.get("period", 10))
    if period < 1:
        raise InputError("trace spec", "period", f"must be >= 1, got {period}")
    w = _zipf_weights(spec.experts, s)
    cycle = _perms(rng, (spec.layers, spec.heads), spec.experts)
    shift = np.arange(spec.steps) // period
    ranks = (np.arange(spec.experts)[None, :] + shift[:, None]) % spec.experts  # [steps, E]
    owner = np.take_along_axis(
        np.broadcast_to(cycle, (spec.steps, *cycle.shape)),
        np.broadcast_to(ranks[:, None, None, :], (spec.steps, *cycle.shape)), axis=-1)
    p = np.empty(owner.shape)
    np.put_along_axis(p, owner, np.broadcast_to(w, owner.shape), axis=-1)
    return p


def bursty(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Near-uniform routing with bursts: each (step, layer) independently, with probability
    `burst_prob` (default 0.1), `burst_experts` random experts (default 2) get `burst_factor`
    times (default 8) their usual weight. Models the transient hot spots seen per layer."""
    prob = float(spec.params.get("burst_prob", 0.1))
    n_hot = int(spec.params.get("burst_experts", 2))
    factor = float(spec.params.get("burst_factor", 8.0))
    if not 0 <= prob <= 1:
        raise InputError("trace spec", "burst_prob", f"must be in [0, 1], got {prob}")
    if not 1 <= n_hot <= spec.experts:
        raise InputError("trace spec", "burst_experts", f"must be in [1, {spec.experts}]")
    shape = (spec.steps, spec.layers, spec.heads)
    w = np.ones((*shape, spec.experts))
    burst = rng.random(shape[:2]) < prob
    hot = _perms(rng, shape, spec.experts)[..., :n_hot]
    boost = np.where(burst[..., None, None], factor, 1.0)
    np.put_along_axis(w, hot, np.broadcast_to(boost, hot.shape), axis=-1)
    return w / w.sum(axis=-1, keepdims=True)


def layer_param(spec: TraceSpec, name: str, default: float) -> np.ndarray:
    """A parameter as one value per layer: a number (every layer) or a list of `layers`."""
    v = spec.params.get(name, default)
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(spec.layers, float(arr))
    if arr.shape != (spec.layers,):
        raise InputError("trace spec", name, f"a number or a list of {spec.layers} (one per "
                         f"layer), got {len(arr)} values")
    return arr


def wander(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Real-looking routing, the kind `traces.fit` estimates from a recorded trace. Per layer l
    (every parameter a number or a list with one value per layer) and head, expert e's
    log-weight at step t is

        theta[t, e] = mu[e] + a[t, e] + j[t, e]   (+ log burst_factor on a burst)

    mu: log Zipf weights of `exponent` over a random order of the experts (the long-run skew);
    a: a stationary AR(1) (Ornstein-Uhlenbeck) wander of standard deviation `spread` whose
    correlation halves every `half_life` steps (the drift of the hot set; 0: no memory);
    j: independent per-step jitter of standard deviation `jitter`. With probability
    `burst_prob` per (step, layer) `burst_experts` random experts get `burst_factor` times
    their weight for that step (transient hot spots). p = softmax(theta). Defaults: exponent
    1.2, half_life 50, spread 0.5, jitter 0.1, no bursts."""
    steps, layers, heads, experts = spec.steps, spec.layers, spec.heads, spec.experts
    s = layer_param(spec, "exponent", 1.2)
    half = layer_param(spec, "half_life", 50.0)
    spread = layer_param(spec, "spread", 0.5)
    jitter = layer_param(spec, "jitter", 0.1)
    q = layer_param(spec, "burst_prob", 0.0)
    factor = layer_param(spec, "burst_factor", 8.0)
    n_hot = layer_param(spec, "burst_experts", 2)
    for name, arr, lo in (("half_life", half, 0), ("spread", spread, 0), ("jitter", jitter, 0),
                          ("burst_factor", factor, 1e-12), ("exponent", s, 0)):
        if (arr < lo).any() or not np.isfinite(arr).all():
            raise InputError("trace spec", name, f"must be finite and >= {lo}")
    if ((q < 0) | (q > 1)).any():
        raise InputError("trace spec", "burst_prob", "must be in [0, 1]")
    if ((n_hot < 1) | (n_hot > experts) | (n_hot != np.round(n_hot))).any():
        raise InputError("trace spec", "burst_experts", f"whole numbers in [1, {experts}]")
    logw = -s[:, None] * np.log(np.arange(1, experts + 1))[None, :]  # [L, E], rank order
    perm = _perms(rng, (layers, heads), experts)
    mu = np.empty((layers, heads, experts))
    np.put_along_axis(mu, perm, np.broadcast_to(logw[:, None, :], mu.shape), axis=-1)
    phi = np.where(half > 0, 0.5 ** (1.0 / np.maximum(half, 1e-300)), 0.0)[:, None, None]
    innov = np.sqrt(1.0 - phi**2) * spread[:, None, None]
    # a[0] ~ N(0, spread^2), a[t] = phi a[t-1] + sqrt(1 - phi^2) spread eps[t]: stationary.
    x = rng.standard_normal((steps, layers, heads, experts))
    x[0] *= spread[:, None, None]
    x[1:] *= innov
    theta = np.empty_like(x)
    for ly in range(layers):
        theta[:, ly] = lfilter([1.0], [1.0, -float(phi[ly, 0, 0])], x[:, ly], axis=0)
    theta += mu
    theta += rng.standard_normal(theta.shape) * jitter[None, :, None, None]
    burst = rng.random((steps, layers)) < q[None, :]
    order = _perms(rng, (steps, layers, heads), experts)
    hot = order < n_hot[None, :, None, None].astype(np.int64)  # n_hot random experts a head
    theta += np.where(burst[..., None, None] & hot, np.log(factor)[None, :, None, None], 0.0)
    theta -= theta.max(axis=-1, keepdims=True)
    p = np.exp(theta)
    return p / p.sum(axis=-1, keepdims=True)


GENERATORS: dict[str, Callable[[TraceSpec, np.random.Generator], np.ndarray]] = {
    "uniform": uniform,
    "zipf": zipf,
    "drifting": drifting,
    "bursty": bursty,
    "wander": wander,
}


def cap_probabilities(p: np.ndarray, cap: float) -> np.ndarray:
    """Water-fill: clip p at `cap` and spread the excess over the uncapped entries in
    proportion to their weight, until none exceeds the cap (last axis sums to 1)."""
    p = p.copy()
    for _ in range(p.shape[-1]):
        over = p > cap * (1 + 1e-12)
        if not over.any():
            break
        capped = p >= cap * (1 - 1e-12)
        excess = np.where(over, p - cap, 0.0).sum(axis=-1, keepdims=True)
        p = np.where(over, cap, p)
        free = np.where(capped, 0.0, p)
        p = p + excess * free / np.maximum(free.sum(axis=-1, keepdims=True), 1e-300)
    return p


def _sample_multinomial(rng, n: np.ndarray, p: np.ndarray, shards: int,
                        out: np.ndarray) -> None:
    pv = np.broadcast_to(p[:, :, None], (*p.shape[:2], shards, *p.shape[2:]))
    out[...] = rng.multinomial(n[:, :, None], pv)


def _normal_table() -> np.ndarray:
    z = ndtri((np.arange(2**16) + 0.5) / 2**16)
    return (z / np.sqrt(np.mean(z**2))).astype(np.float32)


NORMAL_TABLE = _normal_table()


def standard_normal16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal draws by table lookup on 16 random bits (module docstring)."""
    size = int(np.prod(shape))
    bits = rng.bit_generator.random_raw(-(-size // 4)).view(np.uint16)[:size]
    return NORMAL_TABLE.take(bits).reshape(shape)


def _sample_normal(rng, n: np.ndarray, p: np.ndarray, shards: int, out: np.ndarray) -> None:
    # y ~ N(0, diag p); y - p * sum(y) has covariance diag(p) - p p^T, the multinomial's / n.
    p32 = p[:, :, None].astype(np.float32)
    n32 = n[:, :, None, :, None].astype(np.float32)
    y = standard_normal16(rng, out.shape)
    y *= np.sqrt(p32)
    total = y @ np.ones((y.shape[-1], 1), np.float32)  # BLAS: faster than a short-axis sum
    y -= p32 * total
    y *= np.sqrt(n32)
    y += n32 * p32 + np.float32(0.5)  # + 0.5 then truncation below: rounding in no extra pass
    np.maximum(y, 0, out=y)
    np.copyto(out, y, casting="unsafe")
    # Rounding and clipping leave each shard a few slots off n: give them to its likeliest expert.
    resid = n[:, :, None].astype(np.int32) - out.sum(axis=-1, dtype=np.int32)
    top = np.broadcast_to(np.argmax(p32, axis=-1)[..., None], (*resid.shape, 1))
    np.put_along_axis(out, top, np.take_along_axis(out, top, -1) + resid[..., None], axis=-1)
    if out.min() < 0:  # only if a likeliest expert was driven below zero: redraw those rows
        neg = (out < 0).any(axis=-1)
        pr = np.broadcast_to(p[:, :, None], out.shape)[neg]
        nr = np.broadcast_to(n[:, :, None], neg.shape)[neg]
        out[neg] = rng.multinomial(nr, pr)


def _sample(draw, rng, tokens: int, top_k: int, p: np.ndarray, shards: int,
            out: np.ndarray) -> None:
    """Counts for one chunk of steps, into `out`. An expert whose share is capped at 1/top_k
    is visited by every token, so it gets exactly `tokens`; the other slots are drawn over the
    rest, and counts above `tokens` are then moved (`_enforce_distinct`)."""
    full = p >= (1.0 - 1e-9) / top_k
    n = tokens * top_k - tokens * full.sum(axis=-1)
    rest = np.where(full, 0.0, p)
    rest /= np.maximum(rest.sum(axis=-1, keepdims=True), 1e-300)
    draw(rng, n, rest, shards, out)
    if full.any():
        np.add(out, full[:, :, None].astype(np.int32) * np.int32(tokens), out=out)
    _enforce_distinct(out, tokens)


def _enforce_distinct(c: np.ndarray, tokens: int) -> None:
    """Move counts above `tokens` (one token visits an expert at most once) to the experts
    with the most room, in place. Rare: only experts with a share close to 1/top_k overflow."""
    if c.max(initial=0) <= tokens:
        return
    rows = np.argwhere((c > tokens).any(axis=-1))
    for idx in map(tuple, rows):
        row = c[idx]
        excess = int(np.clip(row - tokens, 0, None).sum())
        np.minimum(row, tokens, out=row)
        while excess:
            e = int(np.argmin(row))
            give = min(excess, tokens - int(row[e]))
            row[e] += give
            excess -= give


def sample_counts(p: np.ndarray, shards: int, tokens: int, top_k: int,
                  seeds: np.random.SeedSequence, sampler: str = "auto",
                  progress: bool = False) -> tuple[np.ndarray, str]:
    """Counts [steps, layers, shards, heads, experts] drawn from the routing distribution
    p [steps, layers, heads, experts] (capped at 1/top_k here), and the sampler used.

    Steps are drawn in chunks of ~2^21 counts, each from its own child seed of `seeds`, on
    a thread per core (numpy releases the GIL while it draws); the chunking depends only on the
    trace's shape, so the result does not depend on the number of threads."""
    p = cap_probabilities(p, 1.0 / top_k)
    steps, layers, heads, experts = p.shape
    cells = steps * layers * shards * heads * experts
    if sampler == "auto":
        sampler = "multinomial" if cells <= AUTO_EXACT_LIMIT else "normal"
    draw = _sample_multinomial if sampler == "multinomial" else _sample_normal
    counts = np.empty((steps, layers, shards, heads, experts), np.int32)
    step_chunk = max(1, CHUNK_CELLS // (cells // steps))
    starts = list(range(0, steps, step_chunk))
    chunk_seeds = seeds.spawn(len(starts) + 1)[1:]

    def fill(i: int) -> None:
        s0 = starts[i]
        rng = np.random.default_rng(chunk_seeds[i])
        _sample(draw, rng, tokens, top_k, p[s0:s0 + step_chunk], shards,
                counts[s0:s0 + step_chunk])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = pool.map(fill, range(len(starts)))
        if progress:
            from tqdm import tqdm
            done = tqdm(done, total=len(starts), desc="trace gen", unit="chunk", leave=False)
        for _ in done:
            pass
    return counts, sampler


def generate(spec: TraceSpec, progress: bool = False) -> Trace:
    """Generate a trace from `spec`: the same spec (seed included) gives the same counts
    (`sample_counts` says how they are drawn)."""
    if spec.kind not in GENERATORS:
        raise InputError("trace spec", "kind", f"{spec.kind!r} is not one of "
                         f"{', '.join(GENERATORS)}")
    if spec.top_k > spec.experts:
        raise InputError("trace spec", "top_k", f"{spec.top_k} exceeds {spec.experts} experts")
    for name in ("steps", "layers", "shards", "experts", "heads", "top_k", "tokens_per_shard"):
        if getattr(spec, name) < 1:
            raise InputError("trace spec", name, f"must be >= 1, got {getattr(spec, name)}")
    if spec.sampler not in ("auto", "multinomial", "normal"):
        raise InputError("trace spec", "sampler", "not one of auto, multinomial, normal")
    seeds = np.random.SeedSequence(spec.seed)
    p = GENERATORS[spec.kind](spec, np.random.default_rng(seeds.spawn(1)[0]))
    counts, sampler = sample_counts(p, spec.shards, spec.tokens_per_shard, spec.top_k, seeds,
                                    spec.sampler, progress)
    meta = TraceMeta(
        model=spec.model, source=f"synthetic:{spec.kind}", tokens_per_shard=spec.tokens_per_shard,
        top_k=spec.top_k,
        generator={"kind": spec.kind, "seed": spec.seed, "sampler": sampler,
                   "params": dict(sorted(spec.params.items()))},
    )
    return Trace(counts, meta)
