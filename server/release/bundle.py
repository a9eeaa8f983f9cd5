"""Release bundles: written whole or not at all, and verifiable by anyone who has one.

A release is a directory with the synthetic records, the DP aggregates they came from, a
fidelity report, `manifest.json` (dictionary, signed plan, per-site privacy spending with the
sites' signed budget receipts, public keys, generator settings, and the SHA-256 of every other
file) and `manifest.sig`, the coordinator's detached Ed25519 signature of the manifest bytes.
It is assembled in a temporary sibling directory and renamed into place, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ...common import accounting, keys, secagg
from ...common.errors import ReleaseError
from ...protos import guard_pb2 as pb
from . import manifest as mf

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "ppsehr-release/2"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_release(out: str | Path, files: dict[str, bytes], manifest: dict[str, Any],
                  sign: Callable[[bytes], bytes]) -> Path:
    """Write files, manifest (with their hashes) and its signature atomically to `out` (which must not exist)."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for rel, data in files.items():
            if rel in (MANIFEST, SIGNATURE) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ReleaseError(f"bad release file name {rel!r}")
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(path, data)
        manifest = dict(manifest, format=FORMAT, files={rel: sha256(d) for rel, d in sorted(files.items())})
        data = json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n"
        _write_synced(tmp / MANIFEST, data)
        _write_synced(tmp / SIGNATURE, keys.b64(sign(data)).encode() + b"\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def verify_release(path: str | Path, coordinator_key: Path | None = None,
                   site_keys: dict[str, Path] | None = None, addenda: bool = True) -> dict[str, Any]:
    """Check a release: coordinator signature, file hashes, every site receipt and plan, and that
    every figure and sentence of the privacy section, the per-site entries, the receipts' readable
    fields, the plan entries and sites_not_included is what the signed receipts and plans give (the
    manifest is recomputed from them with the same functions that wrote it). Then every evaluation
    addendum under evaluations/. Keys are pinned if given, else taken from the manifest (then their
    fingerprints must be compared with the published ones). Returns the manifest (with the verified
    addenda under `evaluations`); raises ReleaseError naming the first problem found. With
    `addenda=False` the addenda are left unchecked (the report checks each one on its own).
    """
    path = Path(path)
    mpath = path / MANIFEST
    try:
        data = mpath.read_bytes()
        manifest = json.loads(data)
    except FileNotFoundError:
        raise ReleaseError(f"{path}: no {MANIFEST}; not a release directory") from None
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ReleaseError(f"{mpath}: format {found!r}, expected {FORMAT!r}")
    try:
        ckey = keys.load_public_key(coordinator_key) if coordinator_key else keys.public_from_pem(manifest["keys"]["coordinator"])
        signature = keys.unb64((path / SIGNATURE).read_text().strip())
    except FileNotFoundError:
        raise ReleaseError(f"{path}: no {SIGNATURE}; the release is not signed") from None
    except (KeyError, ValueError, TypeError) as e:
        raise ReleaseError(f"{mpath}: no usable coordinator key or signature ({e})") from None
    if not keys.verify(ckey, signature, data):
        raise ReleaseError(f"{path / SIGNATURE}: the coordinator's signature of {MANIFEST} does not verify")
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise ReleaseError(f"{f}: listed in the manifest but missing")
        if sha256(f.read_bytes()) != digest:
            raise ReleaseError(f"{f}: SHA-256 does not match the manifest")
    listed = set(manifest.get("files", {})) | {MANIFEST, SIGNATURE}
    present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    found = [rel for rel in present if rel not in listed and _addendum_name(rel)]
    extra = [rel for rel in present if rel not in listed and rel not in found]
    if extra:
        raise ReleaseError(f"{path}: files not covered by the manifest: {extra}")
    try:
        _verify_accounts(manifest, ckey, mpath, site_keys)
    except (KeyError, TypeError, AttributeError) as e:  # a section of the wrong shape
        raise ReleaseError(f"{mpath}: a section is missing or malformed ({type(e).__name__}: {e})") from None
    if found and addenda:
        from ..evaluate.addendum import verify_addenda  # coordinator-side evaluation; imported only when present

        manifest["evaluations"] = verify_addenda(path, found, manifest, data, ckey, site_keys)
    return manifest


ADDENDA = "evaluations"


