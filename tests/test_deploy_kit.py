"""deploy/: systemd units, compose files and Dockerfile are valid and say what deploy/README.md promises."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from ppsehr.common.procs import flower_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = {name: DEPLOY / "systemd" / f"{name}.service" for name in ("flower-superlink", "flower-supernode", "ppsehr-guard")}
VENV_BIN = "/opt/ppsehr/venv/bin/"
TLS_SUPERLINK = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--fleet-api-address", "--host", "--port", "--database"}
TLS_SUPERNODE = {"--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config", "--host",
                 "--port"}
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "PrivateDevices": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes", "UMask": "0077"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat; backslash continues a line)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = re.sub(r"\\\n\s*", " ", path.read_text())
    for n, line in enumerate(logical.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path}:{n}: bad section header"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path}:{n}: not KEY=VALUE in a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@lru_cache(maxsize=None)
def help_flags(program: str) -> frozenset[str]:
    """Every --flag the installed Flower program documents in its --help."""
    exe = shutil.which(program)
    assert exe, f"{program} is not installed (it comes with flwr==1.39.0)"
    out = subprocess.run([exe, "--help"], env=flower_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


def flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def node_config(value: str) -> dict[str, str]:
    """Flower's --node-config 'key="value" key2="value2"' as a dict."""
    return {k: tomllib.loads(f"v = {v}")["v"] for k, v in (item.split("=", 1) for item in shlex.split(value, posix=False))}


@pytest.fixture(scope="module")
def units():
    return {name: parse_unit(path) for name, path in UNITS.items()}


def exec_start(unit, key="ExecStart") -> list[str]:
    [line] = unit["Service"][key]
    return shlex.split(line)


def environment(values: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for v in values for item in shlex.split(v))


# ----------------------------------------------------------------------------- systemd
def test_units_run_flower_with_real_flags_and_tls(units):
    link = exec_start(units["flower-superlink"])
    assert link[0] == VENV_BIN + "flower-superlink"
    assert TLS_SUPERLINK <= flags(link) <= help_flags("flower-superlink")
    assert "--insecure" not in link
    assert option(link, "--host") == "127.0.0.1", "the Control API must stay on loopback"
    node = exec_start(units["flower-supernode"])
    assert node[0] == VENV_BIN + "flower-supernode"
    assert TLS_SUPERNODE <= flags(node) <= help_flags("flower-supernode")
    assert "--insecure" not in node and "--allow-runtime-dependency-installation" not in node
    cfg = node_config(option(node, "--node-config"))
    assert cfg["guard-address"] == "127.0.0.1:50051" and cfg["site"]


def test_guard_unit_runs_the_real_cli_and_checks_before_start(units):
    from ppsehr.deploy.cli import build_parser

    guard = units["ppsehr-guard"]
    serve, doctor = exec_start(guard), exec_start(guard, "ExecStartPre")
    for argv, func in ((serve, "cmd_site_serve"), (doctor, "cmd_site_doctor")):
        assert argv[0] == VENV_BIN + "ppsehr"
        assert build_parser().parse_args(argv[1:]).func.__name__ == func
    config = option(serve, "--config")
    assert option(doctor, "--config") == config
    # the example site configuration is the one the unit names, and it parses
    from ppsehr.client.config import load_site_config

    site = load_site_config(DEPLOY / "site" / "site.toml")
    assert site.listen == "127.0.0.1:50051" and str(site.state_dir) == "/var/lib/ppsehr-guard"
    assert guard["Service"]["StateDirectory"] == ["ppsehr-guard"]


def test_units_are_hardened_and_separate_the_users(units):
    users = {}
    for name, unit in units.items():
        svc = unit["Service"]
        env = environment(svc["Environment"])
        assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1", name
        [user] = svc["User"]
        assert user not in ("root", "nobody", "0")
        users[name] = user
        for key, value in HARDENING.items():
            assert svc.get(key) == [value], f"{name}: {key}={value} expected, got {svc.get(key)}"
        assert svc["StateDirectoryMode"] == ["0700"]
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert len(set(users.values())) == 3
    guard, node = units["ppsehr-guard"]["Service"], units["flower-supernode"]["Service"]
    assert guard["IPAddressDeny"] == ["any"] and guard["IPAddressAllow"] == ["localhost"]
    assert "/srv/ppsehr/data" in guard["ReadOnlyPaths"][0].split()
    hidden = {p.lstrip("-") for v in node["InaccessiblePaths"] for p in v.split()}
    assert {"/srv/ppsehr", "/etc/ppsehr/site", "/var/lib/ppsehr-guard"} <= hidden
    assert environment(node["Environment"])["FLWR_HOME"] == "/var/lib/flower-supernode"


