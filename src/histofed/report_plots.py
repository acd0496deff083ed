"""Report output: PNG plots (matplotlib's object API, Agg, no pyplot global state) and the
HTML/Markdown rendering of report sections.

A section is ``(title, blocks)``; a block is ``("p", text)``, ``("table", header, rows)``,
``("img", relative_path, alt)`` or ``("config", toml_text)``. Every file is written atomically:
to a temporary file beside the target, then ``os.replace``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from histofed.atomic import atomic_path, atomic_write_text

Series = Mapping[int, float]  # round -> value
Block = tuple

DPI = 110
MARKERS_UP_TO = 30  # draw point markers when a series has at most this many rounds


write_text = atomic_write_text  # used by report.py


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _new_axes(width: float = 7.5, height: float = 4.0):
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _xy(series: Series) -> tuple[list[int], list[float]]:
    rounds = sorted(series)
    return rounds, [series[r] for r in rounds]


def _legend_outside(ax) -> None:
    """Legend to the right of the axes, so it never covers the lines however many clients."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def lines_plot(
    path: Path,
    lines: Mapping[str, Series],
    *,
    title: str,
    ylabel: str,
    mean: Series | None = None,
    mean_label: str = "mean over clients",
    lw: float = 1.3,
) -> Path:
    """One line per entry of ``lines`` (clients, runs, accountants), plus an optional bold mean."""
    fig, ax = _new_axes()
    named = [(color, label, series, False)
             for color, (label, series) in zip(_colors(len(lines)), lines.items())]
    if mean:
        named.append(("black", mean_label, mean, True))
    for color, label, series, bold in named:
        x, y = _xy(series)
        ax.plot(x, y, lw=3.0 if bold else lw, alpha=1.0 if bold else 0.85, color=color,
                label=label, marker="o" if len(x) <= MARKERS_UP_TO else None, ms=4 if bold else 3)
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    _legend_outside(ax)
    return _save(fig, path)


def _byte_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if max_bytes >= scale:
            return scale, unit
    return 1.0, "bytes"


def egress_plot(path: Path, by_direction: Mapping[str, Mapping[str, Series]]) -> Path:
    """Stacked bars of bytes per round, one panel per direction ("up", "down"), stacked by kind.

    Args:
        by_direction: direction -> kind -> round -> bytes.
    """
    directions = [d for d in ("up", "down") if d in by_direction] + sorted(
        d for d in by_direction if d not in ("up", "down"))
    kinds = sorted({k for d in directions for k in by_direction[d]})
    colors = dict(zip(kinds, _colors(len(kinds))))
    totals = [sum(s.get(r, 0) for s in by_direction[d].values())
              for d in directions for r in {r for s in by_direction[d].values() for r in s}]
    scale, unit = _byte_unit(max(totals, default=0))
    fig = Figure(figsize=(7.5, 2.4 * len(directions) + 0.6))
    axes = fig.subplots(len(directions), 1, sharex=True, squeeze=False)[:, 0]
    for ax, direction in zip(axes, directions):
        rounds = sorted({r for s in by_direction[direction].values() for r in s})
        bottom = [0.0] * len(rounds)
        for kind in kinds:
            s = by_direction[direction].get(kind, {})
            h = [s.get(r, 0) / scale for r in rounds]
            ax.bar(rounds, h, bottom=bottom, width=0.8, color=colors[kind], label=kind)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set(ylabel=f"{unit} {direction}")
        ax.grid(alpha=0.3, axis="y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(f"Traffic per round, all clients ({unit}; up = client to server)")
    axes[-1].set_xlabel("round")
    _legend_outside(axes[0])
    return _save(fig, path)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def render_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    """Sections of blocks -> Markdown (images as relative links, config as a pointer)."""
    out = [f"# {title}", ""]
    for name, blocks in sections:
        out += [f"## {name}", ""]
        for b in blocks:
            if b[0] == "table":
                out.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            elif b[0] == "config":
                out.append("The resolved configuration is in `config.toml` (and in report.html).")
            else:
                out.append(b[1])
            out.append("")
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
       "color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
       "padding:.25em .6em;text-align:left}td.n{text-align:right}"
       "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}")


def _td(cell: str) -> str:
    numeric = re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?|nan|—", cell)
    return f'<td class="n">{html.escape(cell)}</td>' if numeric else f"<td>{html.escape(cell)}</td>"


def render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    """Sections of blocks -> one HTML page (numbers right-aligned, config collapsible)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for name, blocks in sections:
        out.append(f"<h2>{esc(name)}</h2>")
        for b in blocks:
            if b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in b[1]) + "</tr>")
                out += ["<tr>" + "".join(_td(c) for c in row) + "</tr>"
                        for row in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                out.append(f'<p><img src="{esc(b[1])}" alt="{esc(b[2])}"></p>')
            elif b[0] == "config":
                out.append("<details><summary>config.toml (resolved, verbatim)</summary>"
                           f"<pre>{esc(b[1])}</pre></details>")
            else:
                out.append(f"<p>{esc(b[1])}</p>")
    return "\n".join(out + ["</body></html>", ""])
