"""The evaluation addendum of a release: `evaluations/<evaluation_id>.json` and its `.sig`.

It carries the signed evaluation plan, every site's signed answer (noisy counts and budget
receipt), the dictionary the records are encoded with, and the sections derived from them: per-site
spending, the privacy statement of the evaluation (alone and with the release), and the results.
`verify_addenda` (called by `ppsehr release verify`) checks the coordinator's signature and
recomputes every section from the signed plan, the signed answers, the release's records.csv and
manifest, exactly as `build` made them. The shape of `results` is in docs/evaluation.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...common import accounting, addressing, keys
from ...common.dictionary import Dictionary, parse_dictionary
from ...common.errors import ReleaseError
from ...protos import guard_pb2 as pb
from ..measure.aggregate import planned_shape
from ..model.records import encode
from ..release import manifest as mf
from . import metrics

FORMAT = "ppsehr-evaluation/1"
DIRECTORY = "evaluations"
TSTR_MODEL = ("logistic regression (scikit-learn, lbfgs, C = 1) on the one-hot cells of every other variable, trained "
              "on the synthetic records inside each site's guard")


class AnswerRejected(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    """One site's verified answer to an evaluation plan."""

    site: str
    signer: str
    signed: pb.SignedSummary
    summary: pb.Summary
    receipt: pb.BudgetReceipt


def verify_answer(signed: pb.SignedSummary, plan: pb.QueryPlan, plan_bytes: bytes, dictionary: Dictionary,
                  site_keys: dict[str, Any]) -> Answer:
    """A site's signed answer to this evaluation plan: signatures, receipt and every table's shape and
    rho checked against the plan. Raises AnswerRejected with the reason."""
    by_fp = {keys.fingerprint(k): (site, k) for site, k in site_keys.items()}
    if signed.signer not in by_fp:
        raise AnswerRejected(f"signed by an unknown key {signed.signer[:80]!r}")
    site, key = by_fp[signed.signer]
    if not keys.verify(key, signed.signature, signed.summary):
        raise AnswerRejected(f"site {site!r}: its signature does not verify")
    summary = pb.Summary.FromString(signed.summary)
    if summary.site != site or not keys.verify(key, summary.receipt_signature, summary.receipt):
        raise AnswerRejected(f"site {site!r}: claims another site, or its receipt's signature does not verify")
    rc = pb.BudgetReceipt.FromString(summary.receipt)
    if (summary.plan_id, rc.plan_id, rc.site, rc.plan_sha256) != (plan.plan_id, plan.plan_id, site,
                                                                  hashlib.sha256(plan_bytes).digest()):
        raise AnswerRejected(f"site {site!r}: answers or receipts another plan")
    if dictionary.hash not in (summary.dictionary_hash,) or rc.dictionary_hash != dictionary.hash:
        raise AnswerRejected(f"site {site!r}: uses another dictionary")
    if rc.parties or rc.roster_sha256 or rc.bound:
        raise AnswerRejected(f"site {site!r}: its receipt claims a secure sum")
    tables: list[tuple[pb.NoisyMarginal, tuple, tuple[int, ...], float]] = []
    if len(summary.marginals) != len(plan.marginals):
        raise AnswerRejected(f"site {site!r}: {len(summary.marginals)} tables for {len(plan.marginals)} planned")
    for m, q in zip(summary.marginals, plan.marginals):
        tables.append((m, tuple(q.variables), planned_shape(q, dictionary)[1], q.rho))
    ev, answer = plan.evaluation, summary.evaluation
    if len(answer.tstr) != len(ev.tstr) or answer.HasField("distance") != ev.HasField("distance") \
            or answer.HasField("unique_copied") != ev.HasField("distance"):
        raise AnswerRejected(f"site {site!r}: its evaluation answer does not match the plan's queries")
    for m, q in zip(answer.tstr, ev.tstr):
        tables.append((m, ("tstr", q.target, dictionary[q.target].cells[q.positive]), (2, q.bins), q.rho))
    if ev.HasField("distance"):
        tables.append((answer.distance, ("distance",), (len(dictionary.names) + 1,), ev.distance.rho_histogram))
        tables.append((answer.unique_copied, ("unique_copied",), (1,), ev.distance.rho_unique))
    for i, (m, variables, shape, rho) in enumerate(tables):
        if tuple(m.variables) != variables or tuple(m.shape) != shape or len(m.counts) != math.prod(shape) or m.masked:
            raise AnswerRejected(f"site {site!r}: table {i} is not the planned {list(variables)} {list(shape)}")
        if not (0 < m.rho <= rho * (1 + 1e-9)) or not (m.noise_scale > 0 and math.isfinite(m.noise_scale)):
            raise AnswerRejected(f"site {site!r}: table {i} reports rho {m.rho!r} / scale {m.noise_scale!r} for a planned "
                                 f"rho of {rho!r}")
    if not math.isclose(rc.rho_debited, math.fsum(m.rho for m, *_ in tables), rel_tol=1e-9):
        raise AnswerRejected(f"site {site!r}: its receipt debits rho {rc.rho_debited!r}, its tables cost more or less")
    return Answer(site, signed.signer, signed, summary, rc)


