"""Writing a figure to disk: PNG (for READMEs and quick looks) and PDF (for papers), each
atomically, and byte-for-byte reproducible so that regenerating an unchanged figure leaves git
clean."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from moesim.atomic import atomic_path

FORMATS = ("png", "pdf")

# Without these matplotlib stamps the render time and its version into the file.
_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def save_figure(fig: Figure, out_dir: str | Path, name: str,
                formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `fig` as `out_dir/name.<fmt>` for each format and close it; return the paths."""
    out_dir = Path(out_dir)
    paths = []
    try:
        for fmt in formats:
            target = out_dir / f"{name}.{fmt}"
            with atomic_path(target) as tmp:
                # The temporary name has no image extension, so the format is given explicitly.
                fig.savefig(tmp, format=fmt, metadata=_METADATA.get(fmt))
            paths.append(target)
    finally:
        plt.close(fig)
    return paths