def _addendum_name(rel: str) -> bool:
    """Whether a file not listed in the manifest may be an evaluation addendum (verified as one)."""
    parts = Path(rel).parts
    return len(parts) == 2 and parts[0] == ADDENDA and parts[1].endswith((".json", ".sig"))


def _fail(mpath: Path, message: str) -> None:
    raise ReleaseError(f"{mpath}: {message}")





def known_sites(manifest: dict[str, Any], site_keys: dict[str, Path] | None) -> set[str]:
    """Sites whose keys this verification knows: the manifest's, and any pinned."""
    return set(manifest.get("keys", {}).get("sites", {})) | set(site_keys or {})


def _verify_accounts(manifest: dict[str, Any], ckey, mpath: Path, site_keys: dict[str, Path] | None) -> None:
    """Plans, receipts, per-site entries, the privacy section and sites_not_included, recomputed."""
    fingerprint = keys.fingerprint(ckey)
    if manifest.get("keys", {}).get("coordinator_fingerprint") != fingerprint:
        _fail(mpath, f"keys.coordinator_fingerprint {manifest.get('keys', {}).get('coordinator_fingerprint')!r} is not "
                     f"the fingerprint of the key that signed the release ({fingerprint})")
    entries = manifest.get("plans") or []
    if not entries:
        _fail(mpath, "no plans")
    plans: dict[str, tuple[str, tuple | None]] = {}
    addressed: dict[str, set[tuple[str, str]] | None] = {}  # plan -> its signed addressees (None: a plan without)
    facts: list[mf.PlanFacts] = []
    for i, entry in enumerate(entries):
        plan, plan_bytes, digest, secure, roster, recovery = _verify_plan(entry, manifest, ckey, mpath, site_keys)
        if entry.get("round") != i + 1:
            _fail(mpath, f"plan entry {entry.get('plan_id')!r}: round {entry.get('round')!r}; plans are rounds 1, 2, ... "
                         "in order")
        if plan.plan_id in plans:
            _fail(mpath, f"plan {plan.plan_id!r} is listed twice")
        mf.compare_derived(mpath, f"plan entry {plan.plan_id!r}", entry,
                 mf.plan_entry_of(i + 1, plan, plan_bytes, keys.unb64(entry["signature"]), roster, recovery))
        plans[plan.plan_id] = (digest, secure)
        addressed[plan.plan_id] = {(a.site, a.signer) for a in plan.addressees} if plan.addressees else None
        for k in roster:
            if addressed[plan.plan_id] is not None and (k.site, k.signer) not in addressed[plan.plan_id]:
                _fail(mpath, f"plan {plan.plan_id!r}: site {k.site!r} (key {k.signer}) is in its secure-sum roster but "
                             "not among the addressees the signed plan names")
        facts.append(mf.plan_facts(i + 1, plan, [k.site for k in roster], recovery))
    if not manifest.get("sites"):
        _fail(mpath, "no site contributed; a release needs at least one site's receipt")
    by_site: dict[str, list[pb.BudgetReceipt]] = {}
    for r in manifest.get("receipts", []):
        site = r.get("site")
        if site not in manifest["sites"]:
            _fail(mpath, f"a receipt names site {site!r}, which the manifest does not list")
        by_site.setdefault(site, []).append(_verify_receipt(r, site, plans, manifest, site_keys, mpath, fingerprint))
    for p in facts:
        for site in p.dropped:
            if any(rc.plan_id == p.plan_id for rc in by_site.get(site, [])):
                _fail(mpath, f"site {site!r} answered plan {p.plan_id!r} (its receipt is in this release), but the signed "
                             "recovery statement lists it as dropped: its masks must never be revealed")
    for site in manifest["sites"]:
        rcs = by_site.get(site)
        if not rcs:
            _fail(mpath, f"site {site!r} has no receipt")
        if len({rc.plan_id for rc in rcs}) != len(rcs):
            _fail(mpath, f"site {site!r} has two receipts for one plan")
        _check_running_totals(site, rcs, mpath)
    try:
        figures = mf.privacy_figures(by_site, facts)
    except mf.Inconsistent as e:
        _fail(mpath, str(e))
    unreadable = mf.unreadable_plans(by_site, facts)
    for r in manifest["receipts"]:
        rc = pb.BudgetReceipt.FromString(keys.unb64(r["receipt"]))
        mf.compare_derived(mpath, f"receipt of site {r['site']!r} for plan {rc.plan_id!r}", r,
                 mf.receipt_entry_of(r["site"], r.get("signer"), keys.unb64(r["receipt"]), keys.unb64(r["signature"]), rc,
                                     rc.plan_id not in unreadable))
        if r.get("signer") != keys.fingerprint(_site_key(r["site"], manifest, site_keys)):
            _fail(mpath, f"receipt of site {r['site']!r} for plan {rc.plan_id!r}: signer {r.get('signer')!r} is not the "
                         "fingerprint of the site's key")
        to = addressed.get(rc.plan_id)
        if to is not None and (r["site"], r["signer"]) not in to:
            _fail(mpath, f"receipt of site {r['site']!r} for plan {rc.plan_id!r}: the signed plan is not addressed to "
                         f"site {r['site']!r} with key {r['signer']} (it names {sorted(to)})")
    for site, stated in manifest["sites"].items():
        mf.compare_derived(mpath, f"site {site!r}", stated, figures["sites"][site], _site_messages(site, figures["sites"][site]))
    mf.compare_derived(mpath, "privacy", manifest.get("privacy"), mf.privacy_section(figures), _privacy_messages(figures))
    _verify_exclusions(manifest, by_site, facts, unreadable, known_sites(manifest, site_keys), mpath)


