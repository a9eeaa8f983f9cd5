"""The release report: one self-contained HTML page (no network needed) plus its PNG figures.

It shows, for a release: every variable's distribution in the synthetic records next to the DP
aggregate it was fitted to, with the 95% band of the aggregate's noise; the dependency structure
(cliques) the model used; each site's privacy budget (this release, lifetime, over time from the
signed receipts); the fidelity figures; the privacy statement; the sites not included.

Post-processing only: it reads the manifest, the noisy measurements, the sampled records and the
fidelity summary, never site data. The numbers come from `compare.py`, the figures from
`figures.py`; the page is the Jinja2 template `templates/report.html.j2` (autoescaped), with
figures embedded as base64 PNG data URIs and the CSS inline.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import numpy as np
from markupsafe import Markup

from ...common import cells as cell_groups
from ...common.dictionary import MISSING, Dictionary, load_dictionary
from ...common.errors import ReleaseError
from ...common.mapping import _bin
from ..model.graphical import SITE, Measurement
from . import figures as fg
from .compare import VariableComparison, budget_history, compare_variables

SECTIONS = {"summary": "Summary", "privacy": "Privacy", "budget": "Budget", "distributions": "Distributions",
            "structure": "Model structure", "fidelity": "Fidelity", "sites-not-included": "Sites not included",
            "generator": "Generator"}


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("ppsehr.server.release", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _num(x: Any, fmt: str = ".4g") -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return str(x)


def _s(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mono(x: Any) -> Markup:
    return Markup("<span class='mono'>{}</span>").format(x)


def _code(x: Any) -> Markup:
    return Markup("<code>{}</code>").format(x)


class _Figures(dict):
    """The report's PNGs by release-relative path; `add` stores one and returns what the template shows."""

    def add(self, name: str, data: bytes, alt: str, caption: str | Markup) -> dict[str, Any]:
        path = f"figures/{name}.png"
        self[path] = data
        return {"data": base64.b64encode(data).decode(), "alt": alt, "path": path, "caption": caption}


def _distributions(dictionary: Dictionary, comparisons: list[VariableComparison], fidelity: dict[str, Any],
                   figs: _Figures) -> list[dict[str, Any]]:
    tvd1 = {r["variables"][0]: r["tvd"] for r in fidelity.get("marginals", []) if len(r.get("variables", [])) == 1}
    cards = []
    for c in comparisons:
        var = dictionary[c.variable]
        text = var.description or c.variable
        if c.tables:
            caption = Markup("{}. Synthetic share inside the 95% noise band in <b>{} of {}</b> cells; DP aggregate "
                             "from {}{}").format(text, c.inside, len(c.cells), _s(c.tables, "measured table"),
                                                 f"; TVD {tvd1[c.variable]:.3f}." if c.variable in tvd1 else ".")
        else:
            caption = f"{text}. No completely observed DP table contains this variable."
        title = f"{c.variable} ({var.unit})" if var.unit else c.variable
        name = f"distribution-{fg.slug(c.variable)}"
        if f"figures/{name}.png" in figs:  # two names with the same slug
            name += f"-{len(cards)}"
        cards.append(figs.add(name, fg.figure_distribution(c, title), f"Distribution of {c.variable}", caption))
    return cards


def _structure(dictionary: Dictionary, gen: dict[str, Any], measurements: list[Measurement],
               figs: _Figures) -> dict[str, Any]:
    cliques = [list(c) for c in gen.get("cliques", [])]
    lead = (f"The graphical model is a junction tree over {_s(len(cliques), 'clique')}: the records reproduce "
            "dependencies inside a clique; variables in no common clique are independent given the separators "
            "between them.")
    if not cliques:
        return {"lead": lead, "figure": None, "rows": []}
    measured = [tuple(v for v in m.variables if v != SITE) for m in measurements]
    order = dictionary.names + ([SITE] if any(SITE in c for c in cliques) else [])
    domain = dictionary.domain() | {SITE: max(len(gen.get("site_groups", [])), 1)}
    rows = [[_mono(" · ".join(c)), f"{len(c)}", f"{math.prod(domain.get(v, 1) for v in c):,}"] for c in cliques]
    fig = figs.add("structure", fg.figure_structure(order, cliques, measured), "Model dependency graph",
                   "An edge joins two variables that share a clique of the model.")
    return {"lead": lead, "figure": fig, "rows": rows}