def test_systemd_analyze_verify(tmp_path):
    """The units as systemd itself reads them (binaries pointed at this environment's)."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); structure checked above")
    bindir = Path(shutil.which("flower-superlink")).parent
    paths = []
    for name, path in UNITS.items():
        text = path.read_text().replace(VENV_BIN, f"{bindir}/")
        assert f"{bindir}/ppsehr" not in text or (bindir / "ppsehr").exists()
        paths.append(tmp_path / path.name)
        paths[-1].write_text(text)
    res = subprocess.run([analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True,
                         timeout=120)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 0 and problems == [], "\n".join(problems)
    # the check is not blind: an unknown key and a missing binary are reported
    bad = tmp_path / "bad.service"
    bad.write_text(paths[0].read_text().replace("UMask=0077", "UMask=0077\nProtectEverything=yes")
                   .replace(f"{bindir}/flower-superlink", "/nonexistent/flower-superlink"))
    res = subprocess.run([analyze, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=120)
    assert "Unknown key" in res.stderr and "/nonexistent/flower-superlink" in res.stderr


# ----------------------------------------------------------------------------- compose
COMPOSE_ENV = {"PPSEHR_SITE": "hospital-a", "PPSEHR_SUPERLINK": "coordinator.example.org:9092"}


def load_compose(name: str) -> dict:
    """A compose file with ${VAR...} interpolated the way Compose does (defaults, required values)."""
    def sub(m: re.Match) -> str:
        var, op, arg = m.group(1), m.group(2), m.group(3)
        if var in COMPOSE_ENV:
            return COMPOSE_ENV[var]
        assert op != ":?", f"{name}: ${{{var}}} is required"
        return arg or ""

    text = re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, (DEPLOY / "compose" / name).read_text())
    return yaml.safe_load(text)


def _hardened(svc: dict, name: str) -> None:
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
    assert "no-new-privileges:true" in svc["security_opt"], name
    assert svc["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
    assert svc["environment"]["FLWR_DISABLE_UPDATE_CHECK"] == "1", name
    assert re.fullmatch(r"\d+:\d+", svc["user"]) and not svc["user"].startswith("0:"), name


def test_coordinator_compose(units):
    c = load_compose("coordinator.yaml")
    assert set(c["services"]) == {"superlink"}
    svc = c["services"]["superlink"]
    _hardened(svc, "superlink")
    argv = svc["command"]
    assert argv[0] == "flower-superlink" and TLS_SUPERLINK <= flags(argv) <= help_flags("flower-superlink")
    assert option(argv, "--host") == "127.0.0.1"
    assert svc["ports"] == ["9092:9092"], "only the Fleet API is published"
    assert option(argv, "--fleet-api-address").endswith(":9092")
    # the same SuperLink settings as the systemd unit
    assert exec_start(units["flower-superlink"])[1:] == argv[1:]


def test_site_compose_only_the_guard_sees_the_data():
    c = load_compose("site.yaml")
    assert set(c["services"]) == {"guard", "supernode"}
    guard, node = c["services"]["guard"], c["services"]["supernode"]
    for name, svc in c["services"].items():
        _hardened(svc, name)
    assert guard["command"][:3] == ["ppsehr", "site", "serve"]
    from ppsehr.deploy.cli import build_parser

    assert build_parser().parse_args(guard["command"][1:]).func.__name__ == "cmd_site_serve"
    assert "/srv/ppsehr/data:/srv/ppsehr/data:ro" in guard["volumes"]
    assert not any("/srv/ppsehr" in v or "/etc/ppsehr/site" in v or "ppsehr-guard" in v for v in node["volumes"])
    assert guard["user"] != node["user"]
    assert node["network_mode"] == "service:guard" and "ports" not in guard and "ports" not in node
    argv = node["command"]
    assert argv[0] == "flower-supernode" and TLS_SUPERNODE <= flags(argv) <= help_flags("flower-supernode")
    assert option(argv, "--superlink") == COMPOSE_ENV["PPSEHR_SUPERLINK"]
    assert node_config(option(argv, "--node-config")) == {"guard-address": "127.0.0.1:50051",
                                                          "site": COMPOSE_ENV["PPSEHR_SITE"]}


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_docker_compose_config_accepts_the_files(name, tmp_path):
    """Compose's own schema check (docker-compose v1 validates without a Docker daemon)."""
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.skip("docker-compose is not installed (apt-get install --no-install-recommends docker-compose); "
                    "structure checked above")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPSEHR_")} | COMPOSE_ENV
    res = subprocess.run([exe, "-f", str(DEPLOY / "compose" / name), "config", "-q"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if name == "site.yaml":  # a required variable left unset is an error, not an empty string
        env.pop("PPSEHR_SITE")
        res = subprocess.run([exe, "-f", str(DEPLOY / "compose" / name), "config", "-q"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "PPSEHR_SITE" in res.stderr


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_every_package_and_runs_as_the_compose_users():
    text = (DEPLOY / "Dockerfile").read_text()
    steps = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    assert re.match(r"FROM python:3\.1[1-9]", steps[0])
    copied = {Path(s.split()[1]).name for s in steps if s.startswith("COPY")}
    copied |= {w for s in steps if s.startswith("COPY") for w in s.split()[1:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert not any(re.match(r"COPY\s+\.\s", s) for s in steps), "copy named sources only (no data or keys)"
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "FLWR_DISABLE_UPDATE_CHECK=1" in text
    assert [s for s in steps if s.startswith("USER")][-1] != "USER root"
    uids = set(re.findall(r"[\w-]+:(\d+):/var/lib/[\w-]+", text))
    for name in ("coordinator.yaml", "site.yaml"):
        for svc in load_compose(name)["services"].values():
            assert svc["user"].split(":")[0] in uids, f"compose user {svc['user']} is not created in the image"


def test_main_readme_links_the_deployment_guide():
    assert "(deploy/README.md)" in (ROOT / "README.md").read_text()
    guide = (DEPLOY / "README.md").read_text()
    for f in [*UNITS.values(), DEPLOY / "compose" / "coordinator.yaml", DEPLOY / "compose" / "site.yaml",
              DEPLOY / "Dockerfile", DEPLOY / "site" / "site.toml"]:
        assert f.relative_to(DEPLOY).as_posix() in guide
