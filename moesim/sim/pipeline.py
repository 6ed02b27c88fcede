"""Pipeline schedules: the order in which each stage runs the forward and backward of its
micro-batches, and one issue order for all stages that respects the sends between them.

1F1B (PipeDream-Flush, Narayanan et al. 2021, arXiv 2104.04473 section 2.2; Megatron-LM's
`forward_backward_pipelining_without_interleaving`): stage s of p runs min(p - s - 1, m)
warm-up forwards, then alternates one forward and one backward until every forward is done,
then the remaining backwards. Nothing here assumes a bubble: the schedule only fixes the order
on each stage; when a stage waits for its neighbour comes out of the simulation (for uniform
stages and free sends it is the (p - 1) / (m + p - 1) bubble, a test).
"""

from __future__ import annotations

from collections.abc import Callable


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """[(pass, micro-batch)] in the order stage `stage` runs them."""
    warm = min(stages - stage - 1, micro_batches)
    out = [("fwd", i) for i in range(warm)]
    for i in range(micro_batches - warm):
        out += [("fwd", warm + i), ("bwd", i)]
    out += [("bwd", i) for i in range(micro_batches - warm, micro_batches)]
    return out


def issue_order(stages: int, micro_batches: int,
                schedule: Callable[[int, int, int], list[tuple[str, int]]] = one_f_one_b
                ) -> list[tuple[int, str, int]]:
    """[(stage, pass, micro-batch)] for all stages: each stage's items in its own order, and
    no item before the item it receives from (the forward of the same micro-batch on the stage
    before, the backward on the stage after), so a program can be built front to back."""
    scheds = [schedule(s, stages, micro_batches) for s in range(stages)]
    ptr = [0] * stages
    done: set[tuple[int, str, int]] = set()
    out: list[tuple[int, str, int]] = []
    while any(ptr[s] < len(scheds[s]) for s in range(stages)):
        progress = False
        for s in range(stages):
            while ptr[s] < len(scheds[s]):
                pass_, mb = scheds[s][ptr[s]]
                src = (s - 1, "fwd", mb) if pass_ == "fwd" else (s + 1, "bwd", mb)
                if 0 <= src[0] < stages and src not in done:
                    break
                out.append((s, pass_, mb))
                done.add((s, pass_, mb))
                ptr[s] += 1
                progress = True
        if not progress:
            raise ValueError("pipeline schedule deadlocks: a stage waits for an item its "
                             "neighbour never runs first")
    return out
