"""What the release measures, chosen from the data: selection on cases with known answers, and the
three rounds end to end against real guards (budget, secure sums, no flags needed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ppsehr.common import accounting
from ppsehr.common.dictionary import parse_dictionary
from ppsehr.server.measure import planner
from ppsehr.server.model.graphical import SITE, JunctionTree, Measurement, estimate


def make_dictionary(spec: dict[str, tuple[int, bool]]):
    """Categorical variables name -> (categories, has a missing cell)."""
    return parse_dictionary({"dictionary": {"name": "t", "version": "1"}, "variables": {
        n: {"type": "categorical", "categories": [f"c{i}" for i in range(k)], "missing": miss}
        for n, (k, miss) in spec.items()}})


def noisy_tables(d, data: dict[str, np.ndarray], sigma: float, rng, pairs=None):
    """Pooled 1-way and 2-way tables of `data` (cell codes) with Gaussian noise of sd sigma per cell."""
    def table(vs):
        t = np.zeros(tuple(d[v].size for v in vs))
        np.add.at(t, tuple(data[v] for v in vs), 1)
        return Measurement(tuple(vs), t + rng.normal(0, sigma, t.shape), sigma ** 2)

    oneway = [table((v,)) for v in d.names]
    cands = [table(p) for p in (pairs or itertools.combinations(d.names, 2))]
    return oneway, cands


def clique_cells(d):
    def cells(sets):
        domain = d.domain()
        if any(SITE in s for s in sets):
            domain = {SITE: 4} | domain
        tree = JunctionTree(domain, sets)
        return max(int(np.prod(tree.shape(c))) for c in tree.cliques)
    return cells


def follow(parent, k, p, rng):
    """A child that copies its parent's code (mod k) with probability p, else is uniform."""
    return np.where(rng.random(len(parent)) < p, parent % k, rng.integers(0, k, len(parent)))


def test_a_planted_strong_pair_is_selected():
    rng = np.random.default_rng(1)
    n = 5000
    d = make_dictionary({f"x{i}": (4, False) for i in range(10)})
    data = {v: rng.integers(0, 4, n) for v in d.names}
    data["x7"] = follow(data["x3"], 4, 0.6, rng)
    oneway, cands = noisy_tables(d, data, 10.0, rng)
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    assert ("x3", "x7") in sel.tree
    assert sel.scores[("x3", "x7")].z > 20
    assert max(sel.scores[p].z for p in itertools.combinations(d.names, 2) if p != ("x3", "x7")) < 10


def test_co_missing_variables_do_not_crowd_out_real_dependence():
    """Six labs missing together for 30% of records (creatinine and BUN also depend on each other),
    a strong pair elsewhere, everything else independent (exact expected tables plus noise): both
    real pairs are measured, the block gets one spanning tree and no extra pairs for its
    co-missingness, and the fitted model keeps the joint missingness."""
    rng = np.random.default_rng(2)
    n, p_missing = 6000, 0.3
    labs = ["creat", "bun", "na", "k", "wbc", "hgb"]
    d = make_dictionary({**{v: (5, True) for v in labs}, "a": (4, False), "b": (4, False), "c": (3, False),
                         "e": (3, False)})
    values = {v: rng.dirichlet(np.full(5, 3.0)) for v in labs}  # a lab's values, when drawn
    copy = 0.7 * np.eye(5) + 0.3 * values["bun"][None, :]  # P(bun | creat)
    ab = np.full((4, 4), 0.4 / 16) + 0.6 * np.eye(4) / 4
    one = {v: np.append((1 - p_missing) * values[v], p_missing) for v in labs}
    one["bun"] = np.append((1 - p_missing) * values["creat"] @ copy, p_missing)
    one |= {"a": ab.sum(axis=1), "b": ab.sum(axis=0), "c": np.full(3, 1 / 3), "e": np.array([0.2, 0.3, 0.5])}

    def joint(x, y):
        if x in labs and y in labs:
            t = np.zeros((6, 6))
            t[5, 5] = p_missing
            if {x, y} == {"creat", "bun"}:
                block = values["creat"][:, None] * copy
                t[:5, :5] = (1 - p_missing) * (block if x == "creat" else block.T)
            else:
                t[:5, :5] = (1 - p_missing) * np.outer(one[x][:5] / (1 - p_missing), one[y][:5] / (1 - p_missing))
            return t
        if {x, y} == {"a", "b"}:
            return ab if x == "a" else ab.T
        return np.outer(one[x], one[y])

    sigma = 8.0
    oneway = [Measurement((v,), n * one[v] + rng.normal(0, sigma, one[v].shape), sigma ** 2) for v in d.names]
    cands = [Measurement(p, n * joint(*p) + rng.normal(0, sigma, joint(*p).shape), sigma ** 2)
             for p in itertools.combinations(d.names, 2)]
    # what crowded the block before: every lab pair is strongly dependent on its face
    indep = planner.select(d, oneway, cands)
    assert all(indep.scores[p].z > 50 for p in itertools.combinations(labs, 2))
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    pairs = {frozenset(p) for p in sel.pairs}
    assert frozenset(("creat", "bun")) in pairs and frozenset(("a", "b")) in pairs
    in_block = [p for p in sel.pairs if set(p) <= set(labs)]
    assert len(in_block) == len(labs) - 1  # a spanning tree, not the 15 co-missing pairs
    assert not sel.extras
    model = estimate(d.domain(), oneway + [m for m in cands if frozenset(m.variables) in pairs])
    all_missing = model.marginal(tuple(labs))[(5,) * len(labs)] / model.total
    assert all_missing == pytest.approx(p_missing, abs=0.03)


