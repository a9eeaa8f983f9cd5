"""The release report: one self-contained HTML page (no network needed) plus its PNG figures.

It shows, for a release: the privacy unit as the sites' signed receipts state it and the privacy
statement; each site's privacy budget (this release, lifetime, over time from the signed receipts);
every variable's distribution in the synthetic records next to the DP aggregate it was fitted to,
with the 95% band of the aggregate's noise; the dependency structure (cliques) the model used; the
records' consistency with the DP measurements (measured marginals only: not fidelity to real data);
the evaluation against the real data from each verified evaluation addendum (TSTR utility,
fidelity on unmeasured pairs, privacy risk, and what the evaluation cost); the sites not included.

Post-processing only: it reads the manifest, the noisy measurements, the sampled records, the
fidelity summary and the signed evaluation addenda, never site data. An addendum is shown only
after it verifies (`load_evaluations`); one that does not is shown as such, without its figures. The numbers come from `compare.py`, the figures from
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
from ...common import keys
from ...common import privacy_unit as units
from ...common.dictionary import MISSING, Dictionary, load_dictionary
from ...common.errors import ReleaseError
from ...common.mapping import _bin
from ..model.graphical import SITE, Measurement
from . import figures as fg
from .compare import Z95, VariableComparison, budget_history, compare_variables

SECTIONS = {"summary": "Summary", "privacy": "Privacy", "budget": "Budget", "distributions": "Distributions",
            "structure": "Model structure", "fidelity": "Consistency with the DP measurements",
            "evaluation": "Evaluation against the real data", "sites-not-included": "Sites not included",
            "generator": "Generator"}
EVALUATE_COMMAND = ("ppsehr release evaluate {release} --dictionary DICTIONARY.toml --signing-key coordinator.key "
                    "--site-key SITE=SITE.pub ... (--superlink HOST:PORT | --guard SITE=HOST:PORT ...)")


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
    """The report's PNGs by release-relative path; `add` stores one (or one being drawn, `fg.draw`) and
    returns what the template shows; `done` waits for the drawings and fills in their data."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[str, dict[str, Any]] = {}

    def add(self, name: str, data: "bytes | fg.Drawing", alt: str, caption: str | Markup) -> dict[str, Any]:
        path = f"figures/{name}.png"
        self[path] = data
        self.shown[path] = {"data": None, "alt": alt, "path": path, "caption": caption}
        return self.shown[path]

    def done(self) -> None:
        for path, data in self.items():
            self[path] = data = data if isinstance(data, bytes) else data.result()
            self.shown[path]["data"] = base64.b64encode(data).decode()


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
        cards.append(figs.add(name, fg.draw(fg.figure_distribution, c, title), f"Distribution of {c.variable}", caption))
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
    fig = figs.add("structure", fg.draw(fg.figure_structure, order, cliques, measured), "Model dependency graph",
                   "An edge joins two variables that share a clique of the model.")
    return {"lead": lead, "figure": fig, "rows": rows}


def _unit_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    """Each site's privacy unit in the manifest's words (privacy.site_units), else from its entry's unit fields."""
    privacy, sites = manifest.get("privacy", {}), manifest.get("sites", {})
    stated = privacy.get("site_units") or {}
    rows = []
    for s in sorted(set(stated) | set(sites)):
        e = stated.get(s) or {}
        unit = e.get("unit", sites.get(s, {}).get("unit"))
        k = e.get("rows_per_patient", sites.get(s, {}).get("rows_per_patient")) or 1
        text = e.get("description") or (units.describe(unit, k) if unit is not None else "not stated in the manifest")
        rows.append([s, _code(unit if unit else "(none)"), text])
    return rows


