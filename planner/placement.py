"""Expert placement: which rank runs which expert, and what share of its tokens each copy takes.

One `Placement` describes one (step, layer) for any strategy as a list of *replicas*: replica i
runs global expert `replica_expert[i]` on rank `replica_rank[i]` and takes the fraction
`replica_share[i]` of that expert's tokens from every source rank. EP is one replica per expert
(plus, for the FlexMoE/SmartMoE-style baseline, extra replicas of hot experts), HP places every
expert of head h on rank h mod N, and FSEP replicas come from the re-layout solver in
`planner.relayout`.

Global expert ids follow docs/interfaces.md: expert e of head h is `g = h * E + e`.
Constructors return replicas in canonical order (by expert, then rank); consumers split a
source's tokens of expert g over g's replicas in replica order.

FSEP as LAER-MoE runs it fills every one of a rank's C slots, duplicates allowed: a replica
fills `replica_slots[i]` >= 1 slots of its rank (LAER-MoE's A[expert][device] counts,
PKU-DAIR/Hetu-Galvatron branch laer-moe, csrc/greedy_balancer.cpp), and its weights are
gathered once per slot. `routing` says how a source's tokens of an expert are split over its
replicas (planner.traffic.split_tokens): "shares" by `replica_share` (the same for every
source), or "node_local" (LAER-MoE's smart routing: evenly by slots among the replicas in the
source's own node of `node_size` ranks, over all replicas only when the node has none;
`replica_share` then holds the slot fractions, for reports only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config import STRATEGIES, ModelConfig
from moesim.errors import InputError

SHARE_TOL = 1e-6
ROUTINGS = ("shares", "node_local")


@dataclass(frozen=True, eq=False)
class Placement:
    """Replicas of one (step, layer). Validated on construction; arrays are read-only."""

    strategy: str
    num_ranks: int
    num_experts: int
    replica_expert: np.ndarray  # int64[R]
    replica_rank: np.ndarray  # int64[R]
    replica_share: np.ndarray  # float64[R]
    source: str = "placement"
    replica_slots: np.ndarray | None = None  # int64[R], slots each replica fills (default 1)
    routing: str = "shares"  # "shares" | "node_local"
    node_size: int = 0  # ranks per node for node_local routing (0: one node)

    def __post_init__(self) -> None:
        if self.replica_slots is None:
            object.__setattr__(self, "replica_slots", np.ones(len(np.reshape(
                self.replica_expert, -1)), dtype=np.int64))
        for name, dtype in (("replica_expert", np.int64), ("replica_rank", np.int64),
                            ("replica_share", np.float64), ("replica_slots", np.int64)):
            arr = np.array(getattr(self, name), dtype=dtype, copy=True).reshape(-1)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        self._validate()

    def _validate(self) -> None:
        src, n, e = self.source, self.num_ranks, self.num_experts
        if self.strategy not in STRATEGIES:
            raise InputError(src, "strategy", f"{self.strategy!r} is not one of "
                             f"{', '.join(STRATEGIES)}")
        if n < 1:
            raise InputError(src, "num_ranks", f"must be >= 1, got {n}")
        if e < 1:
            raise InputError(src, "num_experts", f"must be >= 1, got {e}")
        ex, rk, sh = self.replica_expert, self.replica_rank, self.replica_share
        if not (len(ex) == len(rk) == len(sh) == len(self.replica_slots)):
            raise InputError(src, "replicas", "replica_expert, replica_rank, replica_share "
                             f"and replica_slots differ in length ({len(ex)}, {len(rk)}, "
                             f"{len(sh)}, {len(self.replica_slots)})")
        if len(ex) and self.replica_slots.min() < 1:
            raise InputError(src, "replica_slots", "a replica fills at least one slot")
        if self.routing not in ROUTINGS:
            raise InputError(src, "routing", f"{self.routing!r} is not one of "
                             f"{', '.join(ROUTINGS)}")
        if self.node_size < 0 or (self.node_size and n % self.node_size):
            raise InputError(src, "node_size", f"{self.node_size} does not divide the {n} "
                             "ranks")
        if len(ex) and (ex.min() < 0 or ex.max() >= e):
            raise InputError(src, "replica_expert", f"expert id outside [0, {e})")
        if len(rk) and (rk.min() < 0 or rk.max() >= n):
            raise InputError(src, "replica_rank", f"rank outside [0, {n})")
        if not np.all(np.isfinite(sh)) or (len(sh) and sh.min() < 0):
            raise InputError(src, "replica_share", "shares must be finite and >= 0")
        pair = ex * n + rk
        if len(np.unique(pair)) != len(pair):
            dup = int(pair[np.argmax(np.bincount(pair) > 1)]) if len(pair) else 0
            raise InputError(src, "replicas", f"expert {dup // n} has two replicas on rank "
                             f"{dup % n}")
        count = np.bincount(ex, minlength=e)
        if (count == 0).any():
            raise InputError(src, "replica_expert",
                             f"expert {int(np.argmax(count == 0))} has no replica")
        total = np.bincount(ex, weights=sh, minlength=e)
        bad = np.abs(total - 1.0) > SHARE_TOL
        if bad.any():
            g = int(np.argmax(bad))
            raise InputError(src, "replica_share",
                             f"shares of expert {g} sum to {total[g]:.9g}, not 1")

    @property
    def num_replicas(self) -> int:
        return len(self.replica_expert)

    def share_matrix(self) -> np.ndarray:
        """float64[E_total, N]: the fraction of expert g's tokens that rank r runs."""
        m = np.zeros((self.num_experts, self.num_ranks))
        m[self.replica_expert, self.replica_rank] = self.replica_share
        return m

    def hosted(self) -> np.ndarray:
        """bool[E_total, N]: rank r holds a replica of expert g."""
        m = np.zeros((self.num_experts, self.num_ranks), dtype=bool)
        m[self.replica_expert, self.replica_rank] = True
        return m

    def replicas_per_rank(self) -> np.ndarray:
        """int64[N]: replicas (expert slots) each rank uses."""
        return np.bincount(self.replica_rank, minlength=self.num_ranks).astype(np.int64)

    def slots_per_rank(self) -> np.ndarray:
        """int64[N]: expert slots each rank fills (duplicates count once per slot)."""
        return np.bincount(self.replica_rank, weights=self.replica_slots,
                           minlength=self.num_ranks).astype(np.int64)

    def slot_matrix(self) -> np.ndarray:
        """int64[E_total, N]: slots of expert g on rank r (LAER-MoE's A)."""
        m = np.zeros((self.num_experts, self.num_ranks), dtype=np.int64)
        m[self.replica_expert, self.replica_rank] = self.replica_slots
        return m

    def slot_experts(self, rank: int) -> np.ndarray:
        """The experts of `rank`'s filled slots, in replica order, a duplicate once per slot
        (the order its weights are gathered in)."""
        sel = self.replica_rank == rank
        return np.repeat(self.replica_expert[sel], self.replica_slots[sel])

    def replicas_of(self, expert: int) -> np.ndarray:
        """Indices of `expert`'s replicas, in replica order."""
        return np.flatnonzero(self.replica_expert == expert)

    def same_layout(self, other: Placement) -> bool:
        """Same replicas (expert, rank), slots, routing and shares equal to 1e-9."""
        return (self.num_ranks == other.num_ranks and self.num_experts == other.num_experts
                and np.array_equal(self.slot_matrix(), other.slot_matrix())
                and (self.routing, self.node_size) == (other.routing, other.node_size)
                and np.allclose(self.share_matrix(), other.share_matrix(), atol=1e-9))


