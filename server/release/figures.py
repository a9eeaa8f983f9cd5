"""The release report's figures, drawn with matplotlib's Agg canvas (no display, no global pyplot
state) and returned as PNG bytes.

A report has a figure per variable, 0.1-0.2 s of one core each. Inside `workers()` (the ServerApp
opens it when a release starts) `draw` hands them to worker processes started then, which import
matplotlib while the sites answer and draw in parallel when the report is built; elsewhere
`draw` draws here.
"""

from __future__ import annotations

import io
import math
import re
from concurrent import futures
from concurrent.futures import process as _process  # noqa: F401  (futures.process.BrokenProcessPool)
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ...common.procs import usable_cores
from ..model.graphical import SITE
from .compare import VariableComparison

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BLUE, ORANGE, SLATE, LIGHT, GREY = "#2563eb", "#ea580c", "#334155", "#e2e8f0", "#94a3b8"
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
         "axes.labelsize": 9, "axes.edgecolor": GREY, "axes.labelcolor": SLATE, "xtick.color": SLATE,
         "ytick.color": SLATE, "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
         "legend.fontsize": 8, "axes.grid": True, "grid.color": LIGHT, "grid.linewidth": 0.8,
         "axes.axisbelow": True}
DPI = 120


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "variable"


@contextmanager
def _figure(figsize: tuple[float, float], style: dict[str, Any] | None = None) -> Iterator["Figure"]:
    """A new figure under the report's style. matplotlib is imported here, on the first figure: its
    1.4 s import is paid by a process that draws, not by every one that imports the pipeline."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(STYLE | (style or {})):
        yield Figure(figsize=figsize)


def warm_up() -> None:
    """Import matplotlib and draw one small figure: fonts and renderer loaded (0.5-0.8 s of the first figure)."""
    with _figure((1.0, 1.0)) as fig:
        fig.add_subplot().set_title("warm-up 0.5")
        _png(fig)


class _Workers:
    """Worker processes (`python -m ppsehr.server.release.figures`, matplotlib warmed up at start) and
    one thread per worker feeding it figures over its pipes: a pickled (function, args) frame in, a
    PNG frame out. Pickle is safe here: both ends are this program, on a pipe nobody else holds."""

    def __init__(self, count: int):
        import queue
        import subprocess
        import sys

        self.procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                      for _ in range(count)]
        self.idle: queue.Queue = queue.Queue()
        for proc in self.procs:
            self.idle.put(proc)
        self.threads = futures.ThreadPoolExecutor(count, thread_name_prefix="figures")

    def submit(self, fn: Callable[..., bytes], args: tuple) -> futures.Future:
        return self.threads.submit(self._run, fn, args)

    def _run(self, fn: Callable[..., bytes], args: tuple) -> bytes:
        import pickle

        proc = self.idle.get()
        try:
            if proc.poll() is not None:
                raise EOFError
            _send(proc.stdin, pickle.dumps((fn, args)))
            kind, data = _receive(proc.stdout)
        except (OSError, EOFError):
            raise futures.process.BrokenProcessPool("a figure worker exited") from None
        finally:
            self.idle.put(proc)  # a dead one too: whoever takes it next finds out at once
        if kind != b"P":
            raise RuntimeError(f"figure worker: {data.decode(errors='replace')}")
        return data

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        for proc in self.procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
            except Exception:  # noqa: BLE001  (any state: make sure it is gone)
                proc.kill()
                proc.wait()


def _send(pipe, payload: bytes, kind: bytes = b"J") -> None:
    pipe.write(kind + len(payload).to_bytes(8, "big") + payload)
    pipe.flush()


def _receive(pipe) -> tuple[bytes, bytes]:
    head = pipe.read(9)
    if len(head) < 9:
        raise EOFError
    data = pipe.read(int.from_bytes(head[1:], "big"))
    return head[:1], data


def _serve() -> None:
    """A figure worker: warm up, then draw each (function, args) frame from stdin until it closes."""
    import pickle
    import sys

    warm_up()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            _, frame = _receive(source)
        except EOFError:
            return
        try:
            fn, args = pickle.loads(frame)
            _send(sink, fn(*args), b"P")
        except Exception as e:  # noqa: BLE001  (reported to the caller, which raises it)
            _send(sink, f"{type(e).__name__}: {e}".encode(), b"E")


_pool: _Workers | None = None


@contextmanager
def workers(count: int | None = None) -> Iterator[None]:
    """Within this block `draw` uses `count` worker processes (default: one per core, at most 4),
    started now so that they import matplotlib meanwhile, and stopped on exit. With one core, or
    when they cannot start, figures are drawn in this process."""
    global _pool
    count = count or usable_cores()
    pool = None
    if count > 1 and _pool is None:
        try:
            pool = _pool = _Workers(count)
        except OSError:
            pool = None
    try:
        yield
    finally:
        if pool is not None:
            _pool = None
            pool.close()


def draw(fn: Callable[..., bytes], *args: Any) -> "bytes | Drawing":
    """`fn(*args)`'s PNG: on a worker inside `workers()` (a Drawing to `result()` later), else drawn now."""
    if _pool is None:
        return fn(*args)
    try:
        return Drawing(_pool.submit(fn, args), fn, args)
    except RuntimeError:  # the pool was shut down: draw here
        return fn(*args)