def test_compressed_candidates_keep_a_missing_cell_apart_so_co_missing_labs_are_linked():
    """Candidates at a small budget are compressed to about two groups per variable. Labs missing
    together for 28% of records, their values independent: the missing cell stays a group of its
    own, though short of the threshold, so the candidates show the co-missingness, the tree joins
    the labs to each other and the model keeps their joint missingness (pooled with observed
    values, the missing cell hid it: the model put 0.4% of records, not 28%, with every lab
    missing)."""
    rng = np.random.default_rng(3)
    n, labs = 3000, ["creat", "bun", "na", "k", "hgb"]
    d = make_dictionary({**{v: (5, True) for v in labs}, "a": (4, False), "b": (3, False), "c": (2, False)})
    missing = rng.random(n) < 0.28
    data = {v: np.where(missing, 5, rng.choice(5, n, p=[0.5, 0.2, 0.15, 0.1, 0.05])) for v in labs}
    data |= {"a": rng.integers(0, 4, n), "b": rng.integers(0, 3, n), "c": rng.integers(0, 2, n)}
    sigma = 20.0
    oneway, _ = noisy_tables(d, data, sigma, rng, pairs=[])
    threshold = 0.5 * n  # two groups per variable: a typical cell of a 2-way table holds n / 4
    groups = {v: planner.compress(d[v], m.values, threshold) for v, m in zip(d.names, oneway)}
    for v in labs:
        g = groups[v]
        assert g is not None and g.count(g[-1]) == 1  # the missing cell alone
    cands = []
    for a, b in itertools.combinations(d.names, 2):
        maps = tuple(None if groups[v] is None else np.asarray(groups[v]) for v in (a, b))
        shape = tuple(d[v].size if g is None else int(g.max()) + 1 for v, g in zip((a, b), maps))
        t = np.zeros(shape)
        np.add.at(t, tuple(data[v] if g is None else g[data[v]] for v, g in zip((a, b), maps)), 1)
        cands.append(Measurement((a, b), t + rng.normal(0, sigma, shape), sigma ** 2, maps))
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    assert len([p for p in sel.tree if set(p) <= set(labs)]) == len(labs) - 1
    model = estimate(d.domain(), oneway + [m for m in cands if tuple(m.variables) in set(sel.pairs)])
    assert model.marginal(tuple(labs))[(5,) * len(labs)] / model.total == pytest.approx(0.28, abs=0.03)


def test_without_candidates_variables_missing_as_often_are_linked():
    """Too little budget for candidates: round 1's 1-way tables alone show a block of variables
    missing for about the same 25% (a module one site does not collect); a chain joins them, and
    not the variables missing rarely or far more often. The outcome's pairs come on top."""
    rng = np.random.default_rng(5)
    n = 2000
    block = ["trt", "ascites", "ast", "copper"]
    d = make_dictionary({**{v: (3, True) for v in block}, "stage": (4, True), "chol": (3, True),
                         "age": (4, False), "dead": (2, False)})
    off = rng.random(n) < 0.25
    data = {v: np.where(off, 3, rng.integers(0, 3, n)) for v in block}
    data |= {"stage": np.where(rng.random(n) < 0.02, 4, rng.integers(0, 4, n)),
             "chol": np.where(rng.random(n) < 0.7, 3, rng.integers(0, 3, n)),
             "age": rng.integers(0, 4, n), "dead": rng.integers(0, 2, n)}
    oneway, _ = noisy_tables(d, data, 15.0, rng, pairs=[])
    sel = planner.prior_selection(d, [], "dead", clique_cells(d), oneway)
    linked = {frozenset(p) for p in sel.tree}
    assert len(linked) == len(block) - 1 and all(p <= set(block) for p in linked)
    graph = {v: {w for p in linked if v in p for w in p} for v in block}
    reach, todo = set(), [block[0]]
    while todo:  # the chain connects the whole block
        v = todo.pop()
        reach, todo = reach | {v}, todo + [w for w in graph[v] if w not in reach]
    assert reach == set(block)
    assert {frozenset(p) for p in sel.outcome} == {frozenset(("dead", v)) for v in d.names if v != "dead"}
    assert planner.prior_selection(d, [], "dead", clique_cells(d)).tree == []  # no 1-way tables: no guess


def test_a_rare_binary_variable_does_not_take_most_tree_edges():
    """A chain of 12 six-category variables and a rare (3%) binary one that depends on x5, measured
    with a lot of noise: the rare variable is a leaf of the tree, the chain is recovered."""
    rng = np.random.default_rng(3)
    n = 3000
    names = [f"x{i}" for i in range(12)]
    d = make_dictionary({**{v: (6, False) for v in names}, "dialysis": (2, False)})
    data = {"x0": rng.integers(0, 6, n)}
    for a, b in zip(names, names[1:]):
        data[b] = follow(data[a], 6, 0.55, rng)
    data["dialysis"] = (rng.random(n) < np.where(data["x5"] == 0, 0.12, 0.012)).astype(int)
    oneway, cands = noisy_tables(d, data, 25.0, rng)
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    degree = sum("dialysis" in p for p in sel.tree)
    assert degree <= 1
    chain = {frozenset(p) for p in zip(names, names[1:])}
    assert len(chain & {frozenset(p) for p in sel.tree}) >= 10


