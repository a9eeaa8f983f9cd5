"""The command line as a user meets it: README commands, site admin commands, clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo_cmd, test_cmd = readme_commands()[:2]
    assert "pip install" in demo_cmd and "ppsehr demo" in demo_cmd
    assert "pip install" in test_cmd and "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_site_status_and_audit(guards, dictionary, capsys, sign):
    from ppsehr.protos import guard_pb2 as pb

    g = guards("cleveland")
    g.stub.Answer(sign(pb.QueryPlan(plan_id="p1", coordinator="c", dictionary_hash=dictionary.hash,
                                    marginals=[pb.MarginalQuery(variables=["age"], rho=0.05)])))
    cfg = g.guard.config.source
    assert main(["site", "status", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "rho spent 0.05 of" in out and "answered" in out and "p1" in out
    assert main(["site", "audit", "--config", cfg]) == 0
    assert "audit chain intact" in capsys.readouterr().out


def test_site_check_prints_local_report(site_config, capsys):
    cfg = site_config("va")
    assert main(["site", "check", "--config", cfg.source]) == 0
    out = capsys.readouterr().out
    assert "site va: 200 records" in out and re.search(r"chol\s+56 missing", out)
    assert "privacy unit: one patient, as one table row (the site admin attests" in out


def test_bad_site_table_stops_the_guard_before_anything_is_debited(tmp_path, demo, capsys, consortium_keys):
    bad = tmp_path / "bad.data"
    lines = (demo / "data" / "processed.va.data").read_text().splitlines()
    lines[41] = lines[41].replace(",1,", ",9,", 1)  # an unmapped sex code on data row 42
    bad.write_text("\n".join(lines) + "\n")
    mapping = tmp_path / "va.toml"
    mapping.write_text((demo / "sites" / "va.toml").read_text().replace("../data/processed.va.data", str(bad)))
    cfg = write_site_config(tmp_path / "site.toml", "va", demo / "dictionary.toml", mapping, tmp_path / "state",
                            "127.0.0.1:0", 5.0, 1e-6, consortium_keys.site_keys["va"][0], [consortium_keys.coordinator_pub])
    assert main(["site", "serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.data, data row 42 (line 42), column 'sex' (variables.sex): code '9' is not mapped" in err
    assert not (tmp_path / "state" / "ledger.sqlite").exists()


def test_release_verify_command_rejects_a_non_release(tmp_path, capsys):
    assert main(["release", "verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_help_runs():
    res = subprocess.run([sys.executable, "-m", "ppsehr.deploy.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "site" in res.stdout
