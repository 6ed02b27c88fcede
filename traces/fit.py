"""Fit a generator to a recorded trace (`moesim trace fit`), and say how well it fits.

The generator is `traces.generators.wander` (its docstring has the model): per layer, a Zipf
skew of the long-run expert weights, an AR(1) wander of the log-weights (the drift of the hot
set: a spread and a half-life), per-step jitter and bursts. Every parameter is estimated per
layer, which is how the fit carries per-layer differences. Per layer, from the expert shares
p[t, e] of each step (all shards and heads pooled; n slots a step):

1. Bursts, in share space: an expert whose share at step t exceeds the mean of its shares at
   t-1 and t+1 by more than max(1/E, 5 robust standard deviations of that excess over the
   layer), and at least doubles it, is bursting. burst_prob is the share of steps with a
   burst, burst_experts the median number of bursting experts in them, burst_factor the
   median ratio of the bursting share to its neighbours' mean.
2. The rest by simulated moments: exponent, spread, half_life and jitter minimise
   (scipy.optimize.minimize, Nelder-Mead over their logs from the best point of a 3^4 grid,
   fixed random numbers) the squared
   relative error of the sorted share profile (the mean over steps of the shares sorted in
   decreasing order, capped at 1/top_k as every generator's: the skew) plus the mean squared
   relative error of the drift curve TV(k), the mean total variation distance between the
   shares of steps k apart, k = 1, 2, 5, 10, 20, 50, 100 (those shorter than a quarter of
   the trace), of the layer and of the generator with the bursts of step 1, whose shares get
   the multinomial sampling noise of the trace's n slots (its normal approximation, fixed
   variates) so that both carry the same. The half-life is capped at the trace's length:
   longer memory looks the same within it.
   Matching the whole profile, not a log-log slope, weights the hot experts that set the load
   imbalance; matching TV(k) is matching how fast the hot set moves. The exponent, spread and
   jitter all make skew, so different parameter sets can fit equally well: the statistics
   below, not the parameters, are what the fit promises.

Goodness of fit (`goodness`): a trace generated from the fit with the recorded trace's shape,
top-k and tokens per shard, and per layer each statistic on both: the mean and worst max/mean
expert load, the CV, the top expert's share (traces.stats), the total variation distance of
the expert shares between steps 1 and 10 apart (drift), and the Kolmogorov-Smirnov distance
between the two traces' per-step max/mean distributions. The same for the `zipf`-only part of
the fit (no drift, jitter or bursts) shows what the time structure adds.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.errors import InputError
from traces.generators import TraceSpec, cap_probabilities, generate, wander
from traces.schema import Trace

PARAMS = ("exponent", "half_life", "spread", "jitter", "burst_prob", "burst_factor",
          "burst_experts")
MIN_STEPS = 8
FIT_VERSION = 1


@dataclass
class Fit:
    """Fitted `wander` parameters, one value per layer, and what they were fitted to."""

    params: dict[str, list[float]]
    source: str
    shape: dict[str, int]
    top_k: int
    tokens_per_shard: int
    model: str = ""
    notes: dict = field(default_factory=dict)

    def spec(self, *, steps: int | None = None, shards: int | None = None,
             tokens_per_shard: int | None = None, seed: int = 0,
             params: dict | None = None) -> TraceSpec:
        """A generator spec of the fitted routing, by default shaped like the source."""
        sh = self.shape
        return TraceSpec(kind="wander", steps=steps or sh["steps"], layers=sh["layers"],
                         shards=shards or sh["shards"], experts=sh["experts"],
                         heads=sh["heads"], top_k=self.top_k,
                         tokens_per_shard=tokens_per_shard or self.tokens_per_shard,
                         seed=seed, model=f"fit:{self.model}",
                         params=params if params is not None else self.params)

    def to_json(self) -> str:
        return json.dumps({"version": FIT_VERSION, "kind": "wander", "source": self.source,
                           "model": self.model, "shape": self.shape, "top_k": self.top_k,
                           "tokens_per_shard": self.tokens_per_shard,
                           "params": self.params, "notes": self.notes}, indent=1) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> Fit:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(path, "file", f"not a readable fit JSON: {e}") from None
        for k in ("kind", "shape", "top_k", "tokens_per_shard", "params"):
            if k not in raw:
                raise InputError(path, k, "missing")
        if raw["kind"] != "wander":
            raise InputError(path, "kind", f"{raw['kind']!r}: this reader knows 'wander'")
        layers = raw["shape"].get("layers")
        for k in PARAMS:
            v = raw["params"].get(k)
            if not isinstance(v, list) or len(v) != layers or not all(
                    isinstance(x, (int, float)) for x in v):
                raise InputError(path, f"params.{k}", f"a list of {layers} numbers")
        return cls(raw["params"], raw.get("source", ""), raw["shape"], raw["top_k"],
                   raw["tokens_per_shard"], raw.get("model", ""), raw.get("notes", {}))


def shares(trace: Trace) -> np.ndarray:
    """Expert shares p[step, layer, head, expert] of each step's slots."""
    load = trace.expert_load().astype(np.float64)
    return load / load.sum(axis=-1, keepdims=True)


