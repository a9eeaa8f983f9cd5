"""Benchmark consortia built from real clinical studies shipped by installable Python packages.

Each consortium is a directory `<name>/` beside this file with the public `dictionary.toml`, one
site mapping per site in `sites/<site>.toml` and `PROVENANCE.md` (source, licence, partition
rule, changes). No patient data is stored in ppsehr: `materialize(name, out_dir)` reads the
study from the installed package (scikit-survival or lifelines), splits it into sites by the
documented rule and writes every site's table in that site's own local flavour (column names,
codes, units, missing-value codes, delimiter, with a patient id column) next to copies of the
dictionary and mappings. The result is a consortium directory for
`ppsehr bench fidelity --consortium DIR` (or use `--dataset <name>`, which does this in a
temporary directory).

| name | package | patients | variables | sites (partition) |
|---|---|---|---|---|
| flchain | scikit-survival | 7874 | 7 | 4 serum collection waves (1995, 1996, 1997, 1998-2003) |
| gbsg2 | lifelines | 686 | 9 | 4 diagnosis periods (1984-85, 1986, 1987, 1988-89) |
| actg175 | lifelines | 2139 | 19 | 4 randomised arms (ZDV, ZDV+ddI, ZDV+ddC, ddI) |
| ncctg-lung | lifelines | 227 | 8 | 4 groups of institutions (1, 2-7, 10-13, 15-33) |

Outcomes are binary status at a fixed horizon from right-censored follow-up: an event on or
before the horizon, event-free when followed beyond it, missing (the site's local "unknown"
code) when censored before it.
"""

from __future__ import annotations

import csv
import importlib
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...common.errors import PpsehrError

NAMES = ("flchain", "gbsg2", "actg175", "ncctg-lung")
PIP_PACKAGE = {"flchain": "scikit-survival", "gbsg2": "lifelines", "actg175": "lifelines", "ncctg-lung": "lifelines"}


def packaged_dir(name: str) -> Path:
    """The shipped dictionary, mappings and provenance of consortium `name`."""
    _check_name(name)
    return Path(str(resources.files(__name__) / name))


def materialize(name: str, out_dir: str | Path) -> Path:
    """Write consortium `name` into `out_dir` (created if needed) and return that directory.

    out_dir/dictionary.toml, out_dir/PROVENANCE.md, out_dir/sites/<site>.toml (copies of the
    shipped files) and out_dir/data/<site>.<csv|tsv> (each site's table, in its local flavour).
    """
    _check_name(name)
    src = packaged_dir(name)
    tables = _BUILDERS[name]()
    out = Path(out_dir)
    (out / "sites").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "dictionary.toml", out / "dictionary.toml")
    shutil.copyfile(src / "PROVENANCE.md", out / "PROVENANCE.md")
    shipped = sorted(p.stem for p in (src / "sites").glob("*.toml"))
    if shipped != sorted(tables):
        raise PpsehrError(f"{src / 'sites'}: site mappings {shipped} do not match the sites built for {name!r}: {sorted(tables)}")
    for site, table in tables.items():
        shutil.copyfile(src / "sites" / f"{site}.toml", out / "sites" / f"{site}.toml")
        table.write(out / "data")
    return out


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise PpsehrError(f"unknown consortium {name!r}; choose from {', '.join(NAMES)}")


# ----------------------------------------------------------------------------- site tables
class SiteTable:
    """One site's local table: ordered columns of strings (missing already written as the local code)."""

    def __init__(self, filename: str, delimiter: str = ","):
        self.filename, self.delimiter = filename, delimiter
        self.columns: dict[str, list[str]] = {}

    def add(self, column: str, values: list[str]) -> "SiteTable":
        self.columns[column] = values
        return self

    def write(self, directory: Path) -> Path:
        path = directory / self.filename
        n = {len(v) for v in self.columns.values()}
        assert len(n) == 1, f"{self.filename}: columns of unequal length"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=self.delimiter, lineterminator="\n")
            w.writerow(list(self.columns))
            w.writerows(zip(*self.columns.values()))
        return path


def _num(values: Any, decimals: int, missing: str = "", scale: float = 1.0) -> list[str]:
    """Numbers as text with up to `decimals` places (after multiplying by `scale`); NaN as `missing`."""
    out = []
    for x in np.asarray(values, dtype=float):
        if np.isnan(x):
            out.append(missing)
        else:
            v = round(float(x) * scale, decimals)
            out.append(f"{v:.{decimals}f}".rstrip("0").rstrip(".") if decimals else str(int(round(v))))
    return out


