"""Transports that compose the coordinator's pipeline with site code on one host.

`DirectTransport` asks guards over gRPC through the same relay logic the Flower ClientApp runs
(tests, single-host consortia); `InProcessTransport` calls SiteGuard objects in this process
(benchmarks, simulation). Both live here, above `client/` and `server/`, because they need both.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..protos import guard_pb2 as pb
from ..server.measure.transport import SiteFailure, SiteReply, parse_reply


class DirectTransport:
    """Talk to guards over gRPC without Flower (tests, benchmarks, a single-host consortium)."""

    def __init__(self, guards: dict[str, str]):
        self.guards = guards

    def _ask(self, name: str, address: str, plan: pb.SignedPlan, timeout: float, kind: str) -> SiteReply | SiteFailure:
        from ..client.relay import relay_plan  # the same relay logic the Flower ClientApp runs

        record = relay_plan(plan.SerializeToString(), address, timeout, kind)
        return parse_reply(name, record.get("reply"), record.get("error_code"), record.get("error"), kind)

    def query(self, plan, timeout, progress, kind="summary", to=None):
        guards = {k: v for k, v in self.guards.items() if to is None or k in to}
        progress(f"sending the {'identity request' if kind == 'identify' else 'plan'} ({kind}) to {len(guards)} site(s) directly")
        with ThreadPoolExecutor(max_workers=max(1, len(guards))) as pool:
            results = list(pool.map(lambda kv: self._ask(kv[0], kv[1], plan, timeout, kind), guards.items()))
        return [r for r in results if isinstance(r, SiteReply)], [r for r in results if isinstance(r, SiteFailure)]


class InProcessTransport:
    """Call SiteGuard objects living in this process (benchmarks): the guard's own code, minus gRPC."""

    def __init__(self, guards: dict):
        self.guards = guards  # site name -> ppsehr.client.guard.SiteGuard

    def query(self, plan, timeout, progress, kind="summary", to=None):
        from ..client.guard import Refusal
        from ..client.relay import REQUESTS  # kind -> the guard method that answers it, as the relay uses

        replies: list[SiteReply] = []
        failures: list[SiteFailure] = []
        for name, guard in self.guards.items():
            if to is not None and name not in to:
                continue
            try:
                replies.append(SiteReply(name, getattr(guard, REQUESTS[kind][2])(plan)))
            except Refusal as r:
                failures.append(SiteFailure(name, r.code, r.message))
        return replies, failures
