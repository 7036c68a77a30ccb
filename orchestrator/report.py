"""A batch table for people: a Markdown summary and a heatmap PNG of the same pivot.

Rows are workloads (model x its size, plus precision, optimizer, EMA, cudnn.benchmark
and fraction where the table has more than one), columns GPU types ordered by
memory, cells the batch size (``+``: capped at the sweep's max batch), ``no-fit``,
``error`` or ``-`` (not measured). The Markdown also lists every no-fit and error
row with its reason.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pandas as pd

from . import table as tables
from .errors import SpecError
from .summary import gpu_label, model_at, pivot, row_label

log = logging.getLogger(__name__)

def markdown(df: pd.DataFrame, source: str, png_name: str) -> str:
    """The summary: counts, the heatmap, the pivot as a Markdown table, then no-fit and error rows."""
    piv = pivot(df)
    counts = df["status"].value_counts()
    lines = [f"# Batch sizes: {source}", "",
             f"{len(df)} rows: {counts.get('ok', 0)} ok, {counts.get('no-fit', 0)} no-fit, "
             f"{counts.get('error', 0)} error; {piv.shape[0]} workloads on {piv.shape[1]} GPU types; "
             f"fraction {', '.join(f'{f:g}' for f in sorted(df['fraction'].unique()))}.", "",
             f"![batch sizes]({png_name})", "",
             _md_table(["workload"] + list(piv.columns),
                       [[row_label(k, list(piv.index.names))] + list(v) for k, v in zip(piv.index, piv.values)]),
             "", "`+`: capped at the sweep's max batch (the card may take more); `-`: not measured.", ""]
    return "\n".join(lines + _failures(df)) + "\n"


def _md_table(header: list[str], rows: list[list]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    aligns = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "|" + "|".join(aligns) + "|"] + [line(r) for r in rows])


def _failures(df: pd.DataFrame) -> list[str]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return ["## No-fit and error rows", "", "None: every combination has a batch size."]
    out = ["## No-fit and error rows", ""]
    for _, r in bad.iterrows():
        reason = str(r["error"] or "").replace("\n", " ") or "no reason recorded"
        out.append(f"- {model_at(r)} {r['precision']} {r['optimizer']} on {gpu_label(r)} "
                   f"(fraction {r['fraction']:g}): **{r['status']}**: {reason}")
    return out


def heatmap(df: pd.DataFrame, path: Path, title: str) -> None:
    """The pivot as a PNG: color by log2 batch size, the cell text written in every cell."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    piv = pivot(df)
    text = piv.values
    sizes = np.array([[_number(v) for v in row] for row in text], dtype=float)
    labels = [row_label(k, list(piv.index.names)) for k in piv.index]
    width = 3.0 + 0.1 * max(len(s) for s in labels) + 1.4 * len(piv.columns)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.5 * len(labels)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e0e0e0")  # bad: no-fit, error, not measured
    image = ax.imshow(np.ma.masked_invalid(np.log2(sizes)), cmap=cmap, aspect="auto")
    _write_cells(ax, image, text, sizes)
    ax.set_xticks(range(len(piv.columns)), labels=list(piv.columns), rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("batch size")
    if np.isfinite(sizes).any():  # ticks at powers of two, labelled as batch sizes
        low, high = np.nanmin(np.log2(sizes)), np.nanmax(np.log2(sizes))
        bar.set_ticks(range(math.ceil(low), math.floor(high) + 1) if high - low >= 1 else [low])
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{2 ** v:.0f}"))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _number(value: str) -> float:
    return float(value.rstrip("+")) if value.rstrip("+").isdigit() else math.nan


FAILED_COLORS = {"no-fit": "#f2b8b5", "error": "#f6cf8f"}
"""Cell backgrounds for rows without a batch size (not measured stays grey)."""


def _write_cells(ax, image, text, sizes) -> None:
    from matplotlib.patches import Rectangle

    for i, row in enumerate(text):
        for j, value in enumerate(row):
            if value in FAILED_COLORS:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color=FAILED_COLORS[value]))
            shade = image.cmap(image.norm(math.log2(sizes[i, j]))) if sizes[i, j] > 0 else (0.9, 0.9, 0.9, 1)
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
            ax.text(j, i, value, ha="center", va="center", fontsize=10, color="white" if dark else "black")


def write(table_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``STEM.md`` and ``STEM.png`` for the table (default folder: ``report/`` next to it)."""
    table_path = Path(table_path)
    df = tables.read(table_path)
    if df.empty:
        raise SpecError(f"{table_path} has no rows (missing or empty): build it with "
                        f"`python -m orchestrator sweep --out {table_path}`")
    out = Path(out_dir) if out_dir is not None else table_path.parent / "report"
    md_path, png_path = out / f"{table_path.stem}.md", out / f"{table_path.stem}.png"
    check_writable(out, md_path, png_path)
    out.mkdir(parents=True, exist_ok=True)
    fractions = ", ".join(f"{f:g}" for f in sorted(df["fraction"].unique()))
    heatmap(df, png_path, f"Largest training batch within fraction {fractions} of each GPU ({table_path.name})")
    md_path.write_text(markdown(df, str(table_path), png_path.name))
    log.info("report for %s: %s, %s", table_path, md_path, png_path)
    return md_path, png_path


def check_writable(out: Path, md_path: Path, png_path: Path) -> None:
    """Fail before anything is written when the report cannot go to folder ``out``, or would replace a file
    that is not one of ours: SpecError naming the path and what to do."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"report --out {str(out)!r} is a file, not a folder: name a folder for "
                        f"{md_path.name} and {png_path.name}, e.g. --out {out.parent / 'report'}")
    folder = out
    while not folder.exists() and folder != folder.parent:  # the folder mkdir will create its missing parts in
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"report --out {str(out)!r}: folder {str(folder)!r} is not writable; fix its "
                        "permissions or choose another --out")
    for path in (md_path, png_path):
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise SpecError(f"report --out {str(out)!r}: {str(path)!r} cannot be replaced (a folder, or "
                            "read-only); move it or choose another --out")
    if md_path.is_file() and not md_path.read_bytes().startswith(b"# Batch sizes: "):
        raise SpecError(f"report --out {str(out)!r}: {str(md_path)!r} exists and is not a report of ours; move it "
                        "or choose another --out (it was not changed)")
