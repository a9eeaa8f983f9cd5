"""Secure aggregation by pairwise masking (Bonawitz et al. 2017), with dropout recovery.

For one plan every enrolled site makes a one-time X25519 key and signs it with its Ed25519 site
key. Given the roster of all enrolled keys, each pair of sites derives the same mask stream
(X25519 shared secret -> HKDF-SHA256 bound to the plan and the pair -> ChaCha20 keystream read as
uint64); the lower-named site adds it, the other subtracts it, all mod 2^64. A masked table alone
is uniformly random; the sum over the whole roster is the sum of the noisy tables. The noise
itself is drawn by OpenDP in the guard; its privacy loss is `accounting.distributed_rho`.

Dropouts (plan.secure.dropouts = d > 0; docs/secure-aggregation.md#dropouts). Each answering site
also adds a self-mask from a fresh seed and Shamir-shares the seed (threshold t = n - d, over the
prime field GF(2^127 - 1)) among the roster, each share sealed with ChaCha20-Poly1305 under a key
derived from the pair's X25519 secret (HKDF info "share", never the mask seed), and sends the sealed
shares with its answer. Once the coordinator has the answers it signs who answered (survivors) and
who did not (dropped); each survivor's guard confirms that statement (one per plan, signed), and
then, given t survivors' confirmations of it, reveals once its shares of the survivors' self-mask
seeds and its pair-mask seeds with the dropped sites. The coordinator rebuilds the
self-masks from t shares each, and the masks the survivors share with the dropped sites from
those seeds, and removes both. An honest guard reveals for a site either a self-mask share (it is
told the site answered) or its pair seed (told it dropped), never both, so an answer stays masked
unless the threshold is reachable by the colluding sites plus d + 1 (`min_threshold`, required).
Without d (d = 0) a site that enrolls but does not answer makes the sum unreadable: that round is
lost, and the budget of the sites that did answer is wasted, never overspent.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
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


def _secret(private: X25519PrivateKey, peer: str, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: no shared secret (a peer's key, signed but unusable)
        raise RosterError(f"roster entry for {peer!r}: its key gives no shared secret") from None


def pair_seed(me: str, private: X25519PrivateKey, peer: str, public: bytes, plan_sha256: bytes) -> bytes:
    """The ChaCha20 key of the mask between `me` and `peer` (both derive it; a survivor reveals it for a dropped peer)."""
    low, high = sorted([me, peer])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=plan_sha256,
                info=b"\0".join([CONTEXT, b"mask", low.encode(), high.encode()])).derive(_secret(private, peer, public))


def stream(seed: bytes, length: int) -> np.ndarray:
    """`length` uint64 words of ChaCha20 keystream under `seed` (a mask)."""
    data = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def pair_pad(me: str, peer: str, seed: bytes, length: int) -> np.ndarray:
    """The pair's mask as `me` adds it: the lower-named site adds the stream, the other subtracts it."""
    pad = stream(seed, length)
    return pad if me < peer else np.zeros(length, dtype=np.uint64) - pad


def mask(me: str, private: X25519PrivateKey, roster: dict[str, bytes], plan_sha256: bytes, length: int) -> np.ndarray:
    """The sum of this site's signed pairwise masks over `length` cells (uint64, mod 2^64)."""
    total = np.zeros(length, dtype=np.uint64)
    for peer, public in sorted(roster.items()):
        if peer != me:
            total += pair_pad(me, peer, pair_seed(me, private, peer, public, plan_sha256), length)  # wraps mod 2^64
    return total


# ----------------------------------------------------------------------------- Shamir over GF(P)
P = 2 ** 127 - 1  # a Mersenne prime: self-mask seeds are field elements, shares are 16 bytes


