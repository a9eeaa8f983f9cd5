"""Dictionary and site mappings: the demo consortium, unit conversions, and bad input."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from ppsehr.common.dictionary import MISSING, load_dictionary, parse_dictionary
from ppsehr.common.errors import DictionaryError, MappingError
from ppsehr.common.mapping import load_mapping, load_site_table
from ppsehr.common.units import conversion

ROWS = {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}


def load(demo, dictionary, site):
    return load_site_table(load_mapping(demo / "sites" / f"{site}.toml", dictionary), dictionary)


@pytest.mark.parametrize("site", sorted(ROWS))
def test_demo_sites_load_into_the_dictionary_domains(demo, dictionary, site):
    table, report = load(demo, dictionary, site)
    assert table.n_rows == ROWS[site] == report.n_rows
    for name, var in dictionary.variables.items():
        col = table.columns[name]
        assert col.shape == (table.n_rows,)
        assert col.min() >= 0 and col.max() < var.size


def test_demo_harmonizes_outcome_and_missing_cholesterol(demo, dictionary):
    hd = dictionary["heart_disease"]
    chol_missing = dictionary["chol"].cell_index(MISSING)
    # Hungarian codes presence/absence only; the others grade 0-4: all land on absent/present.
    for site in ROWS:
        table, _ = load(demo, dictionary, site)
        assert set(np.unique(table.columns["heart_disease"])) <= {hd.cell_index("absent"), hd.cell_index("present")}
    raw = [line.split(",") for line in (demo / "data" / "processed.va.data").read_text().splitlines()]
    va, report = load(demo, dictionary, "va")
    zero_or_q = sum(r[4] in ("0", "?") for r in raw)
    assert report.variables["chol"].missing == zero_or_q == int((va.columns["chol"] == chol_missing).sum())
    cle, _ = load(demo, dictionary, "cleveland")
    present = sum(r.split(",")[13].strip() != "0" for r in (demo / "data" / "processed.cleveland.data").read_text().splitlines())
    assert int((cle.columns["heart_disease"] == hd.cell_index("present")).sum()) == present


def test_dictionary_hash_ignores_layout_but_not_content(tmp_path, demo):
    text = (demo / "dictionary.toml").read_text()
    a = tmp_path / "a.toml"
    a.write_text("# a comment\n\n" + text)
    assert load_dictionary(a).hash == load_dictionary(demo / "dictionary.toml").hash
    a.write_text(text.replace("bins = [25, 35,", "bins = [20, 35,"))
    assert load_dictionary(a).hash != load_dictionary(demo / "dictionary.toml").hash


@pytest.mark.parametrize("spec, message", [
    ({"type": "numeric", "bins": [3, 2]}, "strictly increasing"),
    ({"type": "categorical", "categories": []}, "non-empty list"),
    ({"type": "categorical", "categories": ["a", "missing"]}, "reserved"),
    ({"type": "ordinal"}, "must be 'categorical' or 'numeric'"),
    ({"type": "numeric", "bins": [0, 1], "tier": 7}, "tier"),
])
def test_bad_dictionary_is_named(spec, message):
    with pytest.raises(DictionaryError, match=message) as e:
        parse_dictionary({"dictionary": {"name": "d", "version": "1"}, "variables": {"x": spec}}, source="dict.toml")
    assert "dict.toml: variables.x" in str(e.value)


CONV_DICT = """
[dictionary]
name = "conv"
version = "1"
[variables.temp]
type = "numeric"
unit = "Cel"
bins = [35, 36, 37, 38, 39, 40, 42]
precision = 1
[variables.weight]
type = "numeric"
unit = "kg"
bins = [0, 50, 70, 90, 200]
out_of_range = "cell"
[variables.glucose]
type = "numeric"
unit = "mg/dL"
molar_mass = 180.16
bins = [0, 100, 126, 200, 600]
[variables.smoker]
type = "categorical"
categories = ["no", "yes"]
"""


@pytest.fixture
def conv(tmp_path):
    (tmp_path / "dict.toml").write_text(CONV_DICT)
    d = load_dictionary(tmp_path / "dict.toml")

    def make(rows: str, mapping_extra: str = "", smoker_values='{ N = "no", Y = "yes" }', name="site.tsv"):
        (tmp_path / name).write_text(rows)
        (tmp_path / "map.toml").write_text(textwrap.dedent(f"""
            [site]
            id = "s1"
            [source]
            path = "{name}"
            patient_key = "row"
            missing_values = ["NA", "-1"]
            [variables.temp]
            column = "temp_f"
            unit = "degF"
            [variables.weight]
            column = "weight_lb"
            unit = "lb"
            [variables.glucose]
            column = "glu"
            unit = "mmol/L"
            [variables.smoker]
            column = "smk"
            values = {smoker_values}
            """) + mapping_extra)
        return d, load_mapping(tmp_path / "map.toml", d)

    return make


def test_unit_conversions_and_missing_codes(conv):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\n98.6\t154\t5.5\tN\n102.2\t500\t7.0\tY\nNA\t-1\t11.2\tY\n")
    table, report = load_site_table(m, d)
    t, w = d["temp"], d["weight"]
    # 98.6 F = 37.0 C -> [37,38); 102.2 F = 39.0 C -> [39,40)
    assert list(table.columns["temp"]) == [2, 4, t.cell_index(MISSING)]
    # 154 lb = 69.85 kg, 70 at the dictionary's precision (0) -> [70,90); 500 lb = 226.8 kg -> out_of_range
    # cell; -1 -> missing
    assert list(table.columns["weight"]) == [2, w.cell_index("out_of_range"), w.cell_index(MISSING)]
    # 5.5 mmol/L = 99.1 mg/dL -> 99; 7.0 -> 126.1 -> 126; 11.2 -> 201.8 -> 202
    assert list(table.columns["glucose"]) == [0, 2, 3]
    assert report.variables["weight"].out_of_range == 1 and report.variables["temp"].missing == 1
    assert conversion("mg/dL", "mmol/L", 180.16)[0] == pytest.approx(1 / 18.016)


def test_parquet_source(conv, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"temp_f": [98.6, None], "weight_lb": [154.0, 120.0], "glu": [5.5, 5.0], "smk": ["N", "Y"]}),
                   tmp_path / "site.parquet")
    d, m = conv("", name="unused.tsv")
    m = load_mapping(tmp_path / "map.toml", d)
    text = (tmp_path / "map.toml").read_text().replace('path = "unused.tsv"', 'path = "site.parquet"')
    (tmp_path / "map.toml").write_text(text)
    m = load_mapping(tmp_path / "map.toml", d)
    table, _ = load_site_table(m, d)
    assert table.n_rows == 2 and table.columns["temp"][1] == d["temp"].cell_index(MISSING)


def test_malformed_row_names_file_and_line(conv):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\n98.6\t154\t5.5\tN\n98.6\t154\tN\n")
    with pytest.raises(MappingError, match=r"site\.tsv, line 3: expected 4 fields, found 3"):
        load_site_table(m, d)


def test_unmapped_category_names_row_column_and_code(conv):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\n98.6\t154\t5.5\tN\n98.6\t154\t5.5\tmaybe\n")
    with pytest.raises(MappingError, match=r"site\.tsv, data row 2 \(line 3\), column 'smk' \(variables\.smoker\): code 'maybe' is not mapped"):
        load_site_table(m, d)


def test_unmapped_codes_can_be_declared_missing_and_are_counted(conv):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\n98.6\t154\t5.5\tmaybe\n", mapping_extra='unmapped = "missing"\n')
    table, report = load_site_table(m, d)
    assert report.variables["smoker"].unmapped == 1 and report.variables["smoker"].unmapped_codes == {"maybe": 1}
    assert table.columns["smoker"][0] == d["smoker"].cell_index(MISSING)


def test_non_numeric_value_is_named(conv):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\nhot\t154\t5.5\tN\n")
    with pytest.raises(MappingError, match=r"site\.tsv, data row 1 \(line 2\), column 'temp_f' \(variables\.temp\): 'hot' is not a number"):
        load_site_table(m, d)


def test_missing_data_file_and_unmapped_variable(conv, tmp_path):
    d, m = conv("temp_f\tweight_lb\tglu\tsmk\n98.6\t154\t5.5\tN\n")
    (tmp_path / "site.tsv").unlink()
    with pytest.raises(MappingError, match=r"data file .*site\.tsv not found"):
        load_site_table(m, d)
    text = (tmp_path / "map.toml").read_text().replace("[variables.smoker]", "[variables.smokr]")
    (tmp_path / "map.toml").write_text(text)
    with pytest.raises(MappingError, match="variables.smokr is not in dictionary"):
        load_mapping(tmp_path / "map.toml", d)


def test_value_map_to_unknown_category_is_refused(conv):
    with pytest.raises(MappingError, match=r"variables\.smoker\.values: code 'S' maps to 'sometimes', which is not a category of 'smoker'"):
        conv("x\n", smoker_values='{ N = "no", S = "sometimes" }')