def test_extra_pairs_are_what_the_tree_model_misses_within_the_model_size_budget(monkeypatch):
    """a-b and b-c explain a-c through b unless a-c has its own dependence: then a-c is added, if the
    resulting triangle fits the model-size budget."""
    rng = np.random.default_rng(4)
    n = 20000
    d = make_dictionary({v: (3, False) for v in "abcde"})
    data = {v: rng.integers(0, 3, n) for v in "abcde"}
    data["b"] = follow(data["a"], 3, 0.8, rng)
    data["c"] = follow(data["b"], 3, 0.8, rng)  # a-c is strong, but only through b
    oneway, cands = noisy_tables(d, data, 3.0, rng)
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    assert {frozenset("ab"), frozenset("bc")} <= {frozenset(p) for p in sel.tree} and not sel.extras
    # now c also copies a directly in some records: a-c carries dependence the tree cannot explain
    direct = rng.random(n) < 0.3
    data["c"] = np.where(direct, (data["a"] + 1) % 3, data["c"])
    oneway, cands = noisy_tables(d, data, 3.0, rng)
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    assert {frozenset(p) for p in sel.pairs} >= {frozenset("ab"), frozenset("bc"), frozenset("ac")}
    monkeypatch.setattr(planner, "EXTRA_CLIQUE_CELLS", 9)  # a triangle (27 cells) no longer fits
    assert not planner.select(d, oneway, cands, clique_cells=clique_cells(d)).extras


def test_priors_tilt_the_selection_without_overruling_the_data():
    rng = np.random.default_rng(5)
    n = 2000
    d = make_dictionary({v: (3, False) for v in "abcd"})
    data = {v: rng.integers(0, 3, n) for v in "abcd"}
    data["b"] = follow(data["a"], 3, 0.9, rng)  # strong
    data["d"] = follow(data["c"], 3, 0.08, rng)  # faint: lost in the noise below
    oneway, cands = noisy_tables(d, data, 15.0, rng)
    plain = planner.select(d, oneway, cands)
    tilted = planner.select(d, oneway, cands, priors=[("c", "d"), ("a", "c")])
    assert ("c", "d") in tilted.tree  # the data cannot tell: the prior decides
    assert ("a", "b") in plain.tree and ("a", "b") in tilted.tree  # the data can: the prior does not overrule them
    assert ("a", "c") not in tilted.tree or ("b", "c") not in plain.tree


