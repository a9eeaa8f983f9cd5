"""The free pre-flight before a coordinator's first paid plan: which sites can it verify?

Every site the transport reaches is asked for its signed identity (the guard's `Identify`: its
own name and signing key, signed over a fresh challenge; nothing is debited). An identity is
verified when its name is one the coordinator holds a --site-key for and its key is that key.
Then:

- an answering site that cannot be verified (a name with no --site-key, a name whose --site-key
  is another key, a key held under another name: a typo, a stale or swapped key file) stops the
  release before any paid plan is signed, with an error naming each mismatch and the closest
  name (`SiteMismatch`); no site is charged anything;
- a configured site that does not answer (down, unreachable) is left out: it is sent no paid plan,
  and every round lists it in the manifest's sites_not_included as NOT_VERIFIED, not charged. The
  release goes on with the verified sites, if there is one. (`--min-sites` keeps its meaning: the
  sites that must be connected before anything is sent; `min_sites` here can ask for more verified ones.)

Paid plans then go only to the verified sites, and name them (site, key fingerprint) as their
addressees, so a guard that is not one of them refuses for free (NOT_ADDRESSED).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ...common import addressing, keys
from ...common.errors import PpsehrError, closest
from ...protos import guard_pb2 as pb
from .transport import SiteFailure, Transport

Progress = Callable[..., None]
NOT_VERIFIED = "NOT_VERIFIED"


class SiteMismatch(PpsehrError):
    """The sites that answered do not match the coordinator's --site-key list (nothing was sent that costs budget)."""


@dataclass
class Verified:
    """The sites whose identities match the coordinator's keys, and those that could not be asked."""

    keys: dict[str, Ed25519PublicKey]  # verified site -> its key (the --site-key it matched)
    sites: dict[str, str]  # verified site -> the transport's name for it (node id or configured name)
    unverified: list[SiteFailure] = field(default_factory=list)  # senders that gave no identity (not asked anything paid)

    def addressees(self) -> list[pb.Addressee]:
        return addressing.addressees(self.keys)

    @property
    def to(self) -> set[str]:
        """Where paid plans go: the transport's names of the verified sites."""
        return set(self.sites.values())

    @property
    def where(self) -> dict[str, str]:
        """The transport's name of each verified site -> the site."""
        return {w: s for s, w in self.sites.items()}

    def not_verified(self) -> list[SiteFailure]:
        """A failure record per site (or node) left out because it gave no identity: it is sent nothing paid."""
        return [SiteFailure(f.site, NOT_VERIFIED, f"not asked: it did not prove its identity before the first paid "
                            f"plan ({f.code}: {f.message})"[:1000]) for f in self.unverified]


def _who(site: str, where: str) -> str:
    return f"site {site!r}" + (f" ({where})" if where != site else "")


