"""Release bundles: written whole or not at all, and verifiable by anyone who has one.

A release is a directory with the synthetic records, the DP aggregates they came from, a
fidelity report and `manifest.json` (dictionary, plan, per-site privacy spending and receipts,
generator settings, and the SHA-256 of every other file). It is assembled in a temporary
sibling directory and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..common import accounting
from ..common.errors import ReleaseError

MANIFEST = "manifest.json"
FORMAT = "ppsehr-release/1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_release(out: str | Path, files: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    """Write files + manifest (with their hashes) atomically to `out`, which must not exist yet."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for rel, data in files.items():
            if rel == MANIFEST or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ReleaseError(f"bad release file name {rel!r}")
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(path, data)
        manifest = dict(manifest, format=FORMAT, files={rel: sha256(d) for rel, d in sorted(files.items())})
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n")
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


def verify_release(path: str | Path) -> dict[str, Any]:
    """Check file hashes and that each site's stated epsilon follows from its receipted rho.

    Returns the manifest; raises ReleaseError naming the first problem found.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ReleaseError(f"{path}: no {MANIFEST}; not a release directory") from None
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ReleaseError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise ReleaseError(f"{f}: listed in the manifest but missing")
        if sha256(f.read_bytes()) != digest:
            raise ReleaseError(f"{f}: SHA-256 does not match the manifest")
    listed = set(manifest.get("files", {})) | {MANIFEST}
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in listed)
    if extra:
        raise ReleaseError(f"{path}: files not covered by the manifest: {extra}")
    delta = manifest["privacy"]["delta"]
    receipts = {r["site"]: r for r in manifest.get("receipts", [])}
    for site, s in manifest["sites"].items():
        r = receipts.get(site)
        if r is None:
            raise ReleaseError(f"{path / MANIFEST}: site {site!r} has no receipt")
        if not math.isclose(r["rho_debited"], s["rho"], rel_tol=1e-9) or not math.isclose(r["rho_spent_total"], s["rho_total"], rel_tol=1e-9):
            raise ReleaseError(f"{path / MANIFEST}: site {site!r}: stated rho does not match its receipt")
        for key, rho in (("epsilon", s["rho"]), ("epsilon_total", s["rho_total"])):
            if not math.isclose(accounting.epsilon(rho, delta), s[key], rel_tol=1e-6):
                raise ReleaseError(f"{path / MANIFEST}: site {site!r}: {key} {s[key]} does not follow from rho {rho} at delta {delta}")
    return manifest
