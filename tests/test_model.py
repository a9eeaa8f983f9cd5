"""The graphical-model estimator and the planner on cases with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ppsehr.server.measure import planner
from ppsehr.server.model.graphical import JunctionTree, Measurement, estimate

DOMAIN = {"a": 3, "b": 4, "c": 2, "d": 5}


@pytest.fixture(scope="module")
def tree_joint():
    """A distribution that factorises over the tree a-b, b-c, b-d."""
    rng = np.random.default_rng(0)
    pa = rng.dirichlet(np.ones(3))
    pba, pcb, pdb = rng.dirichlet(np.ones(4), 3), rng.dirichlet(np.ones(2), 4), rng.dirichlet(np.ones(5), 4)
    return np.einsum("a,ab,bc,bd->abcd", pa, pba, pcb, pdb)


def marg(joint, keep):
    axes = tuple(i for i, v in enumerate(DOMAIN) if v not in keep)
    return joint.sum(axis=axes)


def test_exact_marginals_give_back_the_tree_distribution(tree_joint):
    N = 1000.0
    ms = [Measurement(vs, N * marg(tree_joint, vs), 1.0) for vs in (("a", "b"), ("b", "c"), ("b", "d"))]
    model = estimate(DOMAIN, ms, iters=3000, tol=1e-13, stall=0)
    assert model.total == pytest.approx(N)
    for vs in (("a", "b"), ("b", "c"), ("b", "d")):
        assert np.abs(model.marginal(vs) - N * marg(tree_joint, vs)).max() < 0.2
    # pairs never measured follow from the tree: a and d are independent given b
    assert np.abs(model.marginal(("a", "d")) - N * marg(tree_joint, ("a", "d"))).max() < 0.2


def test_inconsistent_noisy_marginals_are_made_consistent(tree_joint):
    rng = np.random.default_rng(1)
    N = 500.0
    ms = [Measurement(vs, N * marg(tree_joint, vs) + rng.normal(0, 8, marg(tree_joint, vs).shape), 64.0)
          for vs in (("a", "b"), ("b", "c"), ("b", "d"), ("b",))]
    sums = {vs: m.values.sum(axis=tuple(i for i, v in enumerate(vs) if v != "b")) for vs, m in
            ((m.variables, m) for m in ms)}
    assert max(np.abs(sums[("a", "b")] - sums[("b", "d")])) > 1  # the measurements disagree on b
    model = estimate(DOMAIN, ms)
    b = model.marginal(("b",))
    for vs in (("a", "b"), ("b", "c"), ("b", "d")):
        mu = model.marginal(vs)
        assert (mu >= 0).all()
        assert np.allclose(mu.sum(axis=tuple(i for i, v in enumerate(vs) if v != "b")), b)
    # and it is closer to the truth than the raw noisy tables are
    truth = N * marg(tree_joint, ("a", "b"))
    assert np.abs(model.marginal(("a", "b")) - truth).sum() < np.abs(ms[0].values - truth).sum()


def test_sampling_frequencies_converge_to_the_model(tree_joint):
    ms = [Measurement(vs, 1000 * marg(tree_joint, vs), 1.0) for vs in (("a", "b"), ("b", "c"), ("b", "d"))]
    model = estimate(DOMAIN, ms, iters=2000, tol=1e-12)
    rng = np.random.default_rng(2)
    for n in (1000, 200_000):
        s = model.sample(n, rng)
        emp = np.zeros(tuple(DOMAIN.values()))
        np.add.at(emp, tuple(s.T), 1)
        expected = np.einsum("ab,bc,bd->abcd", model.marginal(("a", "b")),
                             model.marginal(("b", "c")) / model.marginal(("b",))[:, None],
                             model.marginal(("b", "d")) / model.marginal(("b",))[:, None]) / model.total
        tvd = 0.5 * np.abs(emp / n - expected).sum()
        iid = np.mean([0.5 * np.abs(rng.multinomial(n, expected.ravel()) / n - expected.ravel()).sum() for _ in range(20)])
        assert tvd < iid  # controlled rounding beats independent draws
        assert tvd < (0.1 if n == 1000 else 0.01)
        # controlled rounding: the root clique's counts are within one row of n * p
        root = model.cliques[model.tree.bfs[0]]
        counts = np.zeros(tuple(DOMAIN[v] for v in root))
        np.add.at(counts, tuple(s[:, list(DOMAIN).index(v)] for v in root), 1)
        assert np.abs(counts - n * model.marginal(root) / model.total).max() <= 1.0 + 1e-9


def test_cycles_are_triangulated_into_a_junction_tree():
    tree = JunctionTree({"a": 2, "b": 2, "c": 2, "d": 2}, [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")])
    assert all(len(c) == 3 for c in tree.cliques) and len(tree.cliques) == 2
    # running intersection: a variable's cliques form a connected subtree (here: share an edge)
    shared = set(tree.cliques[0]) & set(tree.cliques[1])
    assert len(shared) == 2 and len(tree.edges) == 1


def test_unobserved_cells_carry_no_weight():
    truth = np.array([[30.0, 10.0], [20.0, 40.0]])
    garbage = np.array([[1e6, 1e6], [1e6, 1e6]])
    values = np.stack([truth, garbage])  # slice 1 was never observed
    variance = np.array([1.0, np.inf])[:, None, None]
    m = estimate({"s": 2, "x": 2, "y": 2}, [Measurement(("s", "x", "y"), values, variance)], total=100.0)
    assert np.allclose(m.marginal(("s",)), [100.0, 0.0], atol=1e-3) or m.marginal(("s",))[0] > 0
    slice0 = m.marginal(("s", "x", "y"))[0]
    assert np.abs(slice0 / slice0.sum() - truth / truth.sum()).max() < 0.01


def test_a_model_too_large_is_refused_with_the_reason():
    domain = {f"v{i}": 30 for i in range(6)}
    ms = [Measurement(vs, np.ones((30, 30)), 1.0) for vs in itertools.combinations(domain, 2)]
    with pytest.raises(ValueError, match="cells .limit"):
        estimate(domain, ms)


def test_allocation_spends_exactly_rho_and_favours_bigger_tables(dictionary):
    plan = planner.one_round_plan(dictionary, 0.5)
    assert sum(m.rho for m in plan) == pytest.approx(0.5)
    by = {m.variables: m.rho for m in plan}
    assert by[("chol",)] > by[("sex",)]  # 11 cells vs 2 cells
    assert len(plan) == len(dictionary.names) + len(dictionary.dependencies)


def test_joint_with_gives_every_pairwise_marginal_of_the_model(tree_joint):
    """One outward pass per variable gives the same pairwise tables as `marginal`, near or far."""
    N = 1000.0
    ms = [Measurement(vs, N * marg(tree_joint, vs), 1.0) for vs in (("a", "b"), ("b", "c"), ("b", "d"))]
    model = estimate(DOMAIN, ms, iters=200)
    for a in DOMAIN:
        joint = model.joint_with(a)
        assert set(joint) == set(DOMAIN) - {a}
        for v, table in joint.items():
            np.testing.assert_allclose(table, model.marginal((a, v)), rtol=1e-9, atol=1e-9)


def test_repeated_measurements_weigh_as_one_inverse_variance_mean(tree_joint):
    """Two noisy measurements of a table fit as their inverse-variance mean would (the estimator merges them)."""
    rng = np.random.default_rng(7)
    N = 800.0
    truth = N * marg(tree_joint, ("a", "b"))
    y1, y2 = truth + rng.normal(0, 4, truth.shape), truth + rng.normal(0, 8, truth.shape)
    both = estimate(DOMAIN, [Measurement(("a", "b"), y1, 16.0), Measurement(("b", "a"), y2.T, 64.0)], stall=0)
    mean = (y1 / 16 + y2 / 64) / (1 / 16 + 1 / 64)
    one = estimate(DOMAIN, [Measurement(("a", "b"), mean, 1 / (1 / 16 + 1 / 64))], stall=0, total=both.total)
    np.testing.assert_allclose(both.marginal(("a", "b")), one.marginal(("a", "b")), atol=1e-6)


def test_the_fit_stops_once_what_is_left_is_noise(tree_joint):
    rng = np.random.default_rng(8)
    N = 2000.0
    ms = [Measurement(vs, N * marg(tree_joint, vs) + rng.normal(0, 10, marg(tree_joint, vs).shape), 100.0)
          for vs in (("a", "b"), ("b", "c"), ("b", "d"), ("a",), ("c",))]
    early, full = estimate(DOMAIN, ms), estimate(DOMAIN, ms, stall=0, iters=2000, tol=1e-12)
    assert len(early.history) < len(full.history) / 3
    cells = sum(m.values.size for m in ms)  # the loss at the truth is about cells / 2 (noise alone)
    assert early.history[-1] - full.history[-1] < 0.1 * cells


def test_balanced_matching_brings_pairs_across_cliques_closer_to_the_model(tree_joint, monkeypatch):
    """a, c and d meet only through b: their pair tables in the records come from how rows are
    matched to cells within b's groups. Balanced against earlier columns, they follow the model
    more closely than a random matching does, and the clique tables stay within two rows."""
    from ppsehr.server.model import graphical

    ms = [Measurement(vs, 600 * marg(tree_joint, vs), 1.0) for vs in (("a", "b"), ("b", "c"), ("b", "d"))]
    model = estimate(DOMAIN, ms, iters=2000, tol=1e-12)
    names = list(DOMAIN)

    def error(balance: int) -> float:
        monkeypatch.setattr(graphical, "BALANCE_COLUMNS", balance)
        errs = []
        for seed in range(12):
            s = model.sample(600, np.random.default_rng(seed))
            for x, y in (("a", "c"), ("a", "d"), ("c", "d")):
                emp = np.zeros((DOMAIN[x], DOMAIN[y]))
                np.add.at(emp, (s[:, names.index(x)], s[:, names.index(y)]), 1)
                errs.append(np.abs(emp - model.marginal((x, y))).sum())
            for x, y in (("a", "b"), ("b", "c"), ("b", "d")):  # one clique each: rounded twice at most
                emp = np.zeros((DOMAIN[x], DOMAIN[y]))
                np.add.at(emp, (s[:, names.index(x)], s[:, names.index(y)]), 1)
                assert np.abs(emp - model.marginal((x, y))).max() <= 2.0
        return float(np.mean(errs))

    assert error(3) < 0.8 * error(0)


def test_balanced_matching_is_unbiased_within_strata():
    """Groups of six rows, a cell of 15%: whatever stratum of an earlier column a row is in, it
    gets the cell with probability 0.15 (an interleaving without a random rotation gave the
    middle stratum 0.17 and the outer ones 0.14)."""
    from ppsehr.server.model.graphical import _draw

    rng = np.random.default_rng(5)
    G, m, p = 300, 6, 0.15
    group = np.repeat(np.arange(G), m)
    joint = np.tile([p, 1 - p], (G, 1))
    hits, rows = np.zeros(3), np.zeros(3)
    for _ in range(150):
        stratum = rng.integers(0, 3, G * m)
        out = _draw(joint, group, rng, [stratum])
        hits += np.bincount(stratum, weights=(out == 0), minlength=3)
        rows += np.bincount(stratum, minlength=3)
    assert np.abs(hits / rows - p).max() < 0.006


def test_controlled_rounding_is_unbiased_for_small_groups():
    """Two rows over cells with p = .45/.30/.25: expected counts .9/.6/.5, not flattened."""
    from ppsehr.server.model.graphical import _draw

    rng = np.random.default_rng(0)
    joint = np.array([[0.45, 0.30, 0.25]])
    counts = np.zeros(3)
    for _ in range(20000):
        counts += np.bincount(_draw(joint, np.zeros(2, dtype=np.int64), rng), minlength=3)
    assert np.allclose(counts / 20000, [0.9, 0.6, 0.5], atol=0.02)