def identify(site_keys: dict[str, Ed25519PublicKey], dictionary_hash: str, transport: Transport, timeout: float,
             events: Progress, min_sites: int = 1) -> Verified:
    """Ask every reachable site for its signed identity and match them against `site_keys`.

    Raises SiteMismatch (before anything that costs budget is sent) when an answering site cannot be
    verified, or when fewer than max(1, min_sites) sites are verified."""
    challenge = secrets.token_bytes(32)
    events(f"identity check: asking every reachable site for its signed name and key (free) before the first paid "
           f"plan; {len(site_keys)} --site-key(s) held: {', '.join(sorted(site_keys))}", stage="identify")
    replies, failures = transport.query(pb.IdentityRequest(challenge=challenge), timeout, events, kind="identify")
    by_fp = {keys.fingerprint(k): s for s, k in site_keys.items()}
    verified: dict[str, str] = {}
    answered: list[tuple[str, str, str]] = []  # (where, claimed site, fingerprint) of identities that verify as signed
    problems: list[str] = []
    for r in replies:
        ident = r.signed
        try:
            addressing.check_identity(ident, challenge)
        except addressing.IdentityError as e:
            problems.append(f"{r.where}: its identity does not verify: {e}")
            continue
        site, fp = ident.site[:128], ident.signer
        answered.append((r.where, site, fp))
        if site in site_keys and keys.fingerprint(site_keys[site]) == fp and site not in verified:
            verified[site] = r.where
            if ident.dictionary_hash != dictionary_hash:
                events(f"{_who(site, r.where)}: its guard answers for dictionary {ident.dictionary_hash[:80]!r}, not "
                       f"this release's {dictionary_hash}; it will refuse the plans (for free)")
    unmatched = sorted(set(site_keys) - set(verified))
    mismatched = [(w, s, fp) for w, s, fp in answered if verified.get(s) != w]
    claimed = {fp: s for _, s, fp in answered}
    mentioned: set[str] = set()
    for w, site, fp in mismatched:
        if site in verified:  # a second sender claims a verified site's name
            problems.append(f"site {site!r} answered twice ({verified[site]} and {w}" + (
                "), with the same key: which one is the site?" if fp == keys.fingerprint(site_keys[site]) else
                f", the second with key {fp}, not the key --site-key {site!r} gives)"))
        elif site in site_keys:
            held = keys.fingerprint(site_keys[site])
            text = f"{_who(site, w)} answered with key {fp}, but --site-key {site!r} is key {held}"
            if held in claimed and claimed[held] != site:
                text += f", the key of site {claimed[held]!r}"
            if fp in by_fp:
                text += f"; its key is given as --site-key {by_fp[fp]!r}"
                mentioned.add(by_fp[fp])
            problems.append(text + " (a swapped or stale key file?)")
            mentioned.add(site)
        elif fp in by_fp:
            problems.append(f"{_who(site, w)} answered, but no --site-key is given for it; its key {fp} is given as "
                            f"--site-key {by_fp[fp]!r} (did you mean {site!r}?)")
            mentioned.add(by_fp[fp])
        else:
            text = f"{_who(site, w)} answered with key {fp}, but no --site-key is given for it"
            close = closest(site, [u for u in unmatched if u not in mentioned], cutoff=0.5)
            if close:
                text += f"; --site-key {close!r} matches no site (did you mean {site!r}?)"
                mentioned.add(close)
            problems.append(text)
    if problems:
        names = [s for _, s, _ in mismatched]
        for u in unmatched:
            if u in mentioned:
                continue
            close = closest(u, names, cutoff=0.5)
            problems.append(f"--site-key {u!r} matches no site that answered" + (f" (did you mean {close!r}?)" if close else ""))
        raise SiteMismatch("the sites that answered do not match the --site-key list; no plan that costs budget was "
                           "sent and no site was charged:\n  - " + "\n  - ".join(problems)
                           + ("\nVerified: " + ", ".join(sorted(verified)) if verified else "")
                           + "\nGive each site as --site-key SITE=PUBLIC_KEY_FILE, with SITE the name in the site's "
                           "guard configuration and the public key of its signing key.")
    result = Verified({s: site_keys[s] for s in verified}, verified, [f for f in failures])
    for f in failures:
        events(f"{f.site}: gave no identity ({f.code}: {f.message}); it is left out and asked nothing that costs budget")
    for u in unmatched:
        if u not in {f.site for f in failures}:
            events(f"--site-key {u!r}: no site of that name answered (not connected?); it is left out and asked "
                   "nothing that costs budget")
    need = max(1, min_sites)
    if len(verified) < need:
        raise SiteMismatch(f"{len(verified)} site(s) proved their identity"
                           + (f" ({', '.join(sorted(verified))})" if verified else "")
                           + f"; the release needs at least {need}. No plan that costs budget was sent. "
                           + ("; ".join(f"{f.site}: {f.code} {f.message}" for f in failures) or "No site answered."))
    events(f"identity check: {len(verified)} site(s) verified: "
           + ", ".join(f"{s} ({keys.fingerprint(site_keys[s])})" for s in sorted(verified))
           + (f"; not verified: {', '.join(f.site for f in failures)}" if failures else ""), stage="identify")
    return result