def _privacy(manifest: dict[str, Any]) -> dict[str, Any]:
    privacy, sites = manifest.get("privacy", {}), manifest.get("sites", {})
    rows = []
    for s in sorted(sites):
        e = sites[s]
        limit = e.get("rho_limit")
        rows.append([s, _num(e.get("rho")), _num(e.get("epsilon"), ".3g"), _num(e.get("delta"), "g"),
                     f"{_num(e.get('rho_total'))} of {_num(limit)}" if limit else _num(e.get("rho_total")),
                     _num(e.get("epsilon_total"), ".3g"), e.get("plans", ""), e.get("marginals", "")])
    return {"lead": f"Privacy unit: {privacy.get('unit', 'not stated')}. {privacy.get('model', '')}.",
            "statement": privacy.get("statement", "The manifest carries no privacy statement."), "rows": rows}


def _budget(manifest: dict[str, Any], history: Sequence[dict[str, Any]], figs: _Figures) -> dict[str, Any]:
    sites = manifest.get("sites", {})
    hist = budget_history([*history, manifest])
    lead = ("Each site's lifetime budget: what it had spent before, what this release cost, what is left; and its "
            f"spending over time from {_s(sum(len(v) for v in hist.values()), 'signed receipt')}"
            + (f" across {len(history) + 1} releases." if history else "."))
    if not sites:
        return {"lead": lead, "figure": None}
    return {"lead": lead, "figure": figs.add(
        "budget", fg.figure_budget(sites, hist), "Privacy budget per site",
        "ρ composes by addition across plans and releases; ε at the site's δ follows from OpenDP's privacy profile.")}


def _fidelity(fidelity: dict[str, Any], figs: _Figures) -> dict[str, Any]:
    lead = fidelity.get("note", "Total variation distance (TVD) between the synthetic records and each DP aggregate") + "."
    rows = [r for r in fidelity.get("marginals", []) if "tvd" in r and "variables" in r]
    if not rows:
        return {"lead": lead, "figure": None}
    worst = sorted(rows, key=lambda r: -float(r["tvd"]))[:10]
    others = {k: v for k, v in fidelity.items()
              if k not in ("note", "marginals", "mean_tvd_by_width") and isinstance(v, (int, float, str))}
    return {"lead": lead,
            "figure": figs.add("fidelity", fg.figure_fidelity(rows), "Fidelity per marginal",
                               "0 means identical shares, 1 disjoint."),
            "widths": [[f"{k}-way", _num(v, ".4f")] for k, v in fidelity.get("mean_tvd_by_width", {}).items()],
            "worst": [[_mono(" × ".join(r["variables"])), _num(r["tvd"], ".4f")] for r in worst],
            "others": [[k, _num(v)] for k, v in others.items()]}


def _not_included(manifest: dict[str, Any]) -> dict[str, Any]:
    missing = manifest.get("sites_not_included", [])
    if not missing:
        return {"lead": "Sites that refused, did not answer in time, or sent a summary that failed verification.",
                "rows": []}
    return {"lead": f"{_s(len(missing), 'site answer')} did not count. Refused plans cost the site nothing; for "
                    "timeouts, check the site's ledger.",
            "rows": [[f.get("site"), f.get("round", 1), _code(f.get("code")), f.get("message"), f.get("charged")]
                     for f in missing]}


