"""Domain compression: plans that group a variable's cells, from the guard to the signed release."""

from __future__ import annotations

import json
import math
import shutil

import grpc
import numpy as np
import pytest

from ppsehr.common import accounting, keys
from ppsehr.common.cells import check_groups, group_labels, grouped_index, project, spread
from ppsehr.common.errors import ReleaseError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure import planner
from ppsehr.server.measure.aggregate import aggregate, verify_summary
from ppsehr.server.model.graphical import Measurement, estimate
from ppsehr.server.release.bundle import verify_release

from conftest import edit_manifest, resign_manifest


# ----------------------------------------------------------------------------- common/cells.py
@pytest.mark.parametrize("sizes, groups, where", [
    ([3, 4], [None, [0, 1, 2]], "variable 1"),          # too short
    ([3, 4], [[0, 0, 1, 1], None], "variable 0"),       # too long
    ([3, 4], [None, [0, 2, 2, 0]], "variable 1"),       # group 1 skipped
    ([3, 4], [[0, -1, 1], None], "variable 0"),         # negative group
    ([3, 4], [[0, 1, 3], None], "variable 0"),          # more groups than cells
    ([3, 4], [[1, 1, 2], None], "variable 0"),          # group 0 unused
])
def test_check_groups_rejects_groupings_that_do_not_fit(sizes, groups, where):
    with pytest.raises(ValueError, match=where):
        check_groups(sizes, groups)


def test_check_groups_needs_one_grouping_per_variable_or_none():
    with pytest.raises(ValueError, match="3 groupings for 2 variables"):
        check_groups([3, 4], [None, None, [0]])
    assert check_groups([3, 4], []) == ((None, None), (3, 4))


def test_check_groups_shapes_and_identity():
    maps, shape = check_groups([3, 4, 2], [[0, 1, 2], [], [0, 0]])
    assert maps[0] is None and maps[1] is None  # identity and empty both mean "cell by cell"
    assert shape == (3, 4, 1) and maps[2].tolist() == [0, 0]
    maps, shape = check_groups([5], [[0, 0, 1, 2, 1]])
    assert shape == (3,) and maps[0].tolist() == [0, 0, 1, 2, 1]  # groups need not be runs


def _random_grouping(rng, size):
    if rng.random() < 0.3:
        return None
    g = rng.integers(0, rng.integers(1, size + 1), size)
    return np.unique(g, return_inverse=True)[1]  # renumber 0..g-1, every group used


@pytest.mark.parametrize("seed", range(8))
def test_project_and_spread_are_adjoint_and_match_grouped_index(seed):
    rng = np.random.default_rng(seed)
    sizes = tuple(int(s) for s in rng.integers(1, 6, rng.integers(2, 4)))
    maps, shape = check_groups(sizes, [_random_grouping(rng, s) for s in sizes])
    x, y = rng.normal(size=sizes), rng.normal(size=shape)
    px = project(x, maps)
    assert px.shape == shape
    assert float(np.sum(px * y)) == pytest.approx(float(np.sum(x * spread(y, maps))), rel=1e-10, abs=1e-10)
    assert px.sum() == pytest.approx(x.sum())
    # projecting a table of counts = counting records by their grouped cell
    cols = [rng.integers(0, s, 50) for s in sizes]
    full = np.bincount(np.ravel_multi_index(cols, sizes), minlength=math.prod(sizes)).reshape(sizes)
    grouped = np.bincount(grouped_index(cols, maps, shape), minlength=math.prod(shape)).reshape(shape)
    assert np.array_equal(project(full, maps), grouped)


def test_group_labels_join_member_cells():
    assert group_labels(["a", "b", "c", "d"], np.array([0, 1, 0, 2])) == ["a | c", "b", "d"]
    assert group_labels(["a", "b"], None) == ["a", "b"]


