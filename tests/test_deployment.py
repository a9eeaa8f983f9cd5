"""The real Flower deployment engine on loopback: SuperLink, 3 SuperNodes, 3 guard processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ppsehr.client.ledger import Ledger
from ppsehr.client.config import load_site_config
from ppsehr.deploy.local import LocalConsortium
from ppsehr.server.federation import RunFailed
from ppsehr.server.release.bundle import verify_release

pytestmark = pytest.mark.deployment
SITES = ("cleveland", "hungarian", "va")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    c = LocalConsortium(tmp_path_factory.mktemp("consortium"), sites=SITES, lifetime_epsilon=3.0)
    with c:
        yield c


def ledger_totals(c):
    out = {}
    for site in SITES:
        cfg = load_site_config(c.site_config(site))
        out[site] = Ledger(cfg.ledger_path, cfg.rho_limit, site).spent()
    return out


def test_releases_over_flower_match_the_ledgers(consortium, tmp_path):
    events = []
    final = consortium.release(tmp_path / "r1", epsilon=1.0, seed=11, on_event=events.append)
    m1 = verify_release(final["out"])
    # every site allows secure sums: used; after small per-site tables (plain), the 1-way tables too, since at
    # epsilon 1 the demo's sites differ too little for the noise per-site tables would add
    assert ["secure" in p for p in m1["plans"]] == [False, True, True, True]
    assert set(m1["sites"]) == set(SITES) and m1["sites_not_included"] == []
    assert any(e["stage"] == "aggregate" for e in events)
    totals = ledger_totals(consortium)
    for site in SITES:
        assert m1["sites"][site]["rho_total"] == pytest.approx(totals[site], rel=1e-12)
    # a second release, with secure aggregation required (Enroll, then Answer with the roster, over Flower),
    # spends more, and the manifest says so
    m2 = verify_release(consortium.release(tmp_path / "r2", epsilon=1.0, seed=12, secure_aggregation=True)["out"])
    totals2 = ledger_totals(consortium)
    assert [p["secure"]["roster"] and len(p["secure"]["roster"]) for p in m2["plans"] if "secure" in p] == [len(SITES)] * 3
    for site in SITES:
        assert totals2[site] > totals[site]
        assert m2["sites"][site]["rho_total"] == pytest.approx(totals2[site], rel=1e-12)
        assert m2["sites"][site]["rho_if_others_collude"] > m2["sites"][site]["rho"]
    # beyond the lifetime budget: every guard refuses, nothing is debited, no release is written
    with pytest.raises(RunFailed, match="OVER_BUDGET"):
        consortium.release(tmp_path / "r3", epsilon=3.0)
    assert ledger_totals(consortium) == totals2
    assert not (tmp_path / "r3").exists()


def test_coordinator_cli_runs_an_adaptive_release_over_the_secure_superlink(consortium, tmp_path):
    """What a coordinator types (no strategy flags): three signed rounds over TLS + node auth, receipts for
    each, verify passes."""
    from ppsehr.deploy.local import demo_dir

    before = ledger_totals(consortium)
    k = consortium.keys
    out = tmp_path / "rel"
    cmd = [sys.executable, "-m", "ppsehr.deploy.cli", "coordinator", "release", "--dictionary",
           str(demo_dir() / "dictionary.toml"), "--out", str(out), "--superlink", consortium.control_address,
           "--root-certificates", str(k.tls.ca_cert), "--signing-key", str(k.coordinator_key),
           "--epsilon", "1.5", "--min-sites", str(len(SITES)), "--seed", "3",
           *[a for s in SITES for a in ("--site-key", f"{s}={k.site_keys[s][1]}")]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "round 3" in res.stderr  # progress goes to stderr, results to stdout
    assert "release written to" in res.stdout
    m = verify_release(out, coordinator_key=k.coordinator_pub, site_keys={s: k.site_keys[s][1] for s in SITES})
    assert len(m["plans"]) >= 3  # small per-site tables, 1-way tables, (candidates,) selected tables
    after = ledger_totals(consortium)
    for site in SITES:
        assert m["sites"][site]["plans"] == len(m["plans"])
        assert m["sites"][site]["rho"] == pytest.approx(after[site] - before[site], rel=1e-9)


def test_a_misspelled_site_key_over_flower_costs_nobody_anything(consortium, tmp_path):
    """The measured failure of issue 13: `--site-key wset=...` for `west` got West charged twice and its
    summaries rejected. Now the identity check stops the run before any paid plan."""
    before = ledger_totals(consortium)
    k = consortium.keys
    typo = {("clevland" if s == "cleveland" else s): str(k.site_keys[s][1]) for s in SITES}
    with pytest.raises(RunFailed, match=r"site 'cleveland' \(node \d+\) answered, but no --site-key is given for it; "
                                        r"its key ed25519:\w+ is given as --site-key 'clevland' \(did you mean 'cleveland'\?\)"):
        consortium.release(tmp_path / "typo", epsilon=0.5, site_keys=typo)
    assert ledger_totals(consortium) == before  # nobody was charged
    assert not (tmp_path / "typo").exists()


def test_a_dead_guard_is_reported_and_not_charged(consortium, tmp_path):
    before = ledger_totals(consortium)
    guard = next(p for p in consortium.group.procs if p.name == "guard-va")
    os.kill(guard.pid, signal.SIGKILL)
    guard.popen.wait(timeout=10)
    m = verify_release(consortium.release(tmp_path / "r4", epsilon=0.5, seed=13)["out"])
    assert set(m["sites"]) == {"cleveland", "hungarian"}
    missing = m["sites_not_included"]
    # its node gave no signed identity before the first paid plan (GUARD_UNAVAILABLE): it is sent nothing paid
    assert [(x["round"], x["code"]) for x in missing] == [(p["round"], "NOT_VERIFIED") for p in m["plans"]]
    assert len(m["plans"]) == 2  # 1-ways, selected: two small sites at epsilon 0.5 buy no candidates
    assert all("GUARD_UNAVAILABLE" in x["message"] and x["charged"].startswith("no ") for x in missing)
    assert ledger_totals(consortium)["va"] == before["va"]


def _flower_processes():
    """Live (not zombie) Flower and demo processes, by PID."""
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout.splitlines()
    out = set()
    for line in ps:
        pid, stat, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (line, "", "")
        if not stat.startswith("Z") and ("flower-super" in args or "flwr-" in args or "site serve" in args):
            out.add((int(pid), args))
    return out


def test_demo_command_end_to_end(tmp_path):
    """`VENV/bin/ppsehr demo` as an installed tool is run: the environment is not activated, so
    the interpreter's scripts directory (where Flower's executables are) is not on PATH."""
    from pathlib import Path

    out = tmp_path / "release"
    before = _flower_processes()
    scripts = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != scripts)
    res = subprocess.run([str(scripts / "ppsehr"), "demo", "--json", "--out", str(out), "--seed", "5"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, PATH=path))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert set(summary["sites"]) == {"cleveland", "hungarian", "switzerland", "va"}
    verify_release(out)
    assert _flower_processes() <= before  # every process the demo started is gone


def test_an_unregistered_supernode_cannot_join(consortium, tmp_path):
    """A SuperNode with a fresh, unregistered key (or none) is refused by the TLS SuperLink."""
    from ppsehr.common.keys import new_supernode_key
    from ppsehr.common.procs import flower_env

    rogue_key, _ = new_supernode_key(tmp_path, "rogue")
    rogue = consortium.start_supernode("va", rogue_key, name="supernode-rogue")
    keyless = consortium.start_supernode("va", None, name="supernode-keyless")
    for proc, text in ((rogue, "Failed to activate SuperNode"), (keyless, "must be registered")):
        assert proc.popen.wait(timeout=90) != 0, proc.tail()
        assert text in proc.tail(50)
    listed = subprocess.run(["flwr", "supernode", "list", consortium.connection, "--format", "json"], capture_output=True,
                            text=True, timeout=120, env=flower_env(consortium.flwr_home))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout)["nodes"]) == len(SITES)  # only the registered sites' nodes


def test_a_guard_killed_after_enrolling_is_recovered_over_flower(tmp_path):
    """Four sites (one dropout tolerated by default): va's guard dies after enrolling in round 2. The
    others confirm who answered and reveal over Flower (query.confirm, query.reveal), the sum is read
    over them, and the release verifies (issue #16.2)."""
    from ppsehr.deploy.local import DEMO_SITES

    killed = []
    with LocalConsortium(tmp_path / "four", sites=DEMO_SITES, lifetime_epsilon=3.0) as c:
        guard = next(p for p in c.group.procs if p.name == "guard-va")

        def on_event(e):
            if not killed and e.get("message", "").startswith("round 2:") and "enrolled for the secure sum" in e["message"]:
                os.kill(guard.pid, signal.SIGKILL)
                killed.append(True)

        m = verify_release(c.release(tmp_path / "r", epsilon=1.0, seed=5, on_event=on_event,
                                     secure_aggregation=True, dropouts=1)["out"])
    assert killed
    rec = m["plans"][1]["secure"]["recovery"]
    assert (rec["dropped"], rec["recovered"], rec["revealed_by"]) == (["va"], True, ["cleveland", "hungarian", "switzerland"])
    assert not any(f["code"] == "SUM_INCOMPLETE" for f in m["sites_not_included"])
    assert m["privacy"]["rho_charged_for_nothing_max"] == 0
