"""`ppsehr site doctor`: check a site's configuration before it goes live, and say how to fix each failure.

Run it as the guard's own user (e.g. `sudo -u ppsehr-guard ppsehr site doctor --config site.toml`):
readability is checked for whoever runs it. Checks, in order:

- config: the site configuration parses (then the dictionary and the mapping load);
- data: the mapping's data file(s) exist, are readable, and give group/other no access at all;
- mapping: the data load through the mapping against the dictionary (what the guard does at start),
  with the patient as the privacy unit: a source whose patients' rows are not bounded fails here;
- signing key: present, mode 0600 (or stricter), an Ed25519 private key;
- coordinator keys: every allowlisted coordinator public key loads;
- ledger: the state directory is (or can be made) writable, not open to group/other; an existing
  ledger opens and its audit chain is intact;
- listen: the guard's address is loopback or a private interface (it serves gRPC without TLS);
- superlink (optional): the coordinator's SuperLink Fleet API accepts a TCP connection.

Nothing here reads more than the guard itself would, and nothing is printed from the data.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..common import privacy_unit
from ..common.errors import PpsehrError

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL | SKIP
    detail: str
    fix: str = ""


def _mode_open_to_others(path: Path) -> int:
    """Permission bits that give group or other any access."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def _owner_fix(path: Path, mode: str) -> str:
    return f"chmod {mode} {path}; chown <guard user> {path} (only the guard's user may read it)"


def check_data(paths: list[Path]) -> Check:
    problems, fixes = [], []
    for p in paths:
        if not p.exists():
            return Check("data", FAIL, f"{p} does not exist", "point [source] path in the mapping at the site table")
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in [p, *files] if p.is_dir() else files:
            if not os.access(f, os.R_OK | (os.X_OK if f.is_dir() else 0)):
                problems.append(f"{f} is not readable by this user (uid {os.geteuid()})")
                fixes.append(f"run doctor as the guard's user; give that user ownership: chown <guard user> {f}")
            elif _mode_open_to_others(f):
                problems.append(f"{f} has mode {stat.S_IMODE(f.stat().st_mode):04o}: group/other can access it")
                fixes.append(_owner_fix(f, "0700" if f.is_dir() else "0600"))
    if problems:
        return Check("data", FAIL, "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    return Check("data", OK, f"{', '.join(map(str, paths))}: readable by this user only (no group/other access)")


def check_signing_key(path: Path) -> Check:
    from ..common.keys import load_signing_key

    if not path.exists():
        return Check("signing key", FAIL, f"{path} not found",
                     "create the site's key with `ppsehr keys init` (or copy it from where it was made) and set "
                     "[trust] signing_key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("signing key", FAIL, f"{path} has mode {mode:04o}: group/other can read the site's private key",
                     _owner_fix(path, "0600"))
    try:
        load_signing_key(path)
    except PpsehrError as e:
        return Check("signing key", FAIL, str(e), "use the Ed25519 PEM private key written by `ppsehr keys init`")
    return Check("signing key", OK, f"{path}: Ed25519 private key, mode {mode:04o}")


def check_coordinator_keys(paths: tuple[Path, ...]) -> Check:
    from ..common.keys import fingerprint, load_public_key

    found = []
    for p in paths:
        try:
            found.append(f"{p.name} ({fingerprint(load_public_key(p))})")
        except PpsehrError as e:
            return Check("coordinator keys", FAIL, str(e),
                         "get the coordinator's public key (PEM) over a trusted channel, compare its fingerprint, "
                         "and list it in [trust] coordinators")
    return Check("coordinator keys", OK, f"{len(found)} allowlisted: {', '.join(found)}")


def check_secure_aggregation(sa) -> Check:
    """The peers' keys a site masks with, if it joins secure sums."""
    from ..common.keys import fingerprint, load_public_key

    if sa is None:
        return Check("secure aggregation", OK, "not joined: secure plans are refused at no cost")
    found = []
    for site, path in sorted(sa.peers.items()):
        try:
            found.append(f"{site} ({fingerprint(load_public_key(path))})")
        except PpsehrError as e:
            return Check("secure aggregation", FAIL, str(e),
                         f"get {site}'s signing public key (PEM) over a trusted channel, compare its fingerprint, "
                         "and list it in [secure_aggregation] peers")
    return Check("secure aggregation", OK, f"joins sums of at least {sa.min_parties} sites, assuming up to "
                 f"{sa.assume_colluding} colluding; peers: {', '.join(found)}")


def check_ledger(state_dir: Path, ledger_path: Path, rho_limit: float, site: str) -> Check:
    existing = state_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != state_dir:
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check("ledger", FAIL, f"{state_dir} does not exist and {existing} is not writable by this user",
                         f"mkdir -m 0700 {state_dir}; chown <guard user> {state_dir}")
        return Check("ledger", OK, f"{state_dir} will be created (mode 0700) by the guard on first start")
    try:
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("ledger", FAIL, f"cannot write in {state_dir}: {e.strerror}",
                     f"chown <guard user> {state_dir}; chmod 0700 {state_dir}")
    if _mode_open_to_others(state_dir):
        return Check("ledger", FAIL, f"{state_dir} has mode {stat.S_IMODE(state_dir.stat().st_mode):04o}: others can "
                                     "reach the ledger and audit log", _owner_fix(state_dir, "0700"))
    if ledger_path.exists():
        from .ledger import Ledger

        try:
            ledger = Ledger(ledger_path, rho_limit, site)
            broken = ledger.verify_audit()
            spent = ledger.spent()
        except PpsehrError as e:
            return Check("ledger", FAIL, str(e), "restore the ledger from its backup; never delete it (it holds the "
                                                 "lifetime budget)")
        if broken is not None:
            return Check("ledger", FAIL, f"{ledger_path}: audit chain broken at entry #{broken}",
                         "investigate (`ppsehr site audit`), then restore the ledger from a backup")
        return Check("ledger", OK, f"{ledger_path}: opens, audit chain intact, rho spent {spent:.6g} of {rho_limit:.6g}")
    return Check("ledger", OK, f"{state_dir} is writable; the ledger is created on first start")


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); ValueError if malformed."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def check_listen(address: str) -> Check:
    fix = ("listen on 127.0.0.1 (SuperNode on the same host, the recommended layout) or on a private interface "
           "that only the SuperNode host can reach; set [site] listen")
    try:
        host, port = split_address(address)
    except ValueError as e:
        return Check("listen", FAIL, str(e), fix)
    if host == "localhost":
        return Check("listen", OK, f"{address}: loopback")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Check("listen", WARN, f"{address}: {host!r} is a host name; it cannot be checked without resolving it",
                     "use an IP address: 127.0.0.1, or the private address of the interface the SuperNode uses")
    if ip.is_loopback:
        return Check("listen", OK, f"{address}: loopback")
    if ip.is_unspecified:
        return Check("listen", FAIL, f"{address}: every interface; the guard serves gRPC without TLS", fix)
    if ip.is_private and not ip.is_link_local:
        return Check("listen", OK, f"{address}: private address; firewall it so only the SuperNode host connects")
    return Check("listen", FAIL, f"{address}: {ip} is not a loopback or private address", fix)


