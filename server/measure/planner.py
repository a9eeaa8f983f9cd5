"""Query plans: which marginals every site measures, in which round, with how much of the release's rho.

One strategy, chosen from the data in three rounds (AIM-style selection, federated; four with a
round that tests how the sites differ first), spending exactly the per-site rho of the release
(ONEWAY_SHARE, which includes that test, + CANDIDATE_SHARE + the rest):

1. **1-way tables, per site** (`oneway_plan`; one secure sum beyond PER_SITE_SITES sites, or
   when small per-site 1-way tables, bought first with DIFFERENCE_SHARE, show that the sites
   differ by less than SITE_WORTH times the noise per-site tables would add to the pooled ones:
   `site_worth`, `per_site_round_one`). They carry every clique's margins, the record total, the
   per-site heterogeneity (site effects) and the domain compression of later rounds.
2. **Candidates** (`candidate_plan`): every pair of variables (up to MAX_CANDIDATES tables, the
   default site policy's limit), each over domains compressed by round 1's noisy counts so that a
   typical cell holds CANDIDATE_NOISE times its noise: cheap tables that show which pairs matter.
   Not sent when round 1 shows that a typical one would hold less than MIN_CANDIDATE_SNR noise
   sigma per cell (`candidate_snr`: a small consortium at a small budget): a tree chosen from noise
   costs more than it fixes, so round 3's budget grows instead and it measures the prior
   dependencies, a chain through the variables round 1 shows missing about as often as each
   other (`co_missing_chain`) and a declared outcome's pairs (`prior_selection`), and the other pairs are
   modelled as independent (at that noise level central MST, too, does worse than independent
   columns on the small development sets).
3. **Selected marginals** (`select`, then `final_plan`): the coordinator scores every candidate
   by its noisy workload error, the L1 distance between the candidate and what the current model
   predicts for it, minus the L1 norm the noise alone would add (AIM's quality score, computed as
   post-processing of DP outputs instead of with the exponential mechanism). First a maximum
   spanning tree of errors against independence (Chow-Liu with AIM's score); then, as AIM does,
   further pairs that the fitted tree model still gets wrong by more than EXTRA_SIGMAS noise
   standard deviations, in batches with a refit after each, within a model-size budget; and site
   effects (`site` x variable, from round 1's per-site tables) where the heterogeneity clears
   SITE_SIGMAS. Round 3 measures the 1-way tables again and the selected pairs over domains
   compressed for round 3's noise (more budget per table: AIM's annealing, in rounds).

A declared outcome (`outcome`: the variable the records will be analysed for, e.g. a model's
target) weights the workload toward its pairs, as AIM weights a workload: round 3 measures every
pair with the outcome (a star, within the model-size budget), not only the tree's, and its
candidate and round-3 tables get OUTCOME_WEIGHT times the rho weight. At small budgets the
candidates barely show which predictors matter (scores of 2-3 sigma on the dev sets at epsilon
1), so a tree joins the outcome to one or two of them almost by chance; the star is the
structure of a naive Bayes model (an additive P(outcome | predictors), as a logistic model
assumes), its tables are small when the outcome has few categories, and the estimator weighs
each by its noise.

Declared dependencies (dictionary, `structure` option, the LLM's zero-budget prior) tilt the
selection: a prior pair's score gains PRIOR_SIGMAS noise standard deviations, so it wins when the
data cannot tell, and loses to what the data show clearly.

Missingness: a variable's missing cell keeps its own group in a compressed table when it holds
MISSING_APART (a quarter) of the records a group should hold, so missing/not-missing informs
selection like any other value; pooled with observed values it would hide what variables missing
together share most (on the ICU development set at epsilon 1, candidates compressed to 2x2 hid a
lab panel missing together for 28% of stays). Variables missing together are all
strongly dependent, but one spanning tree through them represents the joint missingness; the
extra pairs are scored against the fitted tree, which already explains it, so co-missingness
cannot crowd out real dependence; within a co-missing block the tree prefers the pairs whose
values also depend on each other.

Within a round rho is split in proportion to cells^(2/3), which minimises the sum of the
marginals' expected L1 errors (error of a table ~ cells * sigma, sigma ~ rho^(-1/2)); 1-way
tables weigh ONE_WAY_WEIGHT times more, since every clique and the record total lean on them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...common import accounting, cells, keys
from ...common.dictionary import Dictionary, Variable
from ...protos import guard_pb2 as pb
from ..model.graphical import SITE, Measurement, estimate, estimate_total, max_spanning_tree

ONE_WAY_WEIGHT = 3.0
ONEWAY_SHARE = 0.3  # round 1: the 1-way tables
PER_SITE_SITES = 4  # round 1 is per site for up to this many sites; beyond, one secure sum (`per_site_round_one`)
SITE_WORTH = 6.0  # ... and only if the sites differ by this many times the noise per-site tables add (`site_worth`)
DIFFERENCE_SHARE = 0.05  # the small per-site 1-way tables `site_worth` is computed from, taken from round 1's share
CANDIDATE_SHARE = 0.15  # round 2: every pair, compressed (round 3 gets the rest)
MAX_CANDIDATES = 500  # the default site policy's max_marginals: more pairs than this are sampled
MAX_TABLE_CELLS = 100_000  # the default site policy's max_cells: a joint table is compressed to fit
CANDIDATE_NOISE = 2.0  # compression of candidates: a typical cell holds this many noise sigmas
MIN_CANDIDATE_SNR = 1.0  # no candidate round if a typical candidate cell would hold fewer records than this many sigmas
PRIOR_SIGMAS = 2.0  # a declared (prior) pair's score gains this many noise standard deviations
TREE_SIGMAS = 0.0  # a spanning-tree edge is kept if its score clears this many standard deviations
EXTRA_SIGMAS = 3.0  # an extra pair's residual error must clear its noise by this many standard deviations
EXTRA_MIN_TVD = 0.01  # ... and be worth at least this much total variation
EXTRA_BATCH = 4  # extra pairs added between refits of the model
EXTRA_CLIQUE_CELLS = 100_000  # extra pairs may grow the model's largest clique up to this size
SITE_SIGMAS = 3.0  # a site effect (site x variable) is modelled if its heterogeneity clears this
SITE_MIN_TVD = 0.01  # ... and is worth at least this much total variation
MISSING_APART = 0.25  # the missing cell keeps its own group if it holds this share of a compression threshold
COMISSING_MIN_SHARE = 0.05  # without candidates, variables missing for at least this share ...
COMISSING_RATIO = 0.7  # ... and about as often as each other (the smaller share this much of the larger) are linked
OUTCOME_WEIGHT = 2.0  # a declared outcome's pairs weigh this many times more in rounds 2 and 3 (weighted workload)
# an unreadable secure sum of the 1-way tables is paid again per site from the later rounds' share (rounds.collect)
assert 2 * ONEWAY_SHARE + CANDIDATE_SHARE < 1, "the shares leave nothing for the selected marginals"


@dataclass(frozen=True)
class PlannedMarginal:
    variables: tuple[str, ...]
    rho: float
    groups: tuple[tuple[int, ...] | None, ...] | None = None  # domain compression (common/cells.py)

    def cells(self, dictionary: Dictionary) -> int:
        return math.prod(dictionary[v].size if not self.groups or self.groups[k] is None else max(self.groups[k]) + 1
                         for k, v in enumerate(self.variables))


def structure(dictionary: Dictionary, extra: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """Cliques beyond 1-way known without data: declared dependencies (+ extra), else a chain."""
    sets = [tuple(d) for d in dictionary.dependencies] + [tuple(e) for e in extra]
    if not sets:
        names = dictionary.names
        sets = [(a, b) for a, b in zip(names, names[1:])]
    return list(dict.fromkeys(sets))


def allocate(dictionary: Dictionary, sets: Sequence[tuple[str, ...] | PlannedMarginal], rho: float,
             outcome: str | None = None) -> list[PlannedMarginal]:
    """Split rho over `sets` in proportion to cells^(2/3) (1-way tables: ONE_WAY_WEIGHT times that,
    joint tables with the `outcome`: OUTCOME_WEIGHT times).

    A set may be a PlannedMarginal whose groups (domain compression) are kept and counted."""
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho per site must be a positive finite number, got {rho!r}")
    planned = [s if isinstance(s, PlannedMarginal) else PlannedMarginal(tuple(s), 0.0) for s in sets]
    weights = [(ONE_WAY_WEIGHT if len(p.variables) == 1 else OUTCOME_WEIGHT if outcome in p.variables else 1.0)
               * p.cells(dictionary) ** (2 / 3) for p in planned]
    total = sum(weights)
    return [PlannedMarginal(p.variables, rho * w / total, p.groups) for p, w in zip(planned, weights)]


def one_round_plan(dictionary: Dictionary, rho: float, extra: Sequence[Sequence[str]] = ()) -> list[PlannedMarginal]:
    """All 1-way marginals plus the declared structure's, in one plan (tests and tools; releases select)."""
    return allocate(dictionary, [(n,) for n in dictionary.names] + structure(dictionary, extra), rho)


