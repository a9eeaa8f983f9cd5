"""`ppsehr site doctor`: every check passes on a good site and explains what is wrong on a bad one."""

from __future__ import annotations

import json
import os
import socket

import pytest

from ppsehr.client.doctor import FAIL, OK, SKIP, WARN, check_listen, check_superlink, diagnose
from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config


@pytest.fixture
def site(tmp_path, demo, consortium_keys):
    """A site set up the way deploy/README.md says: data 0600, state 0700, key 0600, guard on loopback."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    table = data / "va.data"
    table.write_bytes((demo / "data" / "processed.va.data").read_bytes())
    table.chmod(0o600)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text((demo / "sites" / "va.toml").read_text().replace("../data/processed.va.data", str(table)))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = write_site_config(tmp_path / "site.toml", "va", demo / "dictionary.toml", mapping, state,
                               "127.0.0.1:50051", 10.0, 1e-6, consortium_keys.site_keys["va"][0],
                               [consortium_keys.coordinator_pub],
                               peers={p: consortium_keys.site_keys[p][1] for p in ("cleveland", "hungarian")})
    return {"config": config, "table": table, "mapping": mapping, "state": state, "tmp": tmp_path}


def by_name(checks):
    out = {}
    for c in checks:
        out.setdefault(c.name, c)
    return out


def test_a_good_site_is_ready(site, capsys):
    checks = by_name(diagnose(site["config"]))
    for name in ("config", "data", "mapping", "signing key", "coordinator keys", "secure aggregation", "ledger", "listen"):
        assert checks[name].status == OK, checks[name]
    assert "200 rows" in checks["mapping"].detail
    assert main(["site", "doctor", "--config", str(site["config"])]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("ready to go live") and "FAIL" not in out
    if os.geteuid() == 0:
        assert checks["user"].status == WARN


def _copy_key(site, consortium_keys, mode):
    key = site["tmp"] / "keys" / "site.key"
    key.parent.mkdir()
    key.write_bytes(consortium_keys.site_keys["va"][0].read_bytes())
    key.chmod(mode)
    text = site["config"].read_text().replace(str(consortium_keys.site_keys["va"][0]), str(key))
    site["config"].write_text(text)


def _edit_config(site, old, new):
    site["config"].write_text(site["config"].read_text().replace(old, new))


@pytest.mark.parametrize("breakage, name, detail, fix", [
    (lambda s, k: s["table"].chmod(0o644), "data", "mode 0644: group/other can access it", "chmod 0600"),
    (lambda s, k: s["table"].unlink(), "data", "does not exist", "[source] path"),
    (lambda s, k: s["table"].write_text(s["table"].read_text().replace(",1,", ",7,", 1)), "mapping",
     "data row 1 (line 1), column 'sex' (variables.sex): code '7' is not mapped", "ppsehr site check"),
    (lambda s, k: _copy_key(s, k, 0o640), "signing key", "mode 0640: group/other can read", "chmod 0600"),
    (lambda s, k: _copy_key(s, k, 0o600) or (s["tmp"] / "keys" / "site.key").write_text("junk"), "signing key",
     "PEM private key", "ppsehr keys init"),
    (lambda s, k: _edit_config(s, str(k.coordinator_pub), str(s["mapping"])), "coordinator keys",
     "not a PEM public key", "fingerprint"),
    (lambda s, k: _edit_config(s, str(k.site_keys["cleveland"][1]), str(s["mapping"])), "secure aggregation",
     "not a PEM public key", "[secure_aggregation] peers"),
    (lambda s, k: s["state"].chmod(0o755), "ledger", "mode 0755: others can reach the ledger", "chmod 0700"),
    (lambda s, k: _edit_config(s, "127.0.0.1:50051", "0.0.0.0:50051"), "listen", "every interface", "127.0.0.1"),
    (lambda s, k: _edit_config(s, "127.0.0.1:50051", "8.8.8.8:50051"), "listen", "not a loopback or private", "private"),
    (lambda s, k: _edit_config(s, "127.0.0.1:50051", "127.0.0.1:0"), "listen", "port from 1 to 65535", "[site] listen"),
])
def test_each_problem_is_named_with_a_fix(site, consortium_keys, capsys, breakage, name, detail, fix):
    breakage(site, consortium_keys)
    checks = by_name(diagnose(site["config"]))
    assert checks[name].status == FAIL and detail in checks[name].detail and fix in checks[name].fix
    assert [c.name for c in diagnose(site["config"]) if c.status == FAIL] == [name] + (["mapping"] if detail == "does not exist" else [])
    assert main(["site", "doctor", "--config", str(site["config"]), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and any(c["name"] == name and c["status"] == FAIL for c in report["checks"])


def test_a_broken_config_skips_what_depends_on_it(site):
    site["config"].write_text("[site\nid = 'va'\n")
    checks = diagnose(site["config"])
    assert checks[0].name == "config" and checks[0].status == FAIL and "not valid TOML" in checks[0].detail
    assert {c.status for c in checks[1:] if c.name != "user"} == {SKIP}


def test_an_existing_ledger_is_opened_and_its_chain_checked(site, demo, consortium_keys):
    from ppsehr.client.config import load_site_config
    from ppsehr.client.ledger import Ledger

    cfg = load_site_config(site["config"])
    ledger = Ledger(cfg.ledger_path, cfg.rho_limit, cfg.site)
    ledger.debit("plan-1", "coord", b"\0" * 32, 0.25, {})
    assert "rho spent 0.25 of" in by_name(diagnose(site["config"]))["ledger"].detail
    import sqlite3

    db = sqlite3.connect(cfg.ledger_path)
    db.execute("UPDATE audit SET detail = 'edited' WHERE seq = (SELECT MIN(seq) FROM audit)")
    db.commit()
    db.close()
    check = by_name(diagnose(site["config"]))["ledger"]
    assert check.status == FAIL and "audit chain broken" in check.detail


@pytest.mark.parametrize("address, status", [("127.0.0.1:1", OK), ("[::1]:50051", OK), ("localhost:9", OK),
                                             ("10.20.0.5:50051", OK), ("192.168.1.7:50051", OK),
                                             ("[::]:50051", FAIL), ("169.254.1.1:50051", FAIL),
                                             ("guard.example:50051", WARN), ("nonsense", FAIL)])
def test_listen_addresses(address, status):
    assert check_listen(address).status == status


def test_superlink_reachability(site, capsys):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        assert check_superlink(f"127.0.0.1:{port}").status == OK
        assert main(["site", "doctor", "--config", str(site["config"]), "--superlink", f"127.0.0.1:{port}"]) == 0
        assert f"127.0.0.1:{port} accepts TCP connections" in capsys.readouterr().out
    finally:
        server.close()
    check = check_superlink(f"127.0.0.1:{port}", timeout=1)
    assert check.status == FAIL and "cannot connect" in check.detail and "--fleet-api-address" in check.fix


def test_a_data_folder_is_checked_file_by_file(tmp_path):
    """An OMOP CDM export is a folder of CSV files: the folder and every file must be closed to others."""
    from ppsehr.client.doctor import check_data

    cdm = tmp_path / "cdm"
    cdm.mkdir(mode=0o700)
    for name in ("person.csv", "measurement.csv"):
        (cdm / name).write_text("x\n")
        (cdm / name).chmod(0o600)
    assert check_data([cdm]).status == OK
    (cdm / "measurement.csv").chmod(0o640)
    cdm.chmod(0o755)
    check = check_data([cdm])
    assert check.status == FAIL and "measurement.csv has mode 0640" in check.detail and "cdm has mode 0755" in check.detail
    assert "person.csv" not in check.detail and "chmod 0700" in check.fix and "chmod 0600" in check.fix
