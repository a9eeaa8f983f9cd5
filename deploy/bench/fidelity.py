"""`ppsehr bench fidelity`: ppsehr's federated synthesis against central DP baselines.

ppsehr runs exactly as in a release (signed plans, the sites' guards answering with OpenDP and
debiting their ledgers, summaries verified, `measure.rounds.collect` + `model.synthesize`), only
in one process without gRPC or Flower. Baselines see the pooled data, as a central curator
would: central MST and AIM (OpenDP's `dp.mbi`, optional `bench` extra), independent noisy
1-way marginals (OpenDP), and a non-private bootstrap of the real rows as the floor.

ppsehr's methods are told the TSTR target as the release's declared outcome (`--outcome`, which
weights the selection toward the target's pairs); the central baselines get no such hint.

Metrics use the dictionary's discretization against the pooled real data: mean total
variation distance over all 1-way and 2-way marginals and a fixed sample of 3-way marginals,
and the AUC of a logistic regression trained on synthetic (TSTR) or real (TRTR) rows and
tested on held-out real rows.

Datasets: the demo consortium, a simulated one, any consortium directory (`--consortium DIR`:
dictionary.toml and sites/*.toml, loaded as the demo is), or a real benchmark consortium from
`deploy/consortia` (`--dataset flchain|gbsg2|actg175|ncctg-lung`, materialized from lifelines or
scikit-survival into the work directory).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...common import accounting
from ...common.dictionary import Dictionary, load_dictionary
from ...common.errors import DictionaryError, MappingError, PpsehrError, did_you_mean
from ...common.mapping import EncodedTable, load_mapping
from ...common.source import load_site_table
from ..consortia import NAMES as CONSORTIA

# ppsehr's configurations (MeasureOptions): the default release, and the expert overrides worth comparing
PPSEHR_METHODS = {
    "ppsehr": {},  # the default: selected in three rounds (four with few sites), secure sums when every site allows them
    "ppsehr-plain": {"secure_aggregation": False},  # no site allows secure sums
    "ppsehr-pooled": {"site_variable": "pooled"},  # no site effects: every round a secure sum
}
METHODS = (*PPSEHR_METHODS, "central-mst", "central-aim", "independent", "bootstrap")
DELTA = 1e-6


@dataclass
class Dataset:
    name: str
    dictionary: Dictionary
    dictionary_path: Path
    mappings: dict[str, Path]  # site -> mapping file
    tables: dict[str, EncodedTable]
    target: str  # binary-coded target for TSTR: first category vs the rest

    def pooled(self) -> np.ndarray:
        return np.stack([np.concatenate([t.columns[n] for t in self.tables.values()]) for n in self.dictionary.names], axis=1)


# ----------------------------------------------------------------------------- datasets
def demo_dataset(mappings: dict[str, Path] | None = None) -> Dataset:
    """The demo consortium; `mappings` replaces sites' mapping files (tests plant values this way)."""
    from ..local import DEMO_SITES, demo_dir

    demo = demo_dir()
    d = load_dictionary(demo / "dictionary.toml")
    maps = {s: demo / "sites" / f"{s}.toml" for s in DEMO_SITES} | (mappings or {})
    tables = {s: load_site_table(load_mapping(m, d), d)[0] for s, m in maps.items()}
    return Dataset("demo", d, demo / "dictionary.toml", maps, tables, "heart_disease")