def oneway_plan(dictionary: Dictionary, rho: float) -> list[PlannedMarginal]:
    """Round 1: every 1-way marginal."""
    return allocate(dictionary, [(n,) for n in dictionary.names], rho)


def site_worth(dictionary: Dictionary, tables: Sequence[Measurement], plan: Sequence[PlannedMarginal],
               copies: float) -> float:
    """How much the sites differ, over what per-site 1-way tables would cost: an estimate of the
    squared differences between the sites' tables and "every site alike" (from `tables`, 1-way
    tables with a leading `site` axis, one site's noise per slice), over the noise variance that
    measuring `plan` per site adds to the pooled tables (every site's noise instead of `copies`
    sites' worth in a secure sum). Both are in squared counts, so the ratio grows with the sites'
    size and the budget (as a signal-to-noise ratio squared) and with their heterogeneity.

    "Alike" for a table y (K sites, c cells) is w C', its pooled counts C shared out by the sites'
    shares of the records w, read from the other tables' site totals (so w's noise is independent
    of y's). To first order the residual's noise has expected squared norm (K - 2 + K |w|^2)
    (sigma^2 c + |C|^2 v / n^2), v the variance of a site total read from the other tables and n
    their record total; that is subtracted. Post-processing of DP outputs only."""
    if len(tables) < 2:
        return 0.0
    rows = [t.values.reshape(t.values.shape[0], -1) for t in tables]
    noise = [float(np.max(t.variance)) for t in tables]
    info = np.array([1.0 / (v * y.shape[1]) for v, y in zip(noise, rows)])  # 1 / variance of a site total
    totals = np.array([y.sum(axis=1) for y in rows])
    differ = 0.0
    for i, y in enumerate(rows):
        others = np.arange(len(rows)) != i
        per_site = np.clip(info[others] @ totals[others] / info[others].sum(), 0.0, None)
        n = max(float(per_site.sum()), 1.0)
        w = per_site / n
        sites, c = y.shape
        cols = y.sum(axis=0)
        residual = y - np.outer(w, cols)
        expected = (sites - 2 + sites * float(w @ w)) * (noise[i] * c + float(cols @ cols) / info[others].sum() / n ** 2)
        differ += float(np.sum(residual ** 2)) - expected
    cost = (rows[0].shape[0] - copies) * sum(accounting.scale_for_rho(p.rho) ** 2 * p.cells(dictionary) for p in plan)
    return differ / cost if cost > 0 else math.inf  # a secure sum would carry as much noise: per site costs nothing


