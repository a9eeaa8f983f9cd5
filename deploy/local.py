"""A whole consortium on one machine: site guards, a Flower SuperLink and one SuperNode per site.

Used by `ppsehr demo` and the integration tests. Each part is a separate process, as it would
be at real hospitals; everything binds to 127.0.0.1 on free ports, and everything started is
stopped by PID (process group) on exit, error or Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..common.procs import FlwrCli, ProcessGroup, flower_env, free_port, wait_for_port
from .flower_waits import DEFAULT_POLL as LOOPBACK_POLL
from .launcher import Launcher

if TYPE_CHECKING:
    from ..common.keys import ConsortiumKeys

DEMO_SITES = ("cleveland", "hungarian", "switzerland", "va")
STOP_GRACE = 0.5
HOST = "127.0.0.1"


def demo_dir() -> Path:
    """The packaged demo consortium (dictionary, site mappings, UCI Heart Disease data)."""
    return Path(str(resources.files("ppsehr.deploy") / "demo"))


def write_site_config(path: Path, site: str, dictionary: Path, mapping: Path, state_dir: Path, listen: str,
                      epsilon: float, delta: float, signing_key: Path, coordinator_keys: list[Path],
                      policy: dict[str, object] | None = None, peers: dict[str, Path] | None = None,
                      min_parties: int = 3) -> Path:
    """A site configuration file; with `peers` (the other sites' public keys) it joins secure sums."""
    coords = ", ".join(f'"{c}"' for c in coordinator_keys)
    lines = [f'[site]\nid = "{site}"\ndictionary = "{dictionary}"\nmapping = "{mapping}"\n'
             f'state_dir = "{state_dir}"\nlisten = "{listen}"\n',
             f"[budget]\nepsilon = {epsilon!r}\ndelta = {delta!r}\n",
             f'[trust]\nsigning_key = "{signing_key}"\ncoordinators = [{coords}]\n', "[policy]"]
    for k, v in (policy or {}).items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, (list, tuple)) else f"{k} = {list(v)!r}".replace("'", '"'))
    if peers:
        table = ", ".join(f'"{s}" = "{k}"' for s, k in sorted(peers.items()))
        lines.append(f"\n[secure_aggregation]\npeers = {{ {table} }}\nmin_parties = {min_parties}\nassume_colluding = 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class LocalConsortium:
    """Start/stop a loopback deployment. Site configs default to the packaged demo consortium.

    Secure by default: the SuperLink serves TLS with a consortium CA and admits only SuperNodes
    whose EC keys were registered; plans, summaries, receipts and the release are signed.
    """

    workdir: Path
    sites: tuple[str, ...] = DEMO_SITES
    lifetime_epsilon: float = 20.0
    delta: float = 1e-6
    secure: bool = True
    policy: dict[str, object] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda msg: None
    # Flower app processes forked from one warm process (deploy/warm.py, `--isolation process`) instead
    # of a fresh flwr-clientapp / flwr-serverapp per message; False: Flower's own SuperExecs
    warm: bool = True
    group: ProcessGroup = field(init=False)
    guard_addresses: dict[str, str] = field(init=False, default_factory=dict)
    control_address: str = field(init=False, default="")
    cli: FlwrCli | None = field(init=False, default=None)
    connection: str = "local-deploy"

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.group = ProcessGroup(self.workdir / "logs")
        self.flwr_home = self.workdir / "flwr-home"
        self.runtime_apis = self.workdir / "runtime-apis.txt"  # what the warm SuperExec serves

    def _serve_runtime_api(self, address: str, root_ca: Path | None = None) -> None:
        with open(self.runtime_apis, "a") as f:
            f.write(f"{address} {root_ca}\n" if root_ca else f"{address}\n")

    def site_config(self, site: str) -> Path:
        return self.workdir / "sites" / f"{site}.toml"

    @property
    def keys(self) -> "ConsortiumKeys":
        from ..common.keys import init_consortium, load_consortium

        root = self.workdir / "keys"
        return load_consortium(root, self.sites) if (root / "coordinator").exists() else init_consortium(root, list(self.sites), [HOST, "localhost"])

    def start(self) -> "LocalConsortium":
        from ..server.federation import write_flwr_home

        demo = demo_dir()
        env = flower_env(self.flwr_home)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_apis.write_text("")
        isolation = ["--isolation", "process"] if self.warm else []
        keys = self.keys
        control, fleet = free_port(), free_port()
        self.control_address = f"{HOST}:{control}"
        self.fleet_address = f"{HOST}:{fleet}"
        tls = (["--ssl-ca-certfile", str(keys.tls.ca_cert), "--ssl-certfile", str(keys.tls.server_cert),
                "--ssl-keyfile", str(keys.tls.server_key), "--enable-supernode-auth"] if self.secure else ["--insecure"])
        # guards, SuperNodes and the SuperLink are forked from one warm process (deploy/launcher.py)
        launcher = Launcher(self.group, env, LOOPBACK_POLL)
        if self.warm:
            self.group.start("warm-superexec", [sys.executable, "-m", "ppsehr.deploy.warm", "--addresses",
                                                str(self.runtime_apis), "--pull-backoff", str(LOOPBACK_POLL),
                                                "--preload", "ppsehr.client.relay",
                                                "--preload", "ppsehr.server.serverapp"], env=env)
            self._serve_runtime_api(self.control_address, keys.tls.ca_cert if self.secure else None)
        self.cli = FlwrCli(env, self.group)  # Flower's CLI, imported once while the rest starts
        from ..server import pipeline  # noqa: F401  (release() needs it: import it while the processes start)

        superlink = launcher.start("superlink", "superlink", [  # first: everything after waits for it
            *tls, *isolation, "--host", HOST, "--port", str(control), "--fleet-api-address", self.fleet_address,
            "--disable-runtime-dependency-installation"])
        write_flwr_home(self.flwr_home, self.connection, self.control_address,
                        str(keys.tls.ca_cert) if self.secure else None)
        self.progress(f"starting {len(self.sites)} site guards and a Flower SuperLink on {HOST}"
                      + (" (TLS, SuperNode authentication)" if self.secure else " (insecure)"))
        guards = {}
        for site in self.sites:
            port = free_port()
            cfg = self.site_config(site)
            if not cfg.exists():
                write_site_config(cfg, site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                  self.workdir / "state" / site, f"{HOST}:{port}", self.lifetime_epsilon, self.delta,
                                  keys.site_keys[site][0], [keys.coordinator_pub], self.policy,
                                  {p: keys.site_keys[p][1] for p in self.sites if p != site}, min(3, len(self.sites)))
            else:  # keep ledger and settings, take a fresh port
                text = cfg.read_text().splitlines()
                cfg.write_text("\n".join(f'listen = "{HOST}:{port}"' if t.startswith("listen") else t for t in text) + "\n")
            guards[site] = (launcher.start("guard", f"guard-{site}", ["--config", str(cfg)]), port)
            self.guard_addresses[site] = f"{HOST}:{port}"
        wait_for_port(HOST, fleet, 60, superlink)
        wait_for_port(HOST, control, 60, superlink)
        if self.secure:
            self.register_supernodes([keys.supernode_keys[s][1] for s in self.sites])
        for site in self.sites:  # before waiting for the guards
            launcher.start("supernode", f"supernode-{site}", self._supernode_args(site, keys.supernode_keys[site][0]))
        for site, (proc, port) in guards.items():
            wait_for_port(HOST, port, 60, proc)
        self.progress(f"{len(self.sites)} guards ready; {len(self.sites)} SuperNodes connecting to the SuperLink")
        return self

    def register_supernodes(self, public_keys: list[Path]) -> None:
        """Register SuperNode public keys with the SuperLink (`flwr supernode register`)."""
        for k in public_keys:
            code, out = self.cli.run(["supernode", "register", str(k), self.connection])
            if code != 0:
                raise RuntimeError(f"`flwr supernode register {k}` failed (exit {code}):\n{out[-2000:]}")

    def start_supernode(self, site: str, auth_key: Path | None, name: str | None = None):
        """Start one SuperNode for a site (its own process), authenticated with auth_key when the deployment is secure."""
        return self.group.start(name or f"supernode-{site}", [sys.executable, "-m", "ppsehr.deploy.supernode", "--poll",
                                                              str(LOOPBACK_POLL), *self._supernode_args(site, auth_key)],
                                env=flower_env(self.flwr_home))

    def _supernode_args(self, site: str, auth_key: Path | None) -> list[str]:
        """flower-supernode's arguments for a site (a fresh ClientAppIo port, served by the warm SuperExec if any)."""
        keys = self.keys
        security = (["--root-certificates", str(keys.tls.ca_cert)] + (["--auth-supernode-private-key", str(auth_key)] if auth_key else [])
                    if self.secure else ["--insecure"])
        port = free_port()
        if self.warm:
            self._serve_runtime_api(f"{HOST}:{port}")
        return [*security, *(["--isolation", "process"] if self.warm else []), "--superlink", self.fleet_address,
                "--host", HOST, "--port", str(port), "--node-config", f'guard-address="{self.guard_addresses[site]}" site="{site}"']

    def stop(self) -> None:
        """SIGTERM to every process, SIGKILL to what is still running STOP_GRACE seconds later (the
        SuperLink's graceful shutdown takes over a second; nothing here needs it: a guard's ledger is
        durable before any answer leaves, and the Flower state lives only as long as the run)."""
        self.group.stop(grace=STOP_GRACE)

    def __enter__(self) -> "LocalConsortium":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def release(self, out: Path, epsilon: float | None = 1.0, rho: float | None = None, seed: int | None = None,
                rows: int | None = None, timeout: float = 600, on_event: Callable[[dict], None] = lambda e: None,
                min_sites: int | None = None, site_keys: dict[str, str] | None = None, **options) -> dict:
        """Run one release through the SuperLink; return the final event (stage 'done').

        `site_keys` (site -> public key file) replaces the consortium's own list (default: every site's
        key); `options` are further release options (site_variable, secure_aggregation, ...: `ReleaseJob.create`)."""
        from ..server.federation import follow, submit, write_app_dir
        from ..server.pipeline import ReleaseJob

        jobs = self.workdir / "jobs"
        job_dir = jobs / time.strftime("%Y%m%d-%H%M%S") / str(time.monotonic_ns())
        job_dir.mkdir(parents=True)
        keys = self.keys
        job = ReleaseJob.create(dictionary=str(demo_dir() / "dictionary.toml"), out=str(Path(out).resolve()),
                         signing_key=str(keys.coordinator_key),
                         site_keys=site_keys or {s: str(keys.site_keys[s][1]) for s in self.sites}, epsilon=epsilon,
                         rho=rho, delta=self.delta, seed=seed, rows=rows, coordinator="demo-coordinator",
                         min_sites=min_sites or len(self.sites), events=str(job_dir / "events.jsonl"), **options)
        job.validate()
        job.save(job_dir / "job.json")
        run_id = submit(job_dir / "job.json", write_app_dir(jobs / "app"), self.flwr_home, self.connection, cli=self.cli)
        self.progress(f"run {run_id} submitted to the SuperLink")
        return follow(job, run_id, self.flwr_home, self.connection, timeout, on_event, cli=self.cli)

    def evaluate(self, release: Path, timeout: float = 600, on_event: Callable[[dict], None] = lambda e: None,
                 job: Callable[..., object] | None = None, **options) -> dict:
        """Evaluate a release at the sites through the SuperLink; return the final event (its `out` is the
        addendum). `job(release, dictionary=, signing_key=, site_keys=, events=)` builds the EvaluationJob
        (default: `EvaluationJob` with `options`)."""
        from ..server.evaluate.run import EvaluationJob
        from ..server.federation import follow, submit, write_app_dir

        jobs = self.workdir / "jobs"
        job_dir = jobs / time.strftime("%Y%m%d-%H%M%S") / str(time.monotonic_ns())
        job_dir.mkdir(parents=True)
        keys = self.keys
        common = dict(dictionary=str(demo_dir() / "dictionary.toml"), signing_key=str(keys.coordinator_key),
                      site_keys={s: str(keys.site_keys[s][1]) for s in self.sites}, events=str(job_dir / "events.jsonl"))
        evaluation = (job or (lambda release, **kw: EvaluationJob(release=release, **kw, **options)))(
            str(Path(release).resolve()), **common)
        evaluation.coordinator, evaluation.min_sites = "demo-coordinator", len(self.sites)
        evaluation.save(job_dir / "job.json")
        run_id = submit(job_dir / "job.json", write_app_dir(jobs / "app"), self.flwr_home, self.connection, cli=self.cli)
        self.progress(f"run {run_id} (evaluation) submitted to the SuperLink")
        return follow(evaluation, run_id, self.flwr_home, self.connection, timeout, on_event, cli=self.cli)
