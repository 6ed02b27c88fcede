"""HP x EP: Head Parallel across head groups, Expert Parallel inside each group.

Where a Multi-Head LatentMoE has fewer heads than GPUs (HP alone needs the GPUs to divide the
heads, kerner-lab/Sparse-GPT-Pretraining's `num_head % world_size == 0`), the N ranks form G
head groups of N / G ranks (a group is a node by default: HP's fixed-size all-to-all crosses
nodes, EP's k-fold one stays on NVLink). Rank r is (group r // (N/G), local r % (N/G)).

Placement (`hpxep_placement`): head h belongs to group h mod G; its E experts are cut into
contiguous blocks over the group's N / G ranks (expert e on local rank e * (N/G) // E).

Traffic of one (step, layer) (`hpxep_traffic`, a planner.traffic.LayerTraffic):
- ("fwd", "dispatch"), the HP stage: each source splits its tokens into N / G equal parts
  (the first T mod (N/G) parts one token more) and sends part j's sub-tokens of group g's
  heads to rank (g, j): T_part * heads_of(g) rows of head_dim, fixed by the batch. Its
  combine is the transpose; backward mirrors both.
- ("fwd", "ep_dispatch"), the EP stage inside each group: the rows rank (g, j) routed (all
  sources' part-j sub-tokens of g's heads), one per chosen expert, to the expert's rank of
  the group; ("fwd", "ep_combine") is its transpose, backward mirrors both. The trace gives
  counts per source rank, not per token part: a source's counts of each expert are dealt
  over its N / G parts as evenly as integers allow (parts in order).
- routed[d]: the sub-tokens rank d routes; copies["head_pack"]: the latent's heads packed
  group-major before the HP all-to-all (T x latent bytes a rank, as HP).
- Parameters: a rank owns its experts; the latent projections and every head's router are
  counted as replicated on every rank (a head's router is really replicated over its group's
  N / G ranks only: its all-reduce with the latent's over all ranks is an upper bound).
With G = N this is HP (one rank a group, no EP stage traffic but the diagonal); with G = 1 it is
EP over all the heads' experts after an HP stage that stays on each rank.
"""

from __future__ import annotations

import numpy as np

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.placement import Placement, _canonical
from planner.traffic import Key, LayerTraffic, _set, _tokens_per_source, split_tokens


def check_groups(model: ModelConfig, num_ranks: int, groups: int, source: str = "config"
                 ) -> int:
    """The head groups, validated: a Multi-Head LatentMoE, G dividing the ranks and the heads,
    and each group's ranks dividing nothing in particular (EP blocks may differ by one)."""
    if model.num_heads < 2:
        raise InputError(source, "model.num_heads", "HP x EP needs a Multi-Head LatentMoE model "
                         "(num_heads > 1)")
    if groups < 1 or num_ranks % groups:
        raise InputError(source, "parallel.hpxep_groups", f"{groups} head groups do not divide "
                         f"the {num_ranks} ranks")
    if model.num_heads % groups:
        raise InputError(source, "parallel.hpxep_groups", f"{groups} head groups do not divide "
                         f"the {model.num_heads} heads")
    if model.num_experts < num_ranks // groups:
        raise InputError(source, "parallel.hpxep_groups", f"{num_ranks // groups} ranks a group "
                         f"exceed the {model.num_experts} experts of a head")
    return groups


def hpxep_placement(model: ModelConfig, num_ranks: int, groups: int) -> Placement:
    """Expert e of head h on rank (h mod G) * (N/G) + e * (N/G) // E."""
    check_groups(model, num_ranks, groups)
    per = num_ranks // groups
    e = model.num_experts
    g = np.arange(model.total_experts, dtype=np.int64)
    head, ex = g // e, g % e
    rank = (head % groups) * per + ex * per // e
    return _canonical("hpxep", num_ranks, model.total_experts, g, rank,
                      np.ones(model.total_experts))


def _parts(n: np.ndarray, k: int) -> np.ndarray:
    """int64[..., k]: n dealt into k parts, the first n mod k one more."""
    n = np.asarray(n, dtype=np.int64)
    j = np.arange(k, dtype=np.int64)
    return n[..., None] // k + (j < (n % k)[..., None])


def _dealt(counts: np.ndarray, t: int, k: int, bounds: np.ndarray) -> np.ndarray:
    """int64[parts, E]: pairs of each expert among the tokens of each part [bounds[j],
    bounds[j+1]) when the expert-ordered pairs (counts [E], t * k of them) are dealt
    column-major over t tokens: pair p goes to token p mod t."""
    flat = np.repeat(np.arange(len(counts)), counts)
    token = np.arange(flat.size) % max(t, 1)
    part = np.searchsorted(bounds, token, side="right") - 1
    out = np.zeros((len(bounds) - 1, len(counts)), dtype=np.int64)
    np.add.at(out, (part, flat), 1)
    return out


