"""Shared fixtures: the packaged demo consortium, site configs in tmp dirs, real gRPC guards."""

from __future__ import annotations

import json

import os
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from ppsehr.client.config import load_site_config  # noqa: E402
from ppsehr.client.guard import GuardServicer, SiteGuard  # noqa: E402
from ppsehr.common.dictionary import load_dictionary  # noqa: E402
from ppsehr.common.keys import init_consortium, load_signing_key  # noqa: E402
from ppsehr.server.measure.planner import sign_plan  # noqa: E402
from ppsehr.deploy.local import DEMO_SITES, demo_dir, write_site_config  # noqa: E402
from ppsehr.protos import guard_pb2_grpc as pb_grpc  # noqa: E402


@pytest.fixture(scope="session")
def demo() -> Path:
    return demo_dir()


@pytest.fixture(scope="session")
def dictionary(demo):
    return load_dictionary(demo / "dictionary.toml")


@pytest.fixture(scope="session")
def consortium_keys(tmp_path_factory):
    """Coordinator and site signing keys (and TLS/SuperNode material) for the demo sites."""
    return init_consortium(tmp_path_factory.mktemp("keys") / "keys", list(DEMO_SITES), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="session")
def coordinator_key(consortium_keys):
    return load_signing_key(consortium_keys.coordinator_key)


@pytest.fixture(scope="session")
def demo_addressees(consortium_keys):
    """Every demo site, (name, key fingerprint), as addressees of a plan."""
    from ppsehr.common.addressing import addressees
    from ppsehr.common.keys import load_public_key

    return addressees({s: load_public_key(p[1]) for s, p in consortium_keys.site_keys.items()})


@pytest.fixture(scope="session")
def sign(coordinator_key, demo_addressees):
    """Sign a QueryPlan as the allowlisted coordinator (default expiry: 10 minutes from now; default
    addressees: every demo site with its key, as a coordinator holding all their keys names them)."""

    def do(plan, key=None):
        if not plan.expires_at:
            plan.expires_at = int(time.time() + 600)
        if not plan.addressees:
            plan.addressees.extend(demo_addressees)
        return sign_plan(plan, key or coordinator_key)

    return do


@pytest.fixture
def site_config(tmp_path, demo, consortium_keys):
    """Factory: write a site config for a demo site into tmp_path and load it."""

    def make(site="cleveland", epsilon=10.0, policy=None, state=None, secure=False):
        peers = {p: k[1] for p, k in consortium_keys.site_keys.items() if p != site} if secure else None
        path = write_site_config(tmp_path / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                 state or tmp_path / "state" / site, "127.0.0.1:0", epsilon, 1e-6,
                                 consortium_keys.site_keys[site][0], [consortium_keys.coordinator_pub], policy, peers)
        return load_site_config(path)

    return make


class RunningGuard:
    def __init__(self, guard: SiteGuard):
        self.guard = guard
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
        pb_grpc.add_SiteGuardServicer_to_server(GuardServicer(guard), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.SiteGuardStub(self.channel)

    def stop(self):
        self.channel.close()
        self.server.stop(grace=None).wait()


@pytest.fixture
def guards(site_config):
    """Factory: start real gRPC guards (in this process) for demo sites; all stopped at teardown."""
    running = []

    def start(*sites, **kwargs):
        out = [RunningGuard(SiteGuard(site_config(s, **kwargs))) for s in sites]
        running.extend(out)
        return out[0] if len(out) == 1 else out

    yield start
    for g in running:
        g.stop()


@pytest.fixture(scope="session")
def all_sites():
    return DEMO_SITES


def site_guards(tmp, demo, consortium_keys, sites, peers=None, min_parties=3) -> dict[str, SiteGuard]:
    """In-process guards of the demo `sites` under `tmp` (lifetime epsilon 10), each joining secure
    sums with the other `peers` (default: the other `sites`)."""
    peers = tuple(peers or sites)
    guards = {}
    for site in sites:
        cfg = write_site_config(tmp / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                tmp / "state" / site, "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys[site][0],
                                [consortium_keys.coordinator_pub],
                                peers={p: consortium_keys.site_keys[p][1] for p in peers if p != site}, min_parties=min_parties)
        guards[site] = SiteGuard(load_site_config(cfg))
    return guards


def secure_job(tmp, demo, consortium_keys, sites, **options):
    """A secure release job over `sites` (epsilon 1, seed 2, csv only, no report) writing `tmp`/rel."""
    from ppsehr.server.pipeline import ReleaseJob

    return ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp / "rel"),
                             signing_key=str(consortium_keys.coordinator_key),
                             site_keys={s: str(consortium_keys.site_keys[s][1]) for s in sites}, epsilon=1.0, seed=2,
                             secure_aggregation=True, report=False, formats=["csv"], **options)


def release_from_guards(tmp, demo, consortium_keys, sites, epsilon, seed, **options):
    """A real release from in-process guards of `sites` under `tmp`; returns (path, manifest, job)."""
    from ppsehr.server.pipeline import Events, ReleaseJob, run_release
    from ppsehr.deploy.transports import DirectTransport

    running = []
    try:
        guards = site_guards(tmp, demo, consortium_keys, sites, peers=consortium_keys.site_keys, min_parties=2)
        running = [RunningGuard(g) for g in guards.values()]
        job = ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp / "rel"),
                         signing_key=str(consortium_keys.coordinator_key),
                         site_keys={s: str(p[1]) for s, p in consortium_keys.site_keys.items()}, epsilon=epsilon,
                         seed=seed, **options)
        manifest = run_release(job, DirectTransport({g.guard.config.site: g.address for g in running}), Events())
    finally:
        for g in running:
            g.stop()
    return tmp / "rel", manifest, job


@pytest.fixture(scope="session")
def one_release(tmp_path_factory, demo, consortium_keys):
    """A real release from two in-process guards (cleveland, va), made once; tamper tests copy it first."""
    return release_from_guards(tmp_path_factory.mktemp("one-release"), demo, consortium_keys, ("cleveland", "va"), 2.0, 3)[0]


def edit_manifest(path, change):
    """Apply `change` to a release's manifest.json (its signature then no longer verifies)."""
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def resign_manifest(path, key_path):
    """An attacker who also holds a key re-signs the edited manifest."""
    from ppsehr.common import keys

    key = keys.load_signing_key(key_path)
    (path / "manifest.sig").write_text(keys.b64(key.sign((path / "manifest.json").read_bytes())) + "\n")
