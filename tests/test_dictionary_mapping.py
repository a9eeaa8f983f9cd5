"""Dictionary and site mappings: the demo consortium, unit conversions, and bad input."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from ppsehr.common.dictionary import MISSING, load_dictionary, parse_dictionary
from ppsehr.common.errors import DictionaryError, MappingError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
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


# --------------------------------------------------------------------------------------- strict mappings (issue #13)
STRICT_DICT = """
[dictionary]
name = "strict"
version = "1"
[variables.weight]
type = "numeric"
unit = "kg"
bins = [0, 50, 70, 90, 200]
[variables.glucose]
type = "numeric"
unit = "mg/dL"
molar_mass = 180.16
bins = [0, 100, 126, 200, 600]
[variables.creatinine]
type = "numeric"
unit = "mg/dL"
molar_mass = 113.12
bins = [0, 0.5, 1.0, 1.5, 10]
precision = 2
[variables.smoker]
type = "categorical"
categories = ["no", "yes", "former"]
"""

STRICT_MAP = """
[site]
id = "s1"
[source]
path = "site.csv"
patient_key = "row"
[variables.weight]
column = "weight_lb"
unit = "[lb_av]"
[variables.glucose]
column = "glu"
unit = "mmol/L"
[variables.creatinine]
column = "crea"
unit = "umol/L"
[variables.smoker]
column = "smk"
values = { N = "no", Y = "yes", Unknown = "missing" }
"""


@pytest.fixture
def strict(tmp_path):
    (tmp_path / "dict.toml").write_text(STRICT_DICT)
    d = load_dictionary(tmp_path / "dict.toml")
    (tmp_path / "site.csv").write_text("weight_lb,glu,crea,smk\n154,5.55,88.4,N\n200,5.5,132.6,former\n"
                                       "100,7.0,44.2,Unknown\n")

    def make(change=lambda t: t, data=None):
        if data is not None:
            (tmp_path / "site.csv").write_bytes(data)
        (tmp_path / "map.toml").write_text(change(STRICT_MAP))
        return d, tmp_path / "map.toml"

    return make


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('unit = "[lb_av]"', 'units = "lb"'),
     r"map\.toml: variables\.weight: unknown key 'units'; did you mean 'unit'\?"),
    (lambda t: t.replace('column = "glu"', 'column = "glu"\nmissing_value = ["0"]'),
     r"map\.toml: variables\.glucose: unknown key 'missing_value'; did you mean 'missing_values'\?"),
    (lambda t: t.replace('patient_key = "row"', 'patient_key = "row"\ndelimeter = ";"'),
     r"map\.toml: \[source\]: unknown key 'delimeter'; did you mean 'delimiter'\?"),
    (lambda t: t.replace("[variables.smoker]", "[variable.smoker]"),
     r"map\.toml: unknown table 'variable'; did you mean 'variables'\?"),
    (lambda t: t.replace("[variables.smoker]", "[variables.smokers]"),
     r"map\.toml: variables\.smokers is not in dictionary strict 1; did you mean 'smoker'\?"),
    (lambda t: t.replace('unit = "mmol/L"', 'unit = "mmol/l/x"'),
     r"map\.toml: variables\.glucose\.unit: unknown unit 'mmol/l/x'"),
    (lambda t: t.replace('unit = "[lb_av]"', 'unit = "Cel"'),
     r"map\.toml: variables\.weight\.unit: cannot convert 'Cel' \(\[temperature\]\) to 'kg' \(\[mass\]\)"),
    (lambda t: t.replace('unit = "[lb_av]"', 'unit = "mmol/L"'),
     r"map\.toml: variables\.weight\.unit: cannot convert 'mmol/L'"),
    (lambda t: t.replace('Unknown = "missing"', 'Unknown = "unknwn"'),
     r"map\.toml: variables\.smoker\.values: code 'Unknown' maps to 'unknwn', which is not a category of 'smoker'"),
    (lambda t: t.replace('Unknown = "missing"', 'Unknown = "other"'),
     r"variables\.smoker\.values: code 'Unknown' maps to \"other\", but the dictionary declares no other cell"),
    (lambda t: t.replace('Y = "yes"', 'Y = "yess"'), r"maps to 'yess', which is not a category of 'smoker'; did you "
                                                     r"mean 'yes'\?"),
    (lambda t: t.replace('unit = "[lb_av]"', 'unit = "[lb_av]"\nscale = 0.45'), r"variables\.weight: give unit, or "
                                                                                 r"scale/offset, not both"),
    (lambda t: t.replace('column = "smk"', 'column = "smk"\nunit = "kg"'),
     r"variables\.smoker: unit/scale/offset apply to numeric values only"),
    (lambda t: t.replace('patient_key = "row"', 'patient_key = "row"\ndecimal = ","'),
     r"\[source\]: decimal = \",\" needs another delimiter"),
    (lambda t: t.replace('patient_key = "row"', 'patient_key = "row"\nencoding = "klingon"'),
     r"\[source\]: encoding 'klingon' is not a known text encoding"),
])
def test_mapping_mistakes_are_named_at_load(strict, change, message):
    d, path = strict(change)
    with pytest.raises(MappingError, match=message):
        load_mapping(path, d)


def test_molar_conversion_rounding_missing_target_and_pass_through(strict):
    d, path = strict()
    table, report = load_site_table(load_mapping(path, d), d)
    cells = {n: [d[n].cells[c] for c in table.columns[n]] for n in d.names}
    # 154 lb = 69.85 kg -> 70 (precision 0); 200 lb = 90.7 -> 91; 100 lb = 45.4 -> 45
    assert cells["weight"] == ["[70,90)", "[90,200]", "[0,50)"]
    # 5.55 mmol/L = 99.99 mg/dL -> 100 at precision 0: the upper bin, not [0,100)
    assert cells["glucose"] == ["[100,126)", "[0,100)", "[126,200)"]
    # creatinine umol/L -> mg/dL with molar mass 113.12: 88.4 -> 1.00, 132.6 -> 1.50, 44.2 -> 0.50
    assert cells["creatinine"] == ["[1,1.5)", "[1.5,10]", "[0.5,1)"]
    # "former" equals a category: it passes through the partial map; "Unknown" maps to the missing cell
    assert cells["smoker"] == ["no", "former", MISSING] and report.variables["smoker"].missing == 1


def test_a_misspelled_column_names_the_variable_that_asked(strict):
    d, path = strict(lambda t: t.replace('column = "crea"', 'column = "creat"'))
    with pytest.raises(MappingError, match=r"site\.csv: column 'creat' not found \(needed by variables\.creatinine\); "
                                           r"did you mean 'crea'\?"):
        load_site_table(load_mapping(path, d), d)


def test_delimiter_encoding_and_decimal_comma(strict):
    text = "weight_lb;glu;crea;smk\n154;5,55;88,4;Nö\n200;5,5;132,6;former\n"
    d, path = strict(lambda t: t.replace('patient_key = "row"', 'patient_key = "row"\ndelimiter = ";"\ndecimal = ","\n'
                                                                'encoding = "cp1252"').replace('N = "no"', '"Nö" = "no"'),
                     data=text.encode("cp1252"))
    table, _ = load_site_table(load_mapping(path, d), d)
    assert [d["glucose"].cells[c] for c in table.columns["glucose"]] == ["[100,126)", "[0,100)"]
    assert [d["smoker"].cells[c] for c in table.columns["smoker"]] == ["no", "former"]


def test_a_mapping_mistake_stops_check_and_guard_before_any_debit(strict, tmp_path, consortium_keys, capsys):
    from ppsehr.client.config import load_site_config
    from ppsehr.client.guard import SiteGuard
    from ppsehr.deploy.cli import main
    from ppsehr.deploy.local import write_site_config

    d, path = strict(lambda t: t.replace('unit = "[lb_av]"', 'units = "lb"'))
    assert main(["site", "check", "--dictionary", str(tmp_path / "dict.toml"), "--mapping", str(path)]) == 2
    assert "unknown key 'units'; did you mean 'unit'?" in capsys.readouterr().err
    cfg = write_site_config(tmp_path / "site.toml", "s1", tmp_path / "dict.toml", path, tmp_path / "state",
                            "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["va"][0], [consortium_keys.coordinator_pub])
    assert main(["site", "check", "--config", str(cfg)]) == 2
    with pytest.raises(MappingError, match="unknown key 'units'"):
        SiteGuard(load_site_config(cfg))
    assert not (tmp_path / "state" / "ledger.sqlite").exists()  # the guard never opened its ledger: nothing debited
