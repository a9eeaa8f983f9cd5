"""Who a plan is for: sites' signed identities and the addressees a signed plan names.

Before its first paid plan a coordinator asks every site it can reach for its identity (the
guard's `Identify`, free): the site's own name and signing key, signed over the coordinator's
fresh challenge. The coordinator matches them against its --site-key list (server/measure/identify.py)
and names the matched sites, (name, key fingerprint) each, as the addressees of every plan it
signs. A guard whose own (name, fingerprint) is not among them refuses the plan (NOT_ADDRESSED)
before anything is claimed or debited, so a coordinator's typo in a site name or key costs no
site anything. See docs/security.md.
"""

from __future__ import annotations

from typing import Iterable

from cryptography.hazmat.primitives.asymmetric import ed25519

from . import keys
from ..protos import guard_pb2 as pb

CONTEXT = b"ppsehr-identity-v1"
CHALLENGE_BYTES = (16, 64)  # the smallest and largest challenge a guard signs


class IdentityError(Exception):
    """A site identity that does not verify (the message says which field)."""


def identity_statement(site: str, public_key: bytes, challenge: bytes, dictionary_hash: str) -> bytes:
    """The bytes a site signs to state its identity for one challenge."""
    return b"\0".join([CONTEXT, b"identity", site.encode(), public_key, challenge, dictionary_hash.encode()])


def raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_identity(site: str, signing_key: ed25519.Ed25519PrivateKey, challenge: bytes,
                  dictionary_hash: str) -> pb.SiteIdentity:
    """A site's signed identity for `challenge` (the guard's Identify)."""
    lo, hi = CHALLENGE_BYTES
    if not lo <= len(challenge) <= hi:
        raise ValueError(f"the identity request's challenge must be {lo}-{hi} bytes, got {len(challenge)}")
    public = raw_public(signing_key.public_key())
    return pb.SiteIdentity(site=site, public_key=public, signer=keys.fingerprint(signing_key.public_key()),
                           challenge=challenge, dictionary_hash=dictionary_hash,
                           signature=signing_key.sign(identity_statement(site, public, challenge, dictionary_hash)))


def check_identity(identity: pb.SiteIdentity, challenge: bytes) -> ed25519.Ed25519PublicKey:
    """Check that `identity` answers `challenge` and is signed by the key it carries; return that key.

    This proves the answering site holds the key it names; whether that key is the one the
    coordinator holds for the site's name is the caller's question."""
    if identity.challenge != challenge:
        raise IdentityError("it answers another challenge (a replayed or mixed-up identity)")
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(identity.public_key)
    except ValueError:
        raise IdentityError("its public_key is not a raw Ed25519 public key") from None
    if identity.signer != keys.fingerprint(key):
        raise IdentityError(f"its signer {identity.signer[:80]!r} is not the fingerprint of its public_key")
    if not keys.verify(key, identity.signature,
                       identity_statement(identity.site, identity.public_key, identity.challenge, identity.dictionary_hash)):
        raise IdentityError("its signature does not verify")
    return key


def addressees(sites: dict[str, ed25519.Ed25519PublicKey]) -> list[pb.Addressee]:
    """The addressees of a plan for these sites (name -> public key), sorted by name."""
    return [pb.Addressee(site=s, signer=keys.fingerprint(k)) for s, k in sorted(sites.items())]


def addressed(plan: pb.QueryPlan, site: str, signer: str) -> bool:
    return any(a.site == site and a.signer == signer for a in plan.addressees)


def describe(entries: Iterable[pb.Addressee], limit: int = 8) -> str:
    """The addressees as text for a refusal (names and fingerprints come from the signed plan)."""
    items = [f"{a.site[:64]!r} ({a.signer[:48]})" for a in entries]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