# ----------------------------------------------------------------------------- site guard
def grouped_plan(dictionary, marginals, plan_id=None):
    """marginals: (variables, rho, groupings or None); a grouping of None/[] measures cell by cell."""
    return pb.QueryPlan(plan_id=plan_id or f"p-{np.random.randint(1 << 62)}", coordinator="tester", purpose="test",
                        dictionary_hash=dictionary.hash, marginals=[
                            pb.MarginalQuery(variables=v, rho=r, groups=[pb.CellGroups(cell_group=g or ()) for g in gs or ()])
                            for v, r, gs in marginals])


def exact_grouped(table, names, dictionary, groups):
    """The site's exact counts over grouped cells, computed without common/cells.py."""
    sizes = [dictionary[n].size for n in names]
    full = np.zeros(sizes, dtype=np.int64)
    np.add.at(full, tuple(table.columns[n] for n in names), 1)
    for k, g in enumerate(groups):
        if g:
            full = np.stack([np.take(full, [c for c, x in enumerate(g) if x == j], axis=k).sum(axis=k)
                             for j in range(max(g) + 1)], axis=k)
    return full


AGE3 = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 9 age bins -> 3
CHOL5 = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4]  # 10 bins + missing -> 5
CP = [0, 0, 0, 1, 2]  # the three anginas together


def test_guard_answers_grouped_marginals_with_the_grouped_counts(guards, dictionary, demo, sign, consortium_keys):
    g = guards("cleveland", epsilon=100.0, policy={"max_rho_per_plan": 50.0})
    rho = 15.0  # sigma ~ 0.18: the counts are the exact ones within a few sigmas
    marginals = [(["age", "chol"], rho, [AGE3, None]), (["cp", "sex"], rho, [CP, [0, 0]]), (["chol"], rho, [CHOL5])]
    signed = sign(grouped_plan(dictionary, marginals))
    reply = g.stub.Answer(signed)
    summary = pb.Summary.FromString(reply.summary)
    table, _ = load_site_table(load_mapping(demo / "sites" / "cleveland.toml", dictionary), dictionary)
    for got, (names, _, groups) in zip(summary.marginals, marginals):
        exact = exact_grouped(table, names, dictionary, groups)
        assert tuple(got.shape) == exact.shape and len(got.counts) == exact.size
        assert np.abs(np.asarray(got.counts) - exact.ravel()).max() <= 5 * got.noise_scale
    assert tuple(summary.marginals[0].shape) == (3, 11) and tuple(summary.marginals[1].shape) == (3, 1)
    # the coordinator accepts the grouped shapes and the measurements carry their groupings
    site_pub = keys.load_public_key(consortium_keys.site_keys["cleveland"][1])
    result = verify_summary(reply, signed, dictionary, {"cleveland": site_pub})
    plan = pb.QueryPlan.FromString(signed.plan)
    ms = aggregate(plan, [result], dictionary)
    assert [m.coarse for m in ms] == [True, True, True]
    assert ms[0].maps()[1] is None and ms[0].maps()[0].tolist() == AGE3
    assert ms[2].values.shape == (5,)


def test_policy_limits_count_grouped_cells(guards, dictionary, sign):
    g = guards("cleveland", policy={"max_cells": 50})
    with pytest.raises(grpc.RpcError) as e:  # 9 x 11 = 99 cells
        g.stub.Answer(sign(grouped_plan(dictionary, [(["age", "chol"], 0.01, None)])))
    assert e.value.details().startswith("POLICY_LIMIT") and "99 cells" in e.value.details()
    s = pb.Summary.FromString(g.stub.Answer(sign(grouped_plan(dictionary, [(["age", "chol"], 0.01, [None, CHOL5])]))).summary)
    assert tuple(s.marginals[0].shape) == (9, 5)  # 45 cells: within the policy


