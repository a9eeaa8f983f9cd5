"""`ppsehr bench speed` (filled in below)."""


def add_speed_arguments(p) -> None:
    pass


def run_speed_cli(args) -> int:
    raise SystemExit("not yet")