def per_site_round_one(sites: int, secure_later: bool = True, worth: float = math.inf) -> bool:
    """Whether round 1 measures the 1-way tables per site (site effects are read from them) or as one
    secure sum. Per-site tables are plain sums: pooled, they carry every site's noise (`sites` times
    one site's variance) where a secure sum carries one site's worth. They are worth it only where
    they can show site effects: up to PER_SITE_SITES sites, and only if the sites differ by
    SITE_WORTH times the noise they would add (`worth`, `site_worth`). Otherwise they cost more than
    the site effects they show (measured on consortia of 3-20 sites at epsilon 1 and 4, docs/benchmarks.md), and
    round 1 is a secure sum with no site effects modelled. With plain sums ordered (`secure_later`
    False) per-site tables cost nothing more and are kept. (Automatic secure aggregation counts as
    secure: whether every site's policy allows it shows at enrollment, which costs nothing; a round
    1 that cannot be secure goes out per site after all, and site effects are read from it.)"""
    return not secure_later or (sites <= PER_SITE_SITES and worth >= SITE_WORTH)


def joint_names(dictionary: Dictionary) -> list[str]:
    """The variables that may appear in joint tables: all but tier 3 (highly sensitive), which the
    default site policy (`tier3 = "one-way"`) releases in 1-way tables only; a plan with such a
    pair would be refused whole."""
    return [n for n in dictionary.names if dictionary[n].tier < 3]