@pytest.mark.parametrize("groups, reason", [
    ([None, CHOL5 + [0]], "do not fit"),                           # cell_group longer than the domain
    ([None, [0, 0, 2, 2, 3, 3, 4, 4, 4, 4, 5]], "variable 1"),     # group 1 skipped
    ([AGE3, CHOL5, CP], "do not fit"),                             # more CellGroups than variables
    ([AGE3], "1 groupings for 2 variables"),                       # fewer (but some)
    ([[0] * 8 + [2 ** 32 - 1], None], "variable 0"),               # a huge group number
    ([None, CHOL5[:-1]], "variable 1"),                            # cell_group shorter than the domain
])
def test_hostile_groupings_are_refused_without_debit(guards, dictionary, sign, groups, reason):
    g = guards("va")
    plan = grouped_plan(dictionary, [(["sex"], 0.01, None), (["age", "chol"], 0.01, groups)])
    with pytest.raises(grpc.RpcError) as e:
        g.stub.Answer(sign(plan))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert details.startswith("MALFORMED_PLAN: marginal 1:") and reason in details, details
    assert g.guard.ledger.spent() == 0.0 and g.guard.ledger.debits() == []
    last = g.guard.ledger.audit_entries()[-1]
    assert (last.event, last.code, last.plan_id) == ("refused", "MALFORMED_PLAN", plan.plan_id)


# ----------------------------------------------------------------------------- estimator
EST_DOMAIN = {"a": 3, "b": 4, "c": 5}


@pytest.mark.parametrize("order", [("b", "c"), ("c", "b")])
def test_estimator_fits_coarse_tables_exactly(order):
    rng = np.random.default_rng(4)
    joint = 1000.0 * rng.dirichlet(np.ones(60)).reshape(3, 4, 5)

    def marg(vs):
        t = joint.sum(axis=tuple(i for i, v in enumerate(EST_DOMAIN) if v not in vs))
        present = [v for v in EST_DOMAIN if v in vs]
        return np.transpose(t, [present.index(v) for v in vs])

    maps = tuple({"b": np.array([0, 1, 1, 2]), "c": np.array([0, 0, 1, 1, 2])}[v] for v in order)
    coarse = project(marg(order), maps)
    ms = [Measurement((v,), marg((v,)), 1e-4) for v in EST_DOMAIN]
    ms += [Measurement(order, coarse, 1e-4, maps), Measurement(("a", "b"), marg(("a", "b")), 1e-4)]
    model = estimate(EST_DOMAIN, ms, iters=3000, tol=1e-14, stall=0)
    assert np.allclose(project(model.marginal(order), maps), coarse, rtol=1e-6, atol=1e-6 * coarse.max())
    for v in EST_DOMAIN:
        assert np.allclose(model.marginal((v,)), marg((v,)), rtol=1e-6, atol=1e-6)
    assert np.allclose(model.marginal(("a", "b")), marg(("a", "b")), rtol=1e-6, atol=1e-6)


def test_estimator_checks_coarse_shapes():
    maps = (np.array([0, 1, 1, 2]), None)
    with pytest.raises(ValueError, match=r"expected \(3, 5\)"):
        estimate(EST_DOMAIN, [Measurement(("b", "c"), np.ones((4, 5)), 1.0, maps)])


# ----------------------------------------------------------------------------- planner
def _runs(cells):
    return all(b - a == 1 for a, b in zip(cells, cells[1:]))


