"""Site configuration: where the data and mapping are, the lifetime budget and the policy.

    [site]
    id = "cleveland"
    dictionary = "dictionary.toml"      # paths are relative to this file
    mapping = "sites/cleveland.toml"
    state_dir = "state/cleveland"       # ledger + audit log (SQLite)
    listen = "127.0.0.1:50051"          # loopback or a private interface of the site
    [budget]                            # lifetime budget: epsilon + delta, or rho (zCDP)
    epsilon = 10.0
    delta = 1e-6
    [trust]
    signing_key = "keys/site.key"       # this site's Ed25519 key (signs summaries and receipts)
    coordinators = ["keys/coordinator.pub"]   # coordinator keys whose signed plans are answered
    max_plan_lifetime_s = 3600          # plans must expire within this many seconds
    [policy]
    max_rho_per_plan = 1.0
    max_marginals = 500
    max_width = 3
    max_cells = 100000                  # per marginal
    max_total_cells = 2000000           # per plan
    max_plans_per_day = 50
    allowed_variables = ["*"]           # or a list of dictionary variables
    tier3 = "one-way"                   # tier-3 variables: "deny" | "one-way" | "allow"
    [secure_aggregation]                # optional: answer masked plans (docs/secure-aggregation.md)
    peers = { hungary = "keys/hungary.pub" }  # the other sites' Ed25519 keys: masks are agreed only with them
    min_parties = 3                     # a masked sum must have at least this many sites
    assume_colluding = 0                # sites that may collude with the coordinator (their noise is not counted)
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import accounting
from ..common.errors import PpsehrError


class ConfigError(PpsehrError):
    """A site configuration file is malformed."""


# Ceilings no policy may exceed: they bound the memory and time one plan can cost the guard
# (a marginal's OpenDP measurement holds one entry per cell).
HARD_LIMITS = {"max_marginals": 10_000, "max_width": 16, "max_cells": 10_000_000, "max_total_cells": 20_000_000,
               "max_plans_per_day": 100_000}


@dataclass(frozen=True)
class Policy:
    max_rho_per_plan: float = 1.0
    max_marginals: int = 500
    max_width: int = 3
    max_cells: int = 100_000
    max_total_cells: int = 2_000_000
    max_plans_per_day: int = 50
    allowed_variables: tuple[str, ...] = ("*",)
    tier3: str = "one-way"


@dataclass(frozen=True)
class SecureAggregationPolicy:
    """Whether and how this site joins masked sums; absent from the config: it never does."""

    peers: dict[str, Path]  # site -> Ed25519 public key file
    min_parties: int = 3
    assume_colluding: int = 0


@dataclass(frozen=True)
class SiteConfig:
    site: str
    dictionary: Path
    mapping: Path
    state_dir: Path
    listen: str
    rho_limit: float
    delta: float
    epsilon_limit: float | None
    signing_key: Path
    coordinator_keys: tuple[Path, ...]
    max_plan_lifetime_s: float = 3600.0
    policy: Policy = field(default_factory=Policy)
    source: str = ""
    secure_aggregation: SecureAggregationPolicy | None = None
    # Set by the guard from the mapping's source when it loads the data (not read from this file):
    # the privacy unit it answers for and k, the most records one patient contributes. Plans are
    # charged for the loss of one unit (client/guard.py compile_plan; common/privacy_unit.py).
    privacy_unit: str = ""
    rows_per_patient: int = 1

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: site configuration not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    site = raw.get("site", {})
    for key in ("id", "dictionary", "mapping", "state_dir"):
        if not isinstance(site.get(key), str) or not site.get(key):
            raise ConfigError(f"{where}: [site] needs '{key}'")
    base = path.parent
    budget = raw.get("budget", {})
    delta = float(budget.get("delta", 1e-6))
    try:
        if "rho" in budget:
            rho, eps = float(budget["rho"]), None
            accounting.check_rho(rho)
        elif "epsilon" in budget:
            eps = float(budget["epsilon"])
            rho = accounting.rho_for_epsilon(eps, delta)
        else:
            raise ConfigError(f"{where}: [budget] needs 'epsilon' (with 'delta') or 'rho'")
    except ValueError as e:
        raise ConfigError(f"{where}: [budget]: {e}") from None
    trust = raw.get("trust", {})
    coordinators = trust.get("coordinators")
    if not isinstance(trust.get("signing_key"), str) or not isinstance(coordinators, list) or not coordinators:
        raise ConfigError(f"{where}: [trust] needs 'signing_key' (this site's Ed25519 key) and 'coordinators' "
                          "(a non-empty list of allowlisted coordinator public keys); see `ppsehr keys init`")
    lifetime = trust.get("max_plan_lifetime_s", 3600.0)
    if not isinstance(lifetime, (int, float)) or not 0 < lifetime <= 30 * 86400:
        raise ConfigError(f"{where}: trust.max_plan_lifetime_s must be between 0 and 30 days")
    return SiteConfig(site["id"], base / site["dictionary"], base / site["mapping"], base / site["state_dir"],
                      site.get("listen", "127.0.0.1:50051"), rho, delta, eps, base / trust["signing_key"],
                      tuple(base / c for c in coordinators), float(lifetime),
                      _parse_policy(raw.get("policy", {}), where), where,
                      _parse_secure_aggregation(raw.get("secure_aggregation"), base, site["id"], where))


def _parse_secure_aggregation(raw: Any, base: Path, site: str, where: str) -> SecureAggregationPolicy | None:
    if raw is None:
        return None
    name = f"{where}: [secure_aggregation]"
    unknown = set(raw) - {"peers", "min_parties", "assume_colluding"}
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {sorted(unknown)}")
    peers = raw.get("peers")
    if not isinstance(peers, dict) or not peers or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in peers.items()):
        raise ConfigError(f"{name}: 'peers' must map the other sites' names to their public key files")
    if site in peers:
        raise ConfigError(f"{name}: 'peers' names this site ({site!r}); list only the other sites")
    values = {}
    for key, default, low in (("min_parties", 3, 2), ("assume_colluding", 0, 0)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}: '{key}' must be an integer of at least {low}")
        values[key] = value
    if values["assume_colluding"] >= values["min_parties"]:
        raise ConfigError(f"{name}: assume_colluding must be below min_parties (someone's noise must count)")
    return SecureAggregationPolicy({k: base / v for k, v in peers.items()}, **values)


def _parse_policy(raw: dict[str, Any], where: str) -> Policy:
    p = Policy()
    kwargs: dict[str, Any] = {}
    for key, default in p.__dict__.items():
        if key not in raw:
            continue
        value = raw[key]
        if key == "allowed_variables":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: policy.allowed_variables must be a list of names")
            value = tuple(value)
        elif key == "tier3":
            if value not in ("deny", "one-way", "allow"):
                raise ConfigError(f"{where}: policy.tier3 must be deny, one-way or allow")
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{where}: policy.{key} must be a positive number")
            value = float(value)
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}: policy.{key} must be a positive integer")
        elif value > HARD_LIMITS.get(key, value):
            raise ConfigError(f"{where}: policy.{key} = {value} is above the guard's ceiling of {HARD_LIMITS[key]}")
        kwargs[key] = value
    unknown = set(raw) - set(p.__dict__)
    if unknown:
        raise ConfigError(f"{where}: unknown policy key(s) {sorted(unknown)}")
    return Policy(**kwargs)