def _privacy(manifest: dict[str, Any]) -> dict[str, Any]:
    privacy, sites = manifest.get("privacy", {}), manifest.get("sites", {})
    rows = []
    for s in sorted(sites):
        e = sites[s]
        limit = e.get("rho_limit")
        rows.append([s, _num(e.get("rho")), _num(e.get("epsilon"), ".3g"), _num(e.get("delta"), "g"),
                     f"{_num(e.get('rho_total'))} of {_num(limit)}" if limit else _num(e.get("rho_total")),
                     _num(e.get("epsilon_total"), ".3g"), e.get("plans", ""), e.get("marginals", "")])
    lead = ("The privacy unit is what one site's guard protects, as its signed budget receipts state it: the guard "
            "derives it from its source (a patient whose rows are reduced to one record, a patient with up to k "
            "records, one attested row per patient, ...); the table below gives each site's, in the manifest's words."
            if privacy.get("unit") else "The manifest states no privacy unit: read the statement below with care.")
    model = str(privacy.get("model") or "")
    return {"lead": lead + (f" Model: {model}." if model else ""),
            "statement": privacy.get("statement", "The manifest carries no privacy statement."), "rows": rows,
            "units": _unit_rows(manifest)}


def _budget(manifest: dict[str, Any], history: Sequence[dict[str, Any]], figs: _Figures) -> dict[str, Any]:
    sites = manifest.get("sites", {})
    hist = budget_history([*history, manifest])
    lead = ("Each site's lifetime budget: what it had spent before, what this release cost, what is left; and its "
            f"spending over time from {_s(sum(len(v) for v in hist.values()), 'signed receipt')}"
            + (f" across {len(history) + 1} releases." if history else "."))
    if not sites:
        return {"lead": lead, "figure": None}
    return {"lead": lead, "figure": figs.add(
        "budget", fg.draw(fg.figure_budget, sites, hist), "Privacy budget per site",
        "ρ composes by addition across plans and releases; ε at the site's δ follows from OpenDP's privacy profile.")}


def _fidelity(fidelity: dict[str, Any], figs: _Figures) -> dict[str, Any]:
    rows = [r for r in fidelity.get("marginals", []) if "tvd" in r and "variables" in r]
    lead = Markup("Not fidelity to the real data. Total variation distance (TVD) between the synthetic records and "
                  "the noisy DP aggregates they were fitted to, for the {} the model was fitted to only: it shows how well "
                  "the model reproduced its own measurements (0: identical shares, 1: disjoint), and says nothing about "
                  "combinations of variables no marginal measured. For the records against the real patients, see "
                  "<a href='#evaluation'>Evaluation against the real data</a>.").format(_s(len(rows), "measured marginal"))
    if not rows:
        return {"lead": lead, "figure": None}
    worst = sorted(rows, key=lambda r: -float(r["tvd"]))[:10]
    grouped = sum(1 for r in rows if r.get("grouped"))
    return {"lead": lead,
            "figure": figs.add("fidelity", fg.draw(fg.figure_fidelity, rows), "Records against the DP aggregates per measured marginal",
                               "TVD between the records and each measured DP aggregate (noisy counts, clipped at 0)"
                               + (f"; {grouped} compressed table(s) compared over their groups of cells." if grouped else ".")),
            "widths": [[f"{k}-way", _num(v, ".4f")] for k, v in fidelity.get("mean_tvd_by_width", {}).items()],
            "worst": [[_mono(" × ".join(r["variables"])), _num(r["tvd"], ".4f")] for r in worst]}


def _not_included(manifest: dict[str, Any]) -> dict[str, Any]:
    missing = manifest.get("sites_not_included", [])
    if not missing:
        return {"lead": "Sites that refused, did not answer in time, or sent a summary that failed verification.",
                "rows": []}
    return {"lead": f"{_s(len(missing), 'answer')} did not count (from a site, or from a node no known site could be "
                    "matched to). Refused plans cost the site nothing; for timeouts, check the site's ledger.",
            "rows": [_exclusion_row(f) for f in missing]}


def _who(f: dict[str, Any]) -> Any:
    """An exclusion names a verified site, or only the transport's node when no known site could be matched."""
    if f.get("site"):
        return f["site"]
    if f.get("node") is not None:
        return Markup("node {} <span class='muted'>(no known site)</span>").format(f["node"])
    return Markup("<span class='muted'>unknown</span>")


def _exclusion_row(f: dict[str, Any], round_: bool = True) -> list[Any]:
    charged = f.get("charged")
    row = [_who(f), _code(f.get("code", "")), f.get("message", ""),
           charged if charged not in (None, "") else Markup("<span class='muted'>unknown</span>")]
    return [row[0], f.get("round", "–")] + row[1:] if round_ else row