def mid_counts_of(model: ModelConfig, counts: np.ndarray, groups: int) -> np.ndarray:
    """int64[N, H, E]: the pairs each rank (g, j) routes, from per-source counts [N, H, E]:
    source s's part j of tokens, dealt as forced routing deals them (module docstring)."""
    n, h, e = counts.shape
    per = n // groups
    t_src = _tokens_per_source(model, counts)
    mid = np.zeros((n, h, e), dtype=np.int64)
    for s in range(n):
        bounds = np.concatenate([[0], np.cumsum(_parts(t_src[s], per))])
        for hh in range(h):
            mid[(hh % groups) * per + np.arange(per), hh] += _dealt(
                counts[s, hh], int(t_src[s]), model.top_k, bounds)
    return mid


def hpxep_traffic(model: ModelConfig, placement: Placement, counts: np.ndarray | None,
                  groups: int, mid_counts: np.ndarray | None = None,
                  source_tokens: np.ndarray | None = None) -> LayerTraffic:
    """Every byte and token count of one (step, layer): see the module docstring. `counts` is
    int [N, H, E] per source rank (the trace's); `mid_counts` [N, H, E] the pairs each rank
    routes in the EP stage, where known (else `mid_counts_of`); `source_tokens` [N] the tokens
    each source brings, where `counts` is not given (the runtime knows only `mid_counts`)."""
    n, e_total = placement.num_ranks, placement.num_experts
    h, e = model.num_heads, model.num_experts
    check_groups(model, n, groups, "placement")
    per = n // groups
    if counts is not None:
        counts = np.asarray(counts)
        if counts.shape != (n, h, e):
            raise InputError("counts", "shape", f"expected [N, H, E] = {[n, h, e]}, got "
                             f"{list(counts.shape)}")
        if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise InputError("counts", "tokens", "counts must be non-negative integers")
        t_src = _tokens_per_source(model, counts)
    elif source_tokens is None or mid_counts is None:
        raise InputError("hpxep_traffic", "counts", "give counts, or mid_counts with "
                         "source_tokens")
    else:
        t_src = np.asarray(source_tokens, dtype=np.int64)
    group_of_rank = np.arange(n) // per
    local_of_rank = np.arange(n) % per
    heads_of_group = h // groups
    head_group = np.arange(h) % groups

    # HP stage: source s's part j of its tokens, group g's heads, to rank (g, j).
    part = _parts(t_src, per)                                  # [N, per]
    hp_rows = part[:, local_of_rank] * heads_of_group          # [N src, N dst]
    mid = mid_counts_of(model, counts, groups) if mid_counts is None else \
        np.asarray(mid_counts, dtype=np.int64)
    per_head = hp_rows.sum(axis=0) // heads_of_group  # sub-tokens a rank gets of each head
    want = np.where(head_group[None, :] == group_of_rank[:, None],
                    per_head[:, None] * model.top_k, 0)
    if mid.shape != (n, h, e) or (mid.sum(axis=2) != want).any():
        raise InputError("mid_counts", "tokens", "each rank must route top_k experts for each "
                         "sub-token of its group's heads it received")
    c2 = mid.reshape(n, e_total)
    tokens = split_tokens(c2, placement)
    onehot = np.zeros((placement.num_replicas, n), dtype=np.int64)
    onehot[np.arange(placement.num_replicas), placement.replica_rank] = 1
    ep_rows = tokens @ onehot
    expert_tokens = np.zeros((n, e_total), dtype=np.int64)
    np.add.at(expert_tokens, (placement.replica_rank, placement.replica_expert), tokens.sum(0))

    db = model.dtype_bytes
    width = model.expert_dim * db
    phases: dict[Key, np.ndarray] = {}
    rows: dict[Key, np.ndarray] = {}
    row_bytes: dict[Key, int] = {}
    for pass_, fwd_name, back_name, mtx in (("fwd", "dispatch", "combine", hp_rows),
                                            ("fwd", "ep_dispatch", "ep_combine", ep_rows)):
        _set(phases, rows, row_bytes, (pass_, fwd_name), mtx, width)
        _set(phases, rows, row_bytes, (pass_, back_name), mtx.T, width)
        _set(phases, rows, row_bytes, ("bwd", back_name), mtx, width)
        _set(phases, rows, row_bytes, ("bwd", fwd_name), mtx.T, width)
    routed = hp_rows.sum(axis=0)
    copies = {"head_pack": t_src * model.latent_dim * db} if n > 1 else {}
    owned = placement.slots_per_rank() * model.expert_params * db
    replicated = 2 * model.d_model * model.latent_dim * db + e_total * model.expert_dim * db
    return LayerTraffic(placement, tokens, expert_tokens, phases, rows, row_bytes,
                        source_tokens=t_src.astype(np.int64), routed=routed.astype(np.int64),
                        copies=copies, owned_param_bytes=owned.astype(np.int64),
                        replicated_param_bytes=int(replicated))
