"""The `ppsehr` command line: demo, site (guard) administration, coordinator releases, verification."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .errors import PpsehrError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .localdeploy import LocalConsortium

    out = Path(args.out or f"releases/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out.exists():
        raise PpsehrError(f"{out} already exists; choose a new --out")
    keep = args.keep or args.workdir is not None
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ppsehr-demo-"))
    t0 = time.monotonic()
    say = (lambda m: None) if args.json else (lambda m: print(f"[{time.monotonic() - t0:5.1f}s] {m}", flush=True))
    say(f"ppsehr demo: 4 hospitals (UCI Heart Disease), epsilon {args.epsilon:g} per site, work directory {workdir}")
    consortium = LocalConsortium(workdir, lifetime_epsilon=args.lifetime_epsilon, progress=say)
    ok = False
    try:
        with consortium:
            final = consortium.release(out, epsilon=args.epsilon, seed=args.seed, rows=args.rows,
                                       on_event=lambda ev: say(ev["message"]))
        ok = True
    finally:
        if not ok:
            print(f"demo failed; logs are in {workdir / 'logs'}", file=sys.stderr)
        elif not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    manifest = json.loads((Path(final["out"]) / "manifest.json").read_text())
    if args.json:
        _print_json({"out": final["out"], "seconds": round(time.monotonic() - t0, 1), "sites": manifest["sites"],
                     "rows": manifest["generator"]["rows"]})
        return 0
    print(f"\nrelease {manifest['release_id']} in {final['out']}  ({time.monotonic() - t0:.1f} s)")
    print(f"  {manifest['generator']['rows']} synthetic records over {len(manifest['plan']['marginals'])} DP marginals")
    print(f"  {'site':<12} {'rho':>9} {'epsilon':>8} {'delta':>7}   lifetime spent")
    for site, s in manifest["sites"].items():
        print(f"  {site:<12} {s['rho']:>9.4g} {s['epsilon']:>8.3g} {s['delta']:>7.0e}   rho {s['rho_total']:.4g} of {s['rho_limit']:.4g}")
    for f in manifest["sites_not_included"]:
        print(f"  not included: {f['site']} ({f['code']}: {f['message']})")
    print(f"  verify with: ppsehr release verify {final['out']}")
    return 0


# ----------------------------------------------------------------------------- site
def _site(args):
    from ..client.config import load_site_config

    return load_site_config(args.config)


def cmd_site_serve(args) -> int:
    from ..client.guard import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(_site(args), address=args.listen)
    return 0


def cmd_site_check(args) -> int:
    from .dictionary import load_dictionary
    from .mapping import load_mapping, load_site_table

    cfg = _site(args)
    d = load_dictionary(cfg.dictionary)
    _, report = load_site_table(load_mapping(cfg.mapping, d), d)
    print(f"dictionary {d.name} {d.version} ({d.hash})")
    print(report.to_text())
    print("(this report stays at the site: it may quote local codes)")
    return 0


def cmd_site_status(args) -> int:
    from ..client.ledger import Ledger
    from . import accounting

    cfg = _site(args)
    ledger = Ledger(cfg.ledger_path, cfg.rho_limit, cfg.site)
    spent = ledger.spent()
    entries = ledger.audit_entries(last=args.last)
    status = {"site": cfg.site, "rho_limit": cfg.rho_limit, "rho_spent": spent, "rho_left": max(cfg.rho_limit - spent, 0.0),
              "delta": cfg.delta, "epsilon_spent": accounting.epsilon(spent, cfg.delta) if spent > 0 else 0.0,
              "epsilon_limit": accounting.epsilon(cfg.rho_limit, cfg.delta), "plans_answered": len(ledger.debits()),
              "audit": [e.__dict__ for e in entries]}
    if args.json:
        _print_json(status)
        return 0
    print(f"site {cfg.site}: rho spent {spent:.6g} of {cfg.rho_limit:.6g} "
          f"(epsilon {status['epsilon_spent']:.3g} of {status['epsilon_limit']:.3g} at delta {cfg.delta:g}); "
          f"{status['plans_answered']} plan(s) answered")
    for e in entries:
        print(f"  #{e.seq:<4} {e.at}  {e.event:<9} {e.code:<20} plan {e.plan_id[:32]:<32} {e.coordinator[:24]}")
    return 0


def cmd_site_audit(args) -> int:
    from ..client.ledger import Ledger

    cfg = _site(args)
    ledger = Ledger(cfg.ledger_path, cfg.rho_limit, cfg.site)
    for e in ledger.audit_entries():
        print(f"#{e.seq:<4} {e.at}  {e.event:<9} {e.code:<20} {e.plan_id[:32]:<32} {e.detail}")
    broken = ledger.verify_audit()
    if broken is not None:
        print(f"AUDIT CHAIN BROKEN at entry #{broken}: it or an earlier entry was altered", file=sys.stderr)
        return 1
    print("audit chain intact")
    return 0


# ----------------------------------------------------------------------------- coordinator / release
def cmd_coordinator_release(args) -> int:
    from ..server.federation import follow, submit, write_app_dir, write_flwr_home
    from ..server.pipeline import ReleaseJob

    job_dir = Path(args.job_dir or tempfile.mkdtemp(prefix="ppsehr-job-")).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    job = ReleaseJob(dictionary=str(Path(args.dictionary).resolve()), out=str(Path(args.out).resolve()),
                     epsilon=args.epsilon, rho=args.rho, delta=args.delta, seed=args.seed, rows=args.rows,
                     coordinator=args.coordinator, purpose=args.purpose, min_sites=args.min_sites,
                     events=str(job_dir / "events.jsonl"))
    job.rho_per_site()  # validate the budget before anything starts
    if Path(job.out).exists():
        raise PpsehrError(f"{job.out} already exists; choose a new --out")
    job.save(job_dir / "job.json")
    home = write_flwr_home(job_dir / "flwr-home", "coordinator", args.superlink, args.root_certificates)
    run_id = submit(job_dir / "job.json", write_app_dir(job_dir / "app"), home, "coordinator")
    print(f"run {run_id} submitted to {args.superlink}", flush=True)
    final = follow(job, run_id, home, "coordinator", args.timeout, lambda ev: print(ev["message"], flush=True))
    print(f"release written to {final['out']}")
    return 0


def cmd_release_verify(args) -> int:
    from ..server.release import verify_release

    m = verify_release(args.dir)
    print(f"release {m['release_id']}: {len(m['files'])} files verified; privacy statement follows from "
          f"{len(m['receipts'])} site receipt(s)")
    for site, s in m["sites"].items():
        print(f"  {site:<12} rho {s['rho']:.4g} -> epsilon {s['epsilon']:.3g} at delta {s['delta']:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppsehr", description="Federated, differentially private synthetic EHRs.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a 4-hospital consortium on this machine and make one release")
    d.add_argument("--out", help="release directory to create (default: releases/demo-<time>)")
    d.add_argument("--epsilon", type=float, default=4.0, help="budget each site spends on this release (default 4)")
    d.add_argument("--lifetime-epsilon", type=float, default=20.0, help="each site's lifetime budget (default 20)")
    d.add_argument("--seed", type=int)
    d.add_argument("--rows", type=int, help="records to synthesize (default: the DP estimate of the total)")
    d.add_argument("--workdir", help="keep site state, logs and Flower files here (default: a temporary directory)")
    d.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    d.add_argument("--json", action="store_true", help="print a JSON summary only")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("site", help="site guard administration").add_subparsers(dest="site_command", required=True)
    for name, func, text in (("serve", cmd_site_serve, "run the site guard (gRPC)"),
                             ("check", cmd_site_check, "load the site table through its mapping and report"),
                             ("status", cmd_site_status, "budget spent and left, recent audit entries"),
                             ("audit", cmd_site_audit, "list the audit log and verify its hash chain")):
        sp = s.add_parser(name, help=text)
        sp.add_argument("--config", required=True, help="site configuration TOML")
        sp.set_defaults(func=func)
        if name == "serve":
            sp.add_argument("--listen", help="override the configured listen address")
        if name == "status":
            sp.add_argument("--last", type=int, default=10)
            sp.add_argument("--json", action="store_true")

    c = sub.add_parser("coordinator", help="coordinator commands").add_subparsers(dest="coord_command", required=True)
    r = c.add_parser("release", help="run a release through a Flower SuperLink")
    r.add_argument("--dictionary", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--superlink", required=True, help="SuperLink Control API address, e.g. 127.0.0.1:9093")
    r.add_argument("--root-certificates", help="CA certificate for a TLS SuperLink (default: insecure)")
    r.add_argument("--epsilon", type=float, default=4.0)
    r.add_argument("--rho", type=float)
    r.add_argument("--delta", type=float, default=1e-6)
    r.add_argument("--min-sites", type=int, default=1)
    r.add_argument("--seed", type=int)
    r.add_argument("--rows", type=int)
    r.add_argument("--coordinator", default="coordinator")
    r.add_argument("--purpose", default="synthetic release")
    r.add_argument("--job-dir")
    r.add_argument("--timeout", type=float, default=900)
    r.set_defaults(func=cmd_coordinator_release)

    rel = sub.add_parser("release", help="release commands").add_subparsers(dest="release_command", required=True)
    v = rel.add_parser("verify", help="check a release's files, receipts and privacy statement")
    v.add_argument("dir")
    v.set_defaults(func=cmd_release_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args)
    except PpsehrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