def _pm(value: Any, sd: Any, fmt: str = ".3f") -> str:
    """A figure with the 95% half-width of its noise (1.96 x the noise sd the addendum states)."""
    if value is None:
        return "n/a"
    return f"{format(float(value), fmt)} ± {format(Z95 * float(sd), fmt)}" if sd is not None else format(float(value), fmt)


def _majority(t: dict[str, Any]) -> tuple[float | None, float | None]:
    """Accuracy of always predicting the larger class of the real test rows, from the same noisy score
    histograms (totals of the clipped counts), with its delta-method noise sd."""
    neg = float(np.clip(np.asarray(t["histogram"]["negative"], dtype=float), 0, None).sum())
    pos = float(np.clip(np.asarray(t["histogram"]["positive"], dtype=float), 0, None).sum())
    total = neg + pos
    if total <= 0:
        return None, None
    var_total = len(t["histogram"]["positive"]) * float(t["variance"])  # per-cell variance x bins, each class
    return max(neg, pos) / total, math.sqrt(var_total * (neg * neg + pos * pos)) / (total * total)


def _evaluation_unit(add: dict[str, Any]) -> str:
    """The privacy unit the evaluation's signed receipts state (as for the release: common/privacy_unit.py)."""
    by_site: dict[str, list[tuple[str, int]]] = {}
    for r in add.get("receipts", []):
        by_site.setdefault(r["site"], []).append((r.get("unit", ""), int(r.get("rows_per_patient") or 1)))
    return units.statement({s: units.weakest(u) for s, u in by_site.items()})


