"""Picking the unit an axis is labelled in, so that tick labels stay short (0.5-500) whatever
the scale of the run: bytes in B/KiB/MiB/GiB, times in µs/ms/s, counts in k/M/G."""

from __future__ import annotations


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit name) for a byte axis whose largest value is `max_bytes`."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def time_unit(max_s: float) -> tuple[float, str]:
    """(divisor, unit name) for a time axis in seconds whose largest value is `max_s`."""
    if max_s >= 1:
        return 1.0, "s"
    if max_s >= 1e-3:
        return 1e-3, "ms"
    return 1e-6, "µs"


def count_label(v: float, _pos: object = None) -> str:
    """Tick label for counts: 1.5M rather than 1500000 (a matplotlib FuncFormatter)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"