def candidate_pairs(dictionary: Dictionary, priors: Sequence[Sequence[str]] = (),
                    limit: int = MAX_CANDIDATES, outcome: str | None = None) -> list[tuple[str, str]]:
    """Every pair of variables (tier 3 left out), or (beyond `limit`) the prior pairs, the outcome's
    pairs and a fixed sample of the rest (seeded by the dictionary's hash, so the same dictionary
    always gives the same sample)."""
    names = joint_names(dictionary)
    pairs = list(itertools.combinations(names, 2))
    if len(pairs) <= limit:
        return pairs
    order = {n: i for i, n in enumerate(names)}
    prior = {tuple(sorted(p, key=order.__getitem__)) for s in priors for p in itertools.combinations(s, 2)}
    keep = [p for p in pairs if p in prior or outcome in p][:limit]
    rest = [p for p in pairs if p not in prior]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(dictionary.hash.encode()).digest()[:8], "little"))
    pick = sorted(rng.choice(len(rest), size=limit - len(keep), replace=False))
    return sorted(keep + [rest[i] for i in pick], key=lambda p: (order[p[0]], order[p[1]]))


def candidate_plan(dictionary: Dictionary, oneway: Sequence[Measurement], rho: float, sites: float,
                   priors: Sequence[Sequence[str]] = (), outcome: str | None = None) -> list[PlannedMarginal]:
    """Round 2: the candidate pairs over domains compressed for their (small) share of rho."""
    return compressed_plan(dictionary, candidate_pairs(dictionary, priors, outcome=outcome), oneway, rho, sites,
                           CANDIDATE_NOISE, outcome)


def candidate_snr(dictionary: Dictionary, plan: Sequence[PlannedMarginal], oneway: Sequence[Measurement],
                  sites: float) -> float:
    """The median over a candidate plan's tables of records per cell over noise sigma per cell."""
    total = estimate_total([m for m in oneway if len(m.variables) == 1])
    return float(np.median([total / p.cells(dictionary) / (math.sqrt(sites) * accounting.scale_for_rho(p.rho))
                            for p in plan]))


def final_plan(dictionary: Dictionary, pairs: Sequence[tuple[str, ...]], oneway: Sequence[Measurement], rho: float,
               sites: float, outcome: str | None = None) -> list[PlannedMarginal]:
    """Round 3: every 1-way table again and the selected marginals, compressed for round 3's noise."""
    return compressed_plan(dictionary, [(n,) for n in dictionary.names] + [tuple(p) for p in pairs], oneway, rho, sites,
                           outcome=outcome)


# ----------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Score:
    """A marginal's noisy workload error against a model: L1 distance minus the noise's expected L1."""

    variables: tuple[str, ...]
    error: float  # counts (2 N TVD); noise-corrected, so about 0 where the model is right
    sd: float  # standard deviation of `error` under noise alone

    @property
    def z(self) -> float:
        return self.error / self.sd if self.sd > 0 else math.inf * np.sign(self.error)


def workload_error(m: Measurement, expected: np.ndarray) -> Score:
    """AIM's quality score of `m` against a model's expected counts over m.variables (dictionary cells,
    projected onto m's groups when m is compressed); only observed cells count."""
    mu = cells.project(expected, m.maps()) if m.coarse else expected
    var = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape)
    seen = np.isfinite(var)
    diff = float(np.abs(mu - m.values)[seen].sum())
    noise = math.sqrt(2 / math.pi) * float(np.sqrt(var[seen]).sum())
    sd = math.sqrt((1 - 2 / math.pi) * float(var[seen].sum()))
    return Score(tuple(m.variables), diff - noise, sd)


def missing_groups(dictionary: Dictionary, m: Measurement) -> list[int | None]:
    """Per variable of `m`: the index of the group that holds exactly the variable's missing cell, or
    None (no missing cell, or pooled with other cells)."""
    out: list[int | None] = []
    for v, g in zip(m.variables, m.maps()):
        var = dictionary[v] if v in dictionary.variables else None
        if var is None or not var.missing:
            out.append(None)
            continue
        cell = var.size - 1  # the declared missing cell is always last
        if g is None:
            out.append(cell)
        else:
            members = np.flatnonzero(np.asarray(g) == g[cell])
            out.append(int(g[cell]) if len(members) == 1 else None)
    return out


def co_missing_error(dictionary: Dictionary, m: Measurement, expected: np.ndarray) -> float:
    """The part of `workload_error` that is about which records miss both variables: the noise-corrected
    L1 error of the 2x2 missing/observed table (0 unless both variables have a missing group).

    Variables missing together (labs drawn as a panel) depend on each other through that table
    alone; a spanning tree through them represents it, up to a little leakage of noise along the
    tree's paths. The extras are judged without it, on what the model gets wrong about the
    values and about which values go with a missing partner."""
    miss = missing_groups(dictionary, m)
    if len(m.variables) != 2 or None in miss:
        return 0.0
    mu = cells.project(expected, m.maps()) if m.coarse else expected
    var = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape)
    if not np.all(np.isfinite(var)):
        return 0.0
    idx = [np.where(np.arange(n) == k, 1, 0) for n, k in zip(m.values.shape, miss)]
    collapse = np.zeros((2, 2))
    c_mu, c_y, c_var = collapse.copy(), collapse.copy(), collapse.copy()
    np.add.at(c_mu, (idx[0][:, None], idx[1][None, :]), mu)
    np.add.at(c_y, (idx[0][:, None], idx[1][None, :]), m.values)
    np.add.at(c_var, (idx[0][:, None], idx[1][None, :]), var)
    return float(np.abs(c_mu - c_y).sum() - math.sqrt(2 / math.pi) * np.sqrt(c_var).sum())