def consortium_dataset(directory: str | Path, target: str | None = None, name: str | None = None) -> Dataset:
    """A consortium directory, loaded as the demo is: `dictionary.toml` and one site mapping per
    site in `sites/*.toml` (each mapping's [source] path relative to the mapping file).

    `target` (TSTR) defaults to the dictionary's `[benchmark] target`, else its first binary
    categorical variable (`resolve_target`). Errors name the file they are about."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise PpsehrError(f"{root}: consortium directory not found (expected dictionary.toml and sites/*.toml)")
    dict_path = root / "dictionary.toml"
    d = load_dictionary(dict_path)
    files = sorted((root / "sites").glob("*.toml"))
    if not files:
        raise PpsehrError(f"{root / 'sites'}: no site mappings (sites/*.toml) in the consortium directory")
    maps: dict[str, Path] = {}
    tables: dict[str, EncodedTable] = {}
    for f in files:
        mapping = load_mapping(f, d)
        if mapping.site in maps:
            raise MappingError(f"{f}: site id {mapping.site!r} is already used by {maps[mapping.site]}")
        maps[mapping.site] = f
        tables[mapping.site] = load_site_table(mapping, d)[0]
    return Dataset(name or root.name, d, dict_path, maps, tables, resolve_target(d, target))


def resolve_target(d: Dictionary, target: str | None = None) -> str:
    """The TSTR target: `target`, else the dictionary's `[benchmark] target`, else its declared
    outcome (`[model] outcome`), else its first categorical variable with two categories. It must be
    categorical (first category vs the rest) and may appear in joint tables (not tier 3)."""
    bench = d.content.get("benchmark", {})
    declared = bench.get("target") if isinstance(bench, dict) else None
    name = target or declared or d.outcome
    if name is None:
        binary = [n for n, v in d.variables.items() if v.type == "categorical" and len(v.categories) == 2 and v.tier < 3]
        if not binary:
            raise DictionaryError(f"{d.source}: no binary categorical variable to use as the TSTR target; "
                                  f"give --target or declare [benchmark] target = \"...\"")
        return binary[0]
    origin = "--target" if target else "benchmark.target" if declared else "model.outcome"
    if name not in d.variables:
        raise DictionaryError(f"{d.source}: {origin} {name!r} is not a variable of the dictionary"
                              + did_you_mean(name, d.variables, f"variables: {', '.join(d.names)}"))
    if d[name].type != "categorical":
        raise DictionaryError(f"{d.source}: {origin} {name!r} is numeric; the TSTR target must be categorical "
                              f"(its first category is predicted against the rest)")
    if d[name].tier >= 3:
        raise DictionaryError(f"{d.source}: {origin} {name!r} is tier 3 (released in 1-way tables only), so no "
                              "model could learn it from the release; choose another TSTR target")
    return name


def simulated_dataset(workdir: Path, sites: int, rows: int, attributes: int, heterogeneity: float,
                      seed: int = 0) -> Dataset:
    """A consortium drawn from a known Bayesian network, written as Parquet files with mappings.

    Attribute x0 is binary (the TSTR target); each attribute has up to two earlier parents with
    Dirichlet(0.5) conditional tables. `heterogeneity` in [0, 1] mixes each site's own random
    distribution into every root and into the target's table.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    sizes = [2] + list(rng.integers(2, 9, size=attributes - 1))
    names = [f"x{i}" for i in range(attributes)]
    parents = [[]] + [sorted(rng.choice(i, size=min(i, int(rng.integers(1, 3))), replace=False).tolist())
                      for i in range(1, attributes)]
    order = list(range(1, attributes)) + [0]  # the target depends on others, so it is sampled last
    parents[0] = sorted(rng.choice(np.arange(1, attributes), size=min(2, attributes - 1), replace=False).tolist())
    cpts = [rng.dirichlet(np.full(sizes[i], 0.5), size=math.prod(sizes[p] for p in parents[i]) or 1)
            for i in range(attributes)]
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ['[dictionary]\nname = "simulated"\nversion = "1"\n']
    for n, k in zip(names, sizes):
        cats = ", ".join(f'"v{j}"' for j in range(k))
        lines.append(f"[variables.{n}]\ntype = \"categorical\"\ncategories = [{cats}]\nmissing = false\n")
    dict_path = workdir / "dictionary.toml"
    dict_path.write_text("\n".join(lines))
    d = load_dictionary(dict_path)
    per_site = [rows // sites + (1 if s < rows % sites else 0) for s in range(sites)]
    maps, tables = {}, {}
    for s, n_rows in enumerate(per_site):
        local = [c.copy() for c in cpts]
        for i in range(attributes):
            if not parents[i] or i == 0:
                own = rng.dirichlet(np.full(sizes[i], 0.5), size=local[i].shape[0])
                local[i] = (1 - heterogeneity) * local[i] + heterogeneity * own
        data = np.zeros((n_rows, attributes), dtype=np.int64)
        for i in order:
            idx = (np.ravel_multi_index([data[:, p] for p in parents[i]], [sizes[p] for p in parents[i]])
                   if parents[i] else np.zeros(n_rows, dtype=np.int64))
            cum = np.cumsum(local[i], axis=1)
            cum[:, -1] = 1.0
            u = rng.random(n_rows)
            data[:, i] = (u[:, None] > cum[idx]).sum(axis=1)
        site = f"site{s + 1}"
        path = workdir / f"{site}.parquet"
        pq.write_table(pa.table({n: data[:, j] for j, n in enumerate(names)}), path)
        mlines = [f'[site]\nid = "{site}"\n[source]\npath = "{path.name}"\nformat = "parquet"\npatient_key = "row"\n']
        for n, k in zip(names, sizes):
            vals = ", ".join(f'"{j}" = "v{j}"' for j in range(k))
            mlines.append(f"[variables.{n}]\ncolumn = \"{n}\"\nvalues = {{ {vals} }}\n")
        maps[site] = workdir / f"{site}.toml"
        maps[site].write_text("\n".join(mlines))
        tables[site] = load_site_table(load_mapping(maps[site], d), d)[0]
    return Dataset(f"simulated-{sites}x{rows}x{attributes}", d, dict_path, maps, tables, "x0")


# ----------------------------------------------------------------------------- methods
class Federation:
    """Real site guards (in this process) over a dataset, with keys and ledgers in a work directory."""

    POLICY = {"max_rho_per_plan": 1e6, "max_marginals": 10_000, "max_cells": 10**7,
              "max_total_cells": 2 * 10**7, "max_plans_per_day": 100_000}  # generous: a benchmark measures the method

    def __init__(self, ds: Dataset, workdir: Path):
        from ...client.config import load_site_config
        from ...client.guard import SiteGuard
        from ...common.keys import init_consortium
        from ..local import write_site_config

        self.keys = init_consortium(workdir / "keys", list(ds.mappings), ["127.0.0.1"])
        policy = dict(self.POLICY)
        self.guards = {}
        for site, mapping in ds.mappings.items():
            cfg = write_site_config(workdir / "sites" / f"{site}.toml", site, ds.dictionary_path, mapping,
                                    workdir / "state" / site, "127.0.0.1:0", 1000.0, DELTA,
                                    self.keys.site_keys[site][0], [self.keys.coordinator_pub], policy,
                                    {p: self.keys.site_keys[p][1] for p in ds.mappings if p != site}, 2)
            self.guards[site] = SiteGuard(load_site_config(cfg))

    def _context(self, epsilon: float, **options):
        from ...common import keys
        from ...server.measure.rounds import MeasureOptions, Request
        from ...server.pipeline import Events
        from ..transports import InProcessTransport

        opts = MeasureOptions(**options)
        request = Request("coordinator", "benchmark", accounting.rho_for_epsilon(epsilon, DELTA), DELTA)
        ckey = keys.load_signing_key(self.keys.coordinator_key)
        site_keys = {s: keys.load_public_key(p[1]) for s, p in self.keys.site_keys.items()}
        return opts, request, ckey, site_keys, InProcessTransport(self.guards), Events()

    def collect(self, ds: Dataset, epsilon: float, **options):
        """The release's measurement rounds (measure.rounds.collect) against these guards: (rounds, structure).
        `options` are MeasureOptions (e.g. site_variable="pooled")."""
        from ...server.measure.rounds import collect

        opts, request, ckey, site_keys, transport, events = self._context(epsilon, **options)
        return collect(opts, request, ds.dictionary, ckey, site_keys, transport, events)

    def one_round(self, ds: Dataset, epsilon: float):
        """One plain round of the 1-way tables and the dictionary's declared dependencies (tools that want
        DP marginals of a fixed structure, e.g. the LLM benchmark); returns the Round."""
        from ...server.measure import planner
        from ...server.measure.identify import identify
        from ...server.measure.rounds import measure

        opts, request, ckey, site_keys, transport, events = self._context(epsilon)
        plan = planner.one_round_plan(ds.dictionary, request.rho)
        sites = identify(site_keys, ds.dictionary.hash, transport, opts.reply_timeout, events)  # free; as a release does
        return measure(1, plan, opts, request, ds.dictionary, ckey, sites, transport, events)

    def run(self, ds: Dataset, epsilon: float, seed: int, **options) -> tuple[np.ndarray, float]:
        from ...server.measure.rounds import round_measurements
        from ...server.model.synthesize import synthesize

        rounds, structure = self.collect(ds, epsilon, **options)
        site_variable = options.get("site_variable", "model")
        failures = [f"round {r.number}: {f.site}: {f.code} {f.message}" for r in rounds for f in r.failures
                    if f.code not in ("NOT_SENT", "NOT_IN_ROSTER")]  # a secure attempt that fell back costs nothing
        if failures:  # a release would go ahead without them (e.g. on round 1 alone): not the figure we mean to report
            raise PpsehrError(f"{ds.name}: {len(failures)} site answer(s) missing, so this is not a full release: "
                              + "; ".join(failures[:4]))
        measurements, groups = round_measurements(ds.dictionary, rounds, structure, site_variable, {})
        syn = synthesize(ds.dictionary, measurements, groups, None, np.random.default_rng(seed))
        return syn.samples, syn.seconds


def central_mbi(data: np.ndarray, d: Dictionary, epsilon: float, seed: int, algorithm: str) -> np.ndarray:
    """Central MST or AIM from OpenDP's dp.mbi on the pooled rows (needs the `bench` extra)."""
    import opendp.prelude as dp
    import polars as pl

    _patch_mbi_rounding()
    dp.enable_features("contrib")
    rho = accounting.rho_for_epsilon(epsilon, DELTA)
    df = pl.DataFrame({n: data[:, j].astype(np.int64) for j, n in enumerate(d.names)})
    ctx = dp.Context.compositor(data=df.lazy(), privacy_unit=dp.unit_of(contributions=1), privacy_loss=dp.loss_of(rho=rho))
    algo = dp.mbi.MST() if algorithm == "mst" else dp.mbi.AIM()
    np.random.seed(seed % 2**32)  # mbi's sampler draws from numpy's global state
    table = (ctx.query(rho=rho).select(*d.names)
             .contingency_table(keys={n: list(range(d[n].size)) for n in d.names}, algorithm=algo).release())
    return sample_mbi_model(table, d, len(data), seed)


def sample_mbi_model(table, d: Dictionary, n: int, seed: int) -> np.ndarray:
    """Records from a dp.mbi model, drawn with ppsehr's junction-tree sampler.

    OpenDP 0.16's `ContingencyTable.synthesize()` and mbi's `synthetic_data()` both lose the
    joint structure here (mean 2-way TVD worse than shuffled columns, while the model's own
    projected 2-way marginals are good), so the baseline would look far worse than it is. We take
    the model's clique marginals (mapped from dp.mbi's keys, whose extra null cell is dropped)
    and sample them as ppsehr samples its own model: same model, a sampler that works.
    """
    from ...server.model.graphical import Measurement, estimate

    mrf = table.model
    measurements = []
    for clique in mrf.cliques:
        names = tuple(clique)
        mu = np.asarray(mrf.project(list(names)).datavector(flatten=False), dtype=float)
        full = np.zeros(tuple(d[v].size for v in names))
        for idx in itertools.product(*(range(len(table.keys[v])) for v in names)):
            labels = [table.keys[v][i] for v in names for i in [idx[names.index(v)]]]
            if all(lab is not None for lab in labels):
                full[tuple(labels)] += mu[idx]
        measurements.append(Measurement(names, full, 1e-6))
    model = estimate(d.domain(), measurements, iters=500)
    return model.sample(n, np.random.default_rng(seed))


_PATCHED = False


def _patch_mbi_rounding() -> None:
    """OpenDP 0.16's MST/AIM build their selection step 1-2 ulps over its budget and fail; shave 1e-9 off it.

    This gives the baselines slightly *less* budget than stated, never more.
    """
    global _PATCHED
    if _PATCHED:
        return
    import opendp.extras.mbi._aim as aim
    import opendp.extras.mbi._mst as mst

    for mod in (mst, aim):
        original = mod.prior
        mod.prior = lambda x, _f=original: _f(x) * (1 - 1e-9)
    _PATCHED = True


def independent(data: np.ndarray, d: Dictionary, epsilon: float, seed: int) -> np.ndarray:
    """Noisy 1-way marginals of the pooled rows (OpenDP discrete Gaussian), sampled independently."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    rho = accounting.rho_for_epsilon(epsilon, DELTA) / len(d.names)
    scale = accounting.scale_for_rho(rho)
    rng = np.random.default_rng(seed)
    cols = []
    for j, n in enumerate(d.names):
        space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
        meas = space >> dp.t.then_count_by_categories(categories=list(range(d[n].size)), null_category=False,
                                                     MO=dp.L2Distance[int]) >> dp.m.then_gaussian(scale=scale)
        counts = np.clip(np.asarray(meas(data[:, j].astype(np.int64)), dtype=float), 0, None)
        p = counts / counts.sum() if counts.sum() > 0 else np.full(len(counts), 1 / len(counts))
        cols.append(rng.choice(len(p), size=len(data), p=p))
    return np.stack(cols, axis=1)


# ----------------------------------------------------------------------------- metrics
def marginal(data: np.ndarray, cols: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    flat = np.ravel_multi_index([data[:, c] for c in cols], shape)
    return np.bincount(flat, minlength=math.prod(shape)) / max(len(data), 1)


def tvds(real: np.ndarray, synth: np.ndarray, sizes: list[int], width: int, sample: int | None = None) -> float:
    sets = list(itertools.combinations(range(len(sizes)), width))
    if sample is not None and len(sets) > sample:
        rng = np.random.default_rng(0)  # a fixed sample of 3-way sets, the same for every method
        sets = [sets[i] for i in sorted(rng.choice(len(sets), size=sample, replace=False))]
    if not sets:  # fewer variables than the width
        return float("nan")
    return float(np.mean([0.5 * np.abs(marginal(real, c, tuple(sizes[i] for i in c))
                                       - marginal(synth, c, tuple(sizes[i] for i in c))).sum() for c in sets]))


def _features(data: np.ndarray, sizes: list[int], target: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = [np.eye(k)[data[:, j]][:, 1:] for j, k in enumerate(sizes) if j != target]
    return np.hstack([np.ones((len(data), 1))] + blocks), (data[:, target] == 0).astype(float)


def _logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 30) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method."""
    w = np.zeros(X.shape[1])
    reg = np.full(X.shape[1], l2)
    reg[0] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -30, 30)))
        grad = X.T @ (p - y) + reg * w
        H = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(H, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = score[y == 1], score[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tstr(train: np.ndarray, test: np.ndarray, sizes: list[int], target: int) -> float:
    X, y = _features(train, sizes, target)
    if y.min() == y.max():
        return float("nan")
    w = _logistic(X, y)
    Xt, yt = _features(test, sizes, target)
    return auc(Xt @ w, yt)


# ----------------------------------------------------------------------------- runner
def run_fidelity(ds: Dataset, epsilons: list[float], seeds: int, methods: list[str], workdir: Path,
                 say: Callable[[str], None] = print) -> list[dict]:
    real = ds.pooled()
    sizes = [ds.dictionary[n].size for n in ds.dictionary.names]
    target = ds.dictionary.names.index(ds.target)
    split = np.random.default_rng(12345).permutation(len(real))
    test, train = real[split[: len(real) * 3 // 10]], real[split[len(real) * 3 // 10:]]
    trtr = tstr(train, test, sizes, target)
    federation = Federation(ds, workdir) if any(m.startswith("ppsehr") for m in methods) else None
    rows = []
    for eps in epsilons:
        for seed in range(seeds):
            for method in methods:
                if method == "bootstrap" and eps != epsilons[0]:
                    prev = next(r for r in rows if r["method"] == "bootstrap" and r["seed"] == seed)
                    rows.append(dict(prev, epsilon=eps))
                    continue
                t0 = time.perf_counter()
                if method.startswith("ppsehr"):
                    synth, fit = federation.run(ds, eps, seed, outcome=ds.target, **PPSEHR_METHODS[method])
                elif method in ("central-mst", "central-aim"):
                    synth = central_mbi(real, ds.dictionary, eps, seed, method.split("-")[1])
                    fit = time.perf_counter() - t0
                elif method == "independent":
                    synth = independent(real, ds.dictionary, eps, seed)
                    fit = time.perf_counter() - t0
                elif method == "bootstrap":
                    synth = real[np.random.default_rng(seed).integers(0, len(real), size=len(real))]
                    fit = time.perf_counter() - t0
                else:
                    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
                row = {"dataset": ds.name, "method": method, "epsilon": eps, "seed": seed,
                       "tvd1": tvds(real, synth, sizes, 1), "tvd2": tvds(real, synth, sizes, 2),
                       "tvd3": tvds(real, synth, sizes, 3, sample=50) if len(sizes) >= 3 else float("nan"),
                       "tstr_auc": tstr(synth, test, sizes, target), "trtr_auc": trtr,
                       "fit_seconds": round(fit, 3), "rows": int(len(synth))}
                rows.append(row)
                say(f"{ds.name} {method:<16} eps {eps:<4g} seed {seed}: tvd2 {row['tvd2']:.4f} "
                    f"tstr {row['tstr_auc']:.3f} ({fit:.1f} s)")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (dataset, method, epsilon), and tvd2's standard error over seeds (0 for one seed)."""
    keys = sorted({(r["dataset"], r["method"], r["epsilon"]) for r in rows}, key=lambda k: (k[0], k[2], METHODS.index(k[1]) if k[1] in METHODS else 99))
    out = []
    for ds, method, eps in keys:
        sel = [r for r in rows if (r["dataset"], r["method"], r["epsilon"]) == (ds, method, eps)]
        out.append({"dataset": ds, "method": method, "epsilon": eps, "seeds": len(sel),
                    **{k: float(np.nanmean([r[k] for r in sel])) for k in ("tvd1", "tvd2", "tvd3", "tstr_auc", "trtr_auc", "fit_seconds")},
                    "tvd2_se": _standard_error([r["tvd2"] for r in sel])})
    return out


def _standard_error(values: list[float]) -> float:
    """Standard error of the mean over the finite values (0 with fewer than two)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def markdown(summary: list[dict], command: str) -> str:
    """The summary as a table; tvd2 and its ratio to the best central baseline carry +- one standard
    error over seeds (the ratio's by the delta method), so a difference within the noise shows as such."""
    lines = [f"Command: `{command}`", "",
             "| dataset | method | epsilon | seeds | tvd1 | tvd2 | tvd3 | TSTR AUC | TRTR AUC | fit s | tvd2 / best central |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        central = [x for x in summary if x["dataset"] == r["dataset"] and x["epsilon"] == r["epsilon"]
                   and x["method"] in ("central-mst", "central-aim")]
        ratio = ""
        if central and r["method"].startswith("ppsehr"):
            best = min(central, key=lambda x: x["tvd2"])
            q = r["tvd2"] / best["tvd2"]
            se = q * math.hypot(r.get("tvd2_se", 0.0) / r["tvd2"], best.get("tvd2_se", 0.0) / best["tvd2"])
            ratio = f"{q:.3f}" + (f" ±{se:.3f}" if se else "")
        spread = f" ±{r['tvd2_se']:.4f}" if r.get("tvd2_se") else ""
        lines.append(f"| {r['dataset']} | {r['method']} | {r['epsilon']:g} | {r['seeds']} | {r['tvd1']:.4f} | "
                     f"{r['tvd2']:.4f}{spread} | {r['tvd3']:.4f} | {r['tstr_auc']:.3f} | {r['trtr_auc']:.3f} | "
                     f"{r['fit_seconds']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for method in [m for m in METHODS if any(r["method"] == m and r["dataset"] == ds for r in summary)]:
            pts = sorted((r["epsilon"], r["tvd2"]) for r in summary if r["method"] == method and r["dataset"] == ds)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per site (delta 1e-6)")
        ax.set_ylabel("mean 2-way TVD (lower is better)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_fidelity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, choices=["demo", "simulated", *CONSORTIA],
                   help="demo (default), simulated, or a real benchmark consortium materialized from lifelines / "
                        "scikit-survival into the work directory (deploy/consortia)")
    p.add_argument("--consortium", metavar="DIR", help="a consortium directory: dictionary.toml and sites/*.toml "
                   "(each mapping's [source] path relative to it); instead of --dataset")
    p.add_argument("--target", help="TSTR target (a categorical variable: its first category against the rest); default: "
                   "the dictionary's [benchmark] target, else its first binary variable")
    p.add_argument("--epsilon", default="0.5,1,2,4,8", help="comma-separated epsilons per site (default 0.5,1,2,4,8)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="ppsehr,ppsehr-plain,central-mst,central-aim,independent,bootstrap",
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--sites", type=int, default=4, help="simulated: number of sites")
    p.add_argument("--rows", type=int, default=100_000, help="simulated: rows in all (up to 1,000,000)")
    p.add_argument("--attributes", type=int, default=30, help="simulated: attributes (up to 40)")
    p.add_argument("--heterogeneity", type=float, default=0.5, help="simulated: 0 (identical sites) to 1")
    p.add_argument("--json", dest="json_out", default="bench-results/fidelity.json", help="JSON rows output")
    p.add_argument("--out", default="bench-results", help="directory for the markdown table and the plot")


def run_fidelity_cli(args) -> int:
    import sys

    epsilons = [float(x) for x in args.epsilon.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not 1 <= args.attributes <= 40 or not 1 <= args.rows <= 1_000_000 or args.sites < 1:
        raise SystemExit("simulated consortium: 1-40 attributes, 1-1,000,000 rows, at least one site")
    if args.consortium and args.dataset:
        raise SystemExit("give --dataset or --consortium, not both")
    dataset = args.dataset or "demo"
    central = [m for m in methods if m.startswith("central-")]
    if central:
        try:
            import mbi  # noqa: F401
            import polars  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"{', '.join(central)} need(s) the bench extra ({e}): pip install 'ppsehr[bench]', "
                             "or leave them out of --methods") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ppsehr-bench-") as tmp:
        say = lambda m: print(m, flush=True)  # noqa: E731
        if args.consortium:
            ds = consortium_dataset(args.consortium, args.target)
        elif dataset in CONSORTIA:
            from .. import consortia

            say(f"materializing consortium {dataset} from its package into the work directory")
            ds = consortium_dataset(consortia.materialize(dataset, Path(tmp) / "data" / dataset), args.target)
        elif dataset == "demo":
            ds = demo_dataset()
            ds.target = resolve_target(ds.dictionary, args.target or ds.target)
        else:
            say(f"drawing a simulated consortium: {args.sites} sites, {args.rows} rows, {args.attributes} attributes")
            ds = simulated_dataset(Path(tmp) / "data", args.sites, args.rows, args.attributes, args.heterogeneity)
            ds.target = resolve_target(ds.dictionary, args.target or ds.target)
        say(f"{ds.name}: {sum(t.n_rows for t in ds.tables.values())} rows, {len(ds.dictionary.names)} variables, "
            f"{len(ds.tables)} sites, TSTR target {ds.target}")
        rows = run_fidelity(ds, epsilons, args.seeds, methods, Path(tmp) / "federation", say)
    summary = summarize(rows)
    command = "ppsehr bench fidelity " + " ".join(sys.argv[3:])
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"command": command, "rows": rows, "summary": summary}, indent=1) + "\n")
    stem = Path(args.json_out).stem
    (out / f"{stem}.md").write_text(markdown(summary, command))
    plot(summary, out / f"{stem}.png")
    print(markdown(summary, command))
    print(f"wrote {args.json_out}, {out / (stem + '.md')}, {out / (stem + '.png')}")
    return 0