LAGS = (1, 2, 5, 10, 20, 50, 100)


def _tv_curve(p: np.ndarray, lags: tuple[int, ...]) -> np.ndarray:
    """Mean TV distance between the shares of steps k apart, p [steps, heads, E]."""
    return np.array([0.5 * np.abs(p[k:] - p[:-k]).sum(axis=-1).mean() for k in lags])


def _profile(p: np.ndarray) -> np.ndarray:
    """Mean over steps (and heads) of the shares sorted in decreasing order: [E]."""
    return -np.sort(-p, axis=-1).reshape(-1, p.shape[-1]).mean(axis=0)


def _bursts(p: np.ndarray, n: float) -> dict[str, float]:
    """burst_prob, burst_factor, burst_experts of one layer's shares p [steps, heads, E]."""
    experts = p.shape[-1]
    if p.shape[0] < 3:
        return {"burst_prob": 0.0, "burst_factor": 8.0, "burst_experts": 2}
    avg = 0.5 * (p[:-2] + p[2:])
    excess = p[1:-1] - avg
    sd = 1.4826 * float(np.median(np.abs(excess - np.median(excess))))
    over = (excess > max(1.0 / experts, 5 * sd)) & (p[1:-1] > 2 * avg)
    hit = over.reshape(over.shape[0], -1).any(axis=1)
    if not hit.any():
        return {"burst_prob": 0.0, "burst_factor": 8.0, "burst_experts": 2}
    ratio = p[1:-1][over] / np.maximum(avg[over], 0.5 / n)
    n_hot = over.reshape(over.shape[0], -1)[hit].sum(axis=1) / p.shape[1]
    return {"burst_prob": float(hit.mean()), "burst_factor": float(np.median(ratio)),
            "burst_experts": max(round(float(np.median(n_hot))), 1)}