def _site_messages(site: str, want: dict[str, Any]) -> dict[str, Callable[[Any], str]]:
    def eps(key: str, rho_key: str) -> Callable[[Any], str]:
        return lambda got: f"site {site!r}: {key} {got} does not follow from rho {want[rho_key]} at delta {want['delta']}"

    return {"rho": lambda got: f"site {site!r}: stated rho does not match its signed receipts ({want['rho']})",
            "rho_total": lambda got: f"site {site!r}: stated rho_total does not match its signed receipts ({want['rho_total']})",
            "rho_if_others_collude": lambda got: f"site {site!r}: rho_if_others_collude does not match its signed receipts "
                                                 f"({want['rho_if_others_collude']})",
            "epsilon": eps("epsilon", "rho"), "epsilon_total": eps("epsilon_total", "rho_total")}


def _privacy_messages(f: dict[str, Any]) -> dict[str, Callable[[Any], str]]:
    return {"delta": lambda got: f"privacy.delta {got!r} is not the delta every receipt states ({f['delta']!r})",
            "release_rho_max": lambda got: f"release_rho_max {got} does not follow from the receipts ({f['rho']})",
            "release_epsilon_max": lambda got: f"release_epsilon_max {got} does not follow from the receipts "
                                               f"({f['epsilon']} at delta {f['delta']})",
            "statement": lambda got: "privacy.statement is not the statement its verified figures give; expected: "
                                     + mf.privacy_statement(f)}


def _check_running_totals(site: str, rcs: list[pb.BudgetReceipt], mpath: Path) -> None:
    """A site's receipts, in ledger order, must describe one ledger: increasing sequence and totals."""
    ordered = sorted(rcs, key=lambda rc: rc.ledger_seq)
    for a, b in zip(ordered, ordered[1:]):
        if b.ledger_seq == a.ledger_seq or b.rho_spent_total < a.rho_spent_total + b.rho_debited * (1 - 1e-9):
            _fail(mpath, f"site {site!r}: receipts {a.plan_id!r} and {b.plan_id!r} do not describe one ledger "
                         "(sequence numbers or running totals)")
    for rc in ordered:
        if not (math.isfinite(rc.rho_debited) and rc.rho_debited > 0
                and rc.rho_spent_total >= rc.rho_debited * (1 - 1e-9) and rc.rho_limit >= rc.rho_spent_total * (1 - 1e-9)):
            _fail(mpath, f"site {site!r}: receipt for plan {rc.plan_id!r} states impossible figures")