def _verified_evaluation(e: dict[str, Any], dictionary: Dictionary, manifest: dict[str, Any], figs: _Figures,
                         n: int) -> dict[str, Any]:
    add = e["addendum"]
    r, eid = add["results"], str(add["evaluation_id"])
    tag = fg.slug(eid[:12])
    sites = add["sites"]
    cost = [[s, "yes" if v["member"] else "no (held out)", _num(v["rho"]), _num(v["epsilon"], ".3g"), _num(v["release_rho"]),
             _num(v["combined_rho"]), _num(v["combined_epsilon"], ".3g"),
             f"{_num(v['rho_total'])} of {_num(v['rho_limit'])}" if v.get("rho_limit") else _num(v["rho_total"])]
            for s, v in sorted(sites.items())]
    tstr = []
    for t in r["utility"]["tstr"]:
        base, base_sd = _majority(t)
        tstr.append([_mono(f"{t['target']} = {t['positive']}"), _num(t["rows"], ".0f"), _pm(t["auc"], t["auc_sd"]),
                     _pm(t["accuracy"], t["accuracy_sd"]), "0.500", _pm(base, base_sd)])
    unmeasured = r["fidelity"]["unmeasured"]
    tvd = []
    for u in unmeasured:
        if u["tvd"] is None:
            verdict = Markup("<span class='muted'>no real rows after clipping</span>")
        elif u["tvd"] > u["tvd_noise_bound"]:
            verdict = Markup("<span class='tag bad'>beyond the noise bound</span> the records differ from the real table")
        else:
            verdict = Markup("<span class='tag'>within the noise</span> cannot be told apart at this budget")
        tvd.append([_mono(" × ".join(u["variables"])), f"{u['cells']}", _num(u["rows"], ".0f"), _num(u["tvd"], ".3f"),
                    _num(u["tvd_noise_bound"], ".3f"), verdict])
    beyond = sum(1 for u in unmeasured if u["tvd"] is not None and u["tvd"] > u["tvd_noise_bound"])
    if not unmeasured:
        from ..evaluate.run import measured_pairs

        try:
            every = len(measured_pairs(manifest)) >= math.comb(len(dictionary.names), 2)
        except (KeyError, TypeError):
            every = False
        tvd_summary = ("The evaluation plan asked for no unmeasured pair: "
                       + ("every pair of the dictionary's variables is in some marginal the release measured (see "
                          "Consistency with the DP measurements), so none is left to compare with the real data here."
                          if every else "it named none."))
    else:
        tvd_summary = (f"{beyond} of {len(unmeasured)} unmeasured pair(s) beyond their noise bound; mean TVD "
                       f"{_num(r['fidelity']['mean_tvd'], '.3f')}, mean noise bound "
                       f"{_num(r['fidelity']['mean_tvd_noise_bound'], '.3f')}.")
    tvd_figure = figs.add(f"evaluation-{tag}-unmeasured", fg.draw(fg.figure_unmeasured, unmeasured),
                          "Unmeasured pairs: TVD against the real tables",
                          "Each dot is the TVD between the records and the sites' summed noisy real table; the bar is "
                          "the noise bound (the exact TVD lies within it with high probability). Filled: beyond its "
                          "bound.") if any(u["tvd"] is not None for u in unmeasured) else None
    risk = r.get("privacy_risk") or {}
    risk_view: dict[str, Any] | None = None
    if risk:
        labels = {"all": "all answering sites", "members": "members (sites in the release)",
                  "held_out": "held out (answered, not in the release)"}
        rows = []
        for k, label in labels.items():
            d, u = risk["distance"].get(k), risk["unique_copied"].get(k)
            if d is None:
                rows.append([label] + [Markup("<span class='muted'>no such site answered</span>")] + [""] * 4)
                continue
            rows.append([label, _num(d["rows"], ".0f"), _pm(d["exact_copy_share"], d["exact_copy_share_sd"]),
                         _pm(d["mean_distance"], d["mean_distance_sd"], ".2f"),
                         f"{u['count']} ± {Z95 * math.sqrt(float(u['variance'])):.0f}", _pm(u["share"], u["share_sd"])])
        mi, bound = risk["membership"], risk["dp_bound"]
        if mi.get("auc") is None:
            membership = ("not measured: no held-out site answered (every answering site is in the release), so there "
                          "is no baseline of non-members to compare the members' distances with.")
        else:
            membership = (f"AUC {_pm(mi['auc'], mi['auc_sd'])} for members ({', '.join(mi['member_sites'])}) against "
                          f"held-out patients ({', '.join(mi['held_out_sites'])}) by distance to the closest record "
                          "(0.5: no better than chance; differences between hospitals also move it).")
        groups = {labels[k]: v for k, v in risk["distance"].items() if v}
        risk_view = {
            "rows": rows, "membership": membership,
            "bound": (f"The release's DP guarantee, ({_num(bound['epsilon'], '.3g')}, {_num(bound['delta'], 'g')})-DP per "
                      f"site, bounds any membership test's advantage (TPR − FPR) by {_num(bound['max_advantage'], '.3f')}."),
            "figure": figs.add(f"evaluation-{tag}-distance", fg.draw(fg.figure_distances, risk["distances"], groups),
                               "Distance to closest record", "Share of each group's real rows at each Hamming distance "
                               "from their closest synthetic record (summed noisy counts, clipped at 0). Distance 0: an "
                               "exact copy of the row exists among the records.")}
    return {"verified": True, "file": e["file"], "id": eid, "created": add.get("created", ""), "check": e["check"],
            "sites": ", ".join(r["sites"]), "statement": add["privacy"]["statement"], "unit": _evaluation_unit(add),
            "cost": cost, "model": r["utility"]["model"], "tstr": tstr, "tvd": tvd, "tvd_figure": tvd_figure,
            "tvd_summary": tvd_summary,
            "risk": risk_view, "records": n, "release_records": add["plan"].get("records"),
            "excluded": [_exclusion_row(f, round_=False) for f in add.get("sites_not_included", [])]}


