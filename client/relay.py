"""Flower ClientApp: a thin relay between the coordinator and this site's guard.

It holds no data and no keys. It forwards the serialized query plan to the guard named in
the SuperNode's `--node-config guard-address=...` and returns the guard's serialized reply: a
signed summary (message type `query.summary`) or, for secure aggregation, the site's signed
one-time key (`query.enroll`).
Whatever goes wrong, the reply carries a fixed error code and a data-free message: Flower
would otherwise forward exception text to the coordinator word for word. Imports stay light
(no numpy, no OpenDP) because Flower starts a fresh process for every message.
"""

from __future__ import annotations

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..common.refusals import MAX_PLAN_BYTES, REFUSAL_CODES, RELAY_CODES
from ..protos import guard_pb2 as pb
from ..protos import guard_pb2_grpc as pb_grpc

app = ClientApp()


def _error(code: str, message: str) -> ConfigRecord:
    return ConfigRecord({"error_code": code, "error": message})


def _printable(text: str, limit: int = 1000) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def relay_plan(plan_bytes: bytes, guard_address: str, timeout: float, kind: str = "summary") -> ConfigRecord:
    """Send one signed plan to the guard (Answer, or Enroll for kind "enroll"); the record holds the
    guard's serialized `reply` (SignedSummary or KeyShare) or `error_code`/`error`.

    Only the guard's own refusals ("CODE: message", built from plan and policy) pass through;
    every other error becomes a relay code with its fixed message (common/refusals.py)."""
    if len(plan_bytes) > MAX_PLAN_BYTES:
        return _error("PLAN_TOO_LARGE", f"the signed plan has {len(plan_bytes)} bytes; guards accept at most {MAX_PLAN_BYTES}")
    try:
        plan = pb.SignedPlan.FromString(plan_bytes)
    except Exception:
        return _error("MALFORMED_PLAN", "the relay could not parse the signed query plan")
    try:
        with grpc.insecure_channel(guard_address) as channel:
            stub = pb_grpc.SiteGuardStub(channel)
            reply = (stub.Enroll if kind == "enroll" else stub.Answer)(plan, timeout=timeout)
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


def _relay(msg: Message, context: Context, kind: str) -> Message:
    try:
        address = str(context.node_config.get("guard-address", ""))
        if not address:
            record = _error("RELAY_MISCONFIGURED", "the SuperNode has no guard-address in its --node-config")
        else:
            plan_bytes = msg.content.config_records["plan"]["plan"]
            timeout = float(msg.content.config_records["plan"].get("guard-timeout", 600.0))
            record = relay_plan(bytes(plan_bytes), address, timeout, kind)
    except Exception:
        record = _error("RELAY_ERROR", "the relay could not process the message")
    return Message(RecordDict({"result": record}), reply_to=msg)