def _check_compress(var, counts, threshold):
    """What planner.compress promises; returns the groups found below threshold."""
    g = planner.compress(var, counts, threshold)
    c = np.clip(np.asarray(counts, dtype=float), 0, None)
    apart = var.missing and c[-1] > 0 and c[-1] >= planner.MISSING_APART * threshold
    if g is None:  # every cell stays: each one holds the threshold (or two cells are the minimum)
        assert ((c[:-1] if apart else c) >= threshold).all() or var.size - apart <= 2  # two observed cells stay
        return []
    assert len(g) == var.size and not (c >= threshold).all()
    arr = np.asarray(g)
    n = arr.max() + 1
    assert sorted(set(g)) == list(range(n))
    firsts = [g.index(j) for j in range(n)]
    assert firsts == sorted(firsts)  # numbered by first cell
    ordered = var.n_bins if var.type == "numeric" else 0
    for j in range(n):
        bins = [k for k in range(ordered) if g[k] == j]
        assert _runs(bins), (j, g)  # numeric bins merge with neighbours only
    short = [j for j in range(n) if c[arr == j].sum() < threshold]
    if apart:  # the missing cell stands alone, even short of the threshold
        assert list(arr).count(arr[-1]) == 1, (g, c, threshold)
        short = [j for j in short if j != arr[-1]]
    n_observed = n - 1 if apart else n
    few = var.size - apart < 2 or (apart and c[:-1].sum() < threshold)
    assert n_observed >= 2 or few, (g, c, threshold)  # observed values keep two groups, if they can
    if short and few:  # the observed values, short together, are one group beside the missing cell
        assert n_observed == 1, (g, c, threshold)
        return short
    if short:  # only the two-group fallback (observed values would all merge) leaves one short
        assert n_observed == 2, (g, c, threshold)
        observed = arr[:-1] if apart else arr
        if ordered > 1:
            assert g[0] == 0 and g[ordered - 1] == 1  # the bins split in two, extra cells with the upper part
        else:
            values = c[:var.size - 1] if var.missing else c  # the missing cell is not a value
            top = int(np.argmax(values))
            assert list(arr).count(arr[top]) == 1  # the largest value stands apart
        return short
    others = range(ordered, var.size - 1 if apart else var.size)
    rare = [k for k in others if c[k] < threshold]
    assert len({g[k] for k in rare}) <= 1  # short categories are pooled into one group
    for k in others:
        if c[k] >= threshold:  # a category that holds the threshold is never merged with another such one or with bins
            assert not any(g[x] == g[k] for x in range(var.size) if x != k and (x < ordered or c[x] >= threshold))
    return short


@pytest.mark.parametrize("seed", range(6))
def test_compress_keeps_its_promises_on_random_noisy_counts(dictionary, seed):
    rng = np.random.default_rng(seed)
    for name in dictionary.names:
        var = dictionary[name]
        for _ in range(60):
            counts = rng.poisson(rng.gamma(0.7, 40, var.size)) + rng.normal(0, rng.choice([0.0, 3.0, 15.0]), var.size)
            total = np.clip(counts, 0, None).sum()
            threshold = float(rng.uniform(0, 1.3) * total) if rng.random() < 0.8 else float(rng.uniform(0, 20))
            short = _check_compress(var, counts, threshold)
            observed = total - (counts[-1] if var.missing and counts[-1] >= planner.MISSING_APART * threshold else 0)
            if observed >= 2 * threshold and var.type == "categorical":
                assert not short or len(short) == 1, (name, counts, threshold)


def test_a_binary_variable_keeps_both_values_beside_its_missing_cell(dictionary):
    """A 2-year event (16% events, some records censored earlier: missing) in a table compressed
    for a small budget: the rare value is short of the threshold, the missing cell stands apart.
    Merged with the common value, the table would say nothing about the event, only about
    which records miss it (a release's TSTR fell to 0.49 on one blind run before this rule)."""
    var = dictionary["fbs"]  # no / yes / missing
    assert var.size == 3 and var.missing
    assert planner.compress(var, np.array([1790.0, 350.0, 250.0]), 600.0) is None  # every cell stays
    assert planner.compress(var, np.array([1790.0, 150.0, 250.0]), 600.0) is None
    # a missing cell short of a quarter of the threshold, but the largest cell: a value stands apart
    assert planner.compress(var, np.array([1000.0, 400.0, 140.0]), 600.0) == (0, 1, 1)
    # the observed values together short of the threshold: one group beside the missing cell
    assert planner.compress(var, np.array([300.0, 100.0, 900.0]), 600.0) == (0, 0, 1)