def shamir_split(secret: int, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares f(x) for x in `xs` of a random polynomial f of degree threshold - 1 with f(0) = secret."""
    if not (0 <= secret < P and 1 <= threshold <= len(xs) and len(set(xs)) == len(xs) and all(0 < x < P for x in xs)):
        raise ValueError(f"cannot share a secret with threshold {threshold} among {len(xs)} distinct nonzero points")
    coefficients = [secret] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % P
        out[x] = y
    return out


def lagrange_at_zero(xs: list[int]) -> list[int]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for any f of degree < len(xs) (shared by every secret)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % P, den * (xj - xi) % P
        out.append(num * pow(den, -1, P) % P)
    return out


def shamir_combine(points: dict[int, int], coefficients: list[int] | None = None) -> int:
    xs = sorted(points)
    coefficients = coefficients or lagrange_at_zero(xs)
    return sum(c * points[x] for c, x in zip(coefficients, xs)) % P


def index(roster, site: str) -> int:
    """A site's Shamir x: its 1-based position in the sorted roster."""
    return sorted(roster).index(site) + 1


def new_self_seed() -> int:
    return secrets.randbelow(P)


def self_pad(site: str, seed: int, plan_sha256: bytes, length: int) -> np.ndarray:
    """A site's self-mask for one plan from its seed (a field element)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=plan_sha256,
               info=b"\0".join([CONTEXT, b"self", site.encode()])).derive(seed.to_bytes(16, "big"))
    return stream(key, length)


def _share_key(sender: str, recipient: str, secret: bytes, plan_sha256: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=plan_sha256,
                                 info=b"\0".join([CONTEXT, b"share", sender.encode(), recipient.encode()])).derive(secret))


def seal_share(sender: str, private: X25519PrivateKey, recipient: str, public: bytes, plan_sha256: bytes,
               share: int) -> bytes:
    """One Shamir share, readable only by `recipient` (one key per plan, sender and recipient: a zero nonce is safe)."""
    aad = b"\0".join([CONTEXT, plan_sha256, sender.encode(), recipient.encode()])
    return _share_key(sender, recipient, _secret(private, recipient, public), plan_sha256).encrypt(
        bytes(12), share.to_bytes(16, "big"), aad)


def open_share(recipient: str, private: X25519PrivateKey, sender: str, public: bytes, plan_sha256: bytes,
               ciphertext: bytes) -> int:
    aad = b"\0".join([CONTEXT, plan_sha256, sender.encode(), recipient.encode()])
    try:
        value = int.from_bytes(_share_key(sender, recipient, _secret(private, sender, public), plan_sha256).decrypt(
            bytes(12), bytes(ciphertext), aad), "big")
    except InvalidTag:
        raise RosterError(f"the share sealed by {sender!r} does not open: altered, or not sealed for this site") from None
    if value >= P:
        raise RosterError(f"the share sealed by {sender!r} is not a field element")
    return value


# ----------------------------------------------------------------------------- recovery (coordinator)
class RecoveryError(Exception):
    """Masks that cannot be removed (the message says which site's)."""


# Largest roster a plan with dropouts may have: every site shares with the whole roster, and the Reveal
# request carries every survivor's sealed share for every other (about 75 bytes each), which must stay
# within the guard's 4 MiB message limit (refusals.MAX_PLAN_BYTES). A neighbour graph (SecAgg+) would lift it.
MAX_SHARING_ROSTER = 200


def reveal_request_bytes(sites: list[str], plan_bytes: int) -> int:
    """An upper bound on the size of a Reveal request for this roster: the signed plan, the statement,
    t confirmations and every survivor's sealed share for every other."""
    names = sum(len(s.encode()) for s in sites)
    n = len(sites)
    return plan_bytes + 2 * names + 200 + n * 140 + (n - 1) * 2 * names + n * (n - 1) * 60


def min_threshold(dropouts: int, colluding: int) -> int:
    """The smallest threshold t = n - d a plan with dropouts may have: t >= d + colluding + 2, i.e.
    n >= 2d + colluding + 2. Then 2t > n + colluding, so two different recovery statements cannot
    both gather t confirmations (each honest site confirms one), and every honest guard reveals for
    the same survivors; and t > colluding + 1, so the colluders and the hidden site itself cannot
    rebuild the self-mask of an answer the coordinator hid and called dropped. Without the
    confirmations, a coordinator telling each guard a different story could read partial sums, or
    an answer, once n <= 2d + colluding + 1."""
    return dropouts + colluding + 2


def threshold(parties: int, dropouts: int) -> int:
    """Shares needed to rebuild a self-mask seed: the fewest sites whose answers can be read together."""
    return parties - dropouts


def statement_bytes(plan_sha256: bytes, roster: dict[str, bytes], survivors, dropped) -> bytes:
    return pb.RecoveryStatement(plan_sha256=plan_sha256, roster_sha256=roster_sha256(roster), survivors=sorted(survivors),
                                dropped=sorted(dropped)).SerializeToString(deterministic=True)


def check_statement(statement: pb.RecoveryStatement, plan_sha256: bytes, roster: dict[str, bytes], dropouts: int) -> None:
    """A recovery statement must split exactly this roster into survivors and at most `dropouts` dropped sites."""
    survivors, dropped = list(statement.survivors), list(statement.dropped)
    if statement.plan_sha256 != plan_sha256 or statement.roster_sha256 != roster_sha256(roster):
        raise RosterError("the recovery statement is for another plan or roster")
    if survivors != sorted(set(survivors)) or dropped != sorted(set(dropped)) or set(survivors) & set(dropped) \
            or set(survivors) | set(dropped) != set(roster):
        raise RosterError("the recovery statement does not split the roster into survivors and dropped sites (sorted, "
                          "each once)")
    if len(dropped) > dropouts:
        raise RosterError(f"the recovery statement lists {len(dropped)} dropped site(s); the plan tolerates {dropouts}")


def recovered(survivors, dropped, revealers, parties: int, dropouts: int, confirmers=None) -> bool:
    """Whether reveals from `revealers` suffice to read the survivors' sum: t of them for the self-masks,
    and, when sites dropped, every survivor (each holds its own pair seeds with them); and t survivors
    confirmed the statement (`confirmers`, when given)."""
    revealers, survivors = set(revealers), set(survivors)
    t = threshold(parties, dropouts)
    return (revealers <= survivors and len(dropped) <= dropouts and len(revealers) >= t
            and (not dropped or revealers == survivors)
            and (confirmers is None or (set(confirmers) <= survivors and len(set(confirmers)) >= t)))


def confirm_bytes(site: str, plan_sha256: bytes, statement_sha256: bytes) -> bytes:
    """What a survivor signs to confirm a recovery statement."""
    return b"\0".join([CONTEXT, b"confirm", plan_sha256, site.encode(), statement_sha256])


def check_confirmations(confirmations, statement: bytes, plan_sha256: bytes, survivors, site_keys: dict) -> list[str]:
    """The survivors whose confirmations of `statement` verify against their site keys (each once)."""
    digest = hashlib.sha256(statement).digest()
    out: list[str] = []
    for c in confirmations:
        key = site_keys.get(c.site)
        if c.site not in survivors or c.site in out or key is None or c.statement_sha256 != digest:
            raise RosterError(f"a confirmation from {c.site[:80]!r}: not a survivor's (or twice), or of another statement")
        if not keys.verify(key, c.signature, confirm_bytes(c.site, plan_sha256, digest)):
            raise RosterError(f"the confirmation of {c.site!r} does not verify against its site key")
        out.append(c.site)
    return out


def correction(plan_sha256: bytes, roster: dict[str, bytes], dropouts: int, survivors, dropped,
               reveals: dict[str, pb.Reveal], length: int) -> np.ndarray:
    """What to subtract from the survivors' summed masked tables: their self-masks (each rebuilt from t
    shares) and the pair masks they share with the dropped sites (from their revealed seeds)."""
    survivors, dropped = sorted(survivors), sorted(dropped)
    if not recovered(survivors, dropped, reveals, len(roster), dropouts):
        raise RecoveryError(f"reveals from {sorted(reveals)} do not suffice to read the sum of {survivors}")
    t = threshold(len(roster), dropouts)
    shares: dict[str, dict[int, int]] = {s: {} for s in survivors}
    seeds: dict[tuple[str, str], bytes] = {}
    for site, rv in reveals.items():
        x = index(roster, site)
        for sh in rv.shares:
            if sh.owner in shares:
                shares[sh.owner][x] = int.from_bytes(sh.share, "big")
        for sd in rv.seeds:
            if sd.peer in dropped:
                seeds[(site, sd.peer)] = bytes(sd.seed)
    total = np.zeros(length, dtype=np.uint64)
    coefficients: dict[tuple[int, ...], list[int]] = {}  # mostly one set of points serves every seed
    for owner in survivors:
        points = shares[owner]
        if len(points) < t:
            raise RecoveryError(f"too few shares of {owner!r}'s self-mask seed ({len(points)}, {t} needed)")
        xs = tuple(sorted(points)[:t])
        if xs not in coefficients:
            coefficients[xs] = lagrange_at_zero(list(xs))
        seed = shamir_combine({x: points[x] for x in xs}, coefficients[xs])
        total += self_pad(owner, seed, plan_sha256, length)
    for v in survivors:
        for x in dropped:
            if (v, x) not in seeds:
                raise RecoveryError(f"{v!r} did not reveal its pair seed with {x!r}")
            total += pair_pad(v, x, seeds[(v, x)], length)
    return total


def check_reveal_receipt(raw: bytes, signature: bytes, key, site: str, plan_sha256: bytes, statement: bytes,
                         survivors, dropped) -> pb.RevealReceipt:
    """A survivor's signed reveal receipt: signed by its site key, for this plan and statement, revealing
    self-mask shares of exactly the survivors and pair seeds with exactly the dropped sites."""
    if not keys.verify(key, signature, raw):
        raise RosterError(f"the reveal receipt of {site!r}: its signature does not verify")
    rc = pb.RevealReceipt.FromString(raw)
    if rc.site != site or rc.plan_sha256 != plan_sha256 or rc.statement_sha256 != hashlib.sha256(statement).digest():
        raise RosterError(f"the reveal receipt of {site!r} is for another site, plan or recovery statement")
    if list(rc.shares_of) != sorted(survivors) or list(rc.seeds_with) != sorted(dropped):
        raise RosterError(f"the reveal receipt of {site!r} reveals for other sites than the statement's survivors "
                          "and dropped sites")
    return rc


def unmasked_sum(tables: list, correction: np.ndarray | None = None) -> np.ndarray:
    """Sum masked tables mod 2^64 and read the result as signed counts (masks cancel over a full roster;
    with dropouts, after the `correction` is subtracted)."""
    total = np.zeros(len(tables[0]), dtype=np.uint64)
    for t in tables:
        total += np.asarray(t, dtype=np.uint64)
    if correction is not None:
        total -= correction
    return total.view(np.int64)


def masked(counts, pad: np.ndarray) -> np.ndarray:
    """Noisy integer counts plus a mask, mod 2^64."""
    return np.asarray(counts, dtype=np.int64).view(np.uint64) + pad


@dataclass(frozen=True)
class Session:
    """What a guard keeps between Enroll and Answer for one plan (in memory only; that the site enrolled
    is also recorded in its ledger, so a second Enroll, even after a restart, never makes a new key)."""

    private: X25519PrivateKey
    public: bytes
    expires_at: float
    rho: float  # planned loss, held back from the budget until the plan is answered or expires
    share: pb.KeyShare | None = None  # the signed share given out: a repeated Enroll gets this one back


@dataclass
class Answered:
    """What a guard keeps between Answer and Reveal for a plan with dropouts (memory only, one reveal)."""

    private: X25519PrivateKey
    roster: dict[str, bytes]
    own_share: int  # this site's share of its own self-mask seed
    dropouts: int
    need: int  # the fewest survivors whose sum this site joins
    signer: str  # the plan's signer: only it may sign the recovery statement
    plan_id: str
    expires_at: float
    colluding: int = 0
    confirmed: bytes | None = None  # SHA-256 of the one recovery statement this site confirmed
