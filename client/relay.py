"""Flower ClientApp: a thin relay between the coordinator and this site's guard.

It holds no data and no keys. It forwards the serialized query plan to the guard named in
the SuperNode's `--node-config guard-address=...` and returns the guard's serialized reply: a
signed summary (message type `query.summary`), for secure aggregation the site's signed
one-time key (`query.enroll`) and, for secure sums that tolerate dropouts, its signed
confirmation of who answered (`query.confirm`) and its signed reveal (`query.reveal`), or, before
the coordinator's first paid plan, the site's signed identity (`query.identify`: name and signing
key over the coordinator's challenge; free).
Whatever goes wrong, the reply carries a fixed error code and a data-free message: Flower
would otherwise forward exception text to the coordinator word for word. Imports stay light
(no numpy, no OpenDP) because Flower starts a fresh process for every message.

Simulation only (`ppsehr simulate`, Flower's Simulation Engine): a virtual SuperNode has no guard
process. When the environment of the simulation (set by whoever starts it, never by a run or its
FAB) names a site index in PPSEHR_SIMULATION_SITES, a virtual node without guard-address answers
through an in-process guard built from the site config its partition-id points at, once per
worker process (`SIMULATION_GUARDS` most recently used kept). Same guard code, same ledger.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..common.refusals import MAX_PLAN_BYTES, REFUSAL_CODES, RELAY_CODES
from ..protos import guard_pb2 as pb
from ..protos import guard_pb2_grpc as pb_grpc

app = ClientApp()

SIMULATION_SITES_ENV = "PPSEHR_SIMULATION_SITES"  # JSON list of site config paths, by partition-id
SIMULATION_GUARDS = int(os.environ.get("PPSEHR_SIMULATION_GUARDS", "4096"))  # in-process guards kept per worker
_sim_guards: OrderedDict[str, object] = OrderedDict()
_sim_index: dict[str, list[str]] = {}
_sim_lock = threading.Lock()


def _error(code: str, message: str) -> ConfigRecord:
    return ConfigRecord({"error_code": code, "error": message})


def _printable(text: str, limit: int = 1000) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


# What the coordinator sends for each kind of message, and the guard call that answers it.
REQUESTS = {"summary": (pb.SignedPlan, "Answer", "answer"), "enroll": (pb.SignedPlan, "Enroll", "enroll"),
            "confirm": (pb.SignedPlan, "Confirm", "confirm"), "reveal": (pb.SignedPlan, "Reveal", "reveal"),
            "identify": (pb.IdentityRequest, "Identify", "identify")}


def _parse(request_bytes: bytes, kind: str):
    """The request of `kind`, or an error record."""
    if kind not in REQUESTS:
        return _error("RELAY_ERROR", RELAY_CODES["RELAY_ERROR"])
    try:
        return REQUESTS[kind][0].FromString(request_bytes)
    except Exception:
        return _error("MALFORMED_PLAN", "the relay could not parse the signed query plan" if kind != "identify"
                      else "the relay could not parse the identity request")


def relay_plan(plan_bytes: bytes, guard_address: str, timeout: float, kind: str = "summary") -> ConfigRecord:
    """Send one signed plan to the guard (Answer; Enroll / Confirm / Reveal for those kinds), or an
    identity request (Identify, kind "identify"); the record holds the guard's serialized `reply`
    (SignedSummary, KeyShare, Confirmation, SignedReveal or SiteIdentity) or `error_code`/`error`.

    Only the guard's own refusals ("CODE: message", built from plan and policy) pass through;
    every other error becomes a relay code with its fixed message (common/refusals.py)."""
    if len(plan_bytes) > MAX_PLAN_BYTES:
        return _error("PLAN_TOO_LARGE", f"the signed plan has {len(plan_bytes)} bytes; guards accept at most {MAX_PLAN_BYTES}")
    plan = _parse(plan_bytes, kind)
    if isinstance(plan, ConfigRecord):
        return plan
    try:
        with grpc.insecure_channel(guard_address) as channel:
            stub = pb_grpc.SiteGuardStub(channel)
            reply = getattr(stub, REQUESTS[kind][1])(plan, timeout=timeout)
    except grpc.RpcError as e:
        details = (e.details() or "") if hasattr(e, "details") else ""
        code, _, message = details.partition(":")
        if code in REFUSAL_CODES:  # the guard's own refusal: fixed code, data-free message
            return _error(code, _printable(message.strip()))
        status = e.code() if hasattr(e, "code") else None
        if status == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _error("GUARD_TIMEOUT", f"the site guard did not answer within {timeout:g} s")
        if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _error("GUARD_BUSY", RELAY_CODES["GUARD_BUSY"])
        return _error("GUARD_UNAVAILABLE", RELAY_CODES["GUARD_UNAVAILABLE"])
    except Exception:
        return _error("RELAY_ERROR", RELAY_CODES["RELAY_ERROR"])
    return ConfigRecord({"reply": reply.SerializeToString()})


@app.query("summary")
def summary(msg: Message, context: Context) -> Message:
    return _relay(msg, context, "summary")


@app.query("enroll")
def enroll(msg: Message, context: Context) -> Message:
    return _relay(msg, context, "enroll")


@app.query("confirm")
def confirm(msg: Message, context: Context) -> Message:
    return _relay(msg, context, "confirm")


@app.query("reveal")
def reveal(msg: Message, context: Context) -> Message:
    return _relay(msg, context, "reveal")


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    return _relay(msg, context, "identify")


def simulation_site_config(node_config) -> str | None:
    """Simulation only: the site config path of this virtual node (None outside a simulation)."""
    index = os.environ.get(SIMULATION_SITES_ENV, "")
    if not index or "guard-address" in node_config or "partition-id" not in node_config:
        return None
    if index not in _sim_index:
        with open(index, encoding="utf-8") as f:
            _sim_index[index] = [str(p) for p in json.load(f)]
    return _sim_index[index][int(node_config["partition-id"])]


def _simulation_guard(config_path: str):
    """The in-process guard of a simulated site, built on first use in this worker process."""
    with _sim_lock:
        guard = _sim_guards.get(config_path)
        if guard is not None:
            _sim_guards.move_to_end(config_path)
            return guard
    from .config import load_site_config
    from .guard import SiteGuard

    guard = SiteGuard(load_site_config(config_path))
    with _sim_lock:
        _sim_guards[config_path] = guard
        while len(_sim_guards) > SIMULATION_GUARDS:
            _sim_guards.popitem(last=False)
    return guard



def relay_in_process(plan_bytes: bytes, config_path: str, kind: str = "summary") -> ConfigRecord:
    """`relay_plan` for a simulated site: the same checks and reply record, the guard in this process."""
    if len(plan_bytes) > MAX_PLAN_BYTES:
        return _error("PLAN_TOO_LARGE", f"the signed plan has {len(plan_bytes)} bytes; guards accept at most {MAX_PLAN_BYTES}")
    plan = _parse(plan_bytes, kind)
    if isinstance(plan, ConfigRecord):
        return plan
    from .guard import Refusal

    try:
        guard = _simulation_guard(config_path)
        reply = getattr(guard, REQUESTS[kind][2])(plan)
    except Refusal as r:  # the guard's own refusal: fixed code, data-free message
        return _error(r.code, _printable(r.message))
    except Exception:  # details stay in this (simulated) site's log
        logging.getLogger("ppsehr.relay").exception("in-process guard for %s failed", config_path)
        return _error("GUARD_UNAVAILABLE", RELAY_CODES["GUARD_UNAVAILABLE"])
    return ConfigRecord({"reply": reply.SerializeToString()})


def _relay(msg: Message, context: Context, kind: str) -> Message:
    try:
        address = str(context.node_config.get("guard-address", ""))
        simulated = None if address else simulation_site_config(context.node_config)
        if simulated:
            plan_bytes = msg.content.config_records["plan"]["plan"]
            record = relay_in_process(bytes(plan_bytes), simulated, kind)
        elif not address:
            record = _error("RELAY_MISCONFIGURED", "the SuperNode has no guard-address in its --node-config")
        else:
            plan_bytes = msg.content.config_records["plan"]["plan"]
            timeout = float(msg.content.config_records["plan"].get("guard-timeout", 600.0))
            record = relay_plan(bytes(plan_bytes), address, timeout, kind)
    except Exception:
        record = _error("RELAY_ERROR", "the relay could not process the message")
    return Message(RecordDict({"result": record}), reply_to=msg)
