"""The coordinator's release pipeline: plan -> sites -> aggregate -> model -> records -> release.

Each stage takes its own settings (`MeasureOptions`, `LLMConfig`, `OutputOptions`); a
`ReleaseJob` holds them with the budget and the keys. Everything after the sites' summaries is
post-processing of DP outputs: it reads no raw data and costs no privacy. The same function
runs inside the Flower ServerApp (deployment) and in-process (tests, benchmarks).
"""

from __future__ import annotations

import json
import platform
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..common import accounting, keys
from ..common.dictionary import load_dictionary
from ..common.errors import PpsehrError
from .llm.client import EndpointMemory, LLMConfig
from .llm.knowledge import knowledge_dependencies
from .llm.stage import run_llm_stage
from .measure.rounds import MeasureOptions, Request, collect, round_measurements
from .measure.transport import Transport
from .model.graphical import SITE
from .model.records import decode, encode, to_csv
from .model.synthesize import full_domain, synthesize
from .release import manifest as mf
from .release.bundle import write_release
from .release.exports import FORMATS as EXPORT_FORMATS
from .release.exports import export_files
from .release.report import build_report


@dataclass
class OutputOptions:
    """The release stage's settings: which files besides the manifest."""

    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))  # record formats
    report: bool = True  # report.html + figures/

    def validate(self) -> None:
        unknown = sorted(set(self.formats) - set(EXPORT_FORMATS))
        if unknown or "csv" not in self.formats:
            raise PpsehrError(f"formats must include csv and be among {EXPORT_FORMATS}, got {self.formats!r}")


STAGES = {"measure": MeasureOptions, "output": OutputOptions}  # ReleaseJob fields holding a stage's options


