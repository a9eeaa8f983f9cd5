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

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "ppsehr-release/1"


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
                   site_keys: dict[str, Path] | None = None) -> dict[str, Any]:
    """Check a release: coordinator signature, file hashes, every site receipt, and that each stated
    rho/epsilon follows from the receipts. Keys are pinned if given, else taken from the manifest
    (then their fingerprints must be compared with the published ones). Returns the manifest;
    raises ReleaseError naming the first problem found.
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
    if manifest.get("format") != FORMAT:
        raise ReleaseError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    try:
        ckey = keys.load_public_key(coordinator_key) if coordinator_key else keys.public_from_pem(manifest["keys"]["coordinator"])
        signature = keys.unb64((path / SIGNATURE).read_text().strip())
    except FileNotFoundError:
        raise ReleaseError(f"{path}: no {SIGNATURE}; the release is not signed") from None
    except (KeyError, ValueError) as e:
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
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in listed)
    if extra:
        raise ReleaseError(f"{path}: files not covered by the manifest: {extra}")
    plans = {p["plan_id"]: _verify_plan(p, manifest, ckey, mpath, site_keys) for p in manifest.get("plans", [])}
    if not plans:
        raise ReleaseError(f"{mpath}: no plans")
    if not manifest.get("sites"):
        raise ReleaseError(f"{mpath}: no site contributed; a release needs at least one site's receipt")
    by_site: dict[str, list[pb.BudgetReceipt]] = {}
    for r in manifest.get("receipts", []):
        site = r.get("site")
        if site not in manifest["sites"]:
            raise ReleaseError(f"{mpath}: a receipt names site {site!r}, which the manifest does not list")
        by_site.setdefault(site, []).append(_verify_receipt(r, site, plans, manifest, site_keys, mpath))
    for site, s in manifest["sites"].items():
        rcs = by_site.get(site)
        if not rcs:
            raise ReleaseError(f"{mpath}: site {site!r} has no receipt")
        if len({rc.plan_id for rc in rcs}) != len(rcs):
            raise ReleaseError(f"{mpath}: site {site!r} has two receipts for one plan")
        rho = math.fsum(rc.rho_debited for rc in rcs)
        last = max(rcs, key=lambda rc: rc.ledger_seq)
        if not math.isclose(rho, s["rho"], rel_tol=1e-12) or not math.isclose(last.rho_spent_total, s["rho_total"], rel_tol=1e-12):
            raise ReleaseError(f"{mpath}: site {site!r}: stated rho does not match its signed receipts")
        alone = math.fsum(rc.rho_alone if rc.parties else rc.rho_debited for rc in rcs)
        stated = s.get("rho_if_others_collude", None if not any(rc.parties for rc in rcs) else -1.0)
        if stated is not None and not math.isclose(alone, stated, rel_tol=1e-12):
            raise ReleaseError(f"{mpath}: site {site!r}: rho_if_others_collude does not match its signed receipts")
        for key, value in (("epsilon", rho), ("epsilon_total", last.rho_spent_total)):
            if not math.isclose(accounting.epsilon(value, last.delta), s[key], rel_tol=1e-6):
                raise ReleaseError(f"{mpath}: site {site!r}: {key} {s[key]} does not follow from rho {value} at delta {last.delta}")
    # Every listed site answered every plan, unless that plan's round lists as many sites not included.
    for p in manifest["plans"]:
        missing = [site for site in manifest["sites"] if not any(rc.plan_id == p["plan_id"] for rc in by_site[site])]
        excused = [f for f in manifest.get("sites_not_included", []) if f.get("round", 1) == p.get("round", 1)]
        if len(missing) > len(excused):
            raise ReleaseError(f"{mpath}: plan {p['plan_id']!r} has no receipt from {missing} and no matching "
                               "entry in sites_not_included")
    worst = max(math.fsum(rc.rho_debited for rc in rcs) for rcs in by_site.values())
    privacy = manifest["privacy"]
    if not math.isclose(worst, privacy.get("release_rho_max", -1.0), rel_tol=1e-12):
        raise ReleaseError(f"{mpath}: release_rho_max {privacy.get('release_rho_max')} does not follow from the receipts")
    if not math.isclose(accounting.epsilon(worst, privacy["delta"]), privacy["release_epsilon_max"], rel_tol=1e-6):
        raise ReleaseError(f"{mpath}: release_epsilon_max {privacy['release_epsilon_max']} does not follow from the receipts")
    return manifest


def _verify_plan(entry: dict[str, Any], manifest: dict[str, Any], ckey, mpath: Path,
                 site_keys: dict[str, Path] | None) -> tuple[str, tuple | None]:
    """Check one plan's coordinator signature and content; return its SHA-256 (hex) and, for a
    secure plan, what its receipts must state: (roster digest, parties, colluding)."""
    try:
        plan_bytes = keys.unb64(entry["signed_plan"])
        if not keys.verify(ckey, keys.unb64(entry["signature"]), plan_bytes):
            raise ReleaseError(f"{mpath}: the signature of plan {entry['plan_id']!r} does not verify")
        plan = pb.QueryPlan.FromString(plan_bytes)
    except (KeyError, ValueError) as e:
        raise ReleaseError(f"{mpath}: a plan entry is unreadable ({e})") from None
    digest = hashlib.sha256(plan_bytes).hexdigest()
    if plan.plan_id != entry["plan_id"] or digest != entry["sha256"]:
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} does not match the signed plan")
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
        return digest, None
    try:
        sec = entry["secure"]
        roster = [pb.KeyShare(site=k["site"], plan_sha256=bytes.fromhex(digest), public_key=keys.unb64(k["public_key"]),
                              signature=keys.unb64(k["signature"]), signer=k["signer"]) for k in sec["roster"]]
        known = {s: _site_key(s, manifest, site_keys) for s in {k.site for k in roster}}
        parties = secagg.check_roster(roster, bytes.fromhex(digest), known)
    except (KeyError, TypeError, ValueError, secagg.RosterError) as e:
        raise ReleaseError(f"{mpath}: plan {entry['plan_id']!r}: its secure-aggregation roster does not verify ({e})") from None
    if (sec.get("colluding"), sec.get("min_parties")) != (plan.secure.colluding, plan.secure.min_parties):
        raise ReleaseError(f"{mpath}: plan entry {entry['plan_id']!r} states other secure-aggregation terms than the signed plan")
    return digest, (secagg.roster_sha256(parties), len(parties), plan.secure.colluding)


def _site_key(site: str, manifest: dict[str, Any], site_keys: dict[str, Path] | None):
    return keys.load_public_key(site_keys[site]) if site_keys else keys.public_from_pem(manifest["keys"]["sites"][site])


def _groups(query: pb.MarginalQuery) -> list[list[int] | None] | None:
    """A signed marginal's groupings as the manifest states them (None when nothing is grouped)."""
    groups = [list(g.cell_group) or None for g in query.groups]
    return groups if any(groups) else None


def _verify_receipt(r: dict[str, Any], site: str, plans: dict[str, tuple], manifest: dict[str, Any],
                    site_keys: dict[str, Path] | None, mpath: Path) -> pb.BudgetReceipt:
    try:
        key = _site_key(site, manifest, site_keys)
        raw = keys.unb64(r["receipt"])
        ok = keys.verify(key, keys.unb64(r["signature"]), raw)
    except (KeyError, ValueError) as e:
        raise ReleaseError(f"{mpath}: site {site!r}: receipt or key unreadable ({e})") from None
    if not ok:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt's signature does not verify")
    rc = pb.BudgetReceipt.FromString(raw)
    digest, secure = plans.get(rc.plan_id, (None, None))
    if rc.site != site or digest != rc.plan_sha256.hex():
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt is for another site or for a plan not in this release")
    if (rc.roster_sha256, rc.parties, rc.colluding) != (secure or (b"", 0, 0)):
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt's secure-aggregation roster or terms do not match plan {rc.plan_id!r}")
    if rc.dictionary_hash != manifest["dictionary"]["hash"]:
        raise ReleaseError(f"{mpath}: site {site!r}: the receipt is for another dictionary")
    return rc
