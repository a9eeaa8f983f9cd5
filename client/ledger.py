"""The site's durable privacy ledger and hash-chained audit log (one SQLite file).

A debit is committed (synchronous=FULL, WAL) before any answer is computed, inside one
`BEGIN IMMEDIATE` transaction that re-reads the spent total, so concurrent guards or threads
can never together exceed the lifetime budget. A crash after the debit wastes budget; it can
never release an answer that was not paid for. Every plan answered or refused is audited;
each audit entry carries the SHA-256 of its predecessor, so an edit breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

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
"""
GENESIS = "0" * 64


class BudgetExceeded(Exception):
    def __init__(self, needed: float, left: float):
        super().__init__(f"plan needs rho {needed:.6g} but only {max(left, 0.0):.6g} of the lifetime budget is left")
        self.needed, self.left = needed, left


class DuplicatePlan(Exception):
    pass


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('site', ?)", (site,))
            stored = db.execute("SELECT value FROM meta WHERE key='site'").fetchone()[0]
        finally:
            db.close()
        if stored != site:
            raise ValueError(f"{self.path}: ledger belongs to site {stored!r}, not {site!r}")

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

    def debit(self, plan_id: str, coordinator: str, plan_sha256: bytes, rho: float, detail: dict[str, Any]) -> Debit:
        """Durably debit rho for a plan and audit it, or raise BudgetExceeded / DuplicatePlan (nothing written)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM debits WHERE plan_id = ?", (plan_id,)).fetchone():
                raise DuplicatePlan(plan_id)
            spent = float(db.execute("SELECT COALESCE(SUM(rho), 0) FROM debits").fetchone()[0])
            if spent + rho > self.rho_limit * (1 + 1e-12):
                raise BudgetExceeded(rho, self.rho_limit - spent)
            at = utcnow()
            cur = db.execute(
                "INSERT INTO debits (plan_id, coordinator, plan_sha256, rho, total_after, at, at_unix) VALUES (?,?,?,?,?,?,?)",
                (plan_id, coordinator, plan_sha256, rho, spent + rho, at, time.time()))
            self._append_audit(db, at, "debit", plan_id, coordinator, "OK", {"rho": rho, "total_after": spent + rho, **detail})
            return Debit(int(cur.lastrowid), plan_id, rho, spent + rho, at)

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

    def verify_audit(self) -> int | None:
        """Sequence number of the first entry whose chain does not hold, or None if intact."""
        prev = GENESIS
        for e in self.audit_entries():
            if e.prev_hash != prev or _entry_hash(prev, e.at, e.event, e.plan_id, e.coordinator, e.code, e.detail) != e.hash:
                return e.seq
            prev = e.hash
        return None