@dataclass
class ReleaseJob:
    """What the coordinator asks for: budget per site for this release (`epsilon` at `delta`, or
    `rho`), keys, and each stage's options."""

    dictionary: str
    out: str
    signing_key: str  # the coordinator's Ed25519 key: signs plans and the release
    site_keys: dict[str, str]  # site -> public key file: which summaries count, and for which site
    epsilon: float | None = 1.0
    rho: float | None = None
    delta: float = 1e-6
    seed: int | None = None
    rows: int | None = None
    coordinator: str = "coordinator"
    purpose: str = "synthetic release"
    min_sites: int = 1
    wait_sites_timeout: float = 120.0
    events: str | None = None
    measure: MeasureOptions = field(default_factory=MeasureOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    llm: dict[str, Any] = field(default_factory=dict)  # LLMConfig.to_dict(); empty: statistical engine only

    @classmethod
    def create(cls, **options: Any) -> "ReleaseJob":
        """A job from flat options: each name goes to the job or to the one stage that has it."""
        own = {f.name for f in fields(cls)}
        staged: dict[str, dict[str, Any]] = {name: {} for name in STAGES}
        for key in list(options):
            if key in own:
                continue
            stage = next((s for s, c in STAGES.items() if key in {f.name for f in fields(c)}), None)
            if stage is None:
                raise PpsehrError(f"unknown release option {key!r}")
            staged[stage][key] = options.pop(key)
        for stage, values in staged.items():
            if values:
                options[stage] = STAGES[stage](**values)
        return cls(**options)

    def rho_per_site(self) -> float:
        if self.rho is not None:
            accounting.check_rho(self.rho)
            return float(self.rho)
        if self.epsilon is None:
            raise PpsehrError("the release needs a budget: epsilon (with delta) or rho")
        return accounting.rho_for_epsilon(float(self.epsilon), float(self.delta))

    def validate(self) -> float:
        """Check every option before anything is sent (a bad job must cost no site any budget); return rho."""
        self.measure.validate()
        self.output.validate()
        self.llm_config().check()
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise PpsehrError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.rows is not None and not 1 <= self.rows <= 100_000_000:
            raise PpsehrError(f"rows must be between 1 and 100,000,000, got {self.rows!r}")
        try:
            accounting.check_delta(self.delta)
            return self.rho_per_site()
        except ValueError as e:
            raise PpsehrError(f"budget: {e}") from None

    def request(self) -> Request:
        return Request(self.coordinator, self.purpose, self.rho_per_site(), self.delta)

    def llm_config(self) -> LLMConfig:
        return LLMConfig.from_dict(self.llm) if self.llm else LLMConfig()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ReleaseJob":
        data = json.loads(Path(path).read_text())
        return cls(**{k: STAGES[k](**v) if k in STAGES else v for k, v in data.items()})


class Events:
    """Progress of a release as JSON lines (read by the coordinator CLI) and/or a callback."""

    def __init__(self, path: str | None = None, echo: Callable[[str], None] | None = None):
        self.path, self.echo = path, echo

    def __call__(self, message: str, stage: str = "progress", **data: Any) -> None:
        if self.echo:
            self.echo(message)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": time.time(), "stage": stage, "message": message, **data}) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


PLANNER_KNOWLEDGE_SHARE = 0.25  # of the LLM time budget, for the knowledge call before the plan


def llm_budget(config: LLMConfig, share: float = 1.0) -> float | None:
    """Seconds an LLM step of the release may take (None: no limit)."""
    return share * config.time_budget if config.time_budget else None


def run_release(job: ReleaseJob, transport: Transport, events: Events) -> dict[str, Any]:
    """Run one release end to end and write it to job.out. Returns the manifest."""
    started = _now()
    t0 = time.perf_counter()
    job.validate()
    opts = job.measure
    dictionary = load_dictionary(job.dictionary)
    if opts.site_variable != "pooled" and SITE in dictionary.variables:
        raise PpsehrError(f"the dictionary has a variable named {SITE!r}; use site_variable = 'pooled'")
    coordinator_key = keys.load_signing_key(job.signing_key)
    site_keys = {site: keys.load_public_key(path) for site, path in job.site_keys.items()}
    if Path(job.out).exists():
        raise PpsehrError(f"{job.out} already exists; choose a new output directory. Nothing was sent.")
    llm_config = job.llm_config()
    llm_memory = EndpointMemory()  # what the release learns about its LLM endpoint (modes, context, failures)
    prior: list[tuple[str, ...]] = []
    if llm_config.enabled and "knowledge" in llm_config.uses:
        # a prior for the selection, from the public dictionary: no privacy cost; on its own clock (`follow` does not count it against the sites)
        budget = llm_budget(llm_config, PLANNER_KNOWLEDGE_SHARE)
        events("LLM knowledge for the plan" + (f" (budget {budget:.0f} s)" if budget else ""), stage="llm-plan",
               budget_s=budget)
        prior = knowledge_dependencies(llm_config, dictionary, lambda m: events(m, stage="llm-plan"),
                                       memory=llm_memory, time_budget=budget)
    rounds, structure = collect(opts, job.request(), dictionary, coordinator_key, site_keys, transport, events, prior)
    seed = job.seed if job.seed is not None else secrets.randbits(63)
    rng = np.random.default_rng(seed)
    measurements, groups = round_measurements(dictionary, rounds, structure, opts.site_variable, opts.site_groups)
    syn = synthesize(dictionary, measurements, groups, job.rows, rng)
    events(f"model fitted and {len(syn.samples)} records sampled in {syn.seconds:.2f} s", stage="synthesize")
    columns = decode(syn.samples, dictionary, rng)
    if llm_config.enabled:  # the sites are paid: from here on the LLM can only add to the release, never fail it
        budget = llm_budget(llm_config)
        events("LLM stage" + (f" (budget {budget:.0f} s)" if budget else ""), stage="llm", budget_s=budget)
    llm = run_llm_stage(llm_config, dictionary, full_domain(syn), columns, rng,
                        lambda m, **d: events(m, stage="llm", **d), llm_memory)
    samples = syn.samples
    if llm.columns is not columns:  # repaired or LLM-first records: fidelity and report follow what is released
        columns, samples = llm.columns, encode(dictionary, llm.columns)
    release_id = uuid.uuid4().hex
    results = [r for rnd in rounds for r in rnd.results]
    wasted = [r for rnd in rounds for r in rnd.wasted]  # charged for unreadable secure sums: counted all the same
    sites = sorted({r.site for r in results + wasted})
    try:
        privacy, site_entries = mf.release_sections(
            {s: [r.receipt for r in results + wasted if r.site == s] for s in sites},
            [mf.round_facts(rnd) for rnd in rounds])
    except mf.Inconsistent as e:
        raise PpsehrError(f"no privacy statement can be made: {e}") from None
    excluded = mf.exclusion_entries(rounds, set(site_keys))
    fidelity = mf.fidelity_to_aggregates(dictionary, syn.pooled, samples)
    records = ({SITE: syn.site_labels} | columns) if opts.site_variable == "release" and syn.site_labels else columns
    files = {
        "records.csv": to_csv(records),
        "aggregates.json": mf.to_json(mf.aggregates_json(dictionary, syn)),
        "fidelity.json": mf.to_json(fidelity),
        **llm.files,
    }
    formats = job.output.formats
    events(f"exporting records as {', '.join(formats)}", stage="export")
    files |= export_files(dictionary, columns, release_id, set(formats))
    manifest = {
        "release_id": release_id,
        "created": _now(),
        "started": started,
        "dictionary": {"name": dictionary.name, "version": dictionary.version, "hash": dictionary.hash},
        "coordinator": job.coordinator,
        "privacy": privacy,
        "sites": site_entries,
        "sites_not_included": excluded,
        "receipts": [mf.receipt_entry(r) for r in results] + [mf.receipt_entry(r, used=False) for r in wasted],
        "keys": {"coordinator": keys.public_pem(coordinator_key.public_key()),
                 "coordinator_fingerprint": rounds[0].signed.signer,
                 "sites": {s: keys.public_pem(site_keys[s])
                           for s in sorted(set(sites) | {k.site for rnd in rounds for k in rnd.signed.roster}
                                           | {e["site"] for e in excluded if "site" in e})}},
        "plans": [mf.plan_entry(rnd) for rnd in rounds],
        "generator": {"engine": "ppsehr graphical model (Private-PGM-style estimation on a junction tree)",
                      "strategy": "selected in rounds: 1-way tables, candidate pairs, selected marginals",
                      "secure_aggregation": {None: "automatic", True: "required", False: "off"}[opts.secure_aggregation],
                      "site_variable": opts.site_variable,
                      "outcome": opts.outcome or dictionary.outcome,  # a declared outcome weighted the workload
                      "site_groups": syn.groups, "cliques": [list(c) for c in syn.model.cliques],
                      "estimated_total": syn.model.total, "rows": len(samples), "seed": seed,
                      "fit_seconds": round(syn.seconds, 3), "python": platform.python_version(),
                      "formats": list(formats)},
        "llm": llm.manifest_section,
    }
    if job.output.report:
        events("building the report", stage="report")
        files |= build_report(dictionary, manifest, syn.pooled, samples, fidelity, release=str(job.out))
    out = write_release(job.out, files, manifest, sign=coordinator_key.sign)
    events(f"release written to {out} in {time.perf_counter() - t0:.1f} s", stage="done", out=str(out))
    return manifest
