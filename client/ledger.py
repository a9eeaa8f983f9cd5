"""The site's durable privacy ledger and hash-chained audit log (one SQLite file).

A debit is committed (synchronous=FULL, WAL) before any answer is computed, inside one
`BEGIN IMMEDIATE` transaction that re-reads the spent total, so concurrent guards or threads
can never together exceed the lifetime budget. A crash after the debit wastes budget; it can
never release an answer that was not paid for. The daily plan limit is checked in the same
transaction. Every plan answered or refused is audited; each audit entry carries the SHA-256 of
its predecessor, so an edit breaks the chain, and every debit is also an audit entry, so a
deleted or altered debit no longer matches the chain (`Ledger.check`). The state directory is
0700 and the ledger file 0600.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..common.errors import PpsehrError

SCHEMA = """
CREATE TABLE IF NOT EXISTS debits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_id TEXT NOT NULL UNIQUE,
    coordinator TEXT NOT NULL,
    plan_sha256 BLOB NOT NULL,
    rho REAL NOT NULL CHECK (rho >= 0),
    total_after REAL NOT NULL,
    at TEXT NOT NULL,
    at_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    coordinator TEXT NOT NULL,
    code TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_plans (plan_id TEXT PRIMARY KEY, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (sha256 TEXT PRIMARY KEY, policy TEXT NOT NULL, first_seen TEXT NOT NULL);
"""
GENESIS = "0" * 64


class BudgetExceeded(Exception):
    def __init__(self, needed: float, left: float):
        super().__init__(f"plan needs rho {needed:.6g} but only {max(left, 0.0):.6g} of the lifetime budget is left")
        self.needed, self.left = needed, left


class DuplicatePlan(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, limit: int):
        super().__init__(f"policy allows at most {limit} plans per day")
        self.limit = limit


class LedgerError(PpsehrError):
    """The ledger file is damaged or its audit log was altered."""


@dataclass(frozen=True)
class Debit:
    seq: int
    plan_id: str
    rho: float
    total_after: float
    at: str


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    event: str
    plan_id: str
    coordinator: str
    code: str
    detail: str
    prev_hash: str
    hash: str


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _entry_hash(prev_hash: str, at: str, event: str, plan_id: str, coordinator: str, code: str, detail: str) -> str:
    body = json.dumps([prev_hash, at, event, plan_id, coordinator, code, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class Ledger:
    """Lifetime budget ledger and audit log of one site."""

    def __init__(self, path: str | Path, rho_limit: float, site: str):
        self.path = Path(path)
        self.rho_limit = float(rho_limit)
        self.site = site
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        try:
            db = self._connect()
            try:
                db.executescript(SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('site', ?)", (site,))
                stored = db.execute("SELECT value FROM meta WHERE key='site'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: not a readable ledger ({e}); restore it from a backup") from None
        if stored != site:
            raise LedgerError(f"{self.path}: ledger belongs to site {stored!r}, not {site!r}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def spent(self) -> float:
        db = self._connect()
        try:
            return float(db.execute("SELECT COALESCE(SUM(rho), 0) FROM debits").fetchone()[0])
        finally:
            db.close()

    def plans_since(self, seconds: float) -> int:
        db = self._connect()
        try:
            return int(db.execute("SELECT COUNT(*) FROM debits WHERE at_unix >= ?", (time.time() - seconds,)).fetchone()[0])
        finally:
            db.close()

    def claim_plan(self, plan_id: str) -> bool:
        """Record a signed plan id as seen; False if it was seen before (a replay)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM seen_plans WHERE plan_id = ?", (plan_id,)).fetchone():
                return False
            db.execute("INSERT INTO seen_plans VALUES (?, ?)", (plan_id, utcnow()))
            return True

    def seen_plan(self, plan_id: str) -> bool:
        with self._tx() as db:
            return db.execute("SELECT 1 FROM seen_plans WHERE plan_id = ?", (plan_id,)).fetchone() is not None

    def debit(self, plan_id: str, coordinator: str, plan_sha256: bytes, rho: float, detail: dict[str, Any],
              max_plans_per_day: int | None = None) -> Debit:
        """Durably debit rho for a plan and audit it, or raise BudgetExceeded / DuplicatePlan / RateLimited
        (nothing written). Budget and daily limit are checked in the same transaction as the write."""
        if not (isinstance(rho, float) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite non-negative number, got {rho!r}")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM debits WHERE plan_id = ?", (plan_id,)).fetchone():
                raise DuplicatePlan(plan_id)
            if max_plans_per_day is not None and db.execute(
                    "SELECT COUNT(*) FROM debits WHERE at_unix >= ?", (time.time() - 86400,)).fetchone()[0] >= max_plans_per_day:
                raise RateLimited(max_plans_per_day)
            spent = float(db.execute("SELECT COALESCE(SUM(rho), 0) FROM debits").fetchone()[0])
            if spent + rho > self.rho_limit * (1 + 1e-12):
                raise BudgetExceeded(rho, self.rho_limit - spent)
            at = utcnow()
            cur = db.execute(
                "INSERT INTO debits (plan_id, coordinator, plan_sha256, rho, total_after, at, at_unix) VALUES (?,?,?,?,?,?,?)",
                (plan_id, coordinator, plan_sha256, rho, spent + rho, at, time.time()))
            self._append_audit(db, at, "debit", plan_id, coordinator, "OK", {"rho": rho, "total_after": spent + rho, **detail})
            return Debit(int(cur.lastrowid), plan_id, rho, spent + rho, at)

    def record_policy(self, policy: dict[str, Any]) -> str:
        """Store a policy (budget, limits, trusted keys) by its SHA-256; debits name the one in force."""
        text = json.dumps(policy, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO policies VALUES (?, ?, ?)", (digest, text, utcnow()))
        return digest

    def policies(self) -> dict[str, str]:
        db = self._connect()
        try:
            return dict(db.execute("SELECT sha256, policy FROM policies ORDER BY first_seen"))
        finally:
            db.close()

    def enrolled(self, plan_id: str) -> bool:
        """Whether this site ever enrolled in the secure plan `plan_id` (its audit entry is durable)."""
        db = self._connect()
        try:
            return db.execute("SELECT 1 FROM audit WHERE event = 'enrolled' AND plan_id = ?", (plan_id,)).fetchone() is not None
        finally:
            db.close()

    def claim_enrollment(self, plan_id: str, coordinator: str, detail: dict[str, Any]) -> bool:
        """Record, durably and once, that this site enrolled in a secure plan (an `enrolled` audit entry);
        False if it already had (in this process or another, before a restart or not)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM audit WHERE event = 'enrolled' AND plan_id = ?", (plan_id,)).fetchone():
                return False
            self._append_audit(db, utcnow(), "enrolled", plan_id, coordinator, "OK", detail)
            return True

    def audit(self, event: str, plan_id: str, coordinator: str, code: str, detail: dict[str, Any]) -> None:
        with self._tx() as db:
            self._append_audit(db, utcnow(), event, plan_id, coordinator, code, detail)

    @staticmethod
    def _append_audit(db: sqlite3.Connection, at: str, event: str, plan_id: str, coordinator: str,
                      code: str, detail: dict[str, Any]) -> None:
        row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = row[0] if row else GENESIS
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        h = _entry_hash(prev, at, event, plan_id, coordinator, code, text)
        db.execute("INSERT INTO audit (at, event, plan_id, coordinator, code, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
                   (at, event, plan_id, coordinator, code, text, prev, h))

    def debits(self) -> list[Debit]:
        db = self._connect()
        try:
            return [Debit(*r) for r in db.execute("SELECT seq, plan_id, rho, total_after, at FROM debits ORDER BY seq")]
        finally:
            db.close()

    def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        db = self._connect()
        try:
            q = "SELECT seq, at, event, plan_id, coordinator, code, detail, prev_hash, hash FROM audit ORDER BY seq"
            rows = [AuditEntry(*r) for r in db.execute(q)]
        finally:
            db.close()
        return rows[-last:] if last else rows

    def check(self) -> str | None:
        """First problem with the ledger file, or None: SQLite integrity, the audit hash chain, and
        that the debits table and the chain's debit entries agree (a debit deleted, added or altered
        outside the guard shows up here even though the debits table itself is not chained)."""
        db = self._connect()
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                return "SQLite integrity check failed: " + "; ".join(str(r[0]) for r in rows[:5])
            debits = db.execute("SELECT seq, plan_id, rho, total_after FROM debits ORDER BY seq").fetchall()
        except sqlite3.DatabaseError as e:
            return f"SQLite cannot read the ledger: {e}"
        finally:
            db.close()
        broken = self.verify_audit()
        if broken is not None:
            return f"audit chain broken at entry #{broken}: it or an earlier entry was altered or removed"
        audited = []
        for e in self.audit_entries():
            if e.event == "debit":
                d = json.loads(e.detail)
                audited.append((e.seq, e.plan_id, d.get("rho"), d.get("total_after")))
        total = 0.0
        for i, (seq, plan_id, rho, total_after) in enumerate(debits):
            total += rho
            if i >= len(audited) or audited[i][1:] != (plan_id, rho, total_after):
                return f"debit #{seq} (plan {plan_id!r}, rho {rho:.6g}) does not match the audit log's debit entries"
            if not math.isclose(total, total_after, rel_tol=1e-9, abs_tol=1e-15):
                return f"debit #{seq}: running total {total:.9g} differs from the recorded total {total_after:.9g}"
        if len(audited) > len(debits):
            seq, plan_id = audited[len(debits)][:2]
            return f"audit entry #{seq} records a debit for plan {plan_id!r} that the debits table lacks"
        return None

    def verify_audit(self) -> int | None:
        """Sequence number of the first entry whose chain does not hold, or None if intact."""
        prev = GENESIS
        for e in self.audit_entries():
            if e.prev_hash != prev or _entry_hash(prev, e.at, e.event, e.plan_id, e.coordinator, e.code, e.detail) != e.hash:
                return e.seq
            prev = e.hash
        return None
