"""The release report: one self-contained HTML page (no network needed) plus its PNG figures.

It shows, for a release: every variable's distribution in the synthetic records next to the DP
aggregate it was fitted to, with the 95% band of the aggregate's noise; the dependency structure
(cliques) the model used; each site's privacy budget (this release, lifetime, over time from the
signed receipts); the fidelity figures; the privacy statement; the sites not included.

Post-processing only: it reads the manifest, the noisy measurements, the sampled records and the
fidelity summary, never site data. Figures are drawn with matplotlib's Agg canvas (no display,
no global pyplot state); the page embeds them as base64 PNG data URIs and carries its CSS inline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
from matplotlib import dates as mdates
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ...common import cells as cell_groups
from ...common.dictionary import MISSING, Dictionary, load_dictionary
from ...common.errors import ReleaseError
from ...common.mapping import _bin
from ..measure.aggregate import SITE
from ..model.graphical import Measurement

Z95 = NormalDist().inv_cdf(0.975)  # half-width of a two-sided 95% normal interval, in sd
SECTIONS = {"summary": "Summary", "privacy": "Privacy", "budget": "Budget", "distributions": "Distributions",
            "structure": "Model structure", "fidelity": "Fidelity", "sites-not-included": "Sites not included",
            "generator": "Generator"}
BLUE, ORANGE, SLATE, LIGHT, GREY = "#2563eb", "#ea580c", "#334155", "#e2e8f0", "#94a3b8"
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
         "axes.labelsize": 9, "axes.edgecolor": GREY, "axes.labelcolor": SLATE, "xtick.color": SLATE,
         "ytick.color": SLATE, "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
         "legend.fontsize": 8, "axes.grid": True, "grid.color": LIGHT, "grid.linewidth": 0.8,
         "axes.axisbelow": True}
DPI = 120


# ----------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class VariableComparison:
    """One variable: synthetic shares against the DP aggregate's shares and their 95% noise band."""

    variable: str
    cells: tuple[str, ...]
    synthetic: np.ndarray  # share of records per cell
    dp: np.ndarray  # share per cell of the DP aggregate (noisy counts / their total)
    half_width: np.ndarray  # 95% half-width of dp from the noise (the total treated as known)
    tables: int  # measured tables combined into the aggregate

    @property
    def inside(self) -> int:
        """Cells whose synthetic share lies inside the band."""
        return int(np.sum(np.abs(self.synthetic - self.dp) <= self.half_width + 1e-12))


