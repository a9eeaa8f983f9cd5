"""A consortium on several hosts: the coordinator and each site in their own network namespace.

Deployed as a real deployment is, with the commands deploy/README.md gives: `ppsehr keys init`
with a TLS certificate for the coordinator host's addresses, `ppsehr site serve` per hospital,
`flower-superlink` with TLS and SuperNode authentication, `flwr supernode register`, one
authenticated `flower-supernode` per hospital, and `ppsehr coordinator release`. The hosts are
joined by point-to-point links (veth pairs) on addresses private to this test. Mid-release, after
round 1, one hospital's link is cut: the release goes on with the others, verifies, and every
site's ledger holds exactly what the manifest says it spent (or the manifest says it cannot know).

Needs root and `ip netns` (iproute2); skipped where network namespaces are unavailable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppsehr.client.config import load_site_config
from ppsehr.client.ledger import Ledger
from ppsehr.common.keys import init_consortium
from ppsehr.common.procs import ProcessGroup, flower_env
from ppsehr.deploy.local import demo_dir, write_site_config
from ppsehr.server.federation import write_flwr_home
from ppsehr.server.release.bundle import verify_release

pytestmark = pytest.mark.deployment
SITES = ("cleveland", "hungarian", "va")
CUT = "va"  # the site whose link goes down after round 1
NET = "10.231"  # link k: coordinator 10.231.k.1, site 10.231.k.2 (only inside this test's namespaces)
CONTROL, FLEET, GUARD, NODE = 9093, 9092, 50051, 9094


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _netns_available() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"ppsehr-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (RuntimeError, OSError) as e:
        return f"network namespaces unavailable: {e}"
    return None


@pytest.fixture(scope="module")
def hosts():
    """{"coordinator": netns, site: netns, ...}; the links are named c<k> (coordinator side) and s<k>."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    tag = f"pp{os.getpid() % 100000}"
    names = {"coordinator": f"{tag}-coord"} | {s: f"{tag}-{k}" for k, s in enumerate(SITES, 1)}
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for k, site in enumerate(SITES, 1):
            c, s = f"{tag}c{k}", f"{tag}s{k}"
            _ip("link", "add", c, "type", "veth", "peer", "name", s)
            _ip("link", "set", c, "netns", names["coordinator"])
            _ip("link", "set", s, "netns", names[site])
            _ip("-n", names["coordinator"], "addr", "add", f"{NET}.{k}.1/24", "dev", c)
            _ip("-n", names[site], "addr", "add", f"{NET}.{k}.2/24", "dev", s)
            _ip("-n", names["coordinator"], "link", "set", c, "up")
            _ip("-n", names[site], "link", "set", s, "up")
        yield names | {"_tag": tag}
    finally:
        for ns in names.values():  # deleting a namespace deletes its end of each link, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _wait_port(ns: str, port: int, proc, timeout: float = 90) -> None:
    """Wait until 127.0.0.1:port accepts connections inside namespace `ns`."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail(40)}")
        if subprocess.run(_in(ns, [sys.executable, "-c", probe]), capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name}: nothing listens on port {port} in {ns} after {timeout:g} s:\n{proc.tail(40)}")


def _spent(config: Path) -> float:
    cfg = load_site_config(config)
    return Ledger(cfg.ledger_path, cfg.rho_limit, cfg.site).spent()


def test_release_across_hosts_survives_a_cut_link(hosts, tmp_path):
    coord = hosts["coordinator"]
    demo = demo_dir()
    keys = init_consortium(tmp_path / "keys", list(SITES), [f"{NET}.{k}.1" for k in range(1, len(SITES) + 1)] + ["127.0.0.1"])
    home = write_flwr_home(tmp_path / "flwr-home", "consortium", f"127.0.0.1:{CONTROL}", str(keys.tls.ca_cert))
    env = flower_env(home)
    group = ProcessGroup(tmp_path / "logs")
    configs = {}
    try:
        for site in SITES:
            configs[site] = write_site_config(
                tmp_path / "sites" / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                tmp_path / "state" / site, f"127.0.0.1:{GUARD}", 10.0, 1e-6, keys.site_keys[site][0], [keys.coordinator_pub])
        guards = {s: group.start(f"guard-{s}", _in(hosts[s], [sys.executable, "-m", "ppsehr.deploy.cli", "site", "serve",
                                                             "--config", str(configs[s])]), env=env) for s in SITES}
        superlink = group.start("superlink", _in(coord, [
            "flower-superlink", "--ssl-ca-certfile", str(keys.tls.ca_cert), "--ssl-certfile", str(keys.tls.server_cert),
            "--ssl-keyfile", str(keys.tls.server_key), "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", str(CONTROL), "--fleet-api-address", f"0.0.0.0:{FLEET}", "--disable-runtime-dependency-installation"]),
            env=env)
        _wait_port(coord, CONTROL, superlink)
        _wait_port(coord, FLEET, superlink)
        for site in SITES:
            _wait_port(hosts[site], GUARD, guards[site])
            reg = subprocess.run(_in(coord, ["flwr", "supernode", "register", str(keys.supernode_keys[site][1]),
                                             "consortium"]), env=env, capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for k, site in enumerate(SITES, 1):
            group.start(f"supernode-{site}", _in(hosts[site], [
                "flower-supernode", "--root-certificates", str(keys.tls.ca_cert),
                "--auth-supernode-private-key", str(keys.supernode_keys[site][0]), "--superlink", f"{NET}.{k}.1:{FLEET}",
                "--host", "127.0.0.1", "--port", str(NODE),
                "--node-config", f'guard-address="127.0.0.1:{GUARD}" site="{site}"']), env=env)

        out = tmp_path / "release"
        release = group.start("coordinator-release", _in(coord, [
            sys.executable, "-m", "ppsehr.deploy.cli", "coordinator", "release", "--dictionary",
            str(demo / "dictionary.toml"), "--out", str(out), "--superlink", f"127.0.0.1:{CONTROL}",
            "--root-certificates", str(keys.tls.ca_cert), "--signing-key", str(keys.coordinator_key),
            "--epsilon", "1", "--seed", "4", "--min-sites", str(len(SITES)), "--reply-timeout", "45",
            "--job-dir", str(tmp_path / "job"), *[a for s in SITES for a in ("--site-key", f"{s}={keys.site_keys[s][1]}")]]),
            env=env)
        events = tmp_path / "job" / "events.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and '"stage": "plan", "message": "round 2' not in (
                events.read_text() if events.exists() else ""):
            assert release.popen.poll() is None, release.tail(60)
            time.sleep(0.05)
        assert events.exists() and "round 2" in events.read_text(), release.tail(60)
        k = SITES.index(CUT) + 1
        _ip("-n", coord, "link", "set", f"{hosts['_tag']}c{k}", "down")  # the hospital's line goes dead
        assert release.popen.wait(timeout=400) == 0, release.tail(80)
    finally:
        group.stop()

    m = verify_release(out, coordinator_key=keys.coordinator_pub, site_keys={s: keys.site_keys[s][1] for s in SITES})
    assert set(m["sites"]) == set(SITES)  # everyone answered round 1
    later = sorted({p["round"] for p in m["plans"]} - {1})
    assert later and m["sites"][CUT]["plans"] == 1
    assert all(m["sites"][s]["plans"] == 1 + len(later) for s in SITES if s != CUT)
    cut_entries = [f for f in m["sites_not_included"] if f.get("site") == CUT]
    assert sorted(f["round"] for f in cut_entries) == later, m["sites_not_included"]
    # nothing lost or overspent: each ledger holds what the manifest's receipts say, or, where a plan
    # reached the guard and the answer was lost on the dead line, the manifest says it cannot know
    for site in SITES:
        ledger, stated = _spent(configs[site]), m["sites"][site]["rho_total"]
        if site == CUT and ledger > stated * (1 + 1e-12):
            assert any(f["charged"].startswith("unknown") for f in cut_entries), cut_entries
        else:
            assert ledger == pytest.approx(stated, rel=1e-12), site
