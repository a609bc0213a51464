"""One look for every figure, and the writers notebooks use for their outputs.

- ``set_style()``: the seaborn theme, font sizes, and a fixed colour per editor (``EDITOR_COLORS``) and a
  fixed colour, line style and marker per regularizer (``REGULARIZER_STYLES``), so ROME is the same blue
  in every figure of the suite.
- ``provenance_caption(fig, ...)``: a small line at the bottom saying which model and settings produced
  the figure. ``save_figure`` refuses a figure without one.
- ``save_figure`` (PNG + PDF), ``save_table`` (CSV + Markdown), ``write_numbers`` (``numbers.json``):
  byte-stable, so re-running an unchanged notebook leaves ``git diff`` empty.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from kelib import io

DPI = 200  # PNG resolution; fixed so files are byte-stable and comparable between runs
_CAPTION_ATTR = "_kelib_provenance"

# seaborn's "colorblind" palette (Okabe-Ito-like), one fixed entry per editor.
EDITOR_COLORS: dict[str, str] = {
    "ROME": "#0173b2",
    "MEMIT": "#de8f05",
    "FT": "#029e73",
    "AlphaEdit": "#d55e00",
    "KN": "#cc78bc",
    "MEND": "#ca9161",
    "PMET": "#fbafe4",
    "GRACE": "#56b4e9",
}

# Regularizers are told apart by line style and marker first (they usually share a figure with an
# editor's colour), and by their own colour when a figure compares regularizers of one editor.
REGULARIZER_STYLES: dict[str, dict[str, str]] = {
    "none": {"color": "#4d4d4d", "linestyle": "-", "marker": "o", "hatch": ""},
    "RECT": {"color": "#7b3294", "linestyle": "--", "marker": "s", "hatch": "//"},
    "PRUNE": {"color": "#008080", "linestyle": "-.", "marker": "^", "hatch": "\\\\"},
    "D4S": {"color": "#b8860b", "linestyle": ":", "marker": "D", "hatch": ".."},
    "random": {"color": "#e7298a", "linestyle": (0, (3, 1, 1, 1)), "marker": "x", "hatch": "xx"},  # RECT's baselines
    "PCA": {"color": "#1b9e77", "linestyle": (0, (1, 1)), "marker": "v", "hatch": "--"},
}
REGULARIZER_COLORS: dict[str, str] = {k: v["color"] for k, v in REGULARIZER_STYLES.items()}


def _lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
    for key, value in table.items():
        if key.lower() == str(name).lower():
            return value
    raise KeyError(f"no fixed style for {what} {name!r}; known: {list(table)}")


def editor_color(name: str) -> str:
    """The fixed colour of editor ``name`` (case-insensitive: ``"rome"`` works)."""
    return _lookup(EDITOR_COLORS, name, "editor")


def setting_palette(settings) -> dict[str, str]:
    """Colours for run labels such as ``"MEMIT + D4S"`` or ``"ROME seq. (b=1)"``: the editor's colour
    (the first word), so a figure's ROME lines are ROME's blue; tell regularizers apart by line style."""
    return {s: editor_color(str(s).split(" ")[0]) for s in settings}


def regularizer_style(name: str | None, lines: bool = True) -> dict[str, str]:
    """Matplotlib kwargs for regularizer ``name`` (``None`` means ``"none"``).

    ``lines=True`` gives ``color``/``linestyle``/``marker`` (for ``ax.plot``); ``False`` gives
    ``color``/``hatch`` (for bars).
    """
    style = _lookup(REGULARIZER_STYLES, "none" if name is None else name, "regularizer")
    keys = ("color", "linestyle", "marker") if lines else ("color", "hatch")
    return {k: style[k] for k in keys}


def set_style(font_scale: float = 1.0) -> None:
    """The suite's seaborn theme: white grid, readable fonts, fixed DPI, embeddable PDF fonts."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=font_scale)
    plt.rcParams.update(
        {
            "figure.figsize": (6.0, 3.8),
            "figure.dpi": 100,
            "savefig.dpi": DPI,
            "font.size": 10 * font_scale,
            "axes.titlesize": 11 * font_scale,
            "axes.labelsize": 10 * font_scale,
            "xtick.labelsize": 9 * font_scale,
            "ytick.labelsize": 9 * font_scale,
            "legend.fontsize": 9 * font_scale,
            "legend.title_fontsize": 9 * font_scale,
            "legend.frameon": False,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "pdf.fonttype": 42,  # TrueType in PDFs: text stays text in editors
            "svg.hashsalt": "kelib",  # byte-stable SVG, should anyone save one
        }
    )


