"""The guard's fast path: one pass counting a whole plan, and noise through OpenDP on the count vector.

Correctness only (timings live in `ppsehr bench speed`): the counts equal the per-marginal
bincount of the grouped cell index, and the privacy map of the new measurement equals the old
`count_by_categories >> gaussian` chain's for every shape and scale.
"""

from __future__ import annotations

import math

import numpy as np
import opendp.prelude as dp
import pytest

from ppsehr.client.guard import SiteGuard, compile_plan, count_sensitivity, noisy_counts
from ppsehr.common import accounting, cells
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure import planner

dp.enable_features("contrib")


def reference(columns, tables):
    return [np.bincount(cells.grouped_index([columns[n] for n in names], maps, shape), minlength=math.prod(shape))
            if len(columns[names[0]]) else np.zeros(math.prod(shape), np.int64)
            for names, shape, maps in tables]


def random_tables(rng, sizes, count):
    names = list(sizes)
    tables = []
    for _ in range(count):
        width = int(rng.integers(1, 4))
        chosen = [names[i] for i in rng.choice(len(names), size=width, replace=False)]
        groups = []
        for n in chosen:
            if rng.random() < 0.3 and sizes[n] > 2:  # a coarsening: consecutive cells merged, every group used
                k = int(rng.integers(2, sizes[n]))
                cuts = np.sort(rng.choice(np.arange(1, sizes[n]), size=k - 1, replace=False))
                groups.append(list(np.searchsorted(cuts, np.arange(sizes[n]), side="right")))
            else:
                groups.append([])
        maps, shape = cells.check_groups([sizes[n] for n in chosen], groups)
        tables.append((tuple(chosen), shape, maps))
    return tables


@pytest.mark.parametrize("n_rows", [0, 1, 777, 20_000])
@pytest.mark.parametrize("joint_cells,block_rows", [(1, 1 << 16), (1 << 13, 1 << 16), (1 << 20, 1000), (64, 97)])
def test_one_pass_counts_equal_per_marginal_bincounts(n_rows, joint_cells, block_rows):
    rng = np.random.default_rng(n_rows + joint_cells + block_rows)
    sizes = {f"v{i}": int(rng.integers(2, 12)) for i in range(9)} | {"wide": 300}
    columns = {n: rng.integers(0, k, n_rows).astype(np.int32) for n, k in sizes.items()}
    tables = random_tables(rng, sizes, 40)
    tables += [(("wide", "v1"), (300, sizes["v1"]), (None, None)), (("v2",), (sizes["v2"],), (None,))]
    tables += [tables[0]]  # the same table twice
    got = cells.count_tables(columns, n_rows, tables, block_rows=block_rows, joint_cells=joint_cells)
    want = reference(columns, tables)
    assert len(got) == len(want)
    for g, w, (_, shape, _) in zip(got, want, tables):
        assert g.dtype == np.int64 and g.shape == (math.prod(shape),)
        np.testing.assert_array_equal(g, w)
        assert g.sum() == n_rows


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_row_ranges_counted_on_threads_add_up(monkeypatch, dtype):
    """Large tables are split into row ranges counted on threads; any column dtype gives the same counts."""
    monkeypatch.setattr(cells, "PARALLEL_COUNT_ROWS", 500)
    monkeypatch.setattr(cells, "_count_workers", lambda: 3)
    rng = np.random.default_rng(7)
    sizes = {f"v{i}": int(rng.integers(2, 12)) for i in range(6)}
    n_rows = 5_003
    columns = {n: rng.integers(0, k, n_rows).astype(dtype) for n, k in sizes.items()}
    tables = random_tables(rng, sizes, 20)
    assert len(cells._spans(n_rows, 1000)) == 3
    got = cells.count_tables(columns, n_rows, tables, block_rows=1000)
    for g, w in zip(got, reference(columns, tables)):
        np.testing.assert_array_equal(g, w)


