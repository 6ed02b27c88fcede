"""How fast the experts' grouped GEMMs run depends on what runs around them: a probe.

    python -m benchmarks.gemm_context [--dim 2048] [--ffn 1408] [--experts 64] [--rows 2048]

Times the two grouped GEMMs of a gated expert FFN (`torch._grouped_mm`, the runtime's and
`moesim calibrate`'s call) on one GPU in four settings, 20 runs each, median TFLOP/s:
- back to back: the runs queued one after another (how `moesim calibrate` times them);
- synced: a synchronize after every run (how calibrate timed them before session 3);
- idle gap: 2 ms of GPU sleep between runs (the GPU cools down, clocks recover);
- copy between: a 1 GiB device copy between runs, as a layer's memory-bound kernels sit
  between its GEMMs in a step.
It prints the SM clock nvidia-smi reports after each setting. Sustained GEMMs can hit the
board's power limit and lower the clocks, which a step whose GEMMs alternate with
memory-bound kernels may not; this probe says whether the calibration's setting matters.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch


def sm_clock() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rows", type=int, default=2048, help="rows per expert group")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    e, d, f, t = a.experts, a.dim, a.ffn, a.rows

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g)

    x, h = rand(e * t, d), rand(e * t, f)
    w_up, w_down = rand(e, d, 2 * f) / d ** 0.5, rand(e, f, d) / f ** 0.5
    offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * t
    big = torch.empty(1 << 29, device=dev, dtype=torch.bfloat16)
    big2 = torch.empty_like(big)
    flops = 6.0 * e * t * d * f

    def gemms():
        torch._grouped_mm(x, w_up, offs=offs)
        torch._grouped_mm(h, w_down, offs=offs)

    def timed(between, sync_each: bool) -> float:
        for _ in range(3):
            gemms()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(a.repeat)]
        torch.cuda.synchronize()
        for s, en in ev:
            between()
            s.record()
            gemms()
            en.record()
            if sync_each:
                en.synchronize()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(en) / 1e3 for s, en in ev)

    settings = [("back to back", lambda: None, False),
                ("synced", lambda: None, True),
                ("idle gap 2 ms", lambda: torch.cuda._sleep(int(2e-3 * 1.98e9)), False),
                ("1 GiB copy between", lambda: big2.copy_(big), False)]
    print(f"grouped GEMMs {e} x {t} rows, {d} x {f}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    for name, between, sync_each in settings:
        sec = timed(between, sync_each)
        print(f"  {name:22s} {sec * 1e3:7.3f} ms  {flops / sec / 1e12:6.1f} TFLOP/s  "
              f"(after: {sm_clock()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