def dp_marginal(variable: str, measurements: Sequence[Measurement]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Noisy counts of one variable and their per-cell noise variance, from every table that contains it.

    Each table is summed down to the variable (variances add: the cells' noise is independent) and
    the tables are combined by inverse variance (their noise draws are independent too). None if no
    completely observed table contains the variable.
    """
    num = den = None
    used = 0
    for m in measurements:
        if variable not in m.variables or not m.complete or m.maps()[m.variables.index(variable)] is not None:
            continue  # a table that groups this variable's cells says nothing about each cell
        axis = m.variables.index(variable)
        others = tuple(i for i in range(m.values.ndim) if i != axis)
        counts = m.values.sum(axis=others)
        var = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape).sum(axis=others)
        if not np.all(var > 0):
            continue
        w = 1.0 / var
        num = w * counts if num is None else num + w * counts
        den = w if den is None else den + w
        used += 1
    if den is None:
        return None
    return num / den, 1.0 / den, used


def _without_site(m: Measurement) -> Measurement | None:
    """The measurement summed over its `site` axis (per-cell variances add); None if a slice is unobserved."""
    if SITE not in m.variables:
        return m
    if not m.complete:
        return None
    axis = m.variables.index(SITE)
    variance = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape).sum(axis=axis)
    groups = m.groups[:axis] + m.groups[axis + 1:] if m.groups is not None else None
    return Measurement(m.variables[:axis] + m.variables[axis + 1:], m.values.sum(axis=axis), variance, groups)


def compare_variables(dictionary: Dictionary, measurements: Sequence[Measurement],
                      samples: np.ndarray) -> list[VariableComparison]:
    """Per dictionary variable: synthetic shares vs the DP aggregate with its 95% band."""
    domain = dictionary.domain()
    for i, m in enumerate(measurements):
        want = tuple(domain.get(v, -1) for v, g in zip(m.variables, m.maps()) if v != SITE and g is None)
        got = tuple(n for v, n, g in zip(m.variables, m.values.shape, m.maps()) if v != SITE and g is None)
        if got != want:
            raise ReleaseError(f"measurement {i} over {[v for v in m.variables if v != SITE]} has shape {got}; "
                               f"the dictionary says {want}")
    measurements = [m for m in map(_without_site, measurements) if m is not None]
    n = max(len(samples), 1)
    out = []
    for j, (name, var) in enumerate(dictionary.variables.items()):
        synth = np.bincount(samples[:, j], minlength=var.size)[: var.size] / n if len(samples) else np.zeros(var.size)
        est = dp_marginal(name, measurements)
        if est is None:
            dp_share, half, used = np.full(var.size, np.nan), np.full(var.size, np.nan), 0
        else:
            counts, variance, used = est
            total = counts.sum()
            if total <= 0:
                total = 1.0
            dp_share, half = counts / total, Z95 * np.sqrt(variance) / total
        out.append(VariableComparison(name, var.cells, synth, dp_share, half, used))
    return out


def budget_history(manifests: Sequence[dict[str, Any]]) -> dict[str, list[tuple[datetime, float, float, float]]]:
    """Per site, its debits as (debited_at, rho spent in total after it, rho limit, rho debited), oldest first.

    Taken from the signed receipts of every manifest given; a receipt in several manifests counts once.
    """
    seen: dict[tuple[str, int], tuple[datetime, float, float, float]] = {}
    for m in manifests:
        for r in m.get("receipts", []):
            try:
                at = datetime.fromisoformat(str(r["debited_at"]).replace("Z", "+00:00"))
                seen[(str(r["site"]), int(r["ledger_seq"]))] = (at, float(r["rho_spent_total"]), float(r["rho_limit"]),
                                                                float(r["rho_debited"]))
            except (KeyError, TypeError, ValueError):
                continue
    out: dict[str, list[tuple[datetime, float, float, float]]] = {}
    for (site, seq), point in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(site, []).append(point)
    return out


# ----------------------------------------------------------------------------- figures
def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "variable"


def figure_distribution(c: VariableComparison, title: str) -> bytes:
    """Bars: synthetic shares; points with whiskers: the DP aggregate and its 95% noise band."""
    k = len(c.cells)
    with rc_context(STYLE):
        fig = Figure(figsize=(5.4, 3.1))
        ax = fig.add_subplot()
        x = np.arange(k)
        ax.bar(x, c.synthetic, width=0.62, color=BLUE, alpha=0.85, label="synthetic records", zorder=2)
        if c.tables:
            ax.errorbar(x, c.dp, yerr=c.half_width, fmt="o", color=ORANGE, ecolor=ORANGE, elinewidth=2.2,
                        capsize=4, markersize=4.5, markeredgecolor="white", zorder=3,
                        label="DP aggregate, 95% noise band")
        ax.set_xticks(x)
        long = sum(len(s) for s in c.cells) > 44 or max(len(s) for s in c.cells) > 14
        ax.set_xticklabels(c.cells, rotation=35 if long else 0, ha="right" if long else "center", fontsize=8)
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("share of records")
        low = np.nanmin(np.concatenate([c.synthetic, c.dp - c.half_width])) if c.tables else 0.0
        high = np.nanmax(np.concatenate([c.synthetic, c.dp + c.half_width])) if c.tables else c.synthetic.max()
        ax.set_ylim(min(0.0, low * 1.1), max(high * 1.08, 0.05))
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.set_title(title, loc="left")
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=7.5, handlelength=1.4,
                   columnspacing=1.6, borderaxespad=0.3)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        return _png(fig)


def figure_structure(variables: list[str], cliques: list[list[str]], measured: list[tuple[str, ...]]) -> bytes:
    """Variables on a circle; an edge wherever two variables share a clique of the model.

    Solid: the pair was measured together (a DP marginal covers it); dashed: added when the
    graph was triangulated. A `site` variable (site effects) sits in the centre.
    """
    nodes = [v for v in variables if v != SITE]
    pos = {v: (math.cos(math.pi / 2 - 2 * math.pi * i / max(len(nodes), 1)),
               math.sin(math.pi / 2 - 2 * math.pi * i / max(len(nodes), 1))) for i, v in enumerate(nodes)}
    has_site = any(SITE in c for c in cliques)
    if has_site:
        pos[SITE] = (0.0, 0.0)
    measured_pairs = {frozenset(p) for s in measured for p in _pairs(s)}
    edges = {frozenset(p) for c in cliques for p in _pairs(c)}
    with rc_context(STYLE | {"axes.grid": False}):
        fig = Figure(figsize=(6.4, 6.6))
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_aspect("equal")
        kinds = set()
        for e in sorted(edges, key=lambda e: sorted(e)):
            a, b = sorted(e)
            if a not in pos or b not in pos:
                continue
            (xa, ya), (xb, yb) = pos[a], pos[b]
            kinds.add("site" if SITE in e else "measured" if e in measured_pairs else "fill")
            if SITE in e:
                ax.plot([xa, xb], [ya, yb], color=GREY, lw=0.8, alpha=0.6, zorder=1)
            elif e in measured_pairs:
                ax.plot([xa, xb], [ya, yb], color=BLUE, lw=2.0, alpha=0.9, zorder=2)
            else:
                ax.plot([xa, xb], [ya, yb], color=ORANGE, lw=1.3, ls=(0, (4, 3)), alpha=0.9, zorder=2)
        for v, (x, y) in pos.items():
            ax.text(x, y, v, ha="center", va="center", fontsize=9, zorder=3, color="white" if v == SITE else SLATE,
                    bbox=dict(boxstyle="round,pad=0.35", fc=SLATE if v == SITE else "white",
                              ec=SLATE if v == SITE else BLUE, lw=1.2))
        for kind, style, label in (("measured", dict(color=BLUE, lw=2.0), "measured together (DP marginal)"),
                                   ("fill", dict(color=ORANGE, lw=1.3, ls=(0, (4, 3))), "added by triangulation"),
                                   ("site", dict(color=GREY, lw=0.8), "site effect (tables measured per site)")):
            if kind in kinds:
                ax.plot([], [], label=label, **style)
        if kinds:
            fig.legend(loc="lower center", ncols=len(kinds), fontsize=8)
        ax.set_xlim(-1.22, 1.22)
        ax.set_ylim(-1.12, 1.12)
        fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.1)
        return _png(fig)


def _pairs(s: Sequence[str]) -> list[tuple[str, str]]:
    s = list(s)
    return [(a, b) for i, a in enumerate(s) for b in s[i + 1:]]


def figure_budget(sites: dict[str, dict[str, Any]], history: dict[str, list[tuple[datetime, float, float, float]]]) -> bytes:
    """Left: each site's lifetime rho (spent before, this release, left). Right: lifetime rho over time."""
    over_time = len({p[0] for pts in history.values() for p in pts}) >= 2
    names = sorted(sites)
    with rc_context(STYLE):
        fig = Figure(figsize=(10.0 if over_time else 6.4, max(2.4, 0.55 * len(names) + 1.3)))
        ax = fig.add_subplot(1, 2 if over_time else 1, 1)
        y = np.arange(len(names))[::-1]
        this = np.array([float(sites[s]["rho"]) for s in names])
        total = np.array([float(sites[s]["rho_total"]) for s in names])
        limit = np.array([float(sites[s].get("rho_limit", sites[s]["rho_total"])) for s in names])
        before = np.clip(total - this, 0, None)
        ax.barh(y, before, color=GREY, label="spent before this release", height=0.6)
        ax.barh(y, this, left=before, color=BLUE, label="this release", height=0.6)
        ax.barh(y, np.clip(limit - total, 0, None), left=total, color=LIGHT, label="left", height=0.6)
        for yi, t, lim in zip(y, total, limit):
            ax.text(lim, yi, f"  {t / lim:.0%} used" if lim > 0 else "", va="center", fontsize=8, color=SLATE)
        ax.set_yticks(y)
        ax.set_yticklabels(names)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("lifetime ρ (zCDP) per site")
        ax.set_xlim(0, max(limit.max(), total.max()) * 1.22)
        ax.set_title("Lifetime budget", loc="left", pad=22)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=3, fontsize=7.5, borderaxespad=0.2)
        if over_time:
            ax2 = fig.add_subplot(1, 2, 2)
            end = max(p[0] for pts in history.values() for p in pts)
            for i, (site, pts) in enumerate(sorted(history.items())):
                # start from what was spent before the first debit shown; draw later sites thinner so
                # that sites with identical spending stay visible
                xs, ys = [pts[0][0]], [max(pts[0][1] - pts[0][3], 0.0)]
                for at, after, _, _ in pts:
                    xs.append(at)
                    ys.append(after)
                xs.append(end)
                ys.append(ys[-1])
                ax2.step(xs, ys, where="post", lw=1.4 + 1.3 * (len(history) - 1 - i), marker="o",
                         markevery=list(range(1, len(xs) - 1)), markersize=4, label=site, color=_palette(i),
                         solid_capstyle="butt")
            top = max(p[1] for pts in history.values() for p in pts) * 1.3
            limits = sorted({p[2] for pts in history.values() for p in pts})
            for lim in limits:
                if lim <= top:
                    ax2.axhline(lim, color=SLATE, lw=1, ls=(0, (4, 3)))
                    ax2.text(0.99, lim, "lifetime limit", transform=ax2.get_yaxis_transform(), ha="right",
                             va="bottom", fontsize=7.5, color=SLATE)
            above = [lim for lim in limits if lim > top]
            if above:
                ax2.text(0.01, 0.97, f"lifetime limit ρ {', '.join(f'{x:.4g}' for x in above)}: above this scale",
                         transform=ax2.transAxes, ha="left", va="top", fontsize=7.5, color=SLATE)
            locator = mdates.AutoDateLocator(minticks=3, maxticks=6)
            ax2.xaxis.set_major_locator(locator)
            ax2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            ax2.set_ylim(0, max([top] + [lim * 1.08 for lim in limits if lim <= top]))
            ax2.set_ylabel("lifetime ρ spent")
            ax2.set_title("Spending over time (signed receipts, UTC)", loc="left", pad=22)
            ax2.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=7.5, ncols=min(len(history), 5),
                       borderaxespad=0.2)
        fig.tight_layout()
        return _png(fig)


