"""How a coordinator reaches the sites' guards: the Transport protocol, and Flower (deployment).

Transports composed on one host (gRPC without Flower, in-process guards) live in
`ppsehr.deploy.transports`. Each delivers one serialized SignedPlan to every site and returns the parsed replies (signed
summaries, for kind "enroll" the sites' signed one-time keys, for kind "reveal" their signed reveals) plus a failure record per
site that did not answer (a site that did not answer was not charged by
this coordinator: its guard either refused, which costs nothing, or was never reached).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ...protos import guard_pb2 as pb

Progress = Callable[..., None]  # progress(message, stage=..., **data): pipeline.Events


@dataclass(frozen=True)
class SiteFailure:
    site: str
    code: str
    message: str


@dataclass(frozen=True)
class SiteReply:
    where: str  # who answered, as the transport knows it (node id or configured name); not yet verified
    signed: pb.SignedSummary | pb.KeyShare


# What a site replies to each kind of request ("identify" sends a pb.IdentityRequest, the others a pb.SignedPlan).
KINDS = {"summary": pb.SignedSummary, "enroll": pb.KeyShare, "confirm": pb.Confirmation, "reveal": pb.SignedReveal,
         "identify": pb.SiteIdentity}


class Transport(Protocol):
    def query(self, plan: pb.SignedPlan | pb.IdentityRequest, timeout: float, progress: Progress, kind: str = "summary",
              to: set[str] | None = None) -> tuple[list[SiteReply], list[SiteFailure]]:
        """Send to every site, or only to those named in `to` (as this transport names them in replies)."""
        ...


def parse_reply(where: str, reply: bytes | None, code: str | None, message: str | None,
                kind: str = "summary") -> SiteReply | SiteFailure:
    if reply is None:
        return SiteFailure(where, code or "NO_REPLY", (message or "nothing in the reply")[:1000])
    try:
        signed = KINDS[kind].FromString(reply)
    except Exception:
        return SiteFailure(where, "BAD_REPLY", f"the reply is not a {KINDS[kind].__name__}")
    return SiteReply(where, signed)


class FlowerTransport:
    """Send the plan to every connected SuperNode through Flower's Grid, in one round (message type
    `query.<kind>`)."""

    def __init__(self, grid, min_sites: int, wait_timeout: float, poll: float = 0.1, rejoin_timeout: float = 15.0):
        self.grid, self.min_sites, self.wait_timeout, self.poll = grid, min_sites, wait_timeout, poll
        self.rejoin_timeout = rejoin_timeout
        self.seen: set[int] = set()  # nodes connected for an earlier round of this release

    def wait_for_sites(self, progress: Progress, want: set[int] | None = None) -> list[int]:
        """The connected nodes. The first request waits for `min_sites`; a later one (its sites have paid
        for earlier rounds) waits a little for the earlier nodes it is for (`want`, default all), then
        goes on with whoever is connected."""
        first = not self.seen
        want = self.seen if want is None else want
        deadline = time.monotonic() + (self.wait_timeout if first else min(self.wait_timeout, self.rejoin_timeout))
        need = self.min_sites if first else 1
        last = -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) != last:
                progress(f"{len(nodes)} of " + (f"at least {self.min_sites}" if first else f"{len(self.seen)} earlier")
                         + " site(s) connected")
                last = len(nodes)
            if len(nodes) >= need and (first or want <= set(nodes) or time.monotonic() > deadline):
                self.seen |= set(nodes)
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} site(s) connected after {self.wait_timeout:g} s; "
                                   f"the release needs at least {need}")
            time.sleep(self.poll * 2)

    def query(self, plan, timeout, progress, kind="summary", to=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        connected = self.wait_for_sites(progress, {n for n in self.seen if to is None or f"node {n}" in to})
        gone = [n for n in sorted(self.seen - set(connected)) if to is None or f"node {n}" in to]
        nodes = [n for n in connected if to is None or f"node {n}" in to]
        plan_bytes = plan.SerializeToString()
        messages = [Message(RecordDict({"plan": ConfigRecord({"plan": plan_bytes, "guard-timeout": float(timeout)})}),
                            dst_node_id=n, message_type=f"query.{kind}", group_id="release", ttl=timeout + 60)
                    for n in nodes]
        pending = {mid: node for mid, node in zip(self.grid.push_messages(messages), nodes)}
        progress(f"{'identity request' if kind == 'identify' else 'plan'} sent to {len(nodes)} site(s); waiting for "
                 + {"enroll": "their one-time keys", "identify": "their signed identities", "confirm": "their confirmations",
                    "reveal": "their reveals"}.get(kind, "summaries"))
        replies: list[SiteReply] = []
        failures: list[SiteFailure] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in self.grid.pull_messages(list(pending)):
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                where = f"node {node}"
                if msg.has_error():
                    # Flower's own error (e.g. node unavailable); the reason text comes from Flower, not the site.
                    r = SiteFailure(where, f"FLOWER_{msg.error.code}", "the site's node did not run the relay")
                else:
                    rec = msg.content.config_records.get("result", {})
                    r = parse_reply(where, rec.get("reply"), rec.get("error_code"), rec.get("error"), kind)
                (replies if isinstance(r, SiteReply) else failures).append(r)
                progress(f"{where}: " + (f"signed {kind} received" if isinstance(r, SiteReply) else f"failed ({r.code})"),
                         stage="measure", done=len(replies) + len(failures), total=len(nodes))
            if pending:
                time.sleep(self.poll)
        failures += [SiteFailure(f"node {n}", "TIMEOUT", f"no reply within {timeout:g} s") for n in pending.values()]
        failures += [SiteFailure(f"node {n}", "NOT_SENT", "its node was no longer connected to the SuperLink when the "
                                 "plan went out") for n in gone]
        return replies, failures
