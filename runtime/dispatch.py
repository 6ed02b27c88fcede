"""From the planner's integer splits to one rank's index tensors for a token all-to-all.

The planner says how many tokens each source sends to each replica (`LayerTraffic.tokens`,
[N, R]); this module only lays those numbers out in memory, following the contract of
docs/interfaces.md: a source's assignments to expert g, in (item, slot) order, are cut into
consecutive chunks for g's replicas in replica order. The send buffer is rank-major and
replica-minor; the receive buffer arrives source-major, replica-minor and is regrouped
replica-major (source-minor) so that each local replica's rows are contiguous for the grouped
GEMM. Nothing here decides who sends what.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from planner.placement import Placement
from runtime.upload import upload


@dataclass(frozen=True)
class TokenRoute:
    """One rank's layout of a dispatch (and, reversed, of its combine)."""

    send_order: torch.Tensor    # int64 [A]: flat assignment (item * k + slot) of each send row
    send_splits: list[int]      # rows to each destination rank
    recv_splits: list[int]      # rows from each source rank
    recv_to_group: torch.Tensor  # int64 [B]: received row for each grouped row
    group_sizes: list[int]      # grouped rows per local replica, replica order
    local_replicas: np.ndarray  # replica indices hosted here, replica order


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    np.cumsum(a[:-1], out=out[1:])
    return out


def build_route(placement: Placement, tokens: np.ndarray, rank: int,
                assign_expert: torch.Tensor, device: torch.device) -> TokenRoute:
    """`tokens` [N, R] from planner.traffic; `assign_expert` int [A] on the device: the global
    expert of each of this rank's flat assignments (item * k + slot). The per-assignment work
    stays on the device; only the small [N, R] split matrix is read on the host."""
    rep_e, rep_r = placement.replica_expert, placement.replica_rank
    n = placement.num_ranks
    mine = tokens[rank]
    # Replicas in (expert, replica index) order.
    rep_order = np.lexsort((np.arange(len(rep_e)), rep_e))
    if int(mine.sum()) != assign_expert.numel():
        raise RuntimeError(f"rank {rank}: planner splits cover {int(mine.sum())} assignments, "
                           f"routing made {assign_expert.numel()}")
    send_splits = np.bincount(rep_r, weights=mine, minlength=n).astype(np.int64)
    local = np.flatnonzero(rep_r == rank)
    blocks = tokens[:, local]  # [N, m]: rows from source s for local replica j
    recv_splits = blocks.sum(axis=1)
    starts = _exclusive_cumsum(blocks.reshape(-1)).reshape(blocks.shape)
    lengths = blocks.T.reshape(-1)  # replica-major
    first = starts.T.reshape(-1)
    total = int(lengths.sum())
    # The per-assignment work runs on the device from these small per-replica and per-block
    # arrays, which go up in one pinned copy (runtime.upload): a host-built index and its
    # upload (1 MB at 131k rows) cost more than the kernels, and a pageable upload stalls the
    # stream. Sizes are known on the host (output_size): no device-to-host sync either.
    rep_order_d, per_rep_d, rep_r_d, shift_d, lengths_d = upload(
        rep_order, mine[rep_order], rep_r, first - _exclusive_cumsum(lengths), lengths,
        device=device)
    # Assignments sorted by expert (stable: item order within an expert); repeating each
    # replica (in (expert, replica index) order) by its token count labels them with their
    # replica.
    by_expert = torch.argsort(assign_expert, stable=True)
    replica_of = torch.repeat_interleave(rep_order_d, per_rep_d, output_size=int(mine.sum()))
    # Send buffer: destination-major, then replica index, then the expert-sorted order.
    key = rep_r_d[replica_of] * len(rep_e) + replica_of
    send_order = by_expert[torch.argsort(key, stable=True)]
    recv_to_group = torch.repeat_interleave(shift_d, lengths_d, output_size=total) \
        + torch.arange(total, device=device)
    return TokenRoute(
        send_order=send_order,
        send_splits=send_splits.tolist(),
        recv_splits=recv_splits.tolist(),
        recv_to_group=recv_to_group,
        group_sizes=blocks.sum(axis=0).tolist(),
        local_replicas=local,
    )