def check_superlink(address: str, timeout: float = 3.0) -> Check:
    fix = ("check the address and port (the SuperLink's --fleet-api-address, 9092 by default), DNS, and that the "
           "hospital's egress firewall allows this host to reach it")
    try:
        host, port = split_address(address)
    except ValueError as e:
        return Check("superlink", FAIL, str(e), fix)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        return Check("superlink", FAIL, f"cannot connect to {address}: {e.strerror or e}", fix)
    return Check("superlink", OK, f"{address} accepts TCP connections")


def diagnose(config_path: str | Path, superlink: str | None = None, timeout: float = 3.0) -> list[Check]:
    """Run every check; later checks that depend on an earlier failure are SKIP."""
    from ..common.dictionary import load_dictionary
    from ..common.mapping import load_mapping
    from ..common.source import load_site_table
    from .config import load_site_config

    checks: list[Check] = []

    def run(name: str, fn: Callable[[], Any], fix: str) -> Any:
        try:
            return fn()
        except (PpsehrError, OSError) as e:
            checks.append(Check(name, FAIL, str(e), fix))
            return None

    cfg = run("config", lambda: load_site_config(config_path), f"fix {config_path} (see docs/operations.md)")
    if cfg is None:
        return checks + [Check(n, SKIP, "needs a valid configuration") for n in
                         ("data", "mapping", "signing key", "coordinator keys", "ledger", "listen")]
    dictionary = run("config", lambda: load_dictionary(cfg.dictionary),
                     f"[site] dictionary in {config_path} must name the consortium's dictionary.toml")
    mapping = dictionary and run("config", lambda: load_mapping(cfg.mapping, dictionary),
                                 f"fix the mapping {cfg.mapping} (see docs/dictionary.md)")
    if mapping:
        checks.append(Check("config", OK, f"site {cfg.site}: {config_path}, dictionary {dictionary.name} "
                                          f"{dictionary.version}, mapping {cfg.mapping}"))
        checks.append(check_data([Path(p) for p in mapping.data_paths]))  # table files, a database, or an OMOP CDM
        table = run("mapping", lambda: load_site_table(mapping, dictionary),
                    "fix the mapping or the data at the place named (`ppsehr site check` prints a full report); a "
                    "patient with several rows needs a reduce rule per variable, or [source] rows_per_patient = k "
                    "(docs/dictionary.md)")
        if table is not None:
            t, report = table
            rows = f" from {report.source_rows} rows" if report.source_rows is not None else ""
            checks.append(Check("mapping", OK, f"{t.n_rows} records{rows} load into {len(dictionary.variables)} "
                                               f"dictionary variables; privacy unit: "
                                               f"{privacy_unit.describe(t.unit, t.rows_per_patient)}"))
    else:
        checks += [Check("data", SKIP, "needs a valid mapping"), Check("mapping", SKIP, "needs a valid mapping")]
    checks.append(check_signing_key(cfg.signing_key))
    checks.append(check_coordinator_keys(cfg.coordinator_keys))
    checks.append(check_secure_aggregation(cfg.secure_aggregation))
    checks.append(check_ledger(cfg.state_dir, cfg.ledger_path, cfg.rho_limit, cfg.site))
    checks.append(check_listen(cfg.listen))
    if superlink:
        checks.append(check_superlink(superlink, timeout))
    if os.geteuid() == 0:
        checks.append(Check("user", WARN, "running as root: root can read everything, so the readability checks "
                                          "say nothing about the guard's user",
                            "run as the guard's user: sudo -u <guard user> ppsehr site doctor --config ..."))
    return checks


def report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]}


def to_text(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<16} {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"      {'':<16} fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    lines.append("ready to go live" if not failed else f"{failed} check(s) failed: not ready")
    return "\n".join(lines)