def test_a_declared_outcome_measures_each_of_its_predictors():
    """A binary outcome y depends weakly on x1, x2 and x3 (additively, as a logistic model sees it),
    which form a chain; the candidates show each y pair at only 3-7 noise standard deviations, so
    the spanning tree joins y to one of them and the tree model explains the rest away. With y
    declared as the outcome every variable is measured with y (with OUTCOME_WEIGHT times the
    budget weight), the planted predictors first; the tree is unchanged."""
    rng = np.random.default_rng(5)
    n = 3000
    names = [f"x{i}" for i in range(8)]
    d = make_dictionary({**{v: (4, False) for v in names}, "y": (2, False)})
    data = {v: rng.integers(0, 4, n) for v in names}
    data["x2"] = follow(data["x1"], 4, 0.6, rng)
    data["x3"] = follow(data["x2"], 4, 0.6, rng)
    data["x5"] = follow(data["x4"], 4, 0.7, rng)
    data["x6"] = follow(data["x5"], 4, 0.7, rng)
    logit = -1 + 0.25 * sum((data[v] >= 2) for v in ("x1", "x2", "x3"))
    data["y"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    oneway, cands = noisy_tables(d, data, 25.0, rng)
    plain = planner.select(d, oneway, cands, clique_cells=clique_cells(d))
    sel = planner.select(d, oneway, cands, clique_cells=clique_cells(d), outcome="y")
    with_y = lambda s: {next(v for v in p if v != "y") for p in s.pairs if "y" in p}  # noqa: E731
    assert not plain.outcome and len(with_y(plain)) == 1
    assert with_y(sel) == set(names) and sel.tree == plain.tree and set(sel.outcome) <= set(sel.pairs)
    assert {v for p in sel.outcome[:2] for v in p} | with_y(plain) == {"x1", "x2", "x3", "y"}
    plan = planner.allocate(d, [("x0", "x4"), ("y", "x1")], 1.0, outcome="y")
    assert plan[1].rho / plan[0].rho == pytest.approx(planner.OUTCOME_WEIGHT * (8 / 16) ** (2 / 3))
    assert planner.allocate(d, [("x0", "x4"), ("y", "x1")], 1.0) == planner.allocate(d, [("x0", "x4"), ("y", "x1")], 1.0, None)


def test_a_candidate_that_was_not_selected_still_informs_the_margins():
    """Unselected tables reach the model as their 1-way margins, each charged its share of the noise."""
    from ppsehr.server.measure.rounds import margins

    values = np.arange(6.0).reshape(2, 3)
    a, b = margins(Measurement(("a", "b"), values, 2.0), lambda vs: len(vs) == 1)
    assert a.variables == ("a",) and np.allclose(a.values, [3, 12]) and np.allclose(a.variance, 2.0 * 3 * 2)
    assert b.variables == ("b",) and np.allclose(b.values, [3, 5, 7]) and np.allclose(b.variance, 2.0 * 2 * 2)
    # a per-site table keeps the site axis where the model has that site effect, and an unobserved
    # slice stays unobserved
    per_site = Measurement((SITE, "a", "b"), np.ones((2, 2, 3)), np.array([1.0, np.inf]).reshape(2, 1, 1))
    a, b = margins(per_site, lambda vs: set(vs) in ({"a"}, {"b"}, {SITE, "a"}))
    assert a.variables == (SITE, "a") and np.allclose(a.values, 3) and np.all(np.isinf(a.variance[1]))
    assert b.variables == ("b",) and np.all(np.isinf(b.variance))
    # a precise pair outside the model moves a noisy margin to the truth (a = 50/50); the margins
    # serve the fit only: the release publishes the DP outputs, not tables derived for the fit
    from ppsehr.server.model.synthesize import synthesize

    d = make_dictionary({"a": (2, False), "b": (3, False)})
    noisy = Measurement(("a",), np.array([70.0, 30.0]), 400.0)
    b_only = Measurement(("b",), np.array([35.0, 25, 40]), 1.0)
    pair = Measurement(("a", "b"), np.array([[10.0, 20, 20], [25, 5, 20]]), 1.0)
    alone = estimate(d.domain(), [noisy, b_only], stall=0)
    assert abs(alone.marginal(("a",))[0] / alone.total - 0.7) < 0.02
    derived = margins(pair, lambda vs: len(vs) == 1)
    assert all(m.derived for m in derived)
    syn = synthesize(d, [noisy, *derived], [], 100, np.random.default_rng(0))
    assert abs(syn.model.marginal(("a",))[0] / syn.model.total - 0.5) < 0.03
    assert [m.variables for m in syn.measurements] == [("a",)] and syn.measurements[0] is noisy
    assert [m.variables for m in syn.pooled] == [("a",)]


def test_site_effects_are_modelled_where_the_sites_differ():
    rng = np.random.default_rng(6)
    d = make_dictionary({v: (4, False) for v in "abc"})
    sizes = [3000, 2000, 1500, 1000]
    shifted = [rng.dirichlet(np.ones(4)) for _ in sizes]  # 'a' differs by site; 'b' and 'c' do not
    tables = {v: np.zeros((4, 4)) for v in "abc"}
    for s, size in enumerate(sizes):
        tables["a"][s] = size * shifted[s]
        tables["b"][s] = size * np.array([0.25] * 4)
        tables["c"][s] = size * np.array([0.1, 0.2, 0.3, 0.4])
    sigma = 5.0
    site_tables = [Measurement((SITE, v), t + rng.normal(0, sigma, t.shape), sigma ** 2) for v, t in tables.items()]
    oneway = [Measurement((v,), t.values.sum(axis=0), 4 * sigma ** 2) for v, t in zip("abc", site_tables)]
    cands = [Measurement(p, np.outer(oneway[0].values, oneway[1].values) / 7500, 4 * sigma ** 2)
             for p in itertools.combinations("abc", 2)]
    sel = planner.select(d, oneway, cands, site_tables, clique_cells=clique_cells(d))
    assert sel.site == ["a"]
    assert (SITE, "a") in sel.structure(d)


def test_candidates_respect_the_default_site_policy_and_keep_the_priors():
    d = make_dictionary({f"v{i:02d}": (3, False) for i in range(40)})  # 780 pairs
    priors = [("v00", "v39"), ("v10", "v20", "v30")]
    pairs = planner.candidate_pairs(d, priors)
    assert len(pairs) == planner.MAX_CANDIDATES == len(set(pairs))
    assert {("v00", "v39"), ("v10", "v20"), ("v10", "v30"), ("v20", "v30")} <= set(pairs)
    assert pairs == planner.candidate_pairs(d, priors)  # the same dictionary, the same sample
    star = {p for p in planner.candidate_pairs(d, priors, outcome="v05") if "v05" in p}
    assert len(star) == 39 and len({p for p in pairs if "v05" in p}) < 39  # a declared outcome keeps all its pairs
    assert len(planner.candidate_pairs(make_dictionary({f"v{i}": (3, False) for i in range(12)}))) == 66
    tiered = parse_dictionary({"dictionary": {"name": "t", "version": "1"}, "variables": {
        "a": {"type": "categorical", "categories": ["x", "y"]}, "b": {"type": "categorical", "categories": ["x", "y"]},
        "hiv": {"type": "categorical", "categories": ["x", "y"], "tier": 3}}})
    assert planner.candidate_pairs(tiered) == [("a", "b")]  # tier 3: 1-way tables only (the default site policy)


# ----------------------------------------------------------------------------- end to end
SITES = ("cleveland", "hungarian", "va")


@pytest.fixture
def in_process(site_config, consortium_keys, dictionary):
    """Collect the release's rounds from in-process guards of SITES (secure: all join secure sums)."""
    from ppsehr.client.guard import SiteGuard
    from ppsehr.common import keys
    from ppsehr.deploy.transports import InProcessTransport
    from ppsehr.server.measure.rounds import MeasureOptions, Request, collect

    def run(epsilon=1.0, secure=True, events=None, **options):
        guards = {s: SiteGuard(site_config(s, secure=secure)) for s in SITES}
        request = Request("coordinator", "test", accounting.rho_for_epsilon(epsilon, 1e-6), 1e-6)
        site_keys = {s: keys.load_public_key(consortium_keys.site_keys[s][1]) for s in SITES}
        rounds, structure = collect(MeasureOptions(**options), request, dictionary,
                                    keys.load_signing_key(consortium_keys.coordinator_key), site_keys,
                                    InProcessTransport(guards), events or (lambda *a, **k: None))
        return guards, request, rounds, structure

    return run


@pytest.mark.parametrize("secure", [True, False])
def test_budget_over_the_three_rounds_is_exactly_the_request(in_process, dictionary, secure, monkeypatch):
    """Automatic secure aggregation: secure sums where every site allows them, plain sums (and nothing
    debited for trying) where none does; either way every site spends exactly the requested rho."""
    monkeypatch.setattr(planner, "SITE_WORTH", -math.inf)  # the sites differ enough for per-site 1-way tables
    seen = []
    guards, request, rounds, structure = in_process(epsilon=4.0, secure=secure, events=lambda m, **k: seen.append(m))
    assert [r.number for r in rounds] == [1, 2, 3, 4]
    # small per-site tables, then the 1-way tables per site (site effects)
    assert [r.secure for r in rounds] == [False, False, secure, secure]
    assert all(len(r.results) == len(SITES) for r in rounds)
    assert sum(sum(m.rho for m in r.marginals) for r in rounds) == pytest.approx(request.rho, rel=1e-12)
    for site, g in guards.items():
        assert g.ledger.spent() == pytest.approx(request.rho, rel=1e-9)
    assert [m.variables for m in rounds[0].marginals] == [(v,) for v in dictionary.names]
    rounds = rounds[1:]
    assert [len(m.variables) for m in rounds[0].marginals] == [1] * len(dictionary.names)
    assert len(rounds[1].marginals) == len(list(itertools.combinations(dictionary.names, 2)))
    pairs = [m.variables for m in rounds[2].marginals if len(m.variables) == 2]
    assert len(pairs) >= len(dictionary.names) // 2 and set(pairs) <= {tuple(s) for s in structure}
    assert any(m.startswith("selected ") for m in seen)
    assert secure or any("secure aggregation is not possible" in m for m in seen)


def test_with_many_sites_round_one_is_a_secure_sum_unless_sums_are_plain(in_process, monkeypatch):
    """Per-site 1-way tables carry every site's noise in their pooled sum: beyond PER_SITE_SITES sites,
    when secure sums may follow (automatic or required), round 1 is one secure sum too and no site
    effects are modelled; with plain sums ordered, or few sites, round 1 stays per site. Either way
    the release spends exactly its rho."""
    assert planner.per_site_round_one(planner.PER_SITE_SITES) and not planner.per_site_round_one(planner.PER_SITE_SITES + 1)
    assert planner.per_site_round_one(100, secure_later=False)
    monkeypatch.setattr(planner, "SITE_WORTH", -math.inf)  # the sites differ enough for per-site 1-way tables
    seen = []
    _, request, rounds, _ = in_process(epsilon=4.0, events=lambda m, **k: seen.append(m))
    assert [r.secure for r in rounds] == [False, False, True, True]  # three sites: small tables, then per site
    monkeypatch.setattr(planner, "PER_SITE_SITES", 2)  # the test's three sites count as "many"
    for secure in (None, False):
        seen = []
        _, request, rounds, structure = in_process(epsilon=4.0, secure_aggregation=secure,
                                                   events=lambda m, **k: seen.append(m))
        assert [r.secure for r in rounds] == [secure is None] * 3
        assert (secure is None) == any(m.startswith("round 1 tried as one secure sum") for m in seen)
        assert secure is False or not any("site" in s for s in structure)
        assert sum(m.rho for m in rounds[0].marginals) == pytest.approx(request.rho * planner.ONEWAY_SHARE, rel=1e-9)
        assert sum(sum(m.rho for m in r.marginals) for r in rounds) == pytest.approx(request.rho, rel=1e-12)
    _, _, rounds, _ = in_process(epsilon=1.0, site_groups={"cleveland": "a", "hungarian": "a", "va": "b"})
    assert not rounds[0].secure and all(r.secure for r in rounds[1:])  # groups asked to be modelled: per site
    seen, site_tables = [], []  # sites that do not allow secure sums: round 1 goes out per site (enrolling cost nothing)
    select = planner.select
    monkeypatch.setattr(planner, "select", lambda *a, **k: site_tables.append(a[3]) or select(*a, **k))
    _, request, rounds, _ = in_process(epsilon=4.0, secure=False, events=lambda m, **k: seen.append(m))
    assert [r.secure for r in rounds] == [False] * 3 and any("this round goes out per site" in m for m in seen)
    assert site_tables and site_tables[-1]  # ... and site effects are read from its per-site tables after all


def test_site_worth_is_about_zero_for_alike_sites_and_measures_how_far_apart_they_are():
    """`site_worth` estimates the squared differences between the sites' 1-way tables and "every site
    alike" without the noise's own share, over the noise per-site tables would add: about 0 on
    average for sites drawn alike, the noiseless figure for sites that differ, and it grows with the
    budget (the noise it is compared with shrinks)."""
    d = make_dictionary({"a": (4, True), "b": (3, False), "c": (2, False)})
    rng = np.random.default_rng(3)
    sizes = np.array([400.0, 250.0, 150.0])
    alike = {v: np.outer(sizes, np.full(d[v].size, 1.0 / d[v].size)) for v in d.names}
    apart = {v: t.copy() for v, t in alike.items()}
    apart["a"] = np.outer(sizes, [0.4, 0.3, 0.2, 0.1])
    apart["a"][2] = sizes[2] * np.array([0.05, 0.15, 0.3, 0.5])  # the smallest site differs on a
    plan = planner.oneway_plan(d, 0.1)
    detect = planner.oneway_plan(d, 0.002)
    sigma = {p.variables[0]: accounting.scale_for_rho(p.rho) for p in detect}

    def draws(truth, n=1000):
        return np.array([planner.site_worth(d, [Measurement((SITE, v), truth[v] + rng.normal(0, sigma[v], truth[v].shape),
                                                            sigma[v] ** 2) for v in d.names], plan, 1.0)
                         for _ in range(n)])

    same, differ = draws(alike), draws(apart)
    assert abs(same.mean()) < 3 * same.std() / math.sqrt(len(same))
    cost = 2 * sum(accounting.scale_for_rho(p.rho) ** 2 * p.cells(d) for p in plan)  # 3 sites against 1 copy
    share = sizes / sizes.sum()
    truth = sum(float(((t - np.outer(share, t.sum(axis=0))) ** 2).sum()) for t in apart.values()) / cost
    assert differ.mean() == pytest.approx(truth, rel=0.1) and truth > 3 * planner.SITE_WORTH
    one = [Measurement((SITE, v), apart[v] + rng.normal(0, sigma[v], apart[v].shape), sigma[v] ** 2) for v in d.names]
    assert planner.site_worth(d, one, planner.oneway_plan(d, 0.4), 1.0) == pytest.approx(
        4 * planner.site_worth(d, one, plan, 1.0), rel=1e-6)  # four times the budget: a quarter of the noise added
    assert planner.site_worth(d, one, plan, 3.0) == math.inf  # a secure sum as noisy as per-site tables: per site
    assert planner.per_site_round_one(3, worth=planner.SITE_WORTH) and not planner.per_site_round_one(3, worth=0.5)
    assert planner.per_site_round_one(3, secure_later=False, worth=0.0)  # plain sums ordered: per site costs nothing more


def test_with_few_sites_how_far_apart_they_are_decides_whether_the_one_way_tables_go_per_site(in_process, dictionary,
                                                                                          monkeypatch):
    """Up to PER_SITE_SITES sites, a first round buys small per-site 1-way tables (DIFFERENCE_SHARE of
    rho). If the sites differ by SITE_WORTH times the noise per-site tables would add, the 1-way tables
    go per site and site effects may be modelled; else they are one secure sum and none are. Either
    way the release spends exactly its rho."""
    d = dictionary
    select = planner.select
    for floor, per_site in ((-math.inf, True), (math.inf, False)):
        monkeypatch.setattr(planner, "SITE_WORTH", floor)
        seen, site_tables = [], []
        monkeypatch.setattr(planner, "select", lambda *a, **k: site_tables.append(a[3]) or select(*a, **k))
        guards, request, rounds, structure = in_process(epsilon=4.0, events=lambda m, **k: seen.append(m))
        tested = rounds[0]
        assert not tested.secure and [m.variables for m in tested.marginals] == [(v,) for v in d.names]
        assert tested.fitted  # the same sites answered the 1-way tables: the small tables are fitted too
        assert sum(m.rho for m in tested.marginals) == pytest.approx(request.rho * planner.DIFFERENCE_SHARE, rel=1e-12)
        assert [r.secure for r in rounds] == [False, not per_site, True, True]
        assert sum(m.rho for m in rounds[1].marginals) == pytest.approx(
            request.rho * (planner.ONEWAY_SHARE - planner.DIFFERENCE_SHARE), rel=1e-9)
        assert bool(site_tables[-1]) == per_site  # per-site tables are what site effects are read from
        assert per_site or not any(SITE in s for s in structure)
        assert any(m.startswith("round 2: the 1-way tables per site" if per_site else "round 2 tried as one secure sum")
                   for m in seen)
        for site in guards:  # every site paid exactly the release's rho (its ledger also holds the other run)
            assert sum(x.receipt.rho_debited for r in rounds for x in r.results if x.site == site) == pytest.approx(
                request.rho, rel=1e-9)
    monkeypatch.setattr(planner, "SITE_WORTH", math.inf)  # no secure sums possible: per site after all
    _, _, rounds, _ = in_process(epsilon=4.0, secure=False)
    assert [r.secure for r in rounds] == [False] * 4


def test_a_site_that_misses_only_the_first_small_tables_still_counts_in_the_model(site_config, consortium_keys,
                                                                                  dictionary, monkeypatch, tmp_path):
    """The first small per-site tables decide how the 1-way tables are sent; they are fitted only where the
    same sites answered both. A site whose reply to them was lost still answers the later rounds and is in
    the model with every selected pair; with fewer sites left than a secure sum needs, the 1-way tables go
    per site and the release says why."""
    from ppsehr.client.guard import SiteGuard
    from ppsehr.common import keys
    from ppsehr.deploy.transports import InProcessTransport
    from ppsehr.protos import guard_pb2 as pb
    from ppsehr.server.measure.rounds import MeasureOptions, Request, collect, round_measurements
    from ppsehr.server.measure.transport import SiteFailure

    class LosesCount(InProcessTransport):
        def query(self, plan, timeout, progress, kind="summary", to=None):
            replies, failures = super().query(plan, timeout, progress, kind, to)
            if kind == "summary" and pb.QueryPlan.FromString(plan.plan).purpose.endswith("(round 1)"):
                replies = [r for r in replies if r.where != "va"]
                failures = failures + [SiteFailure("va", "TIMEOUT", "no reply")]
            return replies, failures

    monkeypatch.setattr(planner, "SITE_SIGMAS", math.inf)  # no site effects: every table is pooled
    site_keys = {s: keys.load_public_key(consortium_keys.site_keys[s][1]) for s in SITES}
    for eps, worth in ((4.0, -math.inf), (1.0, math.inf)):
        monkeypatch.setattr(planner, "SITE_WORTH", worth)  # per-site tables worth it (4), or not (1)
        guards = {s: SiteGuard(site_config(s, secure=True, state=tmp_path / str(eps) / s)) for s in SITES}
        request = Request("coordinator", "test", accounting.rho_for_epsilon(eps, 1e-6), 1e-6)
        seen = []
        rounds, structure = collect(MeasureOptions(), request, dictionary,
                                    keys.load_signing_key(consortium_keys.coordinator_key), site_keys,
                                    LosesCount(guards), lambda m, **k: seen.append(m))
        assert {r.site for r in rounds[0].results} == {"cleveland", "hungarian"} and not rounds[0].fitted
        assert not rounds[1].secure and {r.site for r in rounds[1].results} == set(SITES)
        # at epsilon 1 per-site tables are not worth it, but two sites are too few for a secure sum
        assert (eps == 1.0) == any("2 site(s) are too few for a secure sum" in m for m in seen)
        assert all(r.secure and {x.site for x in r.results} == set(SITES) for r in rounds[2:])
        measurements, _ = round_measurements(dictionary, rounds, structure, "model", {})
        pairs = [m for m in measurements if len(m.variables) == 2]
        assert len(pairs) >= len([s for s in structure if len(s) == 2]) > 0


def test_a_secure_round_one_tolerates_a_dropout_and_a_site_that_cannot_enroll(site_config, consortium_keys, dictionary,
                                                                             monkeypatch, tmp_path):
    """Four sites with the many-sites rule on: round 1 is a secure sum that declares one dropout (a
    per-site round would only have lost that site). A site that cannot pay for the release refuses
    to enroll, for free: round 1 goes out per site after all, and rounds 2 and 3 are still secure
    sums of the sites that answered it, each of which spends exactly the release's rho."""
    from ppsehr.client.guard import SiteGuard
    from ppsehr.common import keys
    from ppsehr.deploy.transports import InProcessTransport
    from ppsehr.server.measure.rounds import MeasureOptions, Request, collect

    monkeypatch.setattr(planner, "PER_SITE_SITES", 3)
    sites = ("cleveland", "hungarian", "switzerland", "va")
    site_keys = {s: keys.load_public_key(consortium_keys.site_keys[s][1]) for s in sites}
    request = Request("coordinator", "test", accounting.rho_for_epsilon(4.0, 1e-6), 1e-6)

    def run(budgets):
        guards = {s: SiteGuard(site_config(s, epsilon=budgets.get(s, 10.0), secure=True, state=state / s)) for s in sites}
        rounds, _ = collect(MeasureOptions(), request, dictionary, keys.load_signing_key(consortium_keys.coordinator_key),
                            site_keys, InProcessTransport(guards), lambda *a, **k: None)
        return guards, rounds

    state = tmp_path / "dropout"
    _, rounds = run({})
    assert [r.secure for r in rounds] == [True] * 3 and rounds[0].plan.secure.dropouts == 1
    state = tmp_path / "refusal"
    guards, rounds = run({"va": 1.0})  # va's lifetime budget cannot pay for an epsilon-4 release
    assert [r.secure for r in rounds] == [False, True, True]
    assert all({r.site for r in rnd.results} == set(sites) - {"va"} for rnd in rounds)
    assert guards["va"].ledger.spent() == 0
    assert all(guards[s].ledger.spent() == pytest.approx(request.rho, rel=1e-9) for s in sites if s != "va")
    assert len(rounds[0].results) == len(SITES) and sum(m.rho for m in rounds[0].marginals) == pytest.approx(
        request.rho * planner.ONEWAY_SHARE, rel=1e-9)


def test_candidates_too_noisy_to_tell_anything_are_not_bought(in_process, dictionary):
    """When round 1 shows that a typical candidate table would hold fewer records per cell than
    MIN_CANDIDATE_SNR noise sigmas, no candidates are sent: its budget goes to round 3, which measures the outcome's
    pairs, the prior dependencies and a chain through variables missing about as often; the release still spends
    exactly its rho."""
    seen = []
    guards, request, rounds, structure = in_process(epsilon=0.3, outcome="heart_disease",
                                                    events=lambda m, **k: seen.append(m))
    assert [r.number for r in rounds] == [1, 2, 3] and any(m.startswith("no candidate round") for m in seen)
    pairs = {frozenset(m.variables) for m in rounds[-1].marginals if len(m.variables) == 2}
    priors = {frozenset(p) for p in dictionary.dependencies}
    star = {frozenset(("heart_disease", v)) for v in planner.joint_names(dictionary) if v != "heart_disease"}
    assert pairs == {frozenset(s) for s in structure if len(s) == 2} and priors | star <= pairs
    assert all(dictionary[v].missing for p in pairs - priors - star for v in p)  # the co-missing chain
    for g in guards.values():
        assert g.ledger.spent() == pytest.approx(request.rho, rel=1e-9)
    assert sum(sum(m.rho for m in r.marginals) for r in rounds) == pytest.approx(request.rho, rel=1e-12)
    _, _, rounds, _ = in_process(epsilon=0.3)  # no outcome: the 1-way tables and the prior dependencies
    assert [r.number for r in rounds] == [1, 2, 3]
    pairs = {frozenset(m.variables) for m in rounds[-1].marginals if len(m.variables) == 2}
    assert priors <= pairs and all(dictionary[v].missing for p in pairs - priors for v in p)


def test_a_declared_outcome_in_a_release(in_process, dictionary):
    """`outcome`: round 3 measures every pair with the outcome, with more budget each; the release still spends
    exactly its rho; an outcome the dictionary does not have stops the release before anything is sent."""
    guards, request, rounds, structure = in_process(epsilon=4.0, outcome="heart_disease")
    third = [m for m in rounds[2].marginals if len(m.variables) == 2]
    mine = [m for m in third if "heart_disease" in m.variables]
    assert {v for m in mine for v in m.variables} == set(planner.joint_names(dictionary))  # a star
    assert sum(m.rho for r in rounds for m in r.marginals) == pytest.approx(request.rho, rel=1e-12)
    others = [m for m in third if "heart_disease" not in m.variables]
    per_cell = lambda ms: np.mean([m.rho / m.cells(dictionary) ** (2 / 3) for m in ms])  # noqa: E731
    assert per_cell(mine) / per_cell(others) == pytest.approx(planner.OUTCOME_WEIGHT)
    from ppsehr.common.errors import PpsehrError

    with pytest.raises(PpsehrError, match="not a variable"):
        in_process(outcome="no_such_variable")


def test_the_default_release_needs_no_flags():
    from ppsehr.deploy.cli import build_parser, job_options
    from ppsehr.server.measure.rounds import MeasureOptions
    from ppsehr.server.pipeline import ReleaseJob

    args = build_parser().parse_args(["coordinator", "release", "--dictionary", "d.toml", "--out", "o",
                                      "--superlink", "127.0.0.1:1", "--signing-key", "k", "--site-key", "a=a.pub"])
    job = ReleaseJob.create(dictionary="d.toml", out="o", signing_key="k", site_keys={"a": "a.pub"},
                            **{k: v for k, v in job_options(args).items() if k in {"site_variable", "structure",
                               "secure_aggregation", "colluding", "min_parties", "site_groups"}})
    assert job.measure == MeasureOptions() == ReleaseJob(dictionary="d.toml", out="o", signing_key="k",
                                                         site_keys={}).measure
    assert MeasureOptions().secure_aggregation is None and MeasureOptions().structure == []
    depends = build_parser().parse_args(["coordinator", "release", "--dictionary", "d.toml", "--out", "o",
                                         "--superlink", "x", "--signing-key", "k", "--depends", "age,chol"])
    assert job_options(depends)["structure"] == [["age", "chol"]] and job_options(depends)["outcome"] is None
    outcome = build_parser().parse_args(["coordinator", "release", "--dictionary", "d.toml", "--out", "o",
                                         "--superlink", "x", "--signing-key", "k", "--outcome", "heart_disease"])
    assert ReleaseJob.create(dictionary="d.toml", out="o", signing_key="k", site_keys={},
                             **job_options(outcome)).measure.outcome == "heart_disease"


def test_a_dictionary_may_declare_the_outcome():
    from ppsehr.common.errors import DictionaryError

    head = {"dictionary": {"name": "t", "version": "1"}, "variables": {
        v: {"type": "categorical", "categories": ["x", "y"]} for v in "abc"}}
    assert parse_dictionary(head).outcome is None
    assert parse_dictionary(head | {"model": {"outcome": "b"}}).outcome == "b"
    with pytest.raises(DictionaryError, match="model.outcome"):
        parse_dictionary(head | {"model": {"outcome": "z"}})
