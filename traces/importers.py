"""Importers: routing recorded by other tools, turned into moesim traces (`moesim trace import`).

Each reader checks its input as it goes and raises InputError naming the file (or archive
member) and the field at the first thing that does not fit, so a bad file gives one line, not a
traceback; the trace it builds is then validated like any other (traces.schema).

Formats
-------
- ``smartmoe``: SmartMoE-AE's training logs (thu-pacman/SmartMoE-AE ``moe_trace/``), a .tar.xz
  archive or its unpacked folder. One file ``table_iter{I}_rank{R}.log`` per (iteration, rank);
  one line per MoE layer, ``{layer}:[[E counts] x M]``: the tokens each of the rank's M
  micro-batches sent to each expert (floats with integral values). A trace step is one logged
  iteration, a shard is one rank (its micro-batches summed: ``micro_batches_as_shards`` keeps
  them apart, shard = rank * M + micro-batch). The logs do not say top-k: it is an argument
  (2 for the artifact's GPT-MoE). Every (iteration, rank) of the grid must be present.
- ``histogram``: per-layer expert selection counts, CSV with columns
  ``model,top_k,domain,layer,expert,selections`` (allenai/OLMoE ``scripts/routing_output``,
  converted). A histogram has no time axis and no shards, so the trace is *sampled* from it
  (`expand_histogram`): layer l's distribution is p_l = selections / sum (capped at 1/top_k, as
  every generator's); with ``concentration`` alpha > 0 each step draws its own
  p ~ Dirichlet(alpha * p_l) (step-to-step drift of the expected load; alpha = 0 keeps p_l
  fixed), and every shard's tokens_per_shard * top_k slots are a multinomial draw from it
  (traces.generators.sample_counts). The histogram's layers become the trace's layers in order.
- ``megatron``: Megatron-Core's router trace (``--moe-routing-trace-path``,
  megatron/core/transformer/moe/router_trace.py): a folder of ``router_trace_rank{R}.jsonl``,
  one JSON record per (step, block, layer) with ``step, layer, rank, num_tokens, topk,
  top_indices`` ([num_tokens][topk] expert ids; records with an ``mtp_idx`` or a block other
  than "decoder" are skipped). A shard is a rank; the layers present (MoE layers only) become
  the trace's layers in increasing order. The number of experts is not in the records: it is
  an argument.
- ``hf``: Hugging Face ``output_router_logits`` dumps: one file per step (a file, or a folder
  of files taken in name order), each the model output's ``router_logits`` saved with
  ``torch.save`` (a tuple or list with one [batch * seq, E] or [batch, seq, E] tensor per MoE
  layer, or a dict holding it under "router_logits") or as .npz (arrays ``layer0``, ``layer1``,
  ... or one [layers, tokens, E] array ``router_logits``). Each token's top-k experts are the
  k largest logits (what softmax-then-top-k picks, ties to the lower id); the tokens are cut
  into ``shards`` equal contiguous groups (batch rows first).
"""

from __future__ import annotations

import json
import lzma
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.errors import InputError
from traces.generators import sample_counts
from traces.schema import Trace, TraceMeta

SMARTMOE_NAME = re.compile(r"(?:^|/)table_iter(\d+)_rank(\d+)\.log$")
MEGATRON_NAME = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
HISTOGRAM_COLUMNS = ["model", "top_k", "domain", "layer", "expert", "selections"]


