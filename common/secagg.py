"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, without dropout recovery).

For one plan every enrolled site makes a one-time X25519 key and signs it with its Ed25519 site
key. Given the roster of all enrolled keys, each pair of sites derives the same mask stream
(X25519 shared secret -> HKDF-SHA256 bound to the plan and the pair -> ChaCha20 keystream read as
uint64); the lower-named site adds it, the other subtracts it, all mod 2^64. A masked table alone
is uniformly random; the sum over the whole roster is the sum of the noisy tables. The noise
itself is drawn by OpenDP in the guard; its privacy loss is `accounting.distributed_rho`.

A site that enrolls but does not answer makes the sum unreadable (no Shamir shares of the masks):
that round is lost, and the budget of the sites that did answer is wasted, never overspent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import keys
from ..protos import guard_pb2 as pb

CONTEXT = b"ppsehr-secagg-v1"


class RosterError(Exception):
    """A roster this site must not mask against (the message names the entry, never data)."""


def share_statement(site: str, plan_sha256: bytes, public_key: bytes) -> bytes:
    """The bytes a site signs to vouch for its one-time key for one plan."""
    return b"\0".join([CONTEXT, b"key-share", plan_sha256, site.encode(), public_key])


def new_share(site: str, plan_sha256: bytes, signing_key, peers=(), min_parties: int = 2) -> tuple[X25519PrivateKey, pb.KeyShare]:
    """A one-time key pair for this plan and the signed share that announces its public half
    (with the site's terms: the peers it masks with, the smallest sum it joins)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, pb.KeyShare(site=site, plan_sha256=plan_sha256, public_key=public,
                                signature=signing_key.sign(share_statement(site, plan_sha256, public)),
                                signer=keys.fingerprint(signing_key.public_key()), peers=sorted(peers),
                                min_parties=min_parties)


def agreeing(shares: dict[str, pb.KeyShare]) -> list[str]:
    """The largest roster (found greedily) in which every site lists every other as a peer and the
    sum is at least as large as every member's min_parties; sites that cannot join are dropped,
    the one the most others cannot mask with first."""
    members = set(shares)
    while members:
        def misfits(s: str) -> int:
            others = members - {s}
            return len(others - set(shares[s].peers)) + sum(s not in shares[o].peers for o in others)

        bad = [s for s in members if misfits(s) or shares[s].min_parties > len(members)]
        if not bad:
            break
        members.remove(max(bad, key=lambda s: (misfits(s), shares[s].min_parties, s)))
    return sorted(members)


def check_share(share: pb.KeyShare, plan_sha256: bytes, site_keys: dict) -> str:
    """Verify one roster entry against the known site keys (site -> Ed25519 public key); return its site."""
    key = site_keys.get(share.site)
    if key is None:
        raise RosterError(f"roster entry for {share.site[:80]!r}: not a site this party knows")
    if share.signer != keys.fingerprint(key) or not keys.verify(
            key, share.signature, share_statement(share.site, share.plan_sha256, share.public_key)):
        raise RosterError(f"roster entry for {share.site!r}: its signature does not verify against the site's key")
    if share.plan_sha256 != plan_sha256:
        raise RosterError(f"roster entry for {share.site!r}: enrolled for another plan")
    if len(share.public_key) != 32:
        raise RosterError(f"roster entry for {share.site!r}: not an X25519 public key")
    return share.site


def check_roster(roster, plan_sha256: bytes, site_keys: dict) -> dict[str, bytes]:
    """Every entry verified, one per site, distinct keys: site -> X25519 public key bytes."""
    out: dict[str, bytes] = {}
    for share in roster:
        site = check_share(share, plan_sha256, site_keys)
        if site in out:
            raise RosterError(f"roster names site {site!r} twice")
        if share.public_key in out.values():
            raise RosterError(f"roster entry for {site!r} reuses another site's key")
        out[site] = bytes(share.public_key)
    return out


def roster_sha256(roster: dict[str, bytes]) -> bytes:
    """A digest of the roster (sorted by site) that receipts and the manifest can compare."""
    h = hashlib.sha256(CONTEXT + b"\0roster")
    for site in sorted(roster):
        h.update(site.encode() + b"\0" + roster[site])
    return h.digest()


def mask(me: str, private: X25519PrivateKey, roster: dict[str, bytes], plan_sha256: bytes, length: int) -> np.ndarray:
    """The sum of this site's signed pairwise masks over `length` cells (uint64, mod 2^64)."""
    total = np.zeros(length, dtype=np.uint64)
    for peer, public in sorted(roster.items()):
        if peer == me:
            continue
        try:
            secret = private.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:  # a low-order point: no shared secret (a peer's key, signed but unusable)
            raise RosterError(f"roster entry for {peer!r}: its key gives no shared secret") from None
        low, high = sorted([me, peer])
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=plan_sha256,
                    info=b"\0".join([CONTEXT, b"mask", low.encode(), high.encode()])).derive(secret)
        stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
        pad = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
        total = total + pad if me == low else total - pad  # uint64 arithmetic wraps mod 2^64
    return total


def masked(counts, pad: np.ndarray) -> np.ndarray:
    """Noisy integer counts plus a mask, mod 2^64."""
    return np.asarray(counts, dtype=np.int64).view(np.uint64) + pad


def unmasked_sum(tables: list) -> np.ndarray:
    """Sum masked tables mod 2^64 and read the result as signed counts (masks cancel over a full roster)."""
    total = np.zeros(len(tables[0]), dtype=np.uint64)
    for t in tables:
        total += np.asarray(t, dtype=np.uint64)
    return total.view(np.int64)


@dataclass(frozen=True)
class Session:
    """What a guard keeps between Enroll and Answer for one plan (in memory only; that the site enrolled
    is also recorded in its ledger, so a second Enroll, even after a restart, never makes a new key)."""

    private: X25519PrivateKey
    public: bytes
    expires_at: float
    rho: float  # planned loss, held back from the budget until the plan is answered or expires
    share: pb.KeyShare | None = None  # the signed share given out: a repeated Enroll gets this one back