def _verify_exclusions(manifest: dict[str, Any], by_site: dict[str, list[pb.BudgetReceipt]], facts: list[mf.PlanFacts],
                       unreadable: set[str], known: set[str], mpath: Path) -> None:
    """sites_not_included, matched per site and per round with the receipts, the listed sites and the rosters."""
    rounds = {p.round: p for p in facts}
    receipted = {(site, rc.plan_id): rc for site, rcs in by_site.items() for rc in rcs}
    excused: dict[tuple[str, str], dict[str, Any]] = {}
    entries = manifest.get("sites_not_included")
    if not isinstance(entries, list):
        _fail(mpath, "sites_not_included is missing or not a list")
    for i, e in enumerate(entries):
        where = f"sites_not_included[{i}]"
        if not isinstance(e, dict) or ("site" in e) == ("node" in e):
            _fail(mpath, f"{where}: an entry names either a site or (when the sender was never tied to a site) a node")
        p = rounds.get(e.get("round"))
        if p is None or e.get("plan_id") != p.plan_id:
            _fail(mpath, f"{where}: round {e.get('round')!r} / plan {e.get('plan_id')!r} is not a plan of this release")
        code, site = e.get("code"), e.get("site")
        if not isinstance(code, str) or not isinstance(e.get("message"), str):
            _fail(mpath, f"{where}: needs a code and a message")
        fields = {"site" if site is not None else "node", "round", "plan_id", "code", "message", "charged"}
        if set(e) != fields:
            _fail(mpath, f"{where}: fields {sorted(set(e) ^ fields)} do not belong to an entry")
        rc = receipted.get((site, p.plan_id)) if site is not None else None
        if site is not None:
            if site not in known:
                _fail(mpath, f"{where}: names site {site!r}, which no key in this release (or pinned) belongs to")
            if (site, p.plan_id) in excused:
                _fail(mpath, f"{where}: site {site!r} is listed twice for round {p.round}")
            if rc is not None and p.plan_id not in unreadable:
                _fail(mpath, f"{where}: site {site!r} has a receipt for round {p.round}'s plan, whose answers were used, "
                             "but is listed as not included")
            excused[(site, p.plan_id)] = e
        if (code == "SUM_INCOMPLETE") != (rc is not None):
            _fail(mpath, f"{where}: code {code!r} " + ("is only for a site charged for an unreadable secure sum, whose "
                                                       "receipt this release holds" if rc is None else
                                                       f"for site {site!r}, which was charged for an unreadable sum"))
        if e.get("charged") != mf.charged_text(code, rc is not None):
            _fail(mpath, f"{where}: charged {e.get('charged')!r} does not follow from its code and the receipts "
                         f"(expected {mf.charged_text(code, rc is not None)!r})")
        if rc is not None:
            missing = {s for s in p.roster if (s, p.plan_id) not in receipted}
            if e["message"] != mf.sum_incomplete_message(rc.rho_debited, missing, p.dropouts):
                _fail(mpath, f"{where}: message is not what site {site!r}'s receipt and the roster give; expected: "
                             + mf.sum_incomplete_message(rc.rho_debited, missing, p.dropouts))
    for (site, plan_id), rc in receipted.items():
        if plan_id in unreadable and (site, plan_id) not in excused:
            _fail(mpath, f"site {site!r} was charged for plan {plan_id!r}, whose secure sum cannot be read, and "
                         "sites_not_included does not say so")
    for p in facts:
        for site in manifest["sites"]:
            if (site, p.plan_id) not in receipted and (site, p.plan_id) not in excused:
                _fail(mpath, f"site {site!r} has no receipt for plan {p.plan_id!r} (round {p.round}) and no "
                             "sites_not_included entry for that site and round")
        for site in p.roster:
            if (site, p.plan_id) not in receipted and (site, p.plan_id) not in excused:
                _fail(mpath, f"site {site!r} enrolled in the secure sum of plan {p.plan_id!r} (round {p.round}; its "
                             "signed key share is in the roster) but has neither a receipt nor a sites_not_included entry")