def test_compress_pools_short_bins_next_to_a_large_missing_cell(dictionary):
    var = dictionary["trestbps"]  # 9 bins + missing
    counts = np.array([1.0] * 9 + [100.0])  # a mostly-missing measurement: the bins together hold 9 records
    g = np.asarray(planner.compress(var, counts, 50.0))
    assert g.max() == 1 and counts[g == g[-1]].sum() >= 50  # two groups (the minimum), missing in a full one
    assert planner.compress(var, counts, 3.0) == (0, 0, 0, 1, 1, 1, 2, 2, 2, 3)  # bins in runs of >= 3, missing apart
    # a short last run joins the one before; the bins together hold the threshold, so they keep two groups
    assert planner.compress(var, counts, 10.0) == (0,) * 9 + (1,)
    assert planner.compress(var, counts, 5.0) == (0,) * 5 + (1,) * 4 + (2,)


@pytest.fixture(scope="module")
def demo_oneways(dictionary, demo):
    """Pooled exact 1-way counts of the demo sites (as if noise-free round-1 tables)."""
    from ppsehr.deploy.local import DEMO_SITES

    counts = {n: np.zeros(dictionary[n].size) for n in dictionary.names}
    for site in DEMO_SITES:
        t, _ = load_site_table(load_mapping(demo / "sites" / f"{site}.toml", dictionary), dictionary)
        for n in dictionary.names:
            counts[n] += np.bincount(t.columns[n], minlength=dictionary[n].size)
    return [Measurement((n,), counts[n], 4 * 25.0) for n in dictionary.names]


def test_compressed_plan_spends_rho_and_coarsens_less_with_more_budget(dictionary, demo_oneways):
    sets = planner.structure(dictionary)
    plans = {}
    for rho in (0.01, 0.1, 1.0):
        plan = planner.compressed_plan(dictionary, sets, demo_oneways, rho, sites=4)
        assert plan and math.isclose(sum(p.rho for p in plan), rho, rel_tol=1e-9)
        assert [p.variables for p in plan] == [v for v in sets if v in {p.variables for p in plan}]  # order kept
        proto = planner.to_proto(plan, dictionary, "tester", "test")
        for p, q in zip(plan, proto.marginals):
            maps, shape = check_groups([dictionary[v].size for v in p.variables], [list(x.cell_group) for x in q.groups])
            assert math.prod(shape) == p.cells(dictionary)
            assert all(s > 1 for s in shape)  # a table with a one-group variable carries nothing: dropped
        plans[rho] = {p.variables: p.cells(dictionary) for p in plan}
    assert any(plans[0.01][v] < math.prod(dictionary[x].size for x in v) for v in plans[0.01])  # not vacuous
    for low, high in ((0.01, 0.1), (0.1, 1.0)):
        assert set(plans[low]) <= set(plans[high])
        assert all(plans[high][v] >= n for v, n in plans[low].items()), (low, high)
    assert sum(plans[1.0].values()) > sum(plans[0.01].values())


# ----------------------------------------------------------------------------- release
@pytest.fixture(scope="module")
def small_release(tmp_path_factory, demo, consortium_keys):
    """A release at epsilon 4 from two in-process guards (dictionary strategy, compression on)."""
    from conftest import release_from_guards

    return release_from_guards(tmp_path_factory.mktemp("compressed-release"), demo, consortium_keys, ("hungarian", "va"), 4.0, 5)