def _evaluation(evaluations: Sequence[dict[str, Any]] | None, dictionary: Dictionary, manifest: dict[str, Any],
                release: str, figs: _Figures, n: int) -> dict[str, Any]:
    command = EVALUATE_COMMAND.format(release=release)
    how = Markup("Evaluate the release at the sites under DP with {}. It writes a signed addendum into the release's "
                 "<code>evaluations/</code> and a new report with this section; or, after an evaluation, rebuild the "
                 "report with {}. The demo does both with {}.").format(
        _code(command), _code(f"ppsehr release report {release} --dictionary DICTIONARY.toml --out NEW_DIR"),
        _code("ppsehr demo --evaluate"))
    if not evaluations:
        lead = ("No evaluation: this report was built with the release, before any evaluation could exist."
                if evaluations is None else "No evaluation addendum in this release.")
        return {"lead": lead + " How good the records are against the real patients is measured only by a federated "
                               "evaluation: each site compares the records with its own rows inside its guard and answers "
                               "with noisy counts.", "how": how, "items": []}
    items = []
    for e in evaluations:
        if e.get("verified"):
            items.append(_verified_evaluation(e, dictionary, manifest, figs, n))
        else:
            items.append({"verified": False, "file": e["file"], "reason": e["reason"], "check": e.get("check", "")})
    ok = sum(1 for i in items if i["verified"])
    lead = (f"{_s(len(items), 'evaluation addendum')} in this release, {ok} verified. Each site compared the records with "
            "its own real rows inside its guard and answered with noisy counts only; the figures below are their "
            "sums, each with the 95% range of its noise (± 1.96 sd). Only an addendum whose coordinator signature, "
            "signed plan, site answers, receipts and every figure verify against this release is shown.")
    return {"lead": lead, "how": how, "items": items}


def _generator(manifest: dict[str, Any]) -> dict[str, Any]:
    llm = manifest.get("llm", {})
    rows = [[k, _mono(_num(v, ".6g") if isinstance(v, float) else v)]
            for k, v in manifest.get("generator", {}).items() if not isinstance(v, (dict, list))]
    rows.append(["LLM stage", ("used" if llm.get("used") else f"not used: {llm.get('reason', '')}")
                 + ("; degraded: " + "; ".join(llm.get("degradations", [])) if llm.get("degraded") else "")])
    return {"rows": rows, "files": [[_code(k), _mono(v)] for k, v in manifest.get("files", {}).items()]}


