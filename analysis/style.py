"""How every moesim figure looks: one palette, one set of markers, one type size.

Figures are sized for a two-column paper (a single column is 3.4 in wide, a full row 7 in) and
drawn at 8 pt so that they can be dropped into a LaTeX document at 100% scale; the PNGs are
rendered at 200 dpi so they read on a README page too. Strategy colours come from the
Okabe-Ito palette, which stays distinguishable for the common colour-vision deficiencies and in
greyscale print (EP dark blue, HP green, FSEP vermillion differ in lightness as well as hue).
Keeping all of this in one module means a strategy has the same colour and marker in every
figure, which is what lets a reader compare figures at a glance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import matplotlib.pyplot as plt

from moesim.results import PHASES

SINGLE_COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0
PNG_DPI = 200

STRATEGY_ORDER = ("ep", "hp", "fsep", "hpxep")
STRATEGY_LABEL = {"ep": "EP", "hp": "HP", "fsep": "FSEP", "hpxep": "HP x EP"}
STRATEGY_COLOR = {"ep": "#0072B2", "hp": "#009E73", "fsep": "#D55E00", "hpxep": "#CC79A7"}
STRATEGY_MARKER = {"ep": "o", "hp": "s", "fsep": "^", "hpxep": "D"}

# Phases: compute phases in cool/neutral tones, communication phases in warm tones, so that a
# stacked bar reads as "how much of the step is the network" without consulting the legend.
PHASE_COLOR = {
    "router": "#BBBBBB",
    "latent_down": "#88CCEE",
    "latent_up": "#44AA99",
    "permute": "#DDDDDD",
    "expert": "#332288",
    "dispatch": "#EE7733",
    "combine": "#CC3311",
    "weight_gather": "#EE3377",
    "grad_scatter": "#AA4499",
    "grad_sync": "#DDAA33",
    # The rest of a whole iteration: dense compute in blues/greens/greys, the dense
    # parallelisms' collectives in warm tones (hatched as communication by the plots).
    "embed": "#999933",
    "attn_norm": "#E8ECFB",
    "qkv": "#6699CC",
    "attention": "#004488",
    "attn_out": "#77AADD",
    "residual": "#F0F0F0",
    "mlp_norm": "#D9E4F5",
    "dense_mlp": "#117733",
    "shared_expert": "#5289C7",
    "final_norm": "#C6DBEF",
    "lm_head": "#882255",
    "loss": "#CC6677",
    "optimizer": "#000000",
    "tp_all_gather": "#FFAABB",
    "tp_reduce_scatter": "#EE8866",
    "tp_all_reduce": "#BB5566",
    "pp_send": "#AAAA00",
    "dp_all_reduce": "#994455",
    "dp_reduce_scatter": "#997700",
    "dp_all_gather": "#EECC66",
}
PHASE_LABEL = {
    "router": "router",
    "latent_down": "latent down-proj.",
    "latent_up": "latent up-proj.",
    "permute": "permute",
    "expert": "expert GEMMs",
    "dispatch": "dispatch A2A",
    "combine": "combine A2A",
    "weight_gather": "weight gather",
    "grad_scatter": "grad scatter",
    "grad_sync": "grad sync",
    "embed": "embedding",
    "attn_norm": "attention norm",
    "qkv": "QKV proj.",
    "attention": "attention",
    "attn_out": "attention out-proj.",
    "residual": "residual adds",
    "mlp_norm": "MLP norm",
    "dense_mlp": "dense MLP",
    "shared_expert": "shared experts",
    "final_norm": "final norm",
    "lm_head": "LM head",
    "loss": "loss",
    "optimizer": "optimizer step",
    "tp_all_gather": "TP all-gather",
    "tp_reduce_scatter": "TP reduce-scatter",
    "tp_all_reduce": "TP all-reduce",
    "pp_send": "PP send",
    "dp_all_reduce": "DP all-reduce",
    "dp_reduce_scatter": "DP reduce-scatter",
    "dp_all_gather": "DP all-gather",
}
assert set(PHASE_COLOR) == set(PHASES), "every Result phase needs a colour"

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.3,
    "lines.markersize": 4.5,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "figure.dpi": 100,
    "savefig.dpi": PNG_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    # Type 42 keeps text as text in the PDF (editable, searchable) rather than Type 3 glyphs,
    # which some publishers reject.
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    # A fixed hash salt and no embedded dates keep repeated renders byte-identical.
    "svg.hashsalt": "moesim",
    "hatch.linewidth": 0.5,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply the moesim figure style for the duration of a block (and only then)."""
    with plt.rc_context(RC):
        yield


def strategy_label(strategy: str) -> str:
    return STRATEGY_LABEL.get(strategy, strategy)


def strategy_color(strategy: str) -> str:
    return STRATEGY_COLOR.get(strategy, "#555555")


def strategy_marker(strategy: str) -> str:
    return STRATEGY_MARKER.get(strategy, "D")


def ordered_strategies(present: object) -> list[str]:
    """Strategies in the canonical EP, HP, FSEP order, unknown ones after them."""
    seen = list(dict.fromkeys(present))  # type: ignore[call-overload]
    return [s for s in STRATEGY_ORDER if s in seen] + sorted(s for s in seen
                                                             if s not in STRATEGY_ORDER)