def prior_selection(dictionary: Dictionary, known: Sequence[tuple[str, ...]], outcome: str | None,
                    clique_cells: Callable[[list[tuple[str, ...]]], int] | None = None,
                    oneway: Sequence[Measurement] = ()) -> "Selection":
    """Round 3's marginals without candidates: the prior dependencies' pairs, a chain through the
    variables round 1's `oneway` tables show missing about as often (`co_missing_chain`) and,
    with a declared outcome, every pair with it (dictionary order, within the model-size budget).

    No site effects: without candidates the budget is small, and per-site tables that noisy cost
    more than they fix (tried on the development sets: whas500 at epsilon 1, mean 2-way TVD
    0.1116 without them and 0.1158 with them, 30 releases each; veterans, TSTR 0.642 and 0.615)."""
    allowed = set(joint_names(dictionary))
    pairs = [tuple(p) for p in known if len(p) == 2 and set(p) <= allowed]
    if oneway:
        base = estimate(dictionary.domain(), list(oneway), warm="full")
        have = {frozenset(p) for p in pairs}
        pairs += [p for p in co_missing_chain(dictionary, {v: base.marginal((v,)) for v in dictionary.names}, base.total)
                  if frozenset(p) not in have]
    sel = Selection(pairs)  # type: ignore[arg-type]
    if outcome is None:
        return sel
    have = {frozenset(p) for p in sel.tree}
    star = [(outcome, v) for v in joint_names(dictionary) if v != outcome and frozenset((outcome, v)) not in have]
    return _grow(dictionary, sel, "outcome", star, clique_cells)


def co_missing_chain(dictionary: Dictionary, margins: dict[str, np.ndarray], N: float) -> list[tuple[str, str]]:
    """Pairs that link variables missing about as often as each other (a chain, in order of their
    share missing): without candidates, the most likely strong dependence the 1-way tables show.

    Variables missing for the same records (a lab panel not drawn, a module one site does not
    collect) are missing in about the same share; their joint missingness is then most of what
    they share, and far from what independent columns give (two variables missing for the same
    25% are both missing for 25%, not 6%). A pair is linked when each is missing for at least
    COMISSING_MIN_SHARE of the records and the smaller share is at least COMISSING_RATIO of the
    larger; round 3 measures it like any selected pair, so a guess that was wrong costs a table's
    budget, never a false dependence."""
    share = {v: float(np.clip(margins[v][-1], 0, None)) / max(N, 1.0) for v in joint_names(dictionary)
             if dictionary[v].missing}
    ranked = sorted((v for v in share if share[v] >= COMISSING_MIN_SHARE), key=lambda v: share[v])
    return [(a, b) for a, b in zip(ranked, ranked[1:]) if share[a] >= COMISSING_RATIO * share[b]]


def site_effects(dictionary: Dictionary, sel: "Selection", site_tables: Sequence[Measurement],
                 margins: dict[str, np.ndarray], N: float,
                 clique_cells: Callable[[list[tuple[str, ...]]], int] | None) -> "Selection":
    """Model `site` x variable where round 1's per-site 1-way tables (`site_tables`, a leading
    `site` axis) differ from "every site alike" by SITE_SIGMAS noise standard deviations and
    SITE_MIN_TVD, largest first, within the model-size budget (scores kept in `sel.scores`)."""
    found = []
    for m in site_tables:
        v = m.variables[1]
        var = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape)
        seen = np.all(np.isfinite(var), axis=tuple(range(1, var.ndim)))
        per_site = np.where(seen, m.values.sum(axis=tuple(range(1, m.values.ndim))), 0.0)
        s = workload_error(m, np.outer(np.clip(per_site, 0, None), margins[v] / N))
        sel.scores[(SITE, v)] = s
        if s.z >= SITE_SIGMAS and s.error >= 2 * N * SITE_MIN_TVD:
            found.append(s)
    return _grow(dictionary, sel, "site", [s.variables[1] for s in sorted(found, key=lambda s: -s.error)], clique_cells)