def _generator(manifest: dict[str, Any]) -> dict[str, Any]:
    llm = manifest.get("llm", {})
    rows = [[k, _mono(_num(v, ".6g") if isinstance(v, float) else v)]
            for k, v in manifest.get("generator", {}).items() if not isinstance(v, (dict, list))]
    rows.append(["LLM stage", ("used" if llm.get("used") else f"not used: {llm.get('reason', '')}")
                 + ("; degraded: " + "; ".join(llm.get("degradations", [])) if llm.get("degraded") else "")])
    return {"rows": rows, "files": [[_code(k), _mono(v)] for k, v in manifest.get("files", {}).items()]}


def _summary(dictionary: Dictionary, manifest: dict[str, Any], n: int,
             comparisons: list[VariableComparison]) -> dict[str, Any]:
    privacy, d = manifest.get("privacy", {}), manifest.get("dictionary", {})
    missing = manifest.get("sites_not_included", [])
    eps_max = privacy.get("release_epsilon_max")
    measured = [c for c in comparisons if c.tables]
    kpis = [(f"{n:,}", "synthetic records"), (f"{len(dictionary.variables)}", "variables"),
            (f"{len(manifest.get('sites', {}))}", "sites included" + (f" · {len(missing)} not" if missing else "")),
            (f"{sum(len(p.get('marginals', [])) for p in manifest.get('plans', []))}", "DP marginals measured"),
            (_num(eps_max, ".3g") if eps_max is not None else "–",
             f"max ε per site at δ = {_num(privacy.get('delta'), 'g')}"),
            (f"{sum(c.inside for c in measured)}/{sum(len(c.cells) for c in measured)}", "cells inside the noise band")]
    lead = Markup("Release {} of dictionary {} {}, created {} by {}.").format(
        _mono(manifest.get("release_id", "")), d.get("name", dictionary.name), d.get("version", dictionary.version),
        manifest.get("created", ""), manifest.get("coordinator", ""))
    return {"lead": lead, "kpis": kpis}