def _canonical(strategy: str, n: int, e_total: int, expert: np.ndarray, rank: np.ndarray,
               share: np.ndarray, source: str = "placement", slots: np.ndarray | None = None,
               routing: str = "shares", node_size: int = 0) -> Placement:
    order = np.lexsort((rank, expert))
    slots = np.ones(len(expert), dtype=np.int64) if slots is None else np.asarray(slots)
    return Placement(strategy, n, e_total, expert[order], rank[order], share[order], source,
                     slots[order], routing, node_size)


def slot_placement(slots: np.ndarray, node_size: int = 0, routing: str = "node_local",
                   strategy: str = "fsep", source: str = "placement") -> Placement:
    """A Placement from a slot matrix int[E_total, N] (LAER-MoE's A: slots of expert g on
    rank r, duplicates allowed); every expert needs one slot or more. Shares are the slot
    fractions (the token split of `routing` = "shares")."""
    a = np.asarray(slots, dtype=np.int64)
    if a.ndim != 2 or (a < 0).any():
        raise InputError(source, "slots", "need a non-negative [E_total, N] slot matrix")
    tot = a.sum(axis=1)
    if (tot == 0).any():
        raise InputError(source, "replica_expert",
                         f"expert {int(np.argmax(tot == 0))} has no slot")
    expert, rank = np.nonzero(a)
    w = a[expert, rank]
    n = a.shape[1]
    return _canonical(strategy, n, a.shape[0], expert.astype(np.int64), rank.astype(np.int64),
                      w / tot[expert], source, w, routing, node_size if node_size < n else 0)