def _grow(dictionary: Dictionary, sel: "Selection", part: str, items: Sequence,
          clique_cells: Callable[[list[tuple[str, ...]]], int] | None) -> "Selection":
    """Add `items` to one part of a selection (`site`, `outcome`) in order, each one only if the
    model it needs stays within EXTRA_CLIQUE_CELLS."""
    for item in items:
        trial = replace(sel, **{part: getattr(sel, part) + [item]})
        if clique_cells is None or clique_cells(trial.structure(dictionary)) <= EXTRA_CLIQUE_CELLS:
            sel = trial
    return sel


@dataclass
class Selection:
    """What round 3 measures and the model's structure: pairs (tree, then extras) and site effects."""

    tree: list[tuple[str, str]]
    extras: list[tuple[str, str]] = field(default_factory=list)
    outcome: list[tuple[str, str]] = field(default_factory=list)  # a declared outcome's pairs beyond the tree
    site: list[str] = field(default_factory=list)  # variables modelled with a `site` axis
    scores: dict[tuple[str, ...], Score] = field(default_factory=dict)  # against independence (site: sites alike)
    residuals: dict[tuple[str, ...], Score] = field(default_factory=dict)  # against the last fitted model

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.tree + self.outcome + self.extras

    def structure(self, dictionary: Dictionary) -> list[tuple[str, ...]]:
        """Model sets: 1-ways, selected pairs, (site, v) for site effects."""
        return [(n,) for n in dictionary.names] + [tuple(p) for p in self.pairs] + [(SITE, v) for v in self.site]


def pair_sigma(dictionary: Dictionary, candidates: Sequence[Measurement], rho: float, sites: float) -> float:
    """The noise standard deviation per cell of a typical round-3 pair table (summed over `sites` sites'
    worth of noise), if round 3 measures the 1-way tables and a spanning tree's worth of pairs of the
    candidates' typical size with `rho`."""
    cells = float(np.mean([m.values.size for m in candidates])) if candidates else 4.0
    names = dictionary.names
    weight = sum(ONE_WAY_WEIGHT * dictionary[v].size ** (2 / 3) for v in names) + (len(names) - 1) * cells ** (2 / 3)
    return math.sqrt(sites) * accounting.scale_for_rho(rho * cells ** (2 / 3) / weight)


def _prior_pairs(priors: Sequence[Sequence[str]]) -> set[frozenset[str]]:
    return {frozenset(p) for s in priors for p in itertools.combinations(s, 2)}