def _fit_layer(p: np.ndarray, n: int, top_k: int, seed: int) -> dict[str, float]:
    """The wander parameters of one layer from its shares p [steps, heads, E]."""
    from scipy.optimize import minimize

    steps, heads, experts = p.shape
    bursts = _bursts(p, n)

    def _params(x: np.ndarray) -> tuple[float, float, float, float]:
        # A half-life beyond the trace's length cannot be told from a frozen wander.
        s, spread, half, jitter = np.exp(x)
        return s, spread, min(half, float(steps)), jitter

    lags = tuple(k for k in LAGS if k <= max(steps // 4, 1))
    prof, tv = _profile(p), _tv_curve(p, lags)
    sim_steps = min(steps, 400)
    # Fixed random numbers (the generator's seed, the sampling noise's normal variates): the
    # objective is smooth in the parameters.
    noise = np.random.default_rng([seed, 2]).standard_normal((sim_steps, heads, experts))

    def simulate(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, spread, half, jitter = _params(x)
        spec = TraceSpec(kind="wander", steps=sim_steps, layers=1, shards=1,
                         experts=experts, heads=heads, top_k=top_k,
                         params={"exponent": s, "spread": spread, "half_life": half,
                                 "jitter": jitter, **bursts})
        q = cap_probabilities(wander(spec, np.random.default_rng(seed)), 1.0 / top_k)[:, 0]
        qs = np.maximum(q + np.sqrt(q * (1 - q) / n) * noise, 0.0)
        return _profile(qs), _tv_curve(qs, lags)

    def loss(x: np.ndarray) -> float:
        sp, st = simulate(x)
        e_prof = float(np.sum((sp - prof) ** 2) / np.sum(prof ** 2))
        e_tv = float(np.mean(((st - tv) / np.maximum(tv, 1e-9)) ** 2))
        return e_prof * 25.0 + e_tv  # a 20% profile error weighs as a 100% drift error

    grid = itertools.product((0.5, 1.2, 2.5), (0.1, 0.4, 1.2), (3.0, 30.0, 300.0),
                             (0.02, 0.1, 0.4))
    x0 = min((np.log(g) for g in grid), key=loss)
    best = minimize(loss, x0, method="Nelder-Mead",
                    options={"xatol": 1e-3, "fatol": 1e-7, "maxiter": 600})
    s, spread, half, jitter = _params(best.x)
    return {"exponent": float(s), "half_life": float(half), "spread": float(spread),
            "jitter": float(jitter), **bursts, "loss": float(best.fun)}


def fit_trace(trace: Trace, seed: int = 0) -> Fit:
    """Fit `wander` to `trace`, layer by layer (module docstring)."""
    if trace.num_steps < MIN_STEPS:
        raise InputError(trace.meta.source, "steps", f"{trace.num_steps} steps: a fit needs "
                         f"at least {MIN_STEPS} to see drift")
    p = shares(trace)  # [S, L, H, E]
    n = int(trace.num_shards * trace.meta.tokens_per_shard * trace.meta.top_k)
    per_layer = [_fit_layer(p[:, ly], n, trace.meta.top_k, seed + ly)
                 for ly in range(trace.num_layers)]
    params = {k: [round(float(r[k]), 6) for r in per_layer] for k in PARAMS}
    shape = {"steps": trace.num_steps, "layers": trace.num_layers, "shards": trace.num_shards,
             "heads": trace.num_heads, "experts": trace.num_experts}
    return Fit(params, trace.meta.source, shape, trace.meta.top_k, trace.meta.tokens_per_shard,
               trace.meta.model, {"objective": [round(r["loss"], 6) for r in per_layer]})


STAT_COLUMNS = ["max_over_mean", "max_over_mean_worst", "cv", "top_share", "tv_lag1",
                "tv_lag10"]


def layer_stats(trace: Trace) -> pd.DataFrame:
    """Per layer: the traces.stats imbalance figures and the drift (TV at lags 1 and 10)."""
    from traces.stats import imbalance_table

    df = imbalance_table(trace).drop(columns=["tokens_per_step"])
    p = shares(trace)
    for lag in (1, 10):
        tv = (0.5 * np.abs(p[lag:] - p[:-lag]).sum(axis=-1)).mean(axis=(0, 2)) \
            if trace.num_steps > lag else np.full(trace.num_layers, np.nan)
        df[f"tv_lag{lag}"] = tv
    return df


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp
    return float(ks_2samp(a, b).statistic)


def goodness(trace: Trace, fit: Fit, seed: int = 0, zipf_only: bool = False
             ) -> pd.DataFrame:
    """Per layer, each statistic of the recorded trace, of a trace generated from the fit
    (same shape, top-k and tokens per shard), their relative difference, and the KS distance
    of the per-step max/mean distributions."""
    params = fit.params
    if zipf_only:
        params = {**params, "spread": [0.0] * len(params["spread"]),
                  "jitter": [0.0] * len(params["jitter"]),
                  "burst_prob": [0.0] * len(params["burst_prob"])}
    synth = generate(fit.spec(seed=seed, params=params))
    real_s, fit_s = layer_stats(trace), layer_stats(synth)
    out = pd.DataFrame({"layer": real_s["layer"]})
    for c in STAT_COLUMNS:
        out[f"{c}_real"] = real_s[c]
        out[f"{c}_fit"] = fit_s[c]
        out[f"{c}_err"] = (fit_s[c] - real_s[c]) / real_s[c].where(real_s[c] != 0)
    def mom(t: Trace) -> np.ndarray:
        load = t.expert_load().astype(np.float64)
        return load.max(axis=-1) / load.mean(axis=-1)  # [S, L, H]
    a, b = mom(trace), mom(synth)
    out["ks_max_over_mean"] = [_ks(a[:, ly].ravel(), b[:, ly].ravel())
                               for ly in range(trace.num_layers)]
    return out


def summary(gof: pd.DataFrame) -> dict[str, float]:
    """Median |relative error| of each statistic over layers, and the median KS distance."""
    out = {c: float(np.nanmedian(np.abs(gof[f"{c}_err"]))) for c in STAT_COLUMNS}
    out["ks_max_over_mean"] = float(np.median(gof["ks_max_over_mean"]))
    return out