# -- SmartMoE-AE -------------------------------------------------------------------------------
def _smartmoe_files(src: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every table_iter*_rank*.log, from a .tar.xz (streamed) or a folder."""
    if src.is_dir():
        files = sorted(p for p in src.rglob("table_iter*_rank*.log"))
        if not files:
            raise InputError(src, "files", "no table_iter{I}_rank{R}.log files in this folder")
        for p in files:
            yield str(p), p.read_bytes()
        return
    try:
        with tarfile.open(src, mode="r|*") as tf:
            for m in tf:
                if m.isfile() and SMARTMOE_NAME.search(m.name):
                    f = tf.extractfile(m)
                    yield f"{src}:{m.name}", f.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise InputError(src, "archive", f"not a readable tar archive: {e}") from None


def _parse_smartmoe_log(name: str, data: bytes, experts: int | None
                        ) -> np.ndarray:
    """float64 [layers, micro_batches, experts] from one log file's text."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(name, "file", "not an ASCII text log") from None
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        raise InputError(name, "file", "empty log")
    body = []
    for i, ln in enumerate(lines):
        head, sep, rest = ln.partition(":")
        if not sep or head.strip() != str(i):
            raise InputError(name, f"line {i + 1}", f"expected '{i}:[[...], ...]' (layer {i} in "
                             f"order), got {ln[:40]!r}")
        rest = rest.strip()
        if not (rest.startswith("[[") and rest.endswith("]]")) or rest.count("[") != \
                rest.count("]"):
            raise InputError(name, f"line {i + 1}", "expected a list of lists of counts")
        body.append(rest)
    mbs = body[0].count("[") - 1
    per_line = body[0].count(",") + 1
    for i, b in enumerate(body):
        if b.count("[") - 1 != mbs or b.count(",") + 1 != per_line:
            raise InputError(name, f"line {i + 1}", f"layer {i} has another number of "
                             "micro-batches or experts than layer 0")
    if per_line % mbs:
        raise InputError(name, "line 1", "micro-batches of unequal length")
    e = per_line // mbs
    if experts is not None and e != experts:
        raise InputError(name, "line 1", f"{e} experts per micro-batch, other files have "
                         f"{experts}")
    flat = ",".join(body).replace("[", " ").replace("]", " ")
    try:
        values = np.array(flat.split(","), dtype=np.float64)
    except ValueError as err:
        raise InputError(name, "counts", f"not a number: {err}") from None
    return values.reshape(len(body), mbs, e)


def import_smartmoe(src: str | Path, top_k: int = 2, model: str = "smartmoe-gpt-moe",
                    micro_batches_as_shards: bool = False) -> Trace:
    """Read SmartMoE-AE logs (module docstring) into a trace [iterations, layers, ranks, 1, E]."""
    src = Path(src)
    if not src.exists():
        raise InputError(src, "file", "no such file or folder")
    if top_k < 1:
        raise InputError(src, "--top-k", f"must be >= 1, got {top_k}")
    blocks: dict[tuple[int, int], np.ndarray] = {}
    shape = None
    for name, data in _smartmoe_files(src):
        it, rank = map(int, SMARTMOE_NAME.search(name).groups())
        if (it, rank) in blocks:
            raise InputError(name, "file", f"iteration {it} rank {rank} appears twice")
        block = _parse_smartmoe_log(name, data, None if shape is None else shape[2])
        if shape is None:
            shape = block.shape
        elif block.shape != shape:
            raise InputError(name, "layers", f"{block.shape[0]} layers x {block.shape[1]} "
                             f"micro-batches; the first file has {shape[0]} x {shape[1]}")
        if (block < 0).any() or (block != np.rint(block)).any():
            raise InputError(name, "counts", "token counts must be integers >= 0")
        sums = block.sum(axis=2)
        if (sums != sums.flat[0]).any():
            ly, mb = np.argwhere(sums != sums.flat[0])[0]
            raise InputError(name, f"layer {ly}", f"micro-batch {mb} routes {sums[ly, mb]:g} "
                             f"token-expert pairs, micro-batch 0 of layer 0 {sums.flat[0]:g}")
        blocks[(it, rank)] = block
    if not blocks:
        raise InputError(src, "files", "no table_iter{I}_rank{R}.log files in the archive")
    iters = sorted({k[0] for k in blocks})
    ranks = sorted({k[1] for k in blocks})
    if ranks != list(range(len(ranks))):
        raise InputError(src, "rank", f"ranks {ranks[:3]}...{ranks[-3:]} are not 0..N-1")
    missing = [(i, r) for i in iters for r in ranks if (i, r) not in blocks]
    if missing:
        raise InputError(src, "files", f"{len(missing)} (iteration, rank) logs missing, first: "
                         f"table_iter{missing[0][0]}_rank{missing[0][1]}.log")
    layers, mbs, e = shape
    pairs = {float(b.sum(axis=2).flat[0]) for b in blocks.values()}
    if len(pairs) != 1:
        raise InputError(src, "counts", "micro-batches of different files route different "
                         "numbers of token-expert pairs")
    pair_count = int(pairs.pop())
    if pair_count % top_k:
        raise InputError(src, "--top-k", f"a micro-batch routes {pair_count} token-expert "
                         f"pairs: not a multiple of top-k = {top_k}")
    mb_tokens = pair_count // top_k
    arr = np.stack([np.stack([blocks[(i, r)] for r in ranks]) for i in iters])
    # [iters, ranks, layers, mbs, E] -> [iters, layers, ranks, mbs, E]
    arr = arr.transpose(0, 2, 1, 3, 4).astype(np.int32)
    if micro_batches_as_shards:
        counts = arr.reshape(len(iters), layers, len(ranks) * mbs, 1, e)
        tokens = mb_tokens
    else:
        counts = arr.sum(axis=3, dtype=np.int32)[:, :, :, None, :]
        tokens = mb_tokens * mbs
    stride = int(np.diff(iters).min()) if len(iters) > 1 else 0
    meta = TraceMeta(model=model, source=f"smartmoe:{src.name}", tokens_per_shard=tokens,
                     top_k=top_k, generator={
                         "format": "smartmoe", "iterations": [iters[0], iters[-1], stride],
                         "ranks": len(ranks), "micro_batches": mbs,
                         "micro_batches_as_shards": micro_batches_as_shards})
    trace = Trace(np.ascontiguousarray(counts), meta)
    trace.validate(str(src))
    return trace


# -- per-layer histograms (OLMoE) --------------------------------------------------------------
def read_histogram(src: str | Path, model: str | None = None, domain: str | None = None
                   ) -> tuple[np.ndarray, list[int], int, str, str]:
    """(selections [layers, E], layer ids, top_k, model, domain) of one model and domain."""
    src = Path(src)
    if not src.is_file():
        raise InputError(src, "file", "no such file")
    try:
        df = pd.read_csv(src)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(src, "file", f"not readable CSV: {e}") from None
    missing = [c for c in HISTOGRAM_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(src, missing[0], f"missing column; need {', '.join(HISTOGRAM_COLUMNS)}")
    for col in ("top_k", "layer", "expert", "selections"):
        if not pd.api.types.is_integer_dtype(df[col]) or (df[col] < 0).any():
            raise InputError(src, col, "must hold integers >= 0")
    models = list(dict.fromkeys(df["model"]))
    model = model or models[0]
    if model not in models:
        raise InputError(src, "--model", f"{model!r} not in the file; it has {', '.join(models)}")
    df = df[df["model"] == model]
    domains = list(dict.fromkeys(df["domain"]))
    domain = domain or domains[0]
    if domain not in domains:
        raise InputError(src, "--domain", f"{domain!r} not recorded for {model}; it has "
                         f"{', '.join(domains)}")
    df = df[df["domain"] == domain]
    ks = df["top_k"].unique()
    if len(ks) != 1 or ks[0] < 1:
        raise InputError(src, "top_k", f"{model}/{domain} has top_k values {sorted(ks)}")
    if df.duplicated(subset=["layer", "expert"]).any():
        raise InputError(src, "expert", f"{model}/{domain}: a (layer, expert) appears twice")
    layers = sorted(df["layer"].unique().tolist())
    e = int(df["expert"].max()) + 1
    sel = np.zeros((len(layers), e), dtype=np.float64)
    li = np.searchsorted(layers, df["layer"].to_numpy())
    sel[li, df["expert"].to_numpy()] = df["selections"].to_numpy()
    if (sel.sum(axis=1) == 0).any():
        raise InputError(src, "selections", f"{model}/{domain}: a layer with no selections")
    return sel, layers, int(ks[0]), model, domain


def expand_histogram(src: str | Path, steps: int, shards: int, tokens_per_shard: int,
                     model: str | None = None, domain: str | None = None,
                     concentration: float = 0.0, seed: int = 0) -> Trace:
    """A trace of `steps` steps sampled from one model/domain's per-layer histogram (module
    docstring: the sampling model)."""
    sel, layers, k, model, domain = read_histogram(src, model, domain)
    for name, v in (("--steps", steps), ("--shards", shards),
                    ("--tokens-per-shard", tokens_per_shard)):
        if v < 1:
            raise InputError(src, name, f"must be >= 1, got {v}")
    if concentration < 0:
        raise InputError(src, "--concentration", f"must be >= 0, got {concentration}")
    if k > sel.shape[1]:
        raise InputError(src, "top_k", f"{k} exceeds the {sel.shape[1]} experts")
    seeds = np.random.SeedSequence(seed)
    p = sel / sel.sum(axis=1, keepdims=True)  # [L, E]
    if concentration > 0:
        rng = np.random.default_rng(seeds.spawn(1)[0])
        # Dirichlet via normalised gammas (numpy's dirichlet takes one alpha vector per call).
        g = rng.standard_gamma(np.broadcast_to(concentration * p + 1e-12, (steps, *p.shape)))
        ps = g / g.sum(axis=-1, keepdims=True)
    else:
        seeds.spawn(1)
        ps = np.broadcast_to(p, (steps, *p.shape))
    counts, sampler = sample_counts(np.ascontiguousarray(ps[:, :, None, :]), shards,
                                    tokens_per_shard, k, seeds)
    meta = TraceMeta(model=model, source=f"histogram:{Path(src).name}",
                     tokens_per_shard=tokens_per_shard, top_k=k, generator={
                         "format": "histogram", "domain": domain, "layers": layers,
                         "concentration": concentration, "seed": seed, "sampler": sampler})
    trace = Trace(counts, meta)
    trace.validate(str(src))
    return trace


# -- Megatron-Core router trace ----------------------------------------------------------------
def import_megatron(src: str | Path, experts: int, model: str = "megatron") -> Trace:
    """Read a Megatron-Core router-trace folder (module docstring)."""
    src = Path(src)
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = sorted((p for p in src.iterdir() if MEGATRON_NAME.match(p.name)),
                       key=lambda p: int(MEGATRON_NAME.match(p.name).group(1)))
    else:
        raise InputError(src, "file", "no such file or folder")
    if not files:
        raise InputError(src, "files", "no router_trace_rank{R}.jsonl files in this folder")
    if experts < 1:
        raise InputError(src, "--experts", f"must be >= 1, got {experts}")
    cells: dict[tuple[int, int, int], np.ndarray] = {}
    top_k = tokens = None
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(where, "record", f"not JSON: {e}") from None
                if not isinstance(rec, dict):
                    raise InputError(where, "record", "not a JSON object")
                if rec.get("mtp_idx") is not None or rec.get("block", "decoder") != "decoder":
                    continue
                for key in ("step", "layer", "rank", "num_tokens", "topk"):
                    if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool) \
                            or rec[key] < 0:
                        raise InputError(where, key, "missing or not an integer >= 0")
                idx = rec.get("top_indices")
                try:
                    arr = np.asarray(idx, dtype=np.int64)
                except (TypeError, ValueError):
                    raise InputError(where, "top_indices", "not a list of integer lists") \
                        from None
                if arr.shape != (rec["num_tokens"], rec["topk"]):
                    raise InputError(where, "top_indices", f"shape {list(arr.shape)}, but "
                                     f"num_tokens x topk = {rec['num_tokens']} x {rec['topk']}")
                if arr.size and (arr.min() < 0 or arr.max() >= experts):
                    raise InputError(where, "top_indices", f"expert id outside [0, {experts}) "
                                     "(--experts)")
                if rec["topk"] > 1 and (np.diff(np.sort(arr, axis=1), axis=1) == 0).any():
                    raise InputError(where, "top_indices", "a token picks one expert twice")
                top_k = rec["topk"] if top_k is None else top_k
                tokens = rec["num_tokens"] if tokens is None else tokens
                if rec["topk"] != top_k or rec["num_tokens"] != tokens:
                    raise InputError(where, "num_tokens", f"{rec['num_tokens']} tokens x top-"
                                     f"{rec['topk']}; earlier records have {tokens} x "
                                     f"top-{top_k} (a trace needs the same for every rank)")
                key = (rec["step"], rec["layer"], rec["rank"])
                if key in cells:
                    raise InputError(where, "step", f"step {key[0]} layer {key[1]} rank "
                                     f"{key[2]} recorded twice")
                cells[key] = np.bincount(arr.reshape(-1), minlength=experts)
    if not cells:
        raise InputError(src, "records", "no decoder router records")
    steps = sorted({k[0] for k in cells})
    layers = sorted({k[1] for k in cells})
    ranks = sorted({k[2] for k in cells})
    counts = np.zeros((len(steps), len(layers), len(ranks), 1, experts), dtype=np.int32)
    si = {s: i for i, s in enumerate(steps)}
    li = {v: i for i, v in enumerate(layers)}
    ri = {v: i for i, v in enumerate(ranks)}
    for s in steps:
        for ly in layers:
            for r in ranks:
                c = cells.get((s, ly, r))
                if c is None:
                    raise InputError(src, "records", f"no record for step {s} layer {ly} "
                                     f"rank {r} (every rank must record every MoE layer)")
                counts[si[s], li[ly], ri[r], 0] = c
    meta = TraceMeta(model=model, source=f"megatron:{src.name}", tokens_per_shard=tokens,
                     top_k=top_k, generator={"format": "megatron", "steps": steps,
                                             "layers": layers, "ranks": ranks})
    trace = Trace(counts, meta)
    trace.validate(str(src))
    return trace


# -- Hugging Face output_router_logits ---------------------------------------------------------
def _hf_layers(path: Path) -> list[np.ndarray]:
    """The per-layer logits [tokens, E] of one dump file."""
    if path.suffix == ".npz":
        try:
            z = np.load(path)
        except (OSError, ValueError) as e:
            raise InputError(path, "file", f"not a readable .npz: {e}") from None
        if "router_logits" in z.files:
            arr = z["router_logits"]
            if arr.ndim != 3:
                raise InputError(path, "router_logits", f"expected [layers, tokens, E], got "
                                 f"shape {list(arr.shape)}")
            return list(arr)
        names = sorted((n for n in z.files if re.fullmatch(r"layer\d+", n)),
                       key=lambda n: int(n[5:]))
        if not names:
            raise InputError(path, "arrays", "expected 'router_logits' or 'layer0', 'layer1', ...")
        return [z[n] for n in names]
    import torch  # only this format needs it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise InputError(path, "file", f"not a readable torch.save file: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict):
        if "router_logits" not in obj:
            raise InputError(path, "router_logits", "a dict without 'router_logits'")
        obj = obj["router_logits"]
    if isinstance(obj, torch.Tensor):
        obj = list(obj) if obj.dim() == 3 else [obj]
    if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise InputError(path, "router_logits", "expected a tuple/list of tensors, one per "
                         "MoE layer")
    return [t.detach().float().numpy() for t in obj]


def import_hf(src: str | Path, top_k: int, shards: int = 1, model: str = "hf") -> Trace:
    """Read Hugging Face router-logit dumps (module docstring), one file per step."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".npz"))
    elif src.is_file():
        files = [src]
    else:
        raise InputError(src, "file", "no such file or folder")
    if not files:
        raise InputError(src, "files", "no .pt/.pth/.bin/.npz dumps in this folder")
    if top_k < 1 or shards < 1:
        raise InputError(src, "--top-k" if top_k < 1 else "--shards", "must be >= 1")
    steps = []
    shape = None
    for path in files:
        layers = _hf_layers(path)
        per = []
        for i, lg in enumerate(layers):
            lg = np.asarray(lg)
            if lg.ndim == 3:
                lg = lg.reshape(-1, lg.shape[-1])
            if lg.ndim != 2 or lg.shape[0] == 0:
                raise InputError(path, f"layer {i}", f"expected [tokens, E] or [batch, seq, E] "
                                 f"logits, got shape {list(np.shape(lg))}")
            if not np.isfinite(lg).all():
                raise InputError(path, f"layer {i}", "non-finite router logits")
            t, e = lg.shape
            if top_k > e:
                raise InputError(path, "--top-k", f"{top_k} exceeds the {e} experts")
            if t % shards:
                raise InputError(path, "--shards", f"{shards} shards do not divide {t} tokens")
            # k largest logits, ties to the lower expert id (stable sort of -logits).
            idx = np.argsort(-lg, axis=1, kind="stable")[:, :top_k]
            owner = np.repeat(np.arange(shards), t // shards)
            c = np.zeros((shards, e), dtype=np.int32)
            np.add.at(c, (np.repeat(owner, top_k), idx.reshape(-1)), 1)
            per.append(c)
        here = (len(per), *per[0].shape)
        if shape is None:
            shape = here
        elif here != shape or any(c.shape != per[0].shape for c in per):
            raise InputError(path, "router_logits", f"{len(per)} layers x {per[0].shape[1]} "
                             f"experts; the first dump has {shape[0]} x {shape[2]}")
        steps.append(np.stack(per))
    counts = np.stack(steps)[:, :, :, None, :]
    tokens = int(counts[0, 0, 0, 0].sum()) // top_k
    meta = TraceMeta(model=model, source=f"hf:{src.name}", tokens_per_shard=tokens, top_k=top_k,
                     generator={"format": "hf", "files": [p.name for p in files]})
    trace = Trace(np.ascontiguousarray(counts, dtype=np.int32), meta)
    trace.validate(str(src))
    return trace


FORMATS = ("smartmoe", "histogram", "megatron", "hf")