def _palette(i: int) -> str:
    return ["#2563eb", "#ea580c", "#059669", "#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#475569"][i % 8]


def figure_fidelity(rows: list[dict[str, Any]]) -> bytes:
    """TVD of every measured marginal, grouped by width, with the group means."""
    widths = sorted({len(r["variables"]) for r in rows})
    with rc_context(STYLE):
        fig = Figure(figsize=(5.4, 3.2))
        ax = fig.add_subplot()
        for i, w in enumerate(widths):
            tvd = np.sort([float(r["tvd"]) for r in rows if len(r["variables"]) == w])
            offsets = np.linspace(-0.28, 0.28, len(tvd)) if len(tvd) > 1 else np.zeros(1)
            ax.scatter(i + offsets, tvd, s=16, color=_palette(i), alpha=0.75, edgecolors="none", zorder=2)
            ax.hlines(tvd.mean(), i - 0.36, i + 0.36, color=SLATE, lw=2, zorder=3)
            ax.text(i + 0.38, tvd.mean(), f"mean {tvd.mean():.3f}", va="center", fontsize=7.5, color=SLATE)
        ax.set_xticks(range(len(widths)))
        ax.set_xticklabels([f"{w}-way ({sum(len(r['variables']) == w for r in rows)})" for w in widths])
        ax.set_xlim(-0.6, len(widths) - 0.1)
        ax.grid(axis="x", visible=False)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("total variation distance")
        ax.set_title("Records vs DP aggregates, per marginal", loc="left")
        fig.tight_layout()
        return _png(fig)