def test_a_variable_under_two_groupings_in_one_joint_table():
    rng = np.random.default_rng(5)
    columns = {"a": rng.integers(0, 6, 5000).astype(np.int32), "b": rng.integers(0, 3, 5000).astype(np.int32)}
    coarse, _ = cells.check_groups([6], [[0, 0, 1, 1, 2, 2]])
    tables = [(("a", "b"), (6, 3), (None, None)), (("a", "b"), (3, 3), (coarse[0], None)), (("b", "a"), (3, 3), (None, coarse[0]))]
    for got, want in zip(cells.count_tables(columns, 5000, tables), reference(columns, tables)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [-1, 4])
def test_codes_outside_the_domain_are_refused(bad):
    columns = {"a": np.array([0, 1, 2, bad], np.int32), "b": np.array([0, 1, 0, 1], np.int32)}
    with pytest.raises(ValueError, match="outside"):
        cells.count_tables(columns, 4, [(("b", "a"), (2, 4), (None, None))])


@pytest.mark.parametrize("n_cells", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("rho", [1e-6, 0.003, 0.25, 2.0])
def test_privacy_map_equals_the_count_by_categories_chain(n_cells, rho):
    """rho of noise on the exact count vector (new) == rho of count_by_categories >> gaussian on rows (old)."""
    scale = accounting.scale_for_rho(rho)
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
    old = space >> dp.t.then_count_by_categories(categories=list(range(n_cells)), null_category=False,
                                                  MO=dp.L2Distance[int]) >> dp.m.then_gaussian(scale=scale)
    new = noisy_counts(n_cells, scale)
    assert count_sensitivity() == 1
    for records in (1, 2, 5):  # one patient with up to k records (group privacy): d_in = k
        assert count_sensitivity(records) == records
        assert new.map(count_sensitivity(records)) == old.map(records)
    assert new.output_measure == old.output_measure


@pytest.mark.parametrize("secure_parties", [None, 4])
def test_compiled_plan_costs_what_the_old_construction_cost(site_config, dictionary, secure_parties):
    """Every marginal of a real plan (groupings included) has the rho and scale the old chain gave."""
    cfg = site_config("cleveland", secure=secure_parties is not None)
    plan = planner.to_proto(planner.one_round_plan(dictionary, 0.7), dictionary, "tester", "cost test")
    compiled = compile_plan(plan, dictionary, cfg, secure_parties)
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
    for c, m in zip(compiled, plan.marginals):
        n = math.prod(c.shape)
        scale = (accounting.share_scale_for_rho(m.rho, secure_parties, n) if secure_parties
                 else accounting.scale_for_rho(m.rho))
        old = space >> dp.t.then_count_by_categories(categories=list(range(n)), null_category=False,
                                                      MO=dp.L2Distance[int]) >> dp.m.then_gaussian(scale=scale)
        assert c.scale == scale and c.rho_alone == float(old.map(1))
        want = (accounting.secure_table_rho(scale, secure_parties, n, float(old.map(1)))[0] if secure_parties
                else float(old.map(1)))
        assert c.rho == want and c.rho <= m.rho * (1 + 1e-9)


def test_guard_answers_near_the_exact_counts(site_config, dictionary, sign):
    """A plan with grouped marginals, answered at tiny noise, lands within a few counts of the exact tables."""
    guard = SiteGuard(site_config("hungarian", epsilon=1e4,
                                  policy={"max_rho_per_plan": 1e5}))
    names = dictionary.names[:4]
    sizes = [dictionary[n].size for n in names]
    groups = [pb.CellGroups(cell_group=[min(i, 1) for i in range(sizes[0])]), pb.CellGroups()]
    plan = pb.QueryPlan(plan_id="exact-1", coordinator="tester", purpose="t", dictionary_hash=dictionary.hash,
                        marginals=[pb.MarginalQuery(variables=[names[0], names[1]], rho=500.0, groups=groups),
                                   pb.MarginalQuery(variables=[names[2]], rho=500.0),
                                   pb.MarginalQuery(variables=[names[3], names[1], names[2]], rho=500.0)])
    summary = pb.Summary.FromString(guard.answer(sign(plan)).summary)
    table = guard._table
    for got, m in zip(summary.marginals, compile_plan(plan, dictionary, guard.config)):
        exact = np.bincount(table.cell_index(m.variables, m.shape, m.groups), minlength=math.prod(m.shape))
        assert tuple(got.shape) == m.shape
        assert np.abs(np.asarray(got.counts) - exact).max() <= 3  # sigma ~0.03