# ----------------------------------------------------------------------------- sections
def plan_entry(plan: pb.QueryPlan, plan_bytes: bytes, signature: bytes) -> dict[str, Any]:
    """The evaluation plan's entry, every field from the signed plan."""
    ev = plan.evaluation
    return {"plan_id": plan.plan_id, "purpose": plan.purpose,
            "rho_per_site": math.fsum([m.rho for m in plan.marginals] + [q.rho for q in ev.tstr]
                                      + ([ev.distance.rho_histogram, ev.distance.rho_unique] if ev.HasField("distance") else [])),
            "records_sha256": ev.records_sha256.hex(), "records": ev.records, "release_id": ev.release_id,
            "manifest_sha256": ev.manifest_sha256.hex(),
            "unmeasured": [{"variables": list(m.variables), "rho": m.rho} for m in plan.marginals],
            "tstr": [{"target": q.target, "positive": q.positive, "bins": q.bins, "rho": q.rho} for q in ev.tstr],
            "distance": ({"rho_histogram": ev.distance.rho_histogram, "rho_unique": ev.distance.rho_unique}
                         if ev.HasField("distance") else None),
            "signed_plan": keys.b64(plan_bytes), "signature": keys.b64(signature),
            "sha256": hashlib.sha256(plan_bytes).hexdigest()} | mf.addressees_entry(plan)


def evaluation_statement(f: dict[str, Any]) -> str:
    """The evaluation's privacy statement, word for word, from verified figures; verify regenerates it."""
    return (f"Evaluating release {f['release_id']} cost each of the {f['sites']} answering site(s) at most rho = "
            f"{f['rho']:.4g} (zCDP), i.e. ({f['epsilon']:.3g}, {f['delta']:g})-DP, as {f['sites']} signed site receipt(s) "
            f"state. With the release itself, no site spent more than rho = {f['combined']:.4g} on these records, i.e. "
            f"({f['combined_epsilon']:.3g}, {f['delta']:g})-DP. Every result is computed from the sites' signed noisy "
            "answers and carries the noise they declare.")