# ----------------------------------------------------------------------------- HTML
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, fmt: str = ".4g") -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return _e(x)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """`rows` cells are HTML already (escape before)."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
:root{--ink:#0f172a;--muted:#475569;--line:#e2e8f0;--bg:#f8fafc;--blue:#2563eb;--orange:#ea580c;--ok:#059669;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--ink);background:var(--bg)}
header{background:#0f172a;color:#f8fafc;padding:28px 0 22px}
header .eyebrow{font-size:12px;letter-spacing:.12em;text-transform:uppercase;color:#93c5fd}
header h1{margin:4px 0 6px;font-size:28px;font-weight:650}
header p{margin:0;color:#cbd5e1}
.wrap{max-width:1180px;margin:0 auto;padding:0 28px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line)}
nav .wrap{display:flex;flex-wrap:wrap;gap:4px 18px;padding-top:10px;padding-bottom:10px}
nav a{color:var(--muted);text-decoration:none;font-size:13.5px;font-weight:550}
nav a:hover{color:var(--blue)}
section{background:#fff;border:1px solid var(--line);border-radius:10px;margin:22px 0;padding:22px 26px}
section h2{margin:0 0 4px;font-size:20px}
section .lead{margin:0 0 16px;color:var(--muted)}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin-top:8px}
.kpi{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:var(--bg)}
.kpi b{display:block;font-size:22px;font-weight:650}
.kpi span{color:var(--muted);font-size:13px}
table{border-collapse:collapse;width:100%;font-size:13.5px;margin:8px 0}
th,td{text-align:left;padding:7px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12.5px;font-weight:600;color:var(--muted);background:var(--bg)}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfdff}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.statement{border-left:4px solid var(--blue);background:#eff6ff;padding:12px 16px;border-radius:0 8px 8px 0;margin:6px 0 14px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(470px,1fr));gap:16px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px;background:#fff}
figure img{display:block;width:100%;height:auto}
figure figcaption{font-size:12.5px;color:var(--muted);margin-top:6px}
.wide img{max-width:100%;width:auto;margin:0 auto}
.two{display:grid;grid-template-columns:minmax(0,1.1fr) minmax(0,1fr);gap:20px;align-items:start}
@media (max-width:900px){.two{grid-template-columns:1fr}.grid{grid-template-columns:1fr}}
.tag{display:inline-block;padding:1px 8px;border-radius:99px;font-size:12px;font-weight:600}
.tag.ok{background:#ecfdf5;color:var(--ok)}.tag.bad{background:#fef2f2;color:var(--bad)}
.empty{color:var(--muted);font-style:italic}
footer{color:var(--muted);font-size:12.5px;padding:8px 0 40px}
"""


