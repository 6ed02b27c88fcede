"""Per-phase timing of the MoE layers, forward and backward, as Result rows.

Forward phases are timed between two timestamps taken around the phase's code. Backward phases
run inside autograd, so each timed phase also puts an identity "marker" on the tensor entering
it and on the tensor leaving it: in backward the gradient reaches the output marker first (the
phase's backward begins) and the input marker last (it ends). Markers cost nothing when timing
is off.

On CUDA the timestamps are CUDA events on the current stream (read after one synchronize at the
end of the step, so timing never stalls the GPU mid-step); on CPU (gloo) they are
`time.perf_counter` readings, taken after the op returned (gloo collectives are synchronous).
A benchmark that wants steps back to back, as a training loop runs them (the host queueing the
next step while the GPU finishes this one), starts steps with `sync=False`, keeps each step's
`end_step()` and reads them all with `rows(..., step=...)` after the loop: a synchronize at
every step boundary leaves the GPU idle while the host queues the first kernels of the next.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

COMM_PHASES = {"dispatch", "combine", "weight_gather", "grad_scatter", "grad_sync"}


@dataclass
class _Span:
    layer: int
    pass_: str
    phase: str
    start: object = None
    end: object = None
    bytes: int = 0
    tokens: int = 0
    flops: float = 0.0


@dataclass
class StepSpans:
    """One step's timestamps: its start (`base`) and its phases' spans."""

    step: int
    base: object
    spans: list[_Span]


@dataclass
class PhaseRecord:
    """What the caller adds to a running phase: bytes sent, tokens touched, FLOPs."""

    bytes: int = 0
    tokens: int = 0
    flops: float = 0.0
    bwd: dict = field(default_factory=dict)  # the same keys for the backward row, and
    # "phase" when the backward has another name (weight_gather's is grad_scatter)


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.step = 0
        self._base = None
        self._spans: list[_Span] = []
        self._open_bwd: dict[tuple[int, str], _Span] = {}

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _elapsed(self, t) -> float:
        return self.elapsed(StepSpans(self.step, self._base, []), t)

    def elapsed(self, step: StepSpans, t) -> float:
        """Seconds from `step`'s start to timestamp `t` (after a synchronize, on CUDA)."""
        if self.cuda:
            return step.base.elapsed_time(t) / 1e3
        return t - step.base

    def start_step(self, step: int, sync: bool = True) -> None:
        self.step = step
        self._spans = []
        self._open_bwd = {}
        if self.enabled:
            if self.cuda and sync:
                torch.cuda.synchronize()
            self._base = self._now()

    def end_step(self) -> StepSpans:
        """This step's timestamps, to be read later by `rows(..., step=)` (no sync here)."""
        spans = self._spans + [s for s in self._open_bwd.values()
                               if s.start is not None and s.end is not None]
        return StepSpans(self.step, self._base, spans)

    @contextlib.contextmanager
    def fwd(self, layer: int, phase: str) -> Iterator[PhaseRecord]:
        """Time a forward phase; the yielded record takes its bytes/tokens/flops."""
        rec = PhaseRecord()
        if not self.enabled:
            yield rec
            return
        span = _Span(layer, "fwd", phase, start=self._now())
        yield rec
        span.end = self._now()
        span.bytes, span.tokens, span.flops = rec.bytes, rec.tokens, rec.flops
        self._spans.append(span)
        bwd = _Span(layer, "bwd", rec.bwd.get("phase", phase), bytes=rec.bwd.get("bytes", 0),
                    tokens=rec.bwd.get("tokens", 0), flops=rec.bwd.get("flops", 0.0))
        self._open_bwd[(layer, phase)] = bwd

    def bwd_in(self, x: torch.Tensor, layer: int, phase: str) -> torch.Tensor:
        """Marker on the tensor entering `phase`: its backward ends when the gradient gets here."""
        if not self.enabled or not x.requires_grad:
            return x
        return _Marker.apply(x, self, (layer, phase), "end")

    def bwd_out(self, x: torch.Tensor, layer: int, phase: str) -> torch.Tensor:
        """Marker on the tensor leaving `phase`: its backward starts when the gradient gets here."""
        if not self.enabled or not x.requires_grad:
            return x
        return _Marker.apply(x, self, (layer, phase), "start")

    def _hit(self, key: tuple[int, str], which: str) -> None:
        span = self._open_bwd.get(key)
        if span is None:
            return
        t = self._now()
        if which == "start" and span.start is None:
            span.start = t
        elif which == "end":
            span.end = t

    def record(self, layer: int, pass_: str, phase: str, start, end, nbytes: int = 0) -> None:
        """A phase timed by the caller with two `now()` stamps (e.g. the gradient all-reduce)."""
        if self.enabled:
            self._spans.append(_Span(layer, pass_, phase, start, end, nbytes))

    def now(self):
        return self._now() if self.enabled else None

    def rows(self, rank: int, strategy: str, step: StepSpans | None = None) -> list[dict]:
        """Result rows of the step (call after backward), or of an earlier step's `end_step()`;
        synchronizes the device once."""
        if not self.enabled:
            return []
        if self.cuda:
            torch.cuda.synchronize()
        step = step or self.end_step()
        out = []
        for s in step.spans:
            a, b = self.elapsed(step, s.start), self.elapsed(step, s.end)
            out.append({"source": "real", "strategy": strategy, "step": step.step,
                        "layer": s.layer, "rank": rank, "pass": s.pass_, "phase": s.phase,
                        "stream": "comm" if s.phase in COMM_PHASES else "compute",
                        "start_s": a, "end_s": max(a, b), "bytes": int(s.bytes),
                        "tokens": int(s.tokens), "flops": float(s.flops)})
        return out


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, timer, key, which):
        ctx.timer, ctx.key, ctx.which = timer, key, which
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.timer._hit(ctx.key, ctx.which)
        return g, None, None, None