def _verify_plan(entry: dict[str, Any], manifest: dict[str, Any], ckey, mpath: Path,
                 site_keys: dict[str, Path] | None) -> tuple[pb.QueryPlan, bytes, str, tuple | None, list[pb.KeyShare],
                                                             mf.RecoveryFacts | None]:
    """Check one plan's coordinator signature and content; return the plan, its bytes, its SHA-256 (hex),
    for a secure plan what its receipts must state (roster digest, parties, colluding, dropouts), its
    verified roster, and for a plan with dropouts its verified recovery (the coordinator's signed
    statement and the survivors' signed reveal receipts)."""
    try:
        plan_bytes = keys.unb64(entry["signed_plan"])
        if not keys.verify(ckey, keys.unb64(entry["signature"]), plan_bytes):
            raise ReleaseError(f"{mpath}: the signature of plan {entry['plan_id']!r} does not verify")
        plan = pb.QueryPlan.FromString(plan_bytes)
    except (KeyError, ValueError, TypeError) as e:
        raise ReleaseError(f"{mpath}: a plan entry is unreadable ({e})") from None
    digest = hashlib.sha256(plan_bytes).hexdigest()
    if plan.plan_id != entry["plan_id"] or digest != entry["sha256"]:
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} does not match the signed plan")
    if plan.HasField("evaluation"):
        raise ReleaseError(f"{mpath}: plan {entry['plan_id']!r} is an evaluation plan, not a release's")
    try:
        stated = [(m["variables"], float(m["rho"]), m.get("groups")) for m in entry["marginals"]]
        per_site = float(entry["rho_per_site"])
    except (KeyError, TypeError, ValueError) as e:
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} is incomplete ({e})") from None
    signed = [(list(m.variables), m.rho, _groups(m)) for m in plan.marginals]
    if len(stated) != len(signed) or any(sv != gv or sg != gg or not math.isclose(sr, gr, rel_tol=1e-12)
                                         for (sv, sr, sg), (gv, gr, gg) in zip(stated, signed)):
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} lists other marginals or rho than the signed plan")
    if not math.isclose(per_site, math.fsum(m.rho for m in plan.marginals), rel_tol=1e-9):
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r}: rho_per_site does not match the signed plan")
    if plan.dictionary_hash != manifest["dictionary"]["hash"]:
        raise ReleaseError(f"{mpath}: plan {entry['plan_id']!r} is signed for another dictionary")
    if not plan.HasField("secure"):
        if "secure" in entry:
            raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} claims secure aggregation the signed plan lacks")
        return plan, plan_bytes, digest, None, [], None
    try:
        sec = entry["secure"]
        roster = [pb.KeyShare(site=k["site"], plan_sha256=bytes.fromhex(digest), public_key=keys.unb64(k["public_key"]),
                              signature=keys.unb64(k["signature"]), signer=k["signer"]) for k in sec["roster"]]
        known = {s: _site_key(s, manifest, site_keys) for s in {k.site for k in roster}}
        parties = secagg.check_roster(roster, bytes.fromhex(digest), known)
    except (KeyError, TypeError, ValueError, ReleaseError, secagg.RosterError) as e:
        raise ReleaseError(f"{mpath}: plan {entry['plan_id']!r}: its secure-aggregation roster does not verify ({e})") from None
    if (sec.get("colluding"), sec.get("min_parties"), sec.get("dropouts", 0)) != (
            plan.secure.colluding, plan.secure.min_parties, plan.secure.dropouts):
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} states other secure-aggregation terms than the signed plan")
    recovery = _verify_recovery(entry, sec, plan, bytes.fromhex(digest), parties, ckey, manifest, site_keys, mpath)
    return (plan, plan_bytes, digest, (secagg.roster_sha256(parties), len(parties), plan.secure.colluding,
                                       plan.secure.dropouts), roster, recovery)