def select(dictionary: Dictionary, oneway: Sequence[Measurement], candidates: Sequence[Measurement],
           site_tables: Sequence[Measurement] = (), priors: Sequence[Sequence[str]] = (),
           clique_cells: Callable[[list[tuple[str, ...]]], int] | None = None, final_sigma: float = 0.0,
           iters: int = 300, outcome: str | None = None) -> Selection:
    """Choose round 3's marginals from DP outputs only (post-processing).

    `oneway`: pooled 1-way tables; `candidates`: pooled candidate pairs (round 2); `site_tables`:
    1-way tables with a leading `site` axis (round 1's per-site tables), empty when sites are pooled;
    `clique_cells(structure)`: the cells of the largest clique of the model a structure needs (including the
    site axis); structures beyond EXTRA_CLIQUE_CELLS are not grown. `final_sigma`: the noise standard
    deviation per cell round 3 will give a pair table; as in AIM, an extra pair must be worth more
    than the L1 error its own measurement would bring (sqrt(2/pi) sigma per cell). `outcome`: a
    declared outcome, every pair with which is selected (strongest first, within the size budget).
    """
    names = dictionary.names
    domain = dictionary.domain()
    prior = _prior_pairs(priors)
    pairs = {tuple(m.variables): m for m in candidates if len(m.variables) == 2}
    base = estimate(domain, list(oneway), iters=iters, warm="full")  # independence: consistent 1-way margins, total
    N = base.total
    margins = {v: base.marginal((v,)) for v in names}
    scores: dict[tuple[str, ...], Score] = {}
    weights: dict[tuple[str, str], float] = {}
    for (a, b), m in pairs.items():
        s = workload_error(m, np.outer(margins[a], margins[b]) / N)
        scores[(a, b)] = s
        weights[(a, b)] = s.error + (PRIOR_SIGMAS * s.sd if frozenset((a, b)) in prior else 0.0)
    tree = [tuple(p) for p in max_spanning_tree(names, weights)
            if weights[tuple(p)] > TREE_SIGMAS * scores[tuple(p)].sd]
    sel = Selection(tree, scores=scores)  # type: ignore[arg-type]

    def size(s: Selection) -> int:
        return clique_cells(s.structure(dictionary)) if clique_cells else 0

    sel = site_effects(dictionary, sel, site_tables, margins, N, clique_cells)

    # a declared outcome: every pair with it, strongest first
    in_tree = {frozenset(p) for p in sel.tree}
    star = [s for p, s in scores.items() if outcome in p and SITE not in p and frozenset(p) not in in_tree]
    sel = _grow(dictionary, sel, "outcome", [s.variables for s in sorted(star, key=lambda s: -s.error)], clique_cells)

    # extra pairs: what the fitted model still gets wrong, strongest first, in batches with refits
    limit = max(1, len(names) // 2)
    while len(sel.extras) < limit:
        chosen = {frozenset(p) for p in sel.pairs}
        fitted = estimate(domain, list(oneway) + [pairs[p] for p in sel.pairs if p in pairs], iters=iters, total=N,
                          warm="full")
        residual: list[tuple[float, Score]] = []
        joints: dict[str, dict[str, np.ndarray]] = {}
        for (a, b), m in pairs.items():
            if frozenset((a, b)) in chosen:
                continue
            if a not in joints:
                joints[a] = fitted.joint_with(a)
            s = workload_error(m, joints[a][b])
            s = Score(s.variables, s.error - max(0.0, co_missing_error(dictionary, m, joints[a][b])), s.sd)
            sel.residuals[(a, b)] = s
            bonus = PRIOR_SIGMAS * s.sd if frozenset((a, b)) in prior else 0.0
            cost = math.sqrt(2 / math.pi) * final_sigma * m.values.size
            if s.error + bonus >= max(EXTRA_SIGMAS * s.sd, cost) and s.error >= 2 * N * EXTRA_MIN_TVD:
                residual.append((s.error + bonus - cost, s))
        added = 0
        for _, s in sorted(residual, key=lambda x: -x[0]):
            if added >= EXTRA_BATCH or len(sel.extras) >= limit:
                break
            trial = replace(sel, extras=sel.extras + [s.variables])  # type: ignore[list-item]
            if size(trial) <= EXTRA_CLIQUE_CELLS:
                sel, added = trial, added + 1
        if not added:
            break
    return sel


def compress(var: Variable, counts: np.ndarray, threshold: float) -> tuple[int, ...] | None:
    """Group a variable's cells so that each group holds about `threshold` records or more.

    `counts` are noisy 1-way counts (DP outputs; this is post-processing). Numeric bins merge with
    their neighbours, left to right; categories and the declared other/out-of-range cells that
    fall short (and the bins, if all of them together do) are pooled into one group, which joins
    the smallest group if it still falls short. The declared missing cell stays apart if it holds
    MISSING_APART times the threshold: whether a value is missing is often what a variable shares
    most with others (labs drawn as a panel), and pooled with values it would hide that. The
    observed values keep at least two groups (a joint table over one group says nothing about
    them; a binary outcome merged with itself would leave its pairs with nothing but
    missingness): if they would all merge, the largest value (numeric: the bins up to the median)
    stands apart (unless the missing cell stands apart and the observed values together fall
    short: they are then one group).
    Returns cell -> group (groups numbered by first cell), or None if every cell stays.
    """
    counts = np.clip(np.asarray(counts, dtype=float), 0, None)
    ordered = var.n_bins if var.type == "numeric" else 0
    group = np.full(var.size, -1)
    runs: list[list[int]] = []
    acc = 0.0
    for c in range(ordered):
        if not runs or acc >= threshold:
            runs.append([])
            acc = 0.0
        runs[-1].append(c)
        acc += counts[c]
    if len(runs) > 1 and acc < threshold:
        last = runs.pop()
        runs[-1].extend(last)
    rare = runs.pop() if len(runs) == 1 and counts[runs[0]].sum() < threshold else []  # all bins together fall short
    apart = var.size - 1 if var.missing and counts[-1] >= MISSING_APART * threshold and counts[-1] > 0 else None
    others = [c for c in range(ordered, var.size) if c != apart]
    rare += [c for c in others if counts[c] < threshold]
    runs += [[c] for c in others if counts[c] >= threshold]
    if rare:
        if runs and counts[rare].sum() < threshold:
            min(runs, key=lambda r: counts[r].sum()).extend(rare)
        else:
            runs.append(rare)
    observed = [c for c in range(var.size) if c != apart]
    if len(runs) == 1 and len(observed) > 1 and (apart is None or counts[observed].sum() >= threshold):
        if ordered > 1:
            cut = min(int(np.searchsorted(np.cumsum(counts[:ordered]), counts[:ordered].sum() / 2)) + 1, ordered - 1)
            runs = [list(range(cut)), [c for c in observed if c >= cut]]
        else:  # the largest value stands apart (a missing cell pooled here is not a value)
            values = [c for c in observed if not (var.missing and c == var.size - 1)]
            top = values[int(np.argmax(counts[values]))]
            runs = [[top], [c for c in observed if c != top]]
    if apart is not None:
        runs.append([apart])
    for j, r in enumerate(sorted(runs, key=min)):
        group[r] = j
    if len(runs) == var.size:
        return None
    return tuple(int(g) for g in group)


COMPRESS_NOISE = 1.0  # k: a compressed table's typical cell should hold about k times its noise sigma


def compressed_plan(dictionary: Dictionary, sets: Sequence[tuple[str, ...]], oneway: Sequence[Measurement],
                    rho: float, sites: float, noise: float | None = None,
                    outcome: str | None = None) -> list[PlannedMarginal]:
    """Marginals over `sets` with domains compressed by the noisy 1-way counts of an earlier round.

    Each joint table's variables are grouped so that a typical cell of the summed table holds
    about COMPRESS_NOISE times its expected noise: with N records, the noise sigma of the summed
    table (`sites` sites each adding their own; with secure aggregation, parties / (parties -
    colluding) sites' worth) and w variables, every group keeps a share of at
    least (k sigma / N)^(1/w) (unless `compress` must fall back to two groups). (A rule that let a skewed variable keep rare categories next to a
    coarse partner did worse on the demo benchmark: 0.159 against 0.153 mean 2-way TVD at
    epsilon 1.) 1-way sets are measured as they are. Allocation (`allocate`, with the `outcome`'s
    weight) and grouping are iterated, since each shapes the other.
    """
    counts = {m.variables[0]: m.values for m in oneway if len(m.variables) == 1 and not m.coarse}
    total = estimate_total([m for m in oneway if len(m.variables) == 1])

    def grouping(p: PlannedMarginal) -> tuple[tuple[int, ...] | None, ...] | None:
        if len(p.variables) == 1 or not all(v in counts for v in p.variables):
            return None
        sigma = math.sqrt(sites) * accounting.scale_for_rho(p.rho)
        share = min(1.0, ((COMPRESS_NOISE if noise is None else noise) * sigma / total) ** (1 / len(p.variables)))
        while True:
            groups = tuple(compress(dictionary[v], counts[v], share * total) for v in p.variables)
            if PlannedMarginal(p.variables, 0.0, groups).cells(dictionary) <= MAX_TABLE_CELLS or share >= 1.0:
                return groups if any(g is not None for g in groups) else None
            share = min(1.0, share * 1.5)  # a table the default site policy would refuse: coarser

    plan = allocate(dictionary, sets, rho, outcome)
    for _ in range(3):
        new = allocate(dictionary, [PlannedMarginal(p.variables, 0.0, grouping(p)) for p in plan], rho, outcome)
        if [p.groups for p in new] == [p.groups for p in plan]:
            break
        plan = new
    return new


def to_proto(marginals: list[PlannedMarginal], dictionary: Dictionary, coordinator: str, purpose: str,
             lifetime_s: float = 1800.0, plan_id: str | None = None,
             addressees: Sequence[pb.Addressee] = ()) -> pb.QueryPlan:
    """A plan with a fresh random id (single-use at every guard) that expires after lifetime_s, addressed to
    `addressees` (the verified sites, server/measure/identify.py; a guard not among them refuses it)."""
    return pb.QueryPlan(addressees=list(addressees),
        plan_id=plan_id or uuid.uuid4().hex, dictionary_hash=dictionary.hash, coordinator=coordinator,
        purpose=purpose, marginals=[pb.MarginalQuery(variables=m.variables, rho=m.rho, groups=[
            pb.CellGroups(cell_group=g or ()) for g in m.groups] if m.groups and any(m.groups) else []) for m in marginals],
        expires_at=int(time.time() + lifetime_s))


def sign_plan(plan: pb.QueryPlan, key: Ed25519PrivateKey) -> pb.SignedPlan:
    data = plan.SerializeToString(deterministic=True)
    return pb.SignedPlan(plan=data, signature=key.sign(data), signer=keys.fingerprint(key.public_key()))
