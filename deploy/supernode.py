"""`flower-supernode` with Flower's fixed waits shortened (deploy/flower_waits.py), for loopback
consortia (the demo and the tests).

    python -m ppsehr.deploy.supernode --poll 0.1 --superlink HOST:PORT ... (flower-supernode's arguments)

Same arguments, same process, same protocol as Flower's `flower-supernode`; only its idle poll and
object-pull back-off are `--poll` seconds. A loopback consortium forks its SuperNodes from the
launcher (deploy/launcher.py), which runs `run_supernode` in each child.
"""

from __future__ import annotations

import sys

from .flower_waits import DEFAULT_POLL, PATCHED_FLOWER, shorten


def run_supernode(args: list[str]) -> None:
    """Flower's `flower-supernode ARGS`, in this process."""
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL
    if args[:1] == ["--poll"]:
        if len(args) < 2:
            raise SystemExit("--poll needs a number of seconds")
        try:
            poll = float(args[1])
        except ValueError:
            raise SystemExit(f"--poll {args[1]!r}: not a number of seconds") from None
        if not 0 < poll <= 3:
            raise SystemExit(f"--poll {poll}: give seconds in (0, 3]")
        args = args[2:]
    if not shorten(poll, supernode=True):
        import flwr

        print(f"ppsehr.deploy.supernode: Flower {flwr.__version__} is not {PATCHED_FLOWER}; "
              "running flower-supernode with its own waits", file=sys.stderr, flush=True)
    run_supernode(args)


if __name__ == "__main__":
    main()