def test_release_measures_oneways_then_compressed_tables(small_release, dictionary):
    path, manifest, job = small_release
    assert verify_release(path)["release_id"] == manifest["release_id"]
    first, second, third = manifest["plans"]
    rho = accounting.rho_for_epsilon(4.0, job.delta)
    assert [m["variables"] for m in first["marginals"]] == [[n] for n in dictionary.names]
    assert not any("groups" in m for m in first["marginals"])
    assert first["rho_per_site"] == pytest.approx(rho * planner.ONEWAY_SHARE, rel=1e-9)
    assert second["rho_per_site"] == pytest.approx(rho * planner.CANDIDATE_SHARE, rel=1e-9)
    assert third["rho_per_site"] == pytest.approx(rho * (1 - planner.ONEWAY_SHARE - planner.CANDIDATE_SHARE), rel=1e-9)
    for rnd in (second, third):
        grouped = [m for m in rnd["marginals"] if "groups" in m]
        assert grouped, "at epsilon 4 candidate and selected pair tables should be compressed"
        signed = pb.QueryPlan.FromString(keys.unb64(rnd["signed_plan"]))
        for entry, q in zip(rnd["marginals"], signed.marginals):
            assert [list(g.cell_group) or None for g in q.groups] == entry.get("groups", [])  # the manifest says what was signed
    # candidates are coarser than the selected tables measured with more budget each
    cells = {tuple(m["variables"]): math.prod(max(g) + 1 if g else dictionary[v].size
                                              for v, g in zip(m["variables"], m.get("groups", [None] * 2)))
             for m in second["marginals"]}
    for m in third["marginals"]:
        if len(m["variables"]) == 2:
            assert math.prod(max(g) + 1 if g else dictionary[v].size
                             for v, g in zip(m["variables"], m.get("groups", [None] * 2))) >= cells[tuple(m["variables"])]


def test_aggregates_label_grouped_cells(small_release, dictionary):
    path, _, _ = small_release
    agg = json.loads((path / "aggregates.json").read_text())
    grouped = [m for m in agg["marginals"] if m.get("groups")]
    assert grouped
    joined = False
    for m in grouped:
        assert len(m["groups"]) == len(m["variables"]) == len(m["cells"])
        for v, g, labels in zip(m["variables"], m["groups"], m["cells"]):
            if g is None:
                assert v == "site" or labels == list(dictionary[v].cells)
                continue
            want = [" | ".join(c for c, x in zip(dictionary[v].cells, g) if x == j) for j in range(max(g) + 1)]
            assert labels == want
            joined |= any(" | " in label for label in labels)
        assert len(m["counts"]) == math.prod(len(c) for c in m["cells"])
    assert joined


def test_reports_and_prompts_read_coarse_tables_back(small_release, dictionary):
    from ppsehr.server.llm.prompts import DPAggregates
    from ppsehr.server.release.compare import _without_site, compare_variables, dp_marginal
    from ppsehr.server.release.report import release_inputs

    path, _, _ = small_release
    _, ms, samples, _ = release_inputs(path, dictionary)
    coarse = [m for m in ms if m.coarse]
    assert coarse and all(n == int(g.max()) + 1 for m in coarse for n, g in zip(m.values.shape, m.maps()) if g is not None)
    agg = json.loads((path / "aggregates.json").read_text())["marginals"]
    for m, a in zip(ms, agg):
        assert [None if g is None else g.tolist() for g in m.maps()] == a.get("groups", [None] * len(m.variables))
    pooled = [p for p in map(_without_site, ms) if p is not None]
    fine = [p for p in pooled if not p.coarse]
    for m in coarse:  # a variable's DP counts never come from a table that groups its cells
        v = next(v for v, g in zip(m.variables, m.maps()) if g is not None)
        ungrouped = [p for p in pooled if v not in p.variables or p.maps()[p.variables.index(v)] is None]
        got, want = dp_marginal(v, pooled), dp_marginal(v, ungrouped)
        assert len(ungrouped) < len(pooled)
        assert np.allclose(got[0], want[0]) and got[2] == want[2]
    assert len(compare_variables(dictionary, ms, samples)) == len(dictionary.names)
    prompt = DPAggregates.from_measurements(dictionary, pooled)
    assert {frozenset(m.variables) for m in prompt.marginals} == {frozenset(m.variables) for m in fine}


def _merge_first_two_groups(m):
    entry = next(x for x in m["plans"][1]["marginals"] if "groups" in x)
    k = next(i for i, g in enumerate(entry["groups"]) if g)
    entry["groups"][k] = [max(0, x - 1) for x in entry["groups"][k]]