def spending(answers: list[Answer], manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-site entries and the privacy section of an evaluation, from its receipts and the release's sites."""
    deltas = {a.receipt.delta for a in answers}
    release_delta = manifest["privacy"]["delta"]
    if deltas != {release_delta}:
        raise mf.Inconsistent(f"the evaluation's receipts state delta {sorted(deltas)}, the release {release_delta!r}")
    sites = {}
    for a in sorted(answers, key=lambda a: a.site):
        rc = a.receipt
        released = manifest["sites"].get(a.site, {}).get("rho", 0.0)
        combined = math.fsum([released, rc.rho_debited])
        sites[a.site] = {"member": a.site in manifest["sites"], "rho": rc.rho_debited,
                         "epsilon": accounting.epsilon(rc.rho_debited, rc.delta), "delta": rc.delta,
                         "release_rho": released, "combined_rho": combined,
                         "combined_epsilon": accounting.epsilon(combined, rc.delta), "rho_total": rc.rho_spent_total,
                         "epsilon_total": accounting.epsilon(rc.rho_spent_total, rc.delta), "rho_limit": rc.rho_limit}
    rho = max(s["rho"] for s in sites.values())
    combined = max(s["combined_rho"] for s in sites.values())
    f = {"release_id": manifest["release_id"], "sites": len(sites), "rho": rho, "delta": release_delta,
         "epsilon": accounting.epsilon(rho, release_delta), "combined": combined,
         "combined_epsilon": accounting.epsilon(combined, release_delta)}
    return sites, {"delta": release_delta, "evaluation_rho_max": rho, "evaluation_epsilon_max": f["epsilon"],
                   "combined_rho_max": combined, "combined_epsilon_max": f["combined_epsilon"],
                   "statement": evaluation_statement(f)}


def record_cells(records: bytes, dictionary: Dictionary) -> np.ndarray:
    """(n, V) cells of the release's records.csv."""
    rows = list(csv.DictReader(io.StringIO(records.decode("utf-8"))))
    return encode(dictionary, {n: [r[n] for r in rows] for n in dictionary.names})


def _sum(tables: list[pb.NoisyMarginal]) -> tuple[np.ndarray, float]:
    """Summed noisy counts and the per-cell noise variance (sum of the sites' scales squared)."""
    values = np.sum([np.asarray(t.counts, dtype=np.float64) for t in tables], axis=0)
    return values.reshape(tuple(tables[0].shape)), math.fsum(t.noise_scale ** 2 for t in tables)


def _distance_block(tables: list[pb.NoisyMarginal], unique: list[pb.NoisyMarginal]) -> tuple[dict[str, Any], dict[str, Any]]:
    hist, var = _sum(tables)
    count, var_count = _sum(unique)
    copy, copy_sd = metrics.share(hist, var, np.arange(len(hist)) == 0)
    mean, mean_sd = metrics.mean_index(hist, var)
    rate, rate_sd = metrics.ratio(float(count[0]), var_count, hist, var)
    return ({"histogram": hist.astype(int).tolist(), "variance": var, "rows": float(np.clip(hist, 0, None).sum()),
             "exact_copy_share": copy, "exact_copy_share_sd": copy_sd, "mean_distance": mean, "mean_distance_sd": mean_sd},
            {"count": int(count[0]), "variance": var_count, "share": rate, "share_sd": rate_sd})


def results(plan: pb.QueryPlan, answers: list[Answer], dictionary: Dictionary, cells: np.ndarray,
            manifest: dict[str, Any]) -> dict[str, Any]:
    """Every evaluation figure, summed over the answering sites, with the noise it carries."""
    ev = plan.evaluation
    n = max(len(cells), 1)
    out: dict[str, Any] = {"sites": sorted(a.site for a in answers)}
    tstr = []
    for i, q in enumerate(ev.tstr):
        table, var = _sum([a.summary.evaluation.tstr[i] for a in answers])
        neg, pos = table[0], table[1]
        auc, auc_sd = metrics.auc(neg, pos, var, var)
        acc, acc_sd = metrics.accuracy(neg, pos, var, var)
        tstr.append({"target": q.target, "positive": dictionary[q.target].cells[q.positive], "bins": q.bins,
                     "auc": auc, "auc_sd": auc_sd, "accuracy": acc, "accuracy_sd": acc_sd,
                     "rows": float(np.clip(table, 0, None).sum()),
                     "histogram": {"negative": neg.astype(int).tolist(), "positive": pos.astype(int).tolist()},
                     "variance": var})
    out["utility"] = {"model": TSTR_MODEL, "tstr": tstr}
    names = dictionary.names
    unmeasured = []
    for i, q in enumerate(plan.marginals):
        table, var = _sum([a.summary.marginals[i] for a in answers])
        idx = [names.index(v) for v in q.variables]
        synth = np.zeros(table.shape)
        np.add.at(synth, tuple(cells[:, j] for j in idx), 1.0)
        value, bound = metrics.tvd(synth / n, table, var)
        unmeasured.append({"variables": list(q.variables), "cells": int(table.size), "tvd": value, "tvd_noise_bound": bound,
                           "rows": float(np.clip(table, 0, None).sum())})
    done = [u for u in unmeasured if u["tvd"] is not None]
    out["fidelity"] = {"unmeasured": unmeasured,
                       "mean_tvd": float(np.mean([u["tvd"] for u in done])) if done else None,
                       "mean_tvd_noise_bound": float(np.mean([u["tvd_noise_bound"] for u in done])) if done else None}
    risk: dict[str, Any] = {}
    if ev.HasField("distance"):
        members = [a for a in answers if a.site in manifest["sites"]]
        held = [a for a in answers if a.site not in manifest["sites"]]
        blocks = {}
        for name, group in (("all", answers), ("members", members), ("held_out", held)):
            blocks[name] = _distance_block([a.summary.evaluation.distance for a in group],
                                           [a.summary.evaluation.unique_copied for a in group]) if group else (None, None)
        membership = {"member_sites": sorted(a.site for a in members), "held_out_sites": sorted(a.site for a in held),
                      "auc": None, "auc_sd": None}
        if members and held:  # members closer to the records than held-out patients? (a distance-threshold attack)
            m, h = blocks["members"][0], blocks["held_out"][0]
            membership["auc"], membership["auc_sd"] = metrics.auc(np.asarray(h["histogram"])[::-1],
                                                                  np.asarray(m["histogram"])[::-1], h["variance"], m["variance"])
        eps = manifest["privacy"]["release_epsilon_max"]
        delta = manifest["privacy"]["delta"]
        risk = {"distances": list(range(len(names) + 1)),
                "distance": {k: v[0] for k, v in blocks.items()},
                "unique_copied": {k: v[1] for k, v in blocks.items()},
                "membership": membership,
                "dp_bound": {"epsilon": eps, "delta": delta, "max_advantage": metrics.membership_advantage_bound(eps, delta)}}
    out["privacy_risk"] = risk
    return out


def build(plan: pb.QueryPlan, signed: pb.SignedPlan, answers: list[Answer], excluded: list[dict[str, Any]],
          dictionary: Dictionary, records: bytes, manifest: dict[str, Any], created: str, coordinator: str,
          site_keys: dict[str, Any]) -> dict[str, Any]:
    """The addendum (without its signature)."""
    sites, privacy = spending(answers, manifest)
    return {"format": FORMAT, "evaluation_id": plan.plan_id, "release_id": manifest["release_id"],
            "manifest_sha256": plan.evaluation.manifest_sha256.hex(), "records_sha256": plan.evaluation.records_sha256.hex(),
            "created": created, "coordinator": coordinator, "dictionary": dictionary.content,
            "plan": plan_entry(plan, signed.plan, signed.signature),
            "answers": [{"site": a.site, "signer": a.signer, "summary": keys.b64(a.signed.summary),
                         "signature": keys.b64(a.signed.signature)} for a in sorted(answers, key=lambda a: a.site)],
            "receipts": [mf.receipt_entry_of(a.site, a.signer, a.summary.receipt, a.summary.receipt_signature, a.receipt, True)
                         for a in sorted(answers, key=lambda a: a.site)],
            "keys": {"sites": {s: keys.public_pem(k) for s, k in sorted(site_keys.items())
                               if s in sites or s in {e.get("site") for e in excluded}}},
            "sites": sites, "sites_not_included": excluded, "privacy": privacy,
            "results": results(plan, answers, dictionary, record_cells(records, dictionary), manifest)}


def to_bytes(addendum: dict[str, Any]) -> bytes:
    return json.dumps(addendum, indent=1).encode() + b"\n"


# ----------------------------------------------------------------------------- verification
def verify_addenda(path: Path, files: list[str], manifest: dict[str, Any], manifest_bytes: bytes, ckey,
                   site_keys: dict[str, Path] | None) -> list[dict[str, Any]]:
    """Check every evaluations/<id>.json with its .sig; return the addenda (each with its `file`)."""
    stems = sorted({Path(f).with_suffix("").as_posix() for f in files})
    out = []
    for stem in stems:
        jpath, spath = path / f"{stem}.json", path / f"{stem}.sig"
        if not jpath.is_file() or not spath.is_file():
            raise ReleaseError(f"{path / stem}: an evaluation addendum needs both .json and .sig")
        data = jpath.read_bytes()
        try:
            signature = keys.unb64(spath.read_text().strip())
            addendum = json.loads(data)
        except (ValueError, json.JSONDecodeError) as e:
            raise ReleaseError(f"{jpath}: unreadable ({e})") from None
        if not keys.verify(ckey, signature, data):
            raise ReleaseError(f"{spath}: the coordinator's signature of {jpath.name} does not verify")
        try:
            verify_addendum(addendum, Path(stem).name, path, manifest, manifest_bytes, ckey, site_keys, jpath)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReleaseError(f"{jpath}: a section is missing or malformed ({type(e).__name__}: {e})") from None
        out.append(addendum | {"file": f"{stem}.json"})
    return out


def _fail(where: Path, message: str) -> None:
    raise ReleaseError(f"{where}: {message}")


def _close(a: Any, b: Any) -> bool:
    """Recomputed results equal the stated ones (floats to 1e-9 relative: numerical libraries may differ
    in the last bits between machines)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return type(a) is type(b) and a == b


def _first_difference(stated: Any, expected: Any, where: str = "results") -> str:
    if isinstance(stated, dict) and isinstance(expected, dict):
        for k in list(expected) + [k for k in stated if k not in expected]:
            if k not in stated or k not in expected:
                return f"{where}.{k}"
            if not _close(stated[k], expected[k]):
                return _first_difference(stated[k], expected[k], f"{where}.{k}")
    if isinstance(stated, list) and isinstance(expected, list) and len(stated) == len(expected):
        for i, (x, y) in enumerate(zip(stated, expected)):
            if not _close(x, y):
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where} ({stated!r}; the signed answers give {expected!r})"


def verify_addendum(a: dict[str, Any], stem: str, path: Path, manifest: dict[str, Any], manifest_bytes: bytes, ckey,
                    site_keys: dict[str, Path] | None, where: Path) -> None:
    """Recompute an evaluation addendum from its signed plan and answers and the release; raise on any difference."""
    if a.get("format") != FORMAT or a.get("evaluation_id") != stem:
        _fail(where, f"format {a.get('format')!r} / evaluation_id {a.get('evaluation_id')!r}: not the addendum {stem}")
    if a["manifest_sha256"] != hashlib.sha256(manifest_bytes).hexdigest() or a["release_id"] != manifest["release_id"]:
        _fail(where, "is for another release (manifest_sha256 or release_id)")
    records = (path / "records.csv").read_bytes()
    if a["records_sha256"] != manifest["files"].get("records.csv") or a["records_sha256"] != hashlib.sha256(records).hexdigest():
        _fail(where, "records_sha256 is not the release's records.csv")
    dictionary = parse_dictionary(a["dictionary"], "the addendum's dictionary")
    if dictionary.hash != manifest["dictionary"]["hash"]:
        _fail(where, "its dictionary is not the release's (hash)")
    entry = a["plan"]
    plan_bytes = keys.unb64(entry["signed_plan"])
    if not keys.verify(ckey, keys.unb64(entry["signature"]), plan_bytes):
        _fail(where, "the evaluation plan's signature does not verify")
    plan = pb.QueryPlan.FromString(plan_bytes)
    if not plan.HasField("evaluation") or plan.HasField("secure") or plan.plan_id != stem:
        _fail(where, "plan is not this evaluation's plan")
    mf.compare_derived(where, "plan", entry, plan_entry(plan, plan_bytes, keys.unb64(entry["signature"])))
    ev = plan.evaluation
    if (ev.records_sha256.hex(), ev.manifest_sha256.hex(), ev.release_id, plan.dictionary_hash) != (
            a["records_sha256"], a["manifest_sha256"], manifest["release_id"], dictionary.hash):
        _fail(where, "the signed plan evaluates other records, another release or another dictionary")
    cells = record_cells(records, dictionary)
    if ev.records != len(cells):
        _fail(where, f"the signed plan says {ev.records} records; records.csv has {len(cells)}")
    known_pem = a.get("keys", {}).get("sites", {})
    for s, pem in known_pem.items():
        if s in manifest["keys"]["sites"] and pem != manifest["keys"]["sites"][s]:
            _fail(where, f"keys.sites: site {s!r} has another key than in the release")
    if site_keys:
        key_of = {s: keys.load_public_key(p) for s, p in site_keys.items()}
    else:
        key_of = {s: keys.public_from_pem(pem) for s, pem in ({**known_pem, **manifest["keys"]["sites"]}).items()}
    fingerprint = keys.fingerprint(ckey)
    answers: list[Answer] = []
    for i, e in enumerate(a["answers"]):
        signed = pb.SignedSummary(summary=keys.unb64(e["summary"]), signature=keys.unb64(e["signature"]), signer=e["signer"])
        try:
            ans = verify_answer(signed, plan, plan_bytes, dictionary, key_of)
        except AnswerRejected as err:
            _fail(where, f"answers[{i}]: {err}")
        if ans.site != e["site"] or any(x.site == ans.site for x in answers):
            _fail(where, f"answers[{i}]: names site {e['site']!r}, signed by {ans.site!r} (or a site answers twice)")
        if ans.receipt.coordinator != fingerprint:
            _fail(where, f"answers[{i}]: the receipt names plan signer {ans.receipt.coordinator!r}, not the coordinator")
        if plan.addressees and not addressing.addressed(plan, ans.site, ans.signer):
            _fail(where, f"answers[{i}]: the signed plan is not addressed to site {ans.site!r} with key {ans.signer}")
        answers.append(ans)
    if not answers:
        _fail(where, "no site's answer")
    for ans in answers:  # the evaluation's debit comes after the release's, in the same ledger
        release = [pb.BudgetReceipt.FromString(keys.unb64(r["receipt"])) for r in manifest["receipts"] if r["site"] == ans.site]
        if release and (ans.receipt.ledger_seq <= max(r.ledger_seq for r in release) or ans.receipt.rho_spent_total <
                        max(r.rho_spent_total for r in release) + ans.receipt.rho_debited * (1 - 1e-9)):
            _fail(where, f"site {ans.site!r}: its evaluation receipt does not follow its release receipts in one ledger")
    ordered = sorted(answers, key=lambda x: x.site)
    if [e["site"] for e in a["answers"]] != [x.site for x in ordered]:
        _fail(where, "answers are not listed once per site, in site order")
    receipts = [mf.receipt_entry_of(x.site, x.signer, x.summary.receipt, x.summary.receipt_signature, x.receipt, True)
                for x in ordered]
    if len(a["receipts"]) != len(receipts):
        _fail(where, "receipts: one per answer")
    for stated, want in zip(a["receipts"], receipts):
        mf.compare_derived(where, f"receipt of site {want['site']!r}", stated, want)
    try:
        sites, privacy = spending(answers, manifest)
    except mf.Inconsistent as e:
        _fail(where, str(e))
    if set(a["sites"]) != set(sites):
        _fail(where, f"sites {sorted(a['sites'])} are not the answering sites {sorted(sites)}")
    for s, want in sites.items():
        mf.compare_derived(where, f"site {s!r}", a["sites"][s], want)
    mf.compare_derived(where, "privacy", a["privacy"], privacy, {
        "statement": lambda got: "privacy.statement is not the statement its verified figures give; expected: "
                                 + privacy["statement"]})
    known = set(key_of)
    listed: set[str] = set()
    for i, e in enumerate(a["sites_not_included"]):
        site = e.get("site")
        fields = {"site" if site is not None else "node", "code", "message", "charged"}
        if set(e) != fields or not isinstance(e.get("code"), str) or not isinstance(e.get("message"), str):
            _fail(where, f"sites_not_included[{i}]: fields {sorted(e)} are not an entry's")
        if site is not None and (site not in known or site in sites or site in listed):
            _fail(where, f"sites_not_included[{i}]: site {site!r} is unknown, answered, or listed twice")
        listed.add(site)
        if e["code"] == "SUM_INCOMPLETE" or e["charged"] != mf.charged_text(e["code"], False):
            _fail(where, f"sites_not_included[{i}]: charged {e['charged']!r} does not follow from its code")
    expected = results(plan, answers, dictionary, cells, manifest)
    if not _close(a["results"], expected):
        _fail(where, f"{_first_difference(a['results'], expected)} does not follow from the signed answers")
    extra = set(a) - {"format", "evaluation_id", "release_id", "manifest_sha256", "records_sha256", "created", "coordinator",
                      "dictionary", "plan", "answers", "receipts", "keys", "sites", "sites_not_included", "privacy", "results"}
    if extra:
        _fail(where, f"fields {sorted(extra)} are not an addendum's")