def provenance_caption(fig: plt.Figure, text: str | Mapping[str, Any], fontsize: float = 7.0):
    """Write a small grey line under the figure saying which model and settings produced it.

    ``text`` is a string or a mapping (``{"model": "gpt2-xl", "editor": "ROME", "n_edits": 100}`` gives
    ``"model: gpt2-xl | editor: ROME | n_edits: 100"``). ``save_figure`` moves it just below everything
    else in the figure and saves with a tight bounding box, so it never overlaps an axis label and is
    always inside the file. Calling it again replaces the caption.
    """
    if isinstance(text, Mapping):
        text = " | ".join(f"{k}: {v}" for k, v in text.items())
    text = " ".join(str(text).split())
    if not text:
        raise ValueError("provenance caption is empty: say which model and settings made this figure")
    old = getattr(fig, _CAPTION_ATTR, None)
    if old is not None:
        old.remove()
    width_chars = max(40, int(fig.get_figwidth() * 72 / (fontsize * 0.55)))
    artist = fig.text(
        0.0,
        -0.01,
        textwrap.fill(text, width_chars),
        ha="left",
        va="top",
        fontsize=fontsize,
        color="0.35",
        transform=fig.transFigure,
    )
    setattr(fig, _CAPTION_ATTR, artist)
    return artist


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save ``fig`` as ``out_dir/name.png`` and ``out_dir/name.pdf``, byte-stably. Returns both paths.

    Raises ``ValueError`` when the figure has no ``provenance_caption``.
    """
    if getattr(fig, _CAPTION_ATTR, None) is None:
        raise ValueError(
            f"figure {name!r} has no provenance caption: call "
            "kelib.plotting.provenance_caption(fig, ...) with the model and settings first"
        )
    _place_caption(fig)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, metadata in (
        ("png", {"Software": None}),  # no matplotlib version string: same bytes across upgrades
        ("pdf", {"CreationDate": None, "Producer": None, "Creator": None}),
    ):
        path = out_dir / f"{name}.{ext}"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=metadata, bbox_inches="tight", pad_inches=0.05)
        paths.append(path)
    return paths


def _place_caption(fig: plt.Figure, pad_inches: float = 0.04) -> None:
    """Move the caption just under everything else the figure draws (tick labels, axis labels)."""
    caption = getattr(fig, _CAPTION_ATTR)
    caption.set_visible(False)
    try:
        fig.draw_without_rendering()  # runs the layout engine, so the extents are final
        box = fig.get_tightbbox(fig.canvas.get_renderer())
    finally:
        caption.set_visible(True)
    caption.set_position(
        (box.x0 / fig.get_figwidth(), (box.y0 - pad_inches) / fig.get_figheight())
    )


def save_table(
    df, out_dir: str | Path, name: str, float_format: str = ".4g", index: bool | None = None
) -> list[Path]:
    """Save a pandas DataFrame as ``out_dir/name.csv`` (full precision) and ``out_dir/name.md``.

    ``index=None`` writes the index only when it carries information (named, or not 0..n-1).
    Markdown floats use ``float_format``; NaN is written as an empty cell.
    """
    import pandas as pd

    if index is None:
        index = any(n is not None for n in df.index.names) or not df.index.equals(
            pd.RangeIndex(len(df))
        )
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    io.write_text(csv_path, df.to_csv(index=index, lineterminator="\n"))
    io.write_text(md_path, markdown_table(df.reset_index() if index else df, float_format))
    return [csv_path, md_path]


def markdown_table(df, float_format: str = ".4g") -> str:
    """A GitHub Markdown table of ``df`` (no tabulate dependency); numeric columns right-aligned."""
    import pandas as pd

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            text = format(value, float_format)
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    columns = [str(c) for c in df.columns]
    types = pd.api.types
    numeric = [types.is_numeric_dtype(df[c]) and not types.is_bool_dtype(df[c]) for c in df.columns]
    rows = [[cell(v.item() if hasattr(v, "item") else v) for v in row] for row in df.itertuples(index=False)]
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
        "| " + " | ".join("---:" if n else ":---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_numbers(out_dir: str | Path, numbers: Mapping[str, Any]) -> Path:
    """Write ``out_dir/numbers.json`` atomically (sorted keys): the numbers tests and the paper read."""
    path = Path(out_dir) / "numbers.json"
    io.write_json(path, dict(numbers))
    return path
