"""Flower 1.39's fixed waits, shortened for a consortium on one machine (the demo and the tests).

Three waits in Flower's pinned release dominate a loopback release's latency:

- an idle SuperNode sleeps 3 s between asking the SuperLink for messages, and waits for its
  ClientApp's reply in 0.5 s steps (`flwr.supernode.start_client_internal`);
- whoever pulls a message's objects (a SuperNode from the SuperLink, a ClientApp from its SuperNode,
  the ServerApp from the SuperLink) and finds one not pushed yet backs off 1 s, then 2, 4, ... up
  to 10 s (`flwr.supercore.inflatable.inflatable_utils`): the ClientApp, started as soon as its
  message arrives, usually asks before the SuperNode has it all, and answers 1-3 s late.

`shorten(poll)` caps the first at `poll` seconds and starts the back-off at `poll` (capped at 1 s,
with as many tries as Flower's own 2-hour limit allows). Nothing else changes: same protocol, same
processes. It only runs where ppsehr starts Flower itself (deploy/supernode.py, deploy/warm.py);
hospitals run Flower's unmodified `flower-supernode` (deploy/systemd), where a 3 s poll costs a
few seconds a round and spares the SuperLink a request per site every `poll` seconds.
"""

from __future__ import annotations

import time
import types

PATCHED_FLOWER = "1.39.0"  # the Flower release these waits were read from (pinned in pyproject.toml)
DEFAULT_POLL = 0.1


def shorten(poll: float = DEFAULT_POLL, supernode: bool = False) -> bool:
    """Shorten the object-pull back-off (and, with `supernode`, the SuperNode loop's sleeps) in this
    process and the processes it forks; False (nothing changed) on another Flower release."""
    import flwr
    from flwr.supercore.inflatable import inflatable_utils as pulls

    if flwr.__version__ != PATCHED_FLOWER:
        return False
    for fn in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__ or {})
        if {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= defaults.keys():
            defaults.update(initial_backoff=poll, backoff_cap=max(poll, 1.0), max_tries_per_object=None)
            fn.__kwdefaults__ = defaults  # max_time (Flower's 2 h) still bounds a pull
    if supernode:
        from flwr.supernode import start_client_internal as loop

        if isinstance(getattr(loop, "time", None), types.ModuleType):
            clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
            clock.sleep = lambda seconds: time.sleep(min(float(seconds), poll))
            loop.time = clock
    return True