def _verify_recovery(entry: dict[str, Any], sec: dict[str, Any], plan: pb.QueryPlan, plan_sha: bytes,
                     roster: dict[str, bytes], ckey, manifest: dict[str, Any], site_keys: dict[str, Path] | None,
                     mpath: Path) -> mf.RecoveryFacts | None:
    """A secure plan's recovery: the coordinator's signed statement of who answered (for this plan and
    roster, at most its dropouts dropped) and each survivor's signed reveal receipt naming it."""
    if "recovery" not in sec:
        return None
    where = f"plan {entry['plan_id']!r}: recovery"
    if not plan.secure.dropouts:
        raise ReleaseError(f"{mpath}: {where}: the signed plan tolerates no dropouts")
    try:
        rec = sec["recovery"]
        statement, signature = keys.unb64(rec["statement"]), keys.unb64(rec["signature"])
        reveals = [(r["site"], keys.unb64(r["receipt"]), keys.unb64(r["signature"])) for r in rec["reveals"]]
        confirmations = [(c["site"], keys.unb64(c["signature"])) for c in rec["confirmations"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ReleaseError(f"{mpath}: {where} is unreadable ({e})") from None
    if not keys.verify(ckey, signature, statement):
        raise ReleaseError(f"{mpath}: {where}: the statement's signature does not verify against the coordinator's key")
    try:
        parsed = pb.RecoveryStatement.FromString(statement)
        secagg.check_statement(parsed, plan_sha, roster, plan.secure.dropouts)
        digest = hashlib.sha256(statement).digest()
        secagg.check_confirmations(
            [pb.Confirmation(site=s, statement_sha256=digest, signature=sig) for s, sig in confirmations], statement,
            plan_sha, parsed.survivors, {s: _site_key(s, manifest, site_keys) for s, _ in confirmations
                                         if s in parsed.survivors})
        seen: set[str] = set()
        for site, raw, sig in reveals:
            if site not in parsed.survivors or site in seen:
                raise secagg.RosterError(f"a reveal receipt of {site!r}, not a survivor (or twice)")
            seen.add(site)
            secagg.check_reveal_receipt(raw, sig, _site_key(site, manifest, site_keys), site, plan_sha, statement,
                                        parsed.survivors, parsed.dropped)
    except secagg.RosterError as e:
        raise ReleaseError(f"{mpath}: {where}: {e}") from None
    except ReleaseError:
        raise
    except Exception as e:  # a statement or receipt that does not parse
        raise ReleaseError(f"{mpath}: {where} does not verify ({type(e).__name__})") from None
    return mf.RecoveryFacts(statement, signature, tuple(confirmations), tuple(reveals))


def _site_key(site: str, manifest: dict[str, Any], site_keys: dict[str, Path] | None):
    if site_keys:
        if site not in site_keys:
            raise ReleaseError(f"no pinned key for site {site!r}: pin every site's key (--site-key) or none")
        return keys.load_public_key(site_keys[site])
    try:
        return keys.public_from_pem(manifest["keys"]["sites"][site])
    except KeyError:
        raise ReleaseError(f"the manifest carries no key for site {site!r}") from None


def _groups(query: pb.MarginalQuery) -> list[list[int] | None] | None:
    """A signed marginal's groupings as the manifest states them (None when nothing is grouped)."""
    groups = [list(g.cell_group) or None for g in query.groups]
    return groups if any(groups) else None


BOUND_NAMES = (*accounting.BOUNDS, "minimum-per-table")


def _verify_receipt(r: dict[str, Any], site: str, plans: dict[str, tuple], manifest: dict[str, Any],
                    site_keys: dict[str, Path] | None, mpath: Path, coordinator: str) -> pb.BudgetReceipt:
    try:
        key = _site_key(site, manifest, site_keys)
        raw = keys.unb64(r["receipt"])
        ok = keys.verify(key, keys.unb64(r["signature"]), raw)
    except (KeyError, ValueError, TypeError) as e:
        raise ReleaseError(f"{mpath}: site {site!r}: receipt or key unreadable ({e})") from None
    if not ok:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt's signature does not verify")
    rc = pb.BudgetReceipt.FromString(raw)
    digest, secure = plans.get(rc.plan_id, (None, None))
    if rc.site != site or digest != rc.plan_sha256.hex():
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt is for another site or for a plan not in this release")
    if (rc.roster_sha256, rc.parties, rc.colluding, rc.dropouts) != (secure or (b"", 0, 0, 0)):
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt's secure-aggregation roster or terms do not match plan {rc.plan_id!r}")
    if rc.dictionary_hash != manifest["dictionary"]["hash"]:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt is for another dictionary")
    if rc.coordinator != coordinator:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt names plan signer {rc.coordinator!r}, not the release's "
                           f"coordinator ({coordinator})")
    if secure and (rc.bound not in BOUND_NAMES or rc.rho_debited > rc.rho_alone * (1 + 1e-9)
                   or (rc.bound == "own-noise" and not math.isclose(rc.rho_debited, rc.rho_alone, rel_tol=1e-9))):
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt for secure plan {rc.plan_id!r} states bound {rc.bound!r} "
                           f"and rho {rc.rho_debited} against rho_alone {rc.rho_alone}, which no valid bound gives")
    if not secure and rc.bound:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt for plan {rc.plan_id!r} names a secure-sum bound")
    return rc