def _drop_groups(m):
    del next(x for x in m["plans"][1]["marginals"] if "groups" in x)["groups"]


def _regroup_the_first_table(m):
    entry = m["plans"][1]["marginals"][0]
    entry["groups"] = [[0] * 100, None]


@pytest.mark.parametrize("change", [_merge_first_two_groups, _drop_groups, _regroup_the_first_table])
def test_release_verification_compares_groupings_with_the_signed_plan(small_release, tmp_path, consortium_keys, change):
    path, _, _ = small_release
    copy = tmp_path / "rel"
    shutil.copytree(path, copy)
    before = json.loads((copy / "manifest.json").read_text())["plans"][1]["marginals"]
    edit_manifest(copy, change)
    resign_manifest(copy, consortium_keys.coordinator_key)
    assert json.loads((copy / "manifest.json").read_text())["plans"][1]["marginals"] != before
    with pytest.raises(ReleaseError, match="lists other marginals"):
        verify_release(copy, coordinator_key=consortium_keys.coordinator_pub)


def test_compressed_plan_measures_oneway_sets_as_they_are(dictionary, demo_oneways):
    """Round 3 re-measures the 1-way tables next to the (compressed) selected pairs."""
    sets = [(n,) for n in dictionary.names] + [("age", "chol"), ("cp", "heart_disease")]
    plan = planner.compressed_plan(dictionary, sets, demo_oneways, 0.01, sites=4)
    assert [p.variables for p in plan] == sets
    assert all(p.groups is None for p in plan if len(p.variables) == 1)
    age_chol = plan[len(dictionary.names)]
    assert age_chol.groups is not None and age_chol.cells(dictionary) < dictionary["age"].size * dictionary["chol"].size
    assert math.isclose(sum(p.rho for p in plan), 0.01, rel_tol=1e-9)


@pytest.mark.parametrize("bad", [2**70, 1.5, "1"])
def test_release_inputs_refuse_tampered_groups(small_release, dictionary, tmp_path, bad):
    import json
    import shutil

    from ppsehr.common.errors import ReleaseError
    from ppsehr.server.release.report import release_inputs

    copy = tmp_path / "rel"
    shutil.copytree(small_release[0], copy)
    agg = json.loads((copy / "aggregates.json").read_text())
    m = next(m for m in agg["marginals"] if "groups" in m)
    k = next(k for k, g in enumerate(m["groups"]) if g)
    m["groups"][k][-1] = bad
    (copy / "aggregates.json").write_text(json.dumps(agg))
    with pytest.raises(ReleaseError, match=r"aggregates.json: marginals\[\d+\] is malformed"):
        release_inputs(copy, dictionary)


def test_llm_stage_sees_full_domain_tables(tmp_path, dictionary):
    """Compressed tables reach the LLM stage as the model's marginals over dictionary cells."""
    from ppsehr.deploy.bench.fidelity import Federation, demo_dataset
    from ppsehr.server.measure.rounds import round_measurements
    from ppsehr.server.model.synthesize import full_domain, synthesize
    from ppsehr.server.llm.prompts import DPAggregates

    ds = demo_dataset()
    rounds, structure = Federation(ds, tmp_path).collect(ds, 0.5)
    measurements, groups = round_measurements(ds.dictionary, rounds, structure, "model", {})
    syn = synthesize(ds.dictionary, measurements, groups, 200, np.random.default_rng(0))
    assert any(m.coarse for m in syn.pooled)
    full = full_domain(syn)
    assert [m.variables for m in full] == [m.variables for m in syn.pooled] and not any(m.coarse for m in full)
    for m in full:
        assert m.values.shape == tuple(dictionary[v].size for v in m.variables)
    agg = DPAggregates.from_measurements(ds.dictionary, full)
    pairs = {frozenset(m.variables) for m in full if len(m.variables) == 2}
    assert pairs and {frozenset(m.variables) for m in agg.marginals if len(m.variables) == 2} == pairs