class Drawing:
    """A figure being drawn on a worker; `result()` gives its PNG (drawn here if the worker died)."""

    def __init__(self, future: futures.Future, fn: Callable[..., bytes], args: tuple):
        self.future, self.fn, self.args = future, fn, args

    def result(self, timeout: float = 120.0) -> bytes:
        try:
            return self.future.result(timeout)
        except (futures.process.BrokenProcessPool, futures.CancelledError, futures.TimeoutError):
            return self.fn(*self.args)


def _png(fig: "Figure") -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def figure_distribution(c: VariableComparison, title: str) -> bytes:
    """Bars: synthetic shares; points with whiskers: the DP aggregate and its 95% noise band."""
    k = len(c.cells)
    with _figure((5.4, 3.1)) as fig:
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
    with _figure((6.4, 6.6), {"axes.grid": False}) as fig:
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
    with _figure((10.0 if over_time else 6.4, max(2.4, 0.55 * len(names) + 1.3))) as fig:
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
            from matplotlib import dates as mdates

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
    with _figure((5.4, 3.2)) as fig:
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
        ax.set_title("Records vs the DP aggregates they were fitted to (measured marginals)", loc="left")
        fig.tight_layout()
        return _png(fig)




def figure_unmeasured(rows: list[dict[str, Any]]) -> bytes:
    """Evaluation: TVD of each unmeasured pair against the sites' noisy real table, with its noise bound
    (the exact TVD lies within value ± bound); a value beyond its bound is drawn solid."""
    rows = [r for r in rows if r.get("tvd") is not None]
    with _figure((5.4, 0.9 + 0.42 * max(len(rows), 1))) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(rows))[::-1]
        for yi, r in zip(y, rows):
            tvd, bound = float(r["tvd"]), float(r["tvd_noise_bound"])
            beyond = tvd > bound
            ax.hlines(yi, max(tvd - bound, 0.0), min(tvd + bound, 1.0), color=ORANGE, lw=5, alpha=0.35, zorder=1)
            ax.scatter([tvd], [yi], s=36, zorder=2, color=BLUE if beyond else "white", edgecolors=BLUE, linewidths=1.5)
        ax.set_yticks(y)
        ax.set_yticklabels([" × ".join(r["variables"]) for r in rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("total variation distance, records vs the sites' real table (noisy)")
        ax.set_title("Unmeasured pairs: TVD and its noise bound", loc="left")
        ax.scatter([], [], s=36, color=BLUE, label="beyond the noise bound")
        ax.scatter([], [], s=36, color="white", edgecolors=BLUE, linewidths=1.5, label="within the noise")
        ax.plot([], [], color=ORANGE, lw=5, alpha=0.35, label="TVD ± noise bound")
        ax.legend(loc="lower right", fontsize=7.5)
        fig.tight_layout()
        return _png(fig)


def figure_distances(distances: Sequence[int], groups: dict[str, dict[str, Any]]) -> bytes:
    """Evaluation: each real row's Hamming distance to its closest synthetic record, as shares of the
    (noisy, clipped) rows of each group: members (sites in the release) and held-out sites."""
    with _figure((5.4, 3.0)) as fig:
        ax = fig.add_subplot()
        x = np.asarray(list(distances), dtype=float)
        shown = [(k, g) for k, g in groups.items() if g and g.get("histogram")]
        width = 0.8 / max(len(shown), 1)
        for i, (label, g) in enumerate(shown):
            h = np.clip(np.asarray(g["histogram"], dtype=float), 0, None)
            share = h / h.sum() if h.sum() > 0 else h
            ax.bar(x - 0.4 + width * (i + 0.5), share, width=width, color=_palette(i), alpha=0.85, label=label, zorder=2)
        ax.set_xticks(x)
        ax.set_xlabel("distance to the closest synthetic record (variables that differ)")
        ax.set_ylabel("share of real rows")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.grid(axis="x", visible=False)
        ax.set_title("Distance to closest record (noisy counts)", loc="left")
        ax.legend(loc="upper right", fontsize=7.5)
        fig.tight_layout()
        return _png(fig)


if __name__ == "__main__":
    _serve()