def ep_placement(num_experts: int, num_ranks: int,
                 owner: np.ndarray | list[int] | None = None) -> Placement:
    """EP: every expert on exactly one rank. By default contiguous blocks, expert g on rank
    `g * N // E_total` (blocks of E/N when N divides E, sizes differing by at most one
    otherwise); `owner[g]` gives the rank explicitly."""
    if num_experts < 1 or num_ranks < 1:
        raise InputError("ep_placement", "num_experts" if num_experts < 1 else "num_ranks",
                         "must be >= 1")
    g = np.arange(num_experts, dtype=np.int64)
    if owner is None:
        rank = g * num_ranks // num_experts
    else:
        rank = np.asarray(owner, dtype=np.int64).reshape(-1)
        if rank.shape != (num_experts,):
            raise InputError("ep_placement", "owner",
                             f"needs one rank per expert ({num_experts}), got {rank.shape[0]}")
    return _canonical("ep", num_ranks, num_experts, g, rank, np.ones(num_experts))


def ep_hot_replicas(load: np.ndarray, num_ranks: int, extra: int,
                    base: Placement | None = None) -> Placement:
    """The FlexMoE/SmartMoE-style EP baseline: `extra` additional replicas of the most loaded
    experts, tokens split evenly over an expert's replicas.

    Greedy, one replica at a time: take the expert with the most tokens per replica (ties: the
    lower id), and place a new replica on the least-loaded rank that does not hold it yet (ties:
    the lower rank); rank load counts each replica's even share. `load` is tokens per global
    expert (float or int, [E_total]); `base` (default: contiguous `ep_placement`) must have one
    replica per expert. Assumes every replica of an expert is equally fast, as those systems do.
    """
    load = np.asarray(load, dtype=np.float64).reshape(-1)
    e_total = len(load)
    if extra < 0:
        raise InputError("ep_hot_replicas", "extra", f"must be >= 0, got {extra}")
    if (load < 0).any():
        raise InputError("ep_hot_replicas", "load", "loads must be >= 0")
    if extra > e_total * (num_ranks - 1):
        raise InputError("ep_hot_replicas", "extra", f"{extra} extra replicas do not fit: "
                         f"{e_total} experts x {num_ranks} ranks allow at most "
                         f"{e_total * (num_ranks - 1)}")
    base = base or ep_placement(e_total, num_ranks)
    if base.num_replicas != e_total or base.num_experts != e_total:
        raise InputError("ep_hot_replicas", "base", "base placement must have one replica "
                         "per expert")
    hosts = base.hosted()
    nrep = np.ones(e_total)
    for _ in range(extra):
        per = load / nrep
        # The hottest expert that still has a rank without it.
        cand = np.where(hosts.all(axis=1), -np.inf, per)
        g = int(np.argmax(cand))
        rank_load = (hosts * (load / nrep)[:, None]).sum(axis=0)
        r = int(np.argmin(np.where(hosts[g], np.inf, rank_load)))
        hosts[g, r] = True
        nrep[g] += 1
    expert, rank = np.nonzero(hosts)
    return _canonical("ep", num_ranks, e_total, expert.astype(np.int64), rank.astype(np.int64),
                      1.0 / nrep[expert])


def hp_placement(model: ModelConfig, num_ranks: int) -> Placement:
    """HP: head h (all its experts) on rank h mod N. N must divide the number of heads, so that
    every rank holds the same number of heads and the all-to-all is balanced."""
    heads = model.num_heads
    if num_ranks < 1 or heads % num_ranks:
        raise InputError("config", "model.num_heads",
                         f"Head Parallel needs the {num_ranks} ranks to divide the {heads} "
                         f"heads (num_heads must be a multiple of the MoE group size)")
    e = model.num_experts
    g = np.arange(heads * e, dtype=np.int64)
    return _canonical("hp", num_ranks, heads * e, g, (g // e) % num_ranks, np.ones(heads * e))


def with_routing(p: Placement, routing: str, node_size: int = 0) -> Placement:
    """`p` with another token routing (its replicas, slots and shares kept)."""
    return Placement(p.strategy, p.num_ranks, p.num_experts, p.replica_expert, p.replica_rank,
                     p.replica_share, p.source, p.replica_slots, routing,
                     node_size if node_size < p.num_ranks else 0)


def replicated_placement(strategy: str, num_ranks: int, share: np.ndarray,
                         source: str = "placement") -> Placement:
    """A Placement from a share matrix float[E_total, N] (rank r runs share[g, r] of expert g's
    tokens); entries <= 1e-12 are no replica. Shares are renormalised per expert."""
    share = np.asarray(share, dtype=np.float64)
    share = np.where(share > 1e-12, share, 0.0)
    tot = share.sum(axis=1, keepdims=True)
    if (tot <= 0).any():
        raise InputError(source, "replica_share",
                         f"expert {int(np.argmax(tot[:, 0] <= 0))} has no replica")
    share = share / tot
    expert, rank = np.nonzero(share)
    return _canonical(strategy, num_ranks, share.shape[0], expert.astype(np.int64),
                      rank.astype(np.int64), share[expert, rank], source)