def _section(sid: str, lead: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(SECTIONS[sid])}</h2><p class="lead">{lead}</p>{body}</section>'


def _s(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Figures(dict):
    """The report's PNGs by release-relative path; `embed` stores one and returns its <figure>."""

    def embed(self, name: str, data: bytes, alt: str, caption: str, cls: str = "") -> str:
        self[f"figures/{name}.png"] = data
        return (f'<figure class="{cls}"><img src="data:image/png;base64,{base64.b64encode(data).decode()}" '
                f'alt="{_e(alt)}" data-file="figures/{_e(name)}.png"><figcaption>{caption}</figcaption></figure>')


def _distributions(dictionary: Dictionary, comparisons: list[VariableComparison], fidelity: dict[str, Any],
                   figs: _Figures) -> str:
    tvd1 = {r["variables"][0]: r["tvd"] for r in fidelity.get("marginals", []) if len(r.get("variables", [])) == 1}
    cards = []
    for c in comparisons:
        var = dictionary[c.variable]
        text = _e(var.description or c.variable)
        if c.tables:
            caption = (f"{text}. Synthetic share inside the 95% noise band in <b>{c.inside} of {len(c.cells)}</b> "
                       f"cells; DP aggregate from {_s(c.tables, 'measured table')}"
                       + (f"; TVD {tvd1[c.variable]:.3f}." if c.variable in tvd1 else "."))
        else:
            caption = f"{text}. No completely observed DP table contains this variable."
        title = f"{c.variable} ({var.unit})" if var.unit else c.variable
        name = f"distribution-{_slug(c.variable)}"
        if f"figures/{name}.png" in figs:  # two names with the same slug
            name += f"-{len(cards)}"
        cards.append(figs.embed(name, figure_distribution(c, title),
                                f"Distribution of {c.variable}", caption))
    return _section(
        "distributions",
        "Blue bars: the share of synthetic records in each cell. Orange: the DP aggregate the model was fitted to "
        "(the sites' noisy counts, summed), with the 95% band of its noise (±1.96 × the noise standard deviation of "
        "each summed cell, divided by the noisy total). Where the bars sit inside the band, the records agree with "
        "the aggregate as well as the noise allows one to tell.",
        f'<div class="grid">{"".join(cards)}</div>')


def _structure(dictionary: Dictionary, gen: dict[str, Any], measurements: list[Measurement], figs: _Figures) -> str:
    cliques = [list(c) for c in gen.get("cliques", [])]
    lead = (f"The graphical model is a junction tree over {_s(len(cliques), 'clique')}: the records reproduce "
            "dependencies inside a clique; variables in no common clique are independent given the separators "
            "between them.")
    if not cliques:
        return _section("structure", lead, '<p class="empty">The manifest lists no model cliques.</p>')
    measured = [tuple(v for v in m.variables if v != SITE) for m in measurements]
    order = dictionary.names + ([SITE] if any(SITE in c for c in cliques) else [])
    domain = dictionary.domain() | {SITE: max(len(gen.get("site_groups", [])), 1)}
    rows = [[f"<span class='mono'>{_e(' · '.join(c))}</span>", f"{len(c)}",
             f"{math.prod(domain.get(v, 1) for v in c):,}"] for c in cliques]
    fig = figs.embed("structure", figure_structure(order, cliques, measured), "Model dependency graph",
                     "An edge joins two variables that share a clique of the model.", "wide")
    return _section("structure", lead, f'<div class="two">{fig}<div>{_table(["clique", "variables", "cells"], rows)}'
                                       "</div></div>")


def _privacy(manifest: dict[str, Any]) -> str:
    privacy, sites = manifest.get("privacy", {}), manifest.get("sites", {})
    rows = []
    for s in sorted(sites):
        e = sites[s]
        limit = e.get("rho_limit")
        rows.append([_e(s), _num(e.get("rho")), _num(e.get("epsilon"), ".3g"), _num(e.get("delta"), "g"),
                     f"{_num(e.get('rho_total'))} of {_num(limit)}" if limit else _num(e.get("rho_total")),
                     _num(e.get("epsilon_total"), ".3g"), _e(e.get("plans", "")), _e(e.get("marginals", ""))])
    return _section(
        "privacy", f"Privacy unit: {_e(privacy.get('unit', 'not stated'))}. {_e(privacy.get('model', ''))}.",
        f'<div class="statement">{_e(privacy.get("statement", "The manifest carries no privacy statement."))}</div>'
        + _table(["site", "ρ this release", "ε this release", "δ", "lifetime ρ spent", "lifetime ε", "plans",
                  "marginals"], rows)
        + "<p class='lead'>Every figure comes from the sites' signed budget receipts in manifest.json; "
          "<code>ppsehr release verify DIR</code> checks them.</p>")


def _budget(manifest: dict[str, Any], history: Sequence[dict[str, Any]], figs: _Figures) -> str:
    sites = manifest.get("sites", {})
    hist = budget_history([*history, manifest])
    lead = ("Each site's lifetime budget: what it had spent before, what this release cost, what is left; and its "
            f"spending over time from {_s(sum(len(v) for v in hist.values()), 'signed receipt')}"
            + (f" across {len(history) + 1} releases." if history else "."))
    if not sites:
        return _section("budget", lead, '<p class="empty">No site answered.</p>')
    return _section("budget", lead, figs.embed(
        "budget", figure_budget(sites, hist), "Privacy budget per site",
        "ρ composes by addition across plans and releases; ε at the site's δ follows from OpenDP's privacy profile.",
        "wide"))


def _fidelity(fidelity: dict[str, Any], figs: _Figures) -> str:
    lead = _e(fidelity.get("note", "Total variation distance (TVD) between the synthetic records and each DP "
                                   "aggregate")) + "."
    rows = [r for r in fidelity.get("marginals", []) if "tvd" in r and "variables" in r]
    if not rows:
        return _section("fidelity", lead, '<p class="empty">No fidelity figures were computed for this release.</p>')
    worst = sorted(rows, key=lambda r: -float(r["tvd"]))[:10]
    others = {k: v for k, v in fidelity.items()
              if k not in ("note", "marginals", "mean_tvd_by_width") and isinstance(v, (int, float, str))}
    tables = (_table(["width", "mean TVD"], [[f"{_e(k)}-way", _num(v, ".4f")]
                                            for k, v in fidelity.get("mean_tvd_by_width", {}).items()])
              + _table(["largest TVD: marginal", "TVD"],
                       [[f"<span class='mono'>{_e(' × '.join(r['variables']))}</span>", _num(r["tvd"], ".4f")]
                        for r in worst])
              + (_table(["other figure", "value"], [[_e(k), _num(v)] for k, v in others.items()]) if others else ""))
    fig = figs.embed("fidelity", figure_fidelity(rows), "Fidelity per marginal", "0 means identical shares, 1 disjoint.")
    return _section("fidelity", lead, f'<div class="two">{fig}<div>{tables}</div></div>')


def _not_included(manifest: dict[str, Any]) -> str:
    missing = manifest.get("sites_not_included", [])
    if not missing:
        return _section("sites-not-included",
                        "Sites that refused, did not answer in time, or sent a summary that failed verification.",
                        '<p><span class="tag ok">none</span> Every site that was asked answered with a verified '
                        "summary.</p>")
    rows = [[_e(f.get("site")), _e(f.get("round", 1)), f"<code>{_e(f.get('code'))}</code>", _e(f.get("message")),
             _e(f.get("charged"))] for f in missing]
    return _section("sites-not-included",
                    f"{_s(len(missing), 'site answer')} did not count. Refused plans cost the site nothing; for "
                    "timeouts, check the site's ledger.",
                    _table(["site", "round", "code", "message", "budget charged"], rows))


def _generator(manifest: dict[str, Any]) -> str:
    llm = manifest.get("llm", {})
    rows = [[_e(k), f"<span class='mono'>{_num(v, '.6g') if isinstance(v, float) else _e(v)}</span>"]
            for k, v in manifest.get("generator", {}).items() if not isinstance(v, (dict, list))]
    rows.append(["LLM stage", _e(("used" if llm.get("used") else f"not used: {llm.get('reason', '')}")
                                 + ("; degraded: " + "; ".join(llm.get("degradations", [])) if llm.get("degraded") else ""))])
    body = _table(["setting", "value"], rows)
    if manifest.get("files"):
        body += _table(["file", "SHA-256"], [[f"<code>{_e(k)}</code>", f"<span class='mono'>{_e(v)}</span>"]
                                            for k, v in manifest["files"].items()])
    return _section("generator", "How the records were made, and the release's files.", body)


def _summary(dictionary: Dictionary, manifest: dict[str, Any], n: int, comparisons: list[VariableComparison]) -> str:
    privacy, d = manifest.get("privacy", {}), manifest.get("dictionary", {})
    missing = manifest.get("sites_not_included", [])
    eps_max = privacy.get("release_epsilon_max")
    measured = [c for c in comparisons if c.tables]
    kpis = [(f"{n:,}", "synthetic records"), (f"{len(dictionary.variables)}", "variables"),
            (f"{len(manifest.get('sites', {}))}", "sites included" + (f" · {len(missing)} not" if missing else "")),
            (f"{sum(len(p.get('marginals', [])) for p in manifest.get('plans', []))}", "DP marginals measured"),
            (_num(eps_max, ".3g") if eps_max is not None else "–",
             f"max ε per site at δ = {_num(privacy.get('delta'), 'g')}"),
            (f"{sum(c.inside for c in measured)}/{sum(len(c.cells) for c in measured)}", "cells inside the noise band")]
    return _section(
        "summary",
        f"Release <span class='mono'>{_e(manifest.get('release_id', ''))}</span> of dictionary "
        f"{_e(d.get('name', dictionary.name))} {_e(d.get('version', dictionary.version))}, created "
        f"{_e(manifest.get('created', ''))} by {_e(manifest.get('coordinator', ''))}.",
        '<div class="kpis">' + "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(t)}</span></div>' for v, t in kpis)
        + "</div>")


def build_report(dictionary: Dictionary, manifest: dict[str, Any], measurements: list[Measurement],
                 samples: np.ndarray, fidelity: dict[str, Any],
                 history: Sequence[dict[str, Any]] = ()) -> dict[str, bytes]:
    """The release report: {"report.html": self-contained page, "figures/<name>.png": each figure}.

    `measurements` are the DP aggregates the model was fitted to (a `site` axis is summed away),
    `samples` the (n, V) cell indices of the records in dictionary order, `fidelity` what
    release.manifest.fidelity_to_aggregates wrote, `history` earlier manifests of the same consortium (their receipts
    extend the budget-over-time figure). Every text from the manifest is HTML-escaped.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] != len(dictionary.variables):
        raise ReleaseError(f"samples must be an (n, {len(dictionary.variables)}) array of cell indices, "
                           f"got shape {samples.shape}")
    figs = _Figures()
    comparisons = compare_variables(dictionary, measurements, samples)
    body = [_summary(dictionary, manifest, len(samples), comparisons), _privacy(manifest),
            _budget(manifest, history, figs), _distributions(dictionary, comparisons, fidelity, figs),
            _structure(dictionary, manifest.get("generator", {}), measurements, figs), _fidelity(fidelity, figs),
            _not_included(manifest), _generator(manifest)]
    d = manifest.get("dictionary", {})
    name = f"{_e(d.get('name', dictionary.name))} {_e(d.get('version', dictionary.version))}"
    n_sites = len(manifest.get("sites", {}))
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>Release report · {name} · {_e(str(manifest.get('release_id', ''))[:12])}</title>
<style>{CSS}</style></head>
<body>
<header><div class="wrap"><div class="eyebrow">ppsehr · federated differentially private synthetic EHR</div>
<h1>Release report</h1><p>{name} · {_e(manifest.get('created', ''))} · {_s(n_sites, 'site')}</p></div></header>
<nav><div class="wrap">{nav}</div></nav>
<main class="wrap">
{chr(10).join(body)}
</main>
<footer><div class="wrap">Made by ppsehr from the release's DP outputs only (manifest, aggregates, records).
Self-contained: opens without a network. Verify the release with <code>ppsehr release verify DIR</code>.</div></footer>
</body></html>
"""
    return {"report.html": page.encode()} | dict(sorted(figs.items()))


# ----------------------------------------------------------------------------- an existing release
def release_inputs(path: str | Path, dictionary: Dictionary) -> tuple[dict[str, Any], list[Measurement], np.ndarray,
                                                                       dict[str, Any]]:
    """manifest, measurements, samples and fidelity of a written release, for build_report."""
    path = Path(path)

    def read_json(name: str) -> dict[str, Any]:
        try:
            return json.loads((path / name).read_text())
        except FileNotFoundError:
            raise ReleaseError(f"{path / name}: missing (is {path} a ppsehr release?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{path / name}: not valid JSON: {e}") from None

    manifest = read_json("manifest.json")
    if manifest.get("dictionary", {}).get("hash") not in (None, dictionary.hash):
        raise ReleaseError(f"{path}: made with dictionary {manifest['dictionary']['hash']}, not {dictionary.hash}")
    measurements = []
    for i, m in enumerate(read_json("aggregates.json").get("marginals", [])):
        try:
            shape = tuple(len(c) for c in m["cells"])
            variance = np.array([np.inf if v is None else v for v in m["variance"]], dtype=float).reshape(shape)
            groups = m.get("groups")
            if groups is not None:
                groups, grouped = cell_groups.check_groups([dictionary[v].size if v in dictionary.variables else len(c)
                                                            for v, c in zip(m["variables"], m["cells"])], groups)
                if grouped != shape:
                    raise ValueError(f"groups make a {list(grouped)} table, cells say {list(shape)}")
            measurements.append(Measurement(tuple(m["variables"]), np.asarray(m["counts"], dtype=float).reshape(shape),
                                            variance, groups))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ReleaseError(f"{path / 'aggregates.json'}: marginals[{i}] is malformed: {e}") from None
    samples = encode_records(path / "records.csv", dictionary)
    return manifest, measurements, samples, read_json("fidelity.json")


def encode_records(path: Path, dictionary: Dictionary) -> np.ndarray:
    """Records (CSV in the dictionary's vocabulary) back to an (n, V) array of cell indices."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise ReleaseError(f"{path}: missing") from None
    absent = [n for n in dictionary.names if n not in header]
    if absent:
        raise ReleaseError(f"{path}: column(s) {absent} of the dictionary are missing")
    out = np.zeros((len(rows), len(dictionary.names)), dtype=np.int32)
    for j, (name, var) in enumerate(dictionary.variables.items()):
        index = {c: k for k, c in enumerate(var.cells)}
        for i, r in enumerate(rows):
            value = r[name].strip()
            label = MISSING if value == "" else value
            if label in index:
                out[i, j] = index[label]
            elif var.type == "numeric":
                try:
                    out[i, j] = _bin(var, float(value))[0]
                except ValueError:
                    raise ReleaseError(f"{path}, record {i + 1}, column {name!r}: {value!r} is not a number") from None
            else:
                raise ReleaseError(f"{path}, record {i + 1}, column {name!r}: {value!r} is not a cell of {name!r}")
    return out


def write_report(release: str | Path, out: str | Path, dictionary: str | Path,
                 history: Sequence[str | Path] = ()) -> Path:
    """Build the report of a written release into directory `out` (not inside the release: its files are hashed)."""
    if Path(out).exists():
        raise ReleaseError(f"{Path(out).resolve()} already exists; choose a new output directory")
    d = load_dictionary(dictionary)
    manifest, measurements, samples, fidelity = release_inputs(release, d)
    earlier = []
    for h in history:
        try:
            earlier.append(json.loads(Path(h).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ReleaseError(f"{h}: cannot read an earlier manifest: {e}") from None
    return _write_dir(out, build_report(d, manifest, measurements, samples, fidelity, earlier))


def _write_dir(out: str | Path, files: dict[str, bytes]) -> Path:
    """Write files into a new directory `out` whole or not at all (temporary sibling, then rename)."""
    out = Path(out).resolve()
    if out.exists():
        raise ReleaseError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