def _code(values: Any, codes: dict[Any, str], missing: str = "") -> list[str]:
    """Canonical values -> local codes; NaN/None as `missing`. Unknown values are a bug here."""
    out = []
    for x in values:
        if x is None or (isinstance(x, float) and np.isnan(x)):
            out.append(missing)
        else:
            key = int(x) if isinstance(x, (float, np.floating)) and float(x).is_integer() else x
            out.append(codes[key if key in codes else str(key)])
    return out


def _horizon(time: Any, event: Any, days: float) -> np.ndarray:
    """'event' (event on or before `days`), 'free' (followed beyond it) or 'unknown' (censored before)."""
    t, e = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
    return np.where(e & (t <= days), "event", np.where(t > days, "free", "unknown"))


def _ids(index: Any, fmt: str) -> list[str]:
    return [fmt.format(int(i)) for i in index]


def _require(module: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        pip = PIP_PACKAGE[name]
        raise PpsehrError(f"consortium {name!r} reads its data from the {pip!r} package, which is not installed: "
                          f"pip install {pip}  (or pip install 'ppsehr[bench]')") from None


def _pandas(name: str) -> Any:
    return _require("pandas", name)


# ----------------------------------------------------------------------------- flchain
def _flchain() -> dict[str, SiteTable]:
    """scikit-survival's load_flchain: 7874 Olmsted County residents aged 50+, by serum sample year."""
    ds = _require("sksurv.datasets", "flchain")
    X, y = ds.load_flchain()
    X = X.reset_index(drop=True)
    year = X["sample.yr"].astype(str).astype(int).to_numpy()
    status = _horizon(y["futime"], y["death"], 1826)  # 5 years
    sex = X["sex"].astype(str).to_numpy()
    mgus = X["mgus"].astype(str).to_numpy()
    age, kappa, lam, crea = (X[c].to_numpy(dtype=float) for c in ("age", "kappa", "lambda", "creatinine"))
    fut, died = np.asarray(y["futime"], dtype=float), np.asarray(y["death"]).astype(int)
    rownum = np.arange(1, len(X) + 1)
    groups = {"wave1995": year == 1995, "wave1996": year == 1996, "wave1997": year == 1997, "wave1998_2003": year >= 1998}
    out = {}
    m = groups["wave1995"]
    out["wave1995"] = (SiteTable("wave1995.csv")
                       .add("patient_id", _ids(rownum[m], "OC95-{:05d}"))
                       .add("sample_year", _num(year[m], 0))
                       .add("age_years", _num(age[m], 0))
                       .add("sex", list(sex[m]))
                       .add("kappa_mg_dl", _num(kappa[m], 3))
                       .add("lambda_mg_dl", _num(lam[m], 3))
                       .add("creatinine_mg_dl", _num(crea[m], 1, missing=""))
                       .add("mgus", list(mgus[m]))
                       .add("followup_days", _num(fut[m], 0))
                       .add("died", _num(died[m], 0))
                       .add("vital_5y", _code(status[m], {"event": "dead", "free": "alive", "unknown": "unknown"})))
    m = groups["wave1996"]
    out["wave1996"] = (SiteTable("wave1996.csv", ";")
                       .add("subject", _ids(rownum[m], "{:07d}"))
                       .add("age", _num(age[m], 0))
                       .add("gender", _code(sex[m], {"M": "1", "F": "2"}))
                       .add("flc_kappa_mg_l", _num(kappa[m], 2, scale=10))
                       .add("flc_lambda_mg_l", _num(lam[m], 2, scale=10))
                       .add("crea_mg_dl", _num(crea[m], 1, missing="-9"))
                       .add("mgus_dx", _code(mgus[m], {"no": "N", "yes": "Y"}))
                       .add("fu_d", _num(fut[m], 0))
                       .add("status_5y", _code(status[m], {"event": "D", "free": "A", "unknown": "U"})))
    m = groups["wave1997"]
    out["wave1997"] = (SiteTable("wave1997.tsv", "\t")
                       .add("MRN", _ids(rownum[m], "97{:06d}"))
                       .add("AGE", _num(age[m], 0))
                       .add("GENDER", _code(sex[m], {"M": "male", "F": "female"}))
                       .add("KAPPA", _num(kappa[m], 3))
                       .add("LAMBDA", _num(lam[m], 3))
                       .add("CREAT", _num(crea[m], 1, missing="NA"))
                       .add("MGUS", _code(mgus[m], {"no": "0", "yes": "1"}))
                       .add("FUTIME", _num(fut[m], 0))
                       .add("DEATH", _num(died[m], 0))
                       .add("DEATH5Y", _code(status[m], {"event": "1", "free": "0", "unknown": "9"})))
    m = groups["wave1998_2003"]
    out["wave1998_2003"] = (SiteTable("wave1998_2003.csv")
                            .add("id", _ids(rownum[m], "L{:05d}"))
                            .add("sample_yr", _num(year[m], 0))
                            .add("age", _num(age[m], 0))
                            .add("sex", list(sex[m]))
                            .add("kappa_mgL", _num(kappa[m], 2, scale=10))
                            .add("lambda_mgL", _num(lam[m], 2, scale=10))
                            .add("creatinine", _num(crea[m], 1, missing="."))
                            .add("mgus", _code(mgus[m], {"no": "No", "yes": "Yes"}))
                            .add("futime", _num(fut[m], 0))
                            .add("death", _num(died[m], 0))
                            .add("dead_5y", _code(status[m], {"event": "yes", "free": "no", "unknown": "."})))
    return out


# ----------------------------------------------------------------------------- gbsg2
def _gbsg2() -> dict[str, SiteTable]:
    """lifelines' load_lymph_node (GBSG-2 with dates): 686 women, by year of diagnosis."""
    _pandas("gbsg2")
    ld = _require("lifelines.datasets", "gbsg2")
    df = ld.load_lymph_node()
    import pandas as pd

    year = pd.to_datetime(df["diagdateb"], format="%d-%m-%Y").dt.year.to_numpy()
    status = _horizon(df["rectime"], df["censrec"], 730)  # 2 years
    pid = df.index.to_numpy()
    col = {c: df[c].to_numpy() for c in df.columns}
    meno = np.where(col["menopause"] == 1, "pre", "post")      # 1 = premenopausal, 2 = postmenopausal
    horm = np.where(col["hormone"] == 2, "yes", "no")          # 1 = no, 2 = yes
    grade = col["grade"].astype(int)
    groups = {"dx1984_85": year <= 1985, "dx1986": year == 1986, "dx1987": year == 1987, "dx1988_89": year >= 1988}
    out = {}
    m = groups["dx1984_85"]
    out["dx1984_85"] = (SiteTable("dx1984_85.csv")
                        .add("pat_nr", _ids(pid[m], "G2-{:04d}"))
                        .add("diagnosedatum", list(df["diagdateb"].to_numpy()[m]))
                        .add("alter", _num(col["age"][m], 0))
                        .add("menostatus", _code(meno[m], {"pre": "1", "post": "2"}))
                        .add("hormontherapie", _code(horm[m], {"no": "1", "yes": "2"}))
                        .add("tumorgroesse_mm", _num(col["size"][m], 0))
                        .add("grading", _num(grade[m], 0))
                        .add("lk_pos", _num(col["nodes"][m], 0))
                        .add("pgr_fmol", _num(col["prog_recp"][m], 0))
                        .add("er_fmol", _num(col["estrg_recp"][m], 0))
                        .add("ereignis_2j", _code(status[m], {"event": "1", "free": "0", "unknown": "9"})))
    m = groups["dx1986"]
    out["dx1986"] = (SiteTable("dx1986.csv")
                     .add("patient", _ids(pid[m], "{:d}"))
                     .add("age", _num(col["age"][m], 0))
                     .add("menostat", _code(meno[m], {"pre": "Pre", "post": "Post"}))
                     .add("tamoxifen", list(horm[m]))
                     .add("tumour_cm", _num(col["size"][m], 1, scale=0.1))
                     .add("grade", _code(grade[m], {1: "I", 2: "II", 3: "III"}))
                     .add("nodes_positive", _num(col["nodes"][m], 0))
                     .add("pgr", _num(col["prog_recp"][m], 0))
                     .add("er", _num(col["estrg_recp"][m], 0))
                     .add("rfs_2y", _code(status[m], {"event": "event", "free": "no event", "unknown": "censored"})))
    m = groups["dx1987"]
    out["dx1987"] = (SiteTable("dx1987.tsv", "\t")
                     .add("id", _ids(pid[m], "{:d}"))
                     .add("horTh", list(horm[m]))
                     .add("age", _num(col["age"][m], 0))
                     .add("menostat", _code(meno[m], {"pre": "Pre", "post": "Post"}))
                     .add("tsize", _num(col["size"][m], 0))
                     .add("tgrade", _code(grade[m], {1: "I", 2: "II", 3: "III"}))
                     .add("pnodes", _num(col["nodes"][m], 0))
                     .add("progrec", _num(col["prog_recp"][m], 0))
                     .add("estrec", _num(col["estrg_recp"][m], 0))
                     .add("cens_2y", _code(status[m], {"event": "1", "free": "0", "unknown": "NA"})))
    m = groups["dx1988_89"]
    out["dx1988_89"] = (SiteTable("dx1988_89.csv")
                        .add("STUDY_ID", _ids(pid[m], "GBSG2-{:04d}"))
                        .add("AGE_DX", _num(col["age"][m], 0))
                        .add("MENO", _code(meno[m], {"pre": "PRE", "post": "POST"}))
                        .add("TAM", _code(horm[m], {"no": "N", "yes": "Y"}))
                        .add("T_SIZE_MM", _num(col["size"][m], 0))
                        .add("GRADE", _code(grade[m], {1: "G1", 2: "G2", 3: "G3"}))
                        .add("N_POS", _num(col["nodes"][m], 0))
                        .add("PR_FMOL_MG", _num(col["prog_recp"][m], 0))
                        .add("ER_FMOL_MG", _num(col["estrg_recp"][m], 0))
                        .add("RFS_EVENT_2Y", _code(status[m], {"event": "Y", "free": "N", "unknown": "UNK"})))
    return out


# ----------------------------------------------------------------------------- actg175
def _actg175() -> dict[str, SiteTable]:
    """ACTG 175 as shipped in lifelines (datasets/ACTG175.csv, from speff2trial): 2139 patients, by arm."""
    pd = _pandas("actg175")
    _require("lifelines.datasets", "actg175")
    path = resources.files("lifelines.datasets") / "ACTG175.csv"
    if not path.is_file():
        raise PpsehrError(f"consortium 'actg175': {path} is missing from the installed lifelines "
                          f"(lifelines 0.27-0.30 ship it); install one of those versions")
    df = pd.read_csv(str(path), index_col=0)
    c = {k: df[k].to_numpy() for k in df.columns}
    status = _horizon(c["days"], c["cens"], 730)  # 2 years
    yn01 = {0: "0", 1: "1"}
    out = {}
    m = c["arms"] == 0
    t = SiteTable("zdv.csv").add("pidnum", _ids(c["pidnum"][m], "{:d}"))
    t.add("age", _num(c["age"][m], 0)).add("wtkg", _num(c["wtkg"][m], 4))
    for k in ("hemo", "homo", "drugs"):
        t.add(k, _code(c[k][m], yn01))
    t.add("karnof", _num(c["karnof"][m], 0)).add("oprior", _code(c["oprior"][m], yn01)).add("z30", _code(c["z30"][m], yn01))
    t.add("preanti", _num(c["preanti"][m], 0)).add("race", _code(c["race"][m], yn01)).add("gender", _code(c["gender"][m], yn01))
    t.add("symptom", _code(c["symptom"][m], yn01)).add("offtrt", _code(c["offtrt"][m], yn01))
    for k in ("cd40", "cd420", "cd496", "cd80", "cd820"):
        t.add(k, _num(c[k][m], 0, missing="NA"))
    t.add("days", _num(c["days"][m], 0)).add("cens", _code(c["cens"][m], yn01))
    t.add("ev2y", _code(status[m], {"event": "1", "free": "0", "unknown": "NA"}))
    out["zdv"] = t

    m = c["arms"] == 1
    yn = {0: "N", 1: "Y"}
    t = SiteTable("zdv_ddi.csv").add("patient_no", _ids(c["pidnum"][m], "A175-{:06d}"))
    t.add("age_yrs", _num(c["age"][m], 0)).add("sex", _code(c["gender"][m], {0: "F", 1: "M"}))
    t.add("race", _code(c["race"][m], {0: "W", 1: "N"}))
    t.add("weight_lb", _num(c["wtkg"][m], 1, scale=1 / 0.45359237))
    t.add("kps", _num(c["karnof"][m], 0))
    for local, k in (("haemophilia", "hemo"), ("homosexual", "homo"), ("ivdu", "drugs"), ("symptomatic", "symptom")):
        t.add(local, _code(c[k][m], yn))
    t.add("prior_art_d", _num(c["preanti"][m], 0))
    for local, k in (("zdv_30d", "z30"), ("other_art", "oprior"), ("off_tx", "offtrt")):
        t.add(local, _code(c[k][m], yn))
    for local, k in (("cd4_bl", "cd40"), ("cd4_wk20", "cd420"), ("cd4_wk96", "cd496"), ("cd8_bl", "cd80"), ("cd8_wk20", "cd820")):
        t.add(local, _num(c[k][m], 0, missing="-9"))
    t.add("progression_2y", _code(status[m], {"event": "Y", "free": "N", "unknown": "-9"}))
    out["zdv_ddi"] = t

    m = c["arms"] == 2
    yn = {0: "no", 1: "yes"}
    t = SiteTable("zdv_ddc.csv", ";").add("subject_id", _ids(c["pidnum"][m], "{:d}"))
    t.add("age", _num(c["age"][m], 0)).add("sex", _code(c["gender"][m], {0: "female", 1: "male"}))
    t.add("ethnicity", _code(c["race"][m], {0: "white", 1: "non-white"}))
    t.add("weight_kg", _num(c["wtkg"][m], 1))
    t.add("karnofsky", [f"{v}%" for v in _num(c["karnof"][m], 0)])
    for local, k in (("hemophilia", "hemo"), ("msm", "homo"), ("idu", "drugs"), ("symptoms", "symptom")):
        t.add(local, _code(c[k][m], yn))
    t.add("art_days_before", _num(c["preanti"][m], 0))
    for local, k in (("zdv_recent", "z30"), ("non_zdv_art", "oprior"), ("discontinued", "offtrt")):
        t.add(local, _code(c[k][m], yn))
    for local, k in (("cd4_g_l_w0", "cd40"), ("cd4_g_l_w20", "cd420"), ("cd4_g_l_w96", "cd496"),
                     ("cd8_g_l_w0", "cd80"), ("cd8_g_l_w20", "cd820")):
        t.add(local, _num(c[k][m], 3, missing=".", scale=0.001))
    t.add("endpoint_2y", _code(status[m], {"event": "yes", "free": "no", "unknown": "."}))
    out["zdv_ddc"] = t

    m = c["arms"] == 3
    tf = {0: "FALSE", 1: "TRUE"}
    t = SiteTable("ddi.csv").add("PATIENT_ID", _ids(c["pidnum"][m], "P{:d}"))
    t.add("AGE", _num(c["age"][m], 0)).add("SEX", _code(c["gender"][m], {0: "FEMALE", 1: "MALE"}))
    t.add("RACE", _code(c["race"][m], {0: "WHITE", 1: "NON-WHITE"}))
    t.add("WEIGHT_KG", _num(c["wtkg"][m], 2)).add("KARNOFSKY", _num(c["karnof"][m], 0))
    for local, k in (("HEMOPHILIA", "hemo"), ("HOMOSEXUAL_ACTIVITY", "homo"), ("IV_DRUG_USE", "drugs"),
                     ("SYMPTOMATIC", "symptom")):
        t.add(local, _code(c[k][m], tf))
    t.add("PRIOR_ART_DAYS", _num(c["preanti"][m], 0))
    for local, k in (("ZDV_LAST_30D", "z30"), ("NON_ZDV_PRIOR", "oprior"), ("OFF_TREATMENT", "offtrt")):
        t.add(local, _code(c[k][m], tf))
    for local, k in (("CD4_W0", "cd40"), ("CD4_W20", "cd420"), ("CD4_W96", "cd496"), ("CD8_W0", "cd80"), ("CD8_W20", "cd820")):
        t.add(local, _num(c[k][m], 0, missing=""))
    t.add("EVENT_2Y", _code(status[m], {"event": "TRUE", "free": "FALSE", "unknown": ""}))
    out["ddi"] = t
    return out


# ----------------------------------------------------------------------------- ncctg-lung
_KARNO_PCT = {v: f"{v}%" for v in range(0, 101, 10)}


def _lung() -> dict[str, SiteTable]:
    """lifelines' load_lung (NCCTG advanced lung cancer, R survival's `lung`): by institution."""
    _pandas("ncctg-lung")
    ld = _require("lifelines.datasets", "ncctg-lung")
    df = ld.load_lung()
    rownum = np.arange(1, len(df) + 1)
    inst = df["inst"].to_numpy(dtype=float)
    status = _horizon(df["time"], df["status"], 183)  # 6 months; lifelines codes status 1 = dead, 0 = censored
    c = {k: df[k].to_numpy(dtype=float) for k in df.columns}
    male = c["sex"] == 1                               # 1 = male, 2 = female
    groups = {"inst01": inst == 1, "inst02_07": (inst >= 2) & (inst <= 7),
              "inst10_13": (inst >= 10) & (inst <= 13), "inst15_33": inst >= 15}  # the one row without inst is left out
    out = {}
    m = groups["inst01"]
    out["inst01"] = (SiteTable("inst01.csv")
                     .add("id", _ids(rownum[m], "{:d}"))
                     .add("inst", _num(inst[m], 0))
                     .add("time", _num(c["time"][m], 0))
                     .add("status", _code(c["status"][m], {0: "1", 1: "2"}))  # R survival: 1 censored, 2 dead
                     .add("age", _num(c["age"][m], 0))
                     .add("sex", _num(c["sex"][m], 0))
                     .add("ph.ecog", _num(c["ph.ecog"][m], 0, missing="NA"))
                     .add("ph.karno", _num(c["ph.karno"][m], 0, missing="NA"))
                     .add("pat.karno", _num(c["pat.karno"][m], 0, missing="NA"))
                     .add("meal.cal", _num(c["meal.cal"][m], 0, missing="NA"))
                     .add("wt.loss", _num(c["wt.loss"][m], 0, missing="NA"))
                     .add("status_6m", _code(status[m], {"event": "2", "free": "1", "unknown": "0"})))
    m = groups["inst02_07"]
    out["inst02_07"] = (SiteTable("inst02_07.csv")
                        .add("study_no", _ids(rownum[m], "NCCTG-{:03d}"))
                        .add("institution", _num(inst[m], 0))
                        .add("age_years", _num(c["age"][m], 0))
                        .add("sex", list(np.where(male[m], "M", "F")))
                        .add("ecog_ps", _code(c["ph.ecog"][m], {k: f"PS{k}" for k in range(5)}))
                        .add("kps_md", _num(c["ph.karno"][m], 0))
                        .add("kps_pt", _num(c["pat.karno"][m], 0))
                        .add("kcal_meals", _num(c["meal.cal"][m], 0))
                        .add("weight_change_kg", _num(c["wt.loss"][m], 2, scale=-0.45359237))
                        .add("dead_6mo", _code(status[m], {"event": "yes", "free": "no", "unknown": ""})))
    m = groups["inst10_13"]
    out["inst10_13"] = (SiteTable("inst10_13.csv")
                        .add("patient_id", _ids(rownum[m], "{:04d}"))
                        .add("site_code", _num(inst[m], 0))
                        .add("age", _num(c["age"][m], 0))
                        .add("gender", list(np.where(male[m], "male", "female")))
                        .add("ecog", _num(c["ph.ecog"][m], 0, missing="NA"))
                        .add("karnofsky_physician", _code(c["ph.karno"][m], _KARNO_PCT, missing="NA"))
                        .add("karnofsky_patient", _code(c["pat.karno"][m], _KARNO_PCT, missing="NA"))
                        .add("meal_kcal", _num(c["meal.cal"][m], 0, missing="NA"))
                        .add("weight_loss_lb", _num(c["wt.loss"][m], 0, missing="NA"))
                        .add("outcome_6m", _code(status[m], {"event": "died", "free": "alive", "unknown": "lost to follow-up"})))
    m = groups["inst15_33"]
    out["inst15_33"] = (SiteTable("inst15_33.tsv", "\t")
                        .add("pid", _ids(rownum[m], "L{:03d}"))
                        .add("inst", _num(inst[m], 0))
                        .add("age", _num(c["age"][m], 0))
                        .add("male", list(np.where(male[m], "1", "0")))
                        .add("ecog", _num(c["ph.ecog"][m], 0, missing="9"))
                        .add("karno_phys", _num(c["ph.karno"][m], 0))
                        .add("karno_pat", _num(c["pat.karno"][m], 0))
                        .add("calories", _num(c["meal.cal"][m], 0, missing="-1"))
                        .add("wtloss_6mo_lb", _num(c["wt.loss"][m], 0))
                        .add("died_6m", _code(status[m], {"event": "1", "free": "0", "unknown": "9"})))
    return out


_BUILDERS: dict[str, Callable[[], dict[str, SiteTable]]] = {
    "flchain": _flchain, "gbsg2": _gbsg2, "actg175": _actg175, "ncctg-lung": _lung,
}