def _summary(dictionary: Dictionary, manifest: dict[str, Any], n: int,
             comparisons: list[VariableComparison], evaluations: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    privacy, d = manifest.get("privacy", {}), manifest.get("dictionary", {})
    missing = manifest.get("sites_not_included", [])
    eps_max = privacy.get("release_epsilon_max")
    measured = [c for c in comparisons if c.tables]
    kpis = [(f"{n:,}", "synthetic records"), (f"{len(dictionary.variables)}", "variables"),
            (f"{len(manifest.get('sites', {}))}", "sites included" + (f" · {len(missing)} not" if missing else "")),
            (f"{sum(len(p.get('marginals', [])) for p in manifest.get('plans', []))}", "DP marginals measured"),
            (_num(eps_max, ".3g") if eps_max is not None else "–",
             f"max ε per site at δ = {_num(privacy.get('delta'), 'g')}"),
            (f"{sum(c.inside for c in measured)}/{sum(len(c.cells) for c in measured)}", "cells inside the noise band"),
            (f"{sum(1 for e in evaluations or [] if e.get('verified'))}/{len(evaluations or [])}",
             "evaluations verified" if evaluations else "evaluations against real data (see Evaluation)")]
    lead = Markup("Release {} of dictionary {} {}, created {} by {}.").format(
        _mono(manifest.get("release_id", "")), d.get("name", dictionary.name), d.get("version", dictionary.version),
        manifest.get("created", ""), manifest.get("coordinator", ""))
    return {"lead": lead, "kpis": kpis}


def build_report(dictionary: Dictionary, manifest: dict[str, Any], measurements: list[Measurement],
                 samples: np.ndarray, fidelity: dict[str, Any],
                 history: Sequence[dict[str, Any]] = (), evaluations: Sequence[dict[str, Any]] | None = None,
                 release: str = "REL") -> dict[str, bytes]:
    """The release report: {"report.html": self-contained page, "figures/<name>.png": each figure}.

    `measurements` are the DP aggregates the model was fitted to (a `site` axis is summed away),
    `samples` the (n, V) cell indices of the records in dictionary order, `fidelity` what
    release.manifest.fidelity_to_aggregates wrote, `history` earlier manifests of the same consortium (their receipts
    extend the budget-over-time figure), `evaluations` what `load_evaluations` found (None: built with the
    release, before any evaluation), `release` the release directory as the how-to-evaluate command names it.
    Every text from the manifest and the addenda is HTML-escaped by the template.
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
        "summary": _summary(dictionary, manifest, len(samples), comparisons, evaluations), "privacy": _privacy(manifest),
        "budget": _budget(manifest, history, figs), "distributions": _distributions(dictionary, comparisons, fidelity, figs),
        "structure": _structure(dictionary, manifest.get("generator", {}), measurements, figs),
        "fidelity": _fidelity(fidelity, figs),
        "evaluation": _evaluation(evaluations, dictionary, manifest, release, figs, len(samples)),
        "not_included": _not_included(manifest),
        "generator": _generator(manifest),
    }
    figs.done()
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


def load_evaluations(release: str | Path, coordinator_key: str | Path | None = None,
                     site_keys: dict[str, str | Path] | None = None) -> list[dict[str, Any]]:
    """The release's evaluation addenda (evaluations/<id>.json + .sig), each verified on its own with the
    code `ppsehr release verify` runs: the release first (signature, files, receipts, privacy section;
    addenda aside), then the addendum (coordinator signature, signed plan, site answers and receipts,
    every figure recomputed). Returns [{"file", "verified", "reason", "check", "addendum"}] in file
    order; `addendum` only when verified, `reason` (the verifier's message) only when not."""
    from ..evaluate.addendum import DIRECTORY, verify_addenda
    from .bundle import MANIFEST, verify_release

    path = Path(release)
    folder = path / DIRECTORY
    stems = sorted({p.stem for p in folder.iterdir() if p.suffix in (".json", ".sig")}) if folder.is_dir() else []
    if not stems:
        return []
    pins = {s: Path(p) for s, p in (site_keys or {}).items()} or None
    check = "every figure recomputed from the signed answers"
    try:
        manifest = verify_release(path, Path(coordinator_key) if coordinator_key else None, pins, addenda=False)
        ckey = (keys.load_public_key(coordinator_key) if coordinator_key
                else keys.public_from_pem(manifest["keys"]["coordinator"]))
        check = (f"coordinator key {keys.fingerprint(ckey)} ("
                 + ("pinned" if coordinator_key else "from the manifest: compare with the published fingerprint") + ")")
        problem = None
    except ReleaseError as e:
        problem = f"the release itself does not verify: {e}"
    out = []
    for stem in stems:
        entry: dict[str, Any] = {"file": f"{DIRECTORY}/{stem}.json", "check": check}
        if problem is None:
            try:
                [addendum] = verify_addenda(path, [f"{DIRECTORY}/{stem}.json", f"{DIRECTORY}/{stem}.sig"], manifest,
                                            (path / MANIFEST).read_bytes(), ckey, pins)
                out.append(entry | {"verified": True, "addendum": addendum})
                continue
            except ReleaseError as e:
                entry["reason"] = str(e)
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # a hostile or broken file: never shown
                entry["reason"] = f"{path / entry['file']}: malformed ({type(e).__name__}: {e})"
        else:
            entry["reason"] = problem
        out.append(entry | {"verified": False})
    return out


def write_report(release: str | Path, out: str | Path, dictionary: str | Path,
                 history: Sequence[str | Path] = (), coordinator_key: str | Path | None = None,
                 site_keys: dict[str, str | Path] | None = None) -> Path:
    """Build the report of a written release into directory `out` (not inside the release: its files are hashed),
    with an Evaluation section from every evaluation addendum that verifies (keys pinned if given)."""
    if Path(out).exists():
        raise ReleaseError(f"{Path(out).resolve()} already exists; choose a new output directory")
    d = load_dictionary(dictionary)
    manifest, measurements, samples, fidelity = release_inputs(release, d)
    evaluations = load_evaluations(release, coordinator_key, site_keys)
    earlier = []
    for h in history:
        try:
            earlier.append(json.loads(Path(h).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ReleaseError(f"{h}: cannot read an earlier manifest: {e}") from None
    return _write_dir(out, build_report(d, manifest, measurements, samples, fidelity, earlier, evaluations, str(release)))


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
