"""Reports: a self-contained HTML page (images linked by relative path, so the folder can be moved or shared
whole) and the plots, drawn with matplotlib when it is installed (the `[eval]` extra).

Without matplotlib the plot functions return the sentence the page shows in the plot's place; everything
else is written as usual.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..files_out import replacing

PLOTS_MISSING = ("No plots: matplotlib is not installed (pip install 'comfyui-kontext[eval]', or pip install "
                 "matplotlib). The numbers are in the tables below and in metrics.json.")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
td.label { text-align: left; }
figure { display: inline-block; margin: 0.3em; text-align: center; }
figure img { max-width: 256px; max-height: 256px; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; max-width: 256px; }
.note { background: #fff6d6; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def number(value: Any, digits: int = 4) -> str:
    """A table cell: None (an infinite PSNR, identical images) shows as ∞, floats to `digits` places."""
    if value is None:
        return "∞"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "∞"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(item, digits) for item in value)
    return html.escape(str(value))


class HtmlReport:
    """A page built part by part; `write` saves it atomically."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join(  # text left-aligned, numbers right-aligned
            "<tr>" + "".join(f'<td class="label">{html.escape(cell)}</td>' if isinstance(cell, str) else
                             f"<td>{number(cell)}</td>" for cell in row) + "</tr>"
            for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figures(self, items: Sequence[tuple[str, str]]) -> None:
        """A row of images: (relative path, caption) each."""
        cells = "".join(f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for path, caption in items)
        self.parts.append(f"<div>{cells}</div>")

    def image(self, path: str, caption: str) -> None:
        self.parts.append(f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}" '
                          f'style="max-width: 100%; max-height: none"><figcaption>{html.escape(caption)}'
                          f"</figcaption></figure>")

    def settings(self, settings: dict) -> None:
        self.heading("Settings")
        self.parts.append(f"<pre>{html.escape(json.dumps(settings, indent=2, default=str))}</pre>")

    def write(self, path: str | Path) -> Path:
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n")
        with replacing(path) as temporary:
            temporary.write_text(page, encoding="utf-8")
        return Path(path)


def _figure(panels: int):
    """A matplotlib Figure with one panel per metric, or None without matplotlib. The Figure is made
    directly, not through pyplot: no global backend is chosen, so an interactive session is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _save(figure, path: Path) -> None:
    with replacing(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def plot_lines(path: str | Path, x: Sequence[float], series: dict[str, dict[str, Sequence[float | None]]],
               metrics: Sequence[str], x_label: str) -> str | None:
    """One panel per metric, one line per series ({label: {metric: values along x}}); None values (infinite
    PSNR) are left out of their line. Returns None when written, else the sentence saying why not."""
    made = _figure(len(metrics))
    if made is None:
        return PLOTS_MISSING
    figure, axes = made
    from matplotlib.ticker import MaxNLocator

    for axis, metric in zip(axes, metrics):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for label, values in series.items():
            points = [(position, value) for position, value in zip(x, values[metric]) if value is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_title(metric)
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    _save(figure, Path(path))
    return None


def plot_bars(path: str | Path, labels: Sequence[str], values: dict[str, Sequence[float | None]]) -> str | None:
    """One panel per metric ({metric: one value per label}), a bar per label, every label in its place in each
    panel; a None value (the reference itself, an infinite PSNR) gets no bar, a dash at its foot."""
    made = _figure(len(values))
    if made is None:
        return PLOTS_MISSING
    figure, axes = made
    for axis, (metric, column) in zip(axes, values.items()):
        positions = range(len(labels))
        axis.bar([p for p, v in zip(positions, column) if v is not None], [v for v in column if v is not None])
        for position, value in zip(positions, column):
            if value is None:
                axis.annotate("—", (position, 0), ha="center", va="bottom")
        axis.set_xticks(list(positions), list(labels), rotation=30)
        axis.set_xlim(-0.6, len(labels) - 0.4)
        axis.set_title(metric)
        axis.grid(alpha=0.3, axis="y")
    _save(figure, Path(path))
    return None