def build_report(dictionary: Dictionary, manifest: dict[str, Any], measurements: list[Measurement],
                 samples: np.ndarray, fidelity: dict[str, Any],
                 history: Sequence[dict[str, Any]] = ()) -> dict[str, bytes]:
    """The release report: {"report.html": self-contained page, "figures/<name>.png": each figure}.

    `measurements` are the DP aggregates the model was fitted to (a `site` axis is summed away),
    `samples` the (n, V) cell indices of the records in dictionary order, `fidelity` what
    release.manifest.fidelity_to_aggregates wrote, `history` earlier manifests of the same consortium (their receipts
    extend the budget-over-time figure). Every text from the manifest is HTML-escaped by the template.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] != len(dictionary.variables):
        raise ReleaseError(f"samples must be an (n, {len(dictionary.variables)}) array of cell indices, "
                           f"got shape {samples.shape}")
    figs = _Figures()
    comparisons = compare_variables(dictionary, measurements, samples)
    d = manifest.get("dictionary", {})
    context = {
        "sections": SECTIONS, "plural": _s, "css": Markup(_css()),
        "name": f"{d.get('name', dictionary.name)} {d.get('version', dictionary.version)}",
        "release_id": str(manifest.get("release_id", "")), "created": manifest.get("created", ""),
        "n_sites": len(manifest.get("sites", {})),
        "summary": _summary(dictionary, manifest, len(samples), comparisons), "privacy": _privacy(manifest),
        "budget": _budget(manifest, history, figs), "distributions": _distributions(dictionary, comparisons, fidelity, figs),
        "structure": _structure(dictionary, manifest.get("generator", {}), measurements, figs),
        "fidelity": _fidelity(fidelity, figs), "not_included": _not_included(manifest),
        "generator": _generator(manifest),
    }
    page = _environment().get_template("report.html.j2").render(context)
    return {"report.html": page.encode()} | dict(sorted(figs.items()))


@lru_cache(maxsize=1)
def _css() -> str:
    return _environment().loader.get_source(_environment(), "report.css")[0]


# ----------------------------------------------------------------------------- an existing release
def release_inputs(path: str | Path, dictionary: Dictionary) -> tuple[dict[str, Any], list[Measurement], np.ndarray,
                                                                       dict[str, Any]]:
    """manifest, measurements, samples and fidelity of a written release, for build_report."""
    path = Path(path)

    def read_json(name: str) -> dict[str, Any]:
        try:
            return json.loads((path / name).read_text())
        except FileNotFoundError:
            raise ReleaseError(f"{path / name}: missing (is {path} a ppsehr release?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{path / name}: not valid JSON: {e}") from None

    manifest = read_json("manifest.json")
    if manifest.get("dictionary", {}).get("hash") not in (None, dictionary.hash):
        raise ReleaseError(f"{path}: made with dictionary {manifest['dictionary']['hash']}, not {dictionary.hash}")
    measurements = []
    for i, m in enumerate(read_json("aggregates.json").get("marginals", [])):
        try:
            shape = tuple(len(c) for c in m["cells"])
            variance = np.array([np.inf if v is None else v for v in m["variance"]], dtype=float).reshape(shape)
            groups = m.get("groups")
            if groups is not None:
                groups, grouped = cell_groups.check_groups([dictionary[v].size if v in dictionary.variables else len(c)
                                                            for v, c in zip(m["variables"], m["cells"])], groups)
                if grouped != shape:
                    raise ValueError(f"groups make a {list(grouped)} table, cells say {list(shape)}")
            measurements.append(Measurement(tuple(m["variables"]), np.asarray(m["counts"], dtype=float).reshape(shape),
                                            variance, groups))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ReleaseError(f"{path / 'aggregates.json'}: marginals[{i}] is malformed: {e}") from None
    samples = encode_records(path / "records.csv", dictionary)
    return manifest, measurements, samples, read_json("fidelity.json")


def encode_records(path: Path, dictionary: Dictionary) -> np.ndarray:
    """Records (CSV in the dictionary's vocabulary) back to an (n, V) array of cell indices."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise ReleaseError(f"{path}: missing") from None
    absent = [n for n in dictionary.names if n not in header]
    if absent:
        raise ReleaseError(f"{path}: column(s) {absent} of the dictionary are missing")
    out = np.zeros((len(rows), len(dictionary.names)), dtype=np.int32)
    for j, (name, var) in enumerate(dictionary.variables.items()):
        index = {c: k for k, c in enumerate(var.cells)}
        for i, r in enumerate(rows):
            value = r[name].strip()
            label = MISSING if value == "" else value
            if label in index:
                out[i, j] = index[label]
            elif var.type == "numeric":
                try:
                    out[i, j] = _bin(var, float(value))[0]
                except ValueError:
                    raise ReleaseError(f"{path}, record {i + 1}, column {name!r}: {value!r} is not a number") from None
            else:
                raise ReleaseError(f"{path}, record {i + 1}, column {name!r}: {value!r} is not a cell of {name!r}")
    return out


def write_report(release: str | Path, out: str | Path, dictionary: str | Path,
                 history: Sequence[str | Path] = ()) -> Path:
    """Build the report of a written release into directory `out` (not inside the release: its files are hashed)."""
    if Path(out).exists():
        raise ReleaseError(f"{Path(out).resolve()} already exists; choose a new output directory")
    d = load_dictionary(dictionary)
    manifest, measurements, samples, fidelity = release_inputs(release, d)
    earlier = []
    for h in history:
        try:
            earlier.append(json.loads(Path(h).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ReleaseError(f"{h}: cannot read an earlier manifest: {e}") from None
    return _write_dir(out, build_report(d, manifest, measurements, samples, fidelity, earlier))


def _write_dir(out: str | Path, files: dict[str, bytes]) -> Path:
    """Write files into a new directory `out` whole or not at all (temporary sibling, then rename)."""
    out = Path(out).resolve()
    if out.exists():
        raise ReleaseError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
