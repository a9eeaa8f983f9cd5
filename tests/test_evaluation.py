"""Federated evaluation under DP on the demo consortium (issue #14, part 2).

A release from three demo sites (switzerland held out) is evaluated at all four through real gRPC
guards. Every figure is compared with the same metric computed here, independently of the site
code, on the pooled real rows: they agree within the noise the plan declares. The cost is in the
sites' ledgers and receipts, and `release verify` recomputes the addendum.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import numpy as np
import pytest

from ppsehr.common import accounting, keys
from ppsehr.common.errors import ReleaseError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.deploy.cli import main
from ppsehr.deploy.transports import DirectTransport
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.evaluate import addendum as ad
from ppsehr.server.evaluate.run import EvaluationJob, build_plan, run_evaluation
from ppsehr.server.model.records import encode
from ppsehr.server.pipeline import Events, ReleaseJob, run_release
from ppsehr.server.release.bundle import verify_release

MEMBERS = ("cleveland", "hungarian", "va")
SITES = MEMBERS + ("switzerland",)
GENEROUS = 10.0  # epsilon per site for the agreement test: noise small enough to compare figures closely


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, demo, consortium_keys):
    """Four running guards (lifetime epsilon 100), a release from three of them, and its evaluation by all four."""
    from conftest import RunningGuard

    from ppsehr.client.config import load_site_config
    from ppsehr.client.guard import SiteGuard
    from ppsehr.deploy.local import write_site_config

    tmp = tmp_path_factory.mktemp("evaluation")
    running = {}
    for site in SITES:
        cfg = write_site_config(tmp / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                tmp / "state" / site, "127.0.0.1:0", 100.0, 1e-6, consortium_keys.site_keys[site][0],
                                [consortium_keys.coordinator_pub], policy={"max_rho_per_plan": 50.0})
        running[site] = RunningGuard(SiteGuard(load_site_config(cfg)))
    site_keys = {s: str(p[1]) for s, p in consortium_keys.site_keys.items()}
    release = tmp / "rel"
    run_release(ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(release),
                                  signing_key=str(consortium_keys.coordinator_key), site_keys=site_keys, epsilon=4.0, seed=5,
                                  report=False, formats=["csv"]),
                DirectTransport({s: running[s].address for s in MEMBERS}), Events())
    job = EvaluationJob(release=str(release), dictionary=str(demo / "dictionary.toml"),
                        signing_key=str(consortium_keys.coordinator_key), site_keys=site_keys, epsilon=GENEROUS)
    addendum = run_evaluation(job, DirectTransport({s: g.address for s, g in running.items()}), Events())
    yield {"release": release, "addendum": addendum, "guards": running, "job": job, "site_keys": site_keys}
    for g in running.values():
        g.stop()


@pytest.fixture(scope="module")
def pooled(consortium, demo, dictionary):
    """The real rows of every site (cells, dictionary order) and the released records' cells."""
    rows = {}
    for site in SITES:
        table, _ = load_site_table(load_mapping(demo / "sites" / f"{site}.toml", dictionary), dictionary)
        rows[site] = np.stack([table.columns[n].astype(np.int64) for n in dictionary.names], axis=1)
    text = (consortium["release"] / "records.csv").read_text()
    records = list(csv.DictReader(io.StringIO(text)))
    cells = encode(dictionary, {n: [r[n] for r in records] for n in dictionary.names})
    return rows, cells


def within(dp_value, exact, sd, k=4.0):
    assert dp_value is not None and sd is not None and sd > 0
    assert abs(dp_value - exact) <= k * sd, (dp_value, exact, sd)


def test_evaluation_figures_agree_with_pooled_real_metrics_within_the_declared_noise(consortium, pooled, dictionary):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rows, cells = pooled
    everything = np.concatenate([rows[s] for s in SITES])
    add = consortium["addendum"]
    plan = pb.QueryPlan.FromString(keys.unb64(add["plan"]["signed_plan"]))
    answers = [pb.Summary.FromString(keys.unb64(a["summary"])) for a in add["answers"]]
    # the noise is what the plan declares: every table's scale is OpenDP's scale for its planned rho
    planned = [m.rho for m in plan.marginals] + [q.rho for q in plan.evaluation.tstr] + [
        plan.evaluation.distance.rho_histogram, plan.evaluation.distance.rho_unique]
    for s in answers:
        tables = list(s.marginals) + list(s.evaluation.tstr) + [s.evaluation.distance, s.evaluation.unique_copied]
        assert [t.noise_scale for t in tables] == pytest.approx([accounting.scale_for_rho(r) for r in planned], rel=1e-9)
    r = add["results"]
    names = dictionary.names
    # utility: train on synthetic, test on the pooled real rows, AUC over the same score bins
    assert [t["target"] for t in r["utility"]["tstr"]] == ["sex", "heart_disease"]
    for t in r["utility"]["tstr"]:
        j = names.index(t["target"])
        positive = dictionary[t["target"]].cells.index(t["positive"])
        features = [i for i in range(len(names)) if i != j]

        def one_hot(x):
            return np.concatenate([np.eye(dictionary[names[i]].size)[x[:, i]] for i in features], axis=1)

        model = LogisticRegression(C=1.0, max_iter=2000, solver="lbfgs").fit(one_hot(cells), cells[:, j] == positive)
        score = np.minimum((model.predict_proba(one_hot(everything))[:, 1] * t["bins"]).astype(int), t["bins"] - 1)
        truth = everything[:, j] == positive
        within(t["auc"], roc_auc_score(truth, score), t["auc_sd"])
        within(t["accuracy"], np.mean((score >= t["bins"] // 2) == truth), t["accuracy_sd"])
        if t["target"] == "heart_disease":
            assert t["auc"] > 0.7  # the records carry real signal about the outcome
    # fidelity on marginals the synthesizer never measured cell by cell: TVD against the pooled real table
    measured = {frozenset(m["variables"]) for pl in json.loads((consortium["release"] / "manifest.json").read_text())["plans"]
                for m in pl["marginals"] if len(m["variables"]) == 2 and not any(m.get("groups") or [])}
    assert len(r["fidelity"]["unmeasured"]) == 6
    for u in r["fidelity"]["unmeasured"]:
        assert frozenset(u["variables"]) not in measured
        a, b = (names.index(v) for v in u["variables"])
        shape = (dictionary[u["variables"][0]].size, dictionary[u["variables"][1]].size)
        real, synth = np.zeros(shape), np.zeros(shape)
        np.add.at(real, (everything[:, a], everything[:, b]), 1)
        np.add.at(synth, (cells[:, a], cells[:, b]), 1)
        exact = 0.5 * np.abs(synth / synth.sum() - real / real.sum()).sum()
        assert abs(u["tvd"] - exact) <= u["tvd_noise_bound"], (u, exact)
    # privacy risk: distance from each real row to its closest record, unique copies, members vs held out
    def nearest(x):
        return np.array([(cells != row).sum(axis=1).min() for row in x])

    dist = {s: nearest(rows[s]) for s in SITES}
    risk = r["privacy_risk"]
    for group, sites in (("all", SITES), ("members", MEMBERS), ("held_out", ("switzerland",))):
        d = np.concatenate([dist[s] for s in sites])
        block = risk["distance"][group]
        within(block["exact_copy_share"], np.mean(d == 0), block["exact_copy_share_sd"])
        within(block["mean_distance"], d.mean(), block["mean_distance_sd"])
        unique = 0
        for s in sites:  # an exact synthetic copy, and no exact duplicate among the site's own rows
            _, inv, counts = np.unique(rows[s], axis=0, return_inverse=True, return_counts=True)
            unique += int(np.sum((dist[s] == 0) & (counts[inv.ravel()] == 1)))
        u = risk["unique_copied"][group]
        within(u["share"], unique / len(d), u["share_sd"])
    members = np.concatenate([dist[s] for s in MEMBERS])
    held = dist["switzerland"]
    m = risk["membership"]
    assert m["member_sites"] == list(MEMBERS) and m["held_out_sites"] == ["switzerland"]
    exact_auc = roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(held))], -np.r_[members, held])
    within(m["auc"], exact_auc, m["auc_sd"])
    release_eps = json.loads((consortium["release"] / "manifest.json").read_text())["privacy"]["release_epsilon_max"]
    assert risk["dp_bound"]["max_advantage"] == pytest.approx((math.exp(release_eps) - 1) / (math.exp(release_eps) + 1),
                                                              rel=1e-6)


def test_the_evaluation_is_paid_for_receipted_and_verified(consortium, consortium_keys, capsys):
    add, guards = consortium["addendum"], consortium["guards"]
    manifest = json.loads((consortium["release"] / "manifest.json").read_text())
    rho = accounting.rho_for_epsilon(GENEROUS, 1e-6)
    assert add["plan"]["rho_per_site"] == pytest.approx(rho, rel=1e-9)
    for site, g in guards.items():
        entry = add["sites"][site]
        receipt = next(r for r in add["receipts"] if r["site"] == site)
        assert entry["rho"] == receipt["rho_debited"] <= rho * (1 + 1e-9)
        assert entry["member"] == (site in MEMBERS)
        assert entry["release_rho"] == (manifest["sites"][site]["rho"] if site in MEMBERS else 0.0)
        # the site's ledger holds the release's debits and the evaluation's, and nothing else
        assert g.guard.ledger.spent() == pytest.approx(entry["combined_rho"], rel=1e-12) == pytest.approx(entry["rho_total"])
        audit = [e for e in g.guard.ledger.audit_entries() if e.event == "debit"][-1]
        assert json.loads(audit.detail)["evaluation"]["release_id"] == manifest["release_id"]
    assert add["privacy"]["combined_rho_max"] == max(s["combined_rho"] for s in add["sites"].values())
    assert f"rho = {add['privacy']['evaluation_rho_max']:.4g}" in add["privacy"]["statement"]
    verified = verify_release(consortium["release"])
    assert [e["evaluation_id"] for e in verified["evaluations"]] == [add["evaluation_id"]]
    pins = ["--coordinator-key", str(consortium_keys.coordinator_pub)] + [
        a for s, (_, pub) in consortium_keys.site_keys.items() for a in ("--site-key", f"{s}={pub}")]
    assert main(["release", "verify", str(consortium["release"]), *pins]) == 0
    out = capsys.readouterr().out
    assert f"evaluation {add['evaluation_id']}" in out and "4 site answer(s) and their receipts verified" in out


def test_a_default_evaluation_costs_epsilon_half_and_goes_through_the_command_line(consortium, demo, consortium_keys,
                                                                                   tmp_path, capsys):
    release = tmp_path / "rel"
    shutil.copytree(consortium["release"], release)
    before = {s: g.guard.ledger.spent() for s, g in consortium["guards"].items()}
    args = ["release", "evaluate", str(release), "--dictionary", str(demo / "dictionary.toml"),
            "--signing-key", str(consortium_keys.coordinator_key), "--job-dir", str(tmp_path / "job")]
    for s, g in consortium["guards"].items():
        args += ["--site-key", f"{s}={consortium_keys.site_keys[s][1]}", "--guard", f"{s}={g.address}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "TSTR heart_disease=present: AUC" in out and "membership" in out
    [path] = [p for p in (release / "evaluations").glob("*.json") if p.stem != consortium["addendum"]["evaluation_id"]]
    add = json.loads(path.read_text())
    rho = accounting.rho_for_epsilon(0.5, 1e-6)
    assert add["plan"]["rho_per_site"] == pytest.approx(rho, rel=1e-9)
    assert add["privacy"]["evaluation_epsilon_max"] <= 0.5 * (1 + 1e-6)
    for s, g in consortium["guards"].items():
        assert g.guard.ledger.spent() - before[s] == pytest.approx(add["sites"][s]["rho"], rel=1e-9)
    assert len(verify_release(release)["evaluations"]) == 2  # the generous one and this one, both verified


def _tamper_addendum(release, change, key):
    [path] = (release / "evaluations").glob("*.json")  # the module's release carries one addendum
    a = json.loads(path.read_text())
    change(a)
    path.write_bytes(ad.to_bytes(a))
    path.with_suffix(".sig").write_text(keys.b64(keys.load_signing_key(key).sign(path.read_bytes())) + "\n")


def _flip_answer(a):
    s = pb.Summary.FromString(keys.unb64(a["answers"][0]["summary"]))
    s.evaluation.tstr[0].counts[0] += 50
    a["answers"][0]["summary"] = keys.b64(s.SerializeToString())


@pytest.mark.parametrize("change, message", [
    (lambda a: a["results"]["utility"]["tstr"][1].update(auc=0.99), r"results.utility.tstr\[1\].auc"),
    (lambda a: a["results"]["fidelity"]["unmeasured"][0].update(tvd=0.0), r"results.fidelity.unmeasured\[0\].tvd"),
    (lambda a: a["results"]["privacy_risk"]["membership"].update(auc=0.5), r"results.privacy_risk.membership.auc"),
    (lambda a: a["results"]["privacy_risk"]["unique_copied"]["all"].update(count=999), r"unique_copied.all.count"),
    (lambda a: a["privacy"].update(statement="cheap"), r"privacy.statement is not the statement"),
    (lambda a: a["privacy"].update(combined_rho_max=0.01), r"combined_rho_max 0.01"),
    (lambda a: a["sites"]["va"].update(rho=1e-4), r"site 'va': rho 0.0001"),
    (lambda a: a["sites"]["va"].update(member=False), r"site 'va': member False"),
    (lambda a: a["receipts"][0].update(rho_debited=1e-4), r"rho_debited 0.0001"),
    (lambda a: a["sites"].pop("va"), r"are not the answering sites"),
    (lambda a: a["sites_not_included"].append({"site": "ghost", "code": "TIMEOUT", "message": "", "charged": "x"}),
     r"site 'ghost' is unknown"),
    (_flip_answer, r"answers\[0\]: site '\w+': its signature does not verify"),
    (lambda a: a["plan"].update(rho_per_site=0.01), r"plan: rho_per_site 0.01"),
    (lambda a: a.update(manifest_sha256="00" * 32), r"is for another release"),
    (lambda a: a.update(records_sha256="00" * 32), r"records_sha256 is not the release's"),
    (lambda a: a["dictionary"]["dictionary"].update(version="9"), r"its dictionary is not the release's"),
])
def test_a_resigned_addendum_that_misstates_anything_fails_verification(consortium, consortium_keys, tmp_path, change,
                                                                       message):
    import re

    release = tmp_path / "rel"
    shutil.copytree(consortium["release"], release)
    _tamper_addendum(release, change, consortium_keys.coordinator_key)
    with pytest.raises(ReleaseError) as e:
        verify_release(release)
    assert re.search(message, str(e.value)), str(e.value)


def test_an_addendum_without_its_signature_or_signed_by_another_key_fails(consortium, tmp_path):
    release = tmp_path / "rel"
    shutil.copytree(consortium["release"], release)
    [sig] = (release / "evaluations").glob("*.sig")
    priv, _ = keys.new_signing_key(tmp_path / "k", "mallory")
    sig.write_text(keys.b64(keys.load_signing_key(priv).sign(sig.with_suffix(".json").read_bytes())) + "\n")
    with pytest.raises(ReleaseError, match="signature of .*json does not verify"):
        verify_release(release)
    sig.unlink()
    with pytest.raises(ReleaseError, match="needs both .json and .sig"):
        verify_release(release)
    (release / "evaluations" / "notes.txt").write_text("x")
    with pytest.raises(ReleaseError, match="not covered by the manifest"):
        verify_release(release)


# ----------------------------------------------------------------------------- the guard's side
def _eval_plan(consortium, dictionary):
    release = consortium["release"]
    manifest_bytes = (release / "manifest.json").read_bytes()
    records = (release / "records.csv").read_bytes()
    job = EvaluationJob(**{**consortium["job"].__dict__, "epsilon": 0.5})
    return build_plan(job, json.loads(manifest_bytes), manifest_bytes, records, dictionary), records


@pytest.mark.parametrize("edit, records, code", [
    (None, lambda r: r.replace(b"male", b"female", 1), "MALFORMED_PLAN"),  # other records than the plan names
    (lambda p: p.evaluation.tstr[0].__setattr__("target", "nope"), None, "UNKNOWN_VARIABLE"),
    (lambda p: p.evaluation.tstr[0].__setattr__("target", "age"), None, "UNKNOWN_VARIABLE"),
    (lambda p: p.evaluation.tstr[0].__setattr__("bins", 7), None, "MALFORMED_PLAN"),
    (lambda p: p.evaluation.tstr[0].__setattr__("positive", 9), None, "MALFORMED_PLAN"),
    (lambda p: p.evaluation.distance.__setattr__("rho_unique", 1e-300), None, "BAD_RHO"),
    (lambda p: p.evaluation.distance.__setattr__("rho_histogram", 80.0), None, "POLICY_LIMIT"),
    (lambda p: p.evaluation.__setattr__("records", 3), None, "MALFORMED_PLAN"),
    (lambda p: p.secure.__setattr__("min_parties", 3), None, "MALFORMED_PLAN"),
])
def test_evaluation_plans_the_guard_must_not_answer_cost_nothing(consortium, dictionary, sign, edit, records, code):
    import grpc

    g = consortium["guards"]["va"]
    plan, data = _eval_plan(consortium, dictionary)
    plan.plan_id = f"bad-{np.random.randint(1 << 60)}"
    if edit:
        edit(plan)
    signed = sign(plan)
    signed.records = records(data) if records else data
    spent = g.guard.ledger.spent()
    with pytest.raises(grpc.RpcError) as e:
        g.stub.Answer(signed, timeout=60)
    assert e.value.details().startswith(code + ":"), e.value.details()
    assert g.guard.ledger.spent() == spent


def test_records_come_only_with_evaluation_plans_and_a_restricted_policy_refuses_joint_reads(
        consortium, dictionary, sign, guards):
    import grpc

    g = consortium["guards"]["va"]
    plain = sign(pb.QueryPlan(plan_id="plain-with-records", coordinator="t", dictionary_hash=dictionary.hash,
                              marginals=[pb.MarginalQuery(variables=["sex"], rho=0.01)]))
    plain.records = b"age\n1\n"
    with pytest.raises(grpc.RpcError, match="MALFORMED_PLAN: records come only with evaluation plans"):
        g.stub.Answer(plain, timeout=30)
    narrow = guards("hungarian", policy={"allowed_variables": ["age", "sex"]})
    plan, data = _eval_plan(consortium, dictionary)
    signed = sign(plan)
    signed.records = data
    with pytest.raises(grpc.RpcError, match="VARIABLE_NOT_ALLOWED: TSTR and distance queries read every variable"):
        narrow.stub.Answer(signed, timeout=30)
    assert narrow.guard.ledger.spent() == 0


def test_the_unique_copies_count_changes_by_at_most_one_when_a_row_is_added_or_removed():
    """The sensitivity the guard's scalar measurement assumes (client/evaluate.py), checked exhaustively on
    small random tables with many duplicates and copies."""
    from ppsehr.client.evaluate import nearest_distances, unique_copied

    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 4))
        rows = rng.integers(0, 2, size=(int(rng.integers(1, 12)), k))
        records = rng.integers(0, 2, size=(int(rng.integers(1, 6)), k))
        base = unique_copied(rows, nearest_distances(rows, records))
        for i in range(len(rows) if len(rows) > 1 else 0):
            fewer = np.delete(rows, i, axis=0)
            assert abs(unique_copied(fewer, nearest_distances(fewer, records)) - base) <= 1
        extra = np.vstack([rows, rng.integers(0, 2, size=(1, k))])
        assert abs(unique_copied(extra, nearest_distances(extra, records)) - base) <= 1


def test_planned_unmeasured_tables_are_pairs_no_plan_measured(consortium, dictionary):
    manifest = json.loads((consortium["release"] / "manifest.json").read_text())
    plan, _ = _eval_plan(consortium, dictionary)
    measured = {frozenset(m["variables"]) for p in manifest["plans"] for m in p["marginals"]
                if not any(m.get("groups") or [])}  # cell by cell: coarse candidates do not count
    assert plan.marginals and all(frozenset(m.variables) not in measured for m in plan.marginals)
    assert all(m.rho > 0 for m in plan.marginals)


def test_a_site_with_k_rows_per_patient_calibrates_and_charges_evaluations_by_group_privacy(
        consortium, dictionary, demo, tmp_path, consortium_keys, sign):
    """The evaluation's rho is per patient: at k = 3 rows per patient every count's noise is calibrated for
    rho / 9 per row and charged OpenDP's map at d_in = 3 (as the release's tables are)."""
    from ppsehr.client.config import load_site_config
    from ppsehr.client.guard import SiteGuard
    from ppsehr.deploy.local import write_site_config

    rows = (demo / "data" / "processed.cleveland.data").read_text().splitlines()
    lines = ["pid,visit,age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"]
    lines += [f"P{i // 3 if i < 30 else i},2020-01-{1 + i % 3:02d},{r}" for i, r in enumerate(rows)]
    (tmp_path / "ehr.csv").write_text("\n".join(lines) + "\n")
    variables = (demo / "sites" / "cleveland.toml").read_text()
    variables = variables[variables.index("[variables."):]
    (tmp_path / "mapping.toml").write_text('[site]\nid = "cleveland"\n[source]\npath = "ehr.csv"\npatient_key = "pid"\n'
                                           'time = "visit"\nmissing_values = ["?"]\nrows_per_patient = 3\n' + variables)
    guard = SiteGuard(load_site_config(write_site_config(
        tmp_path / "site.toml", "cleveland", demo / "dictionary.toml", tmp_path / "mapping.toml", tmp_path / "state",
        "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["cleveland"][0], [consortium_keys.coordinator_pub])))
    assert guard.config.rows_per_patient == 3
    plan, records = _eval_plan(consortium, dictionary)
    signed = sign(plan)
    signed.records = records
    reply = guard.answer(signed)
    summary = pb.Summary.FromString(reply.summary)
    receipt = pb.BudgetReceipt.FromString(summary.receipt)
    ev = plan.evaluation
    planned = [m.rho for m in plan.marginals] + [q.rho for q in ev.tstr] + [ev.distance.rho_histogram,
                                                                             ev.distance.rho_unique]
    tables = list(summary.marginals) + list(summary.evaluation.tstr) + [summary.evaluation.distance,
                                                                        summary.evaluation.unique_copied]
    for t, rho in zip(tables, planned):
        assert t.noise_scale == pytest.approx(accounting.scale_for_rho(rho / 9), rel=1e-9)
        assert t.rho == pytest.approx(9 / (2 * t.noise_scale ** 2), rel=1e-6) and t.rho <= rho * (1 + 1e-9)
    assert (receipt.unit, receipt.rows_per_patient) == ("patient_rows", 3)
    assert receipt.rho_debited == pytest.approx(math.fsum(t.rho for t in tables), rel=1e-9)
    assert guard.ledger.spent() == pytest.approx(receipt.rho_debited, rel=1e-12)
    # the coordinator checks it like any answer
    key = {"cleveland": keys.load_public_key(consortium_keys.site_keys["cleveland"][1])}
    assert ad.verify_answer(reply, plan, signed.plan, dictionary, key).site == "cleveland"


def test_the_flower_path_follows_an_evaluation_job_and_the_serverapp_dispatches_it(tmp_path):
    """`ppsehr demo --evaluate` / `release evaluate --superlink` hand an EvaluationJob to the same follow()
    and ServerApp as a release (the job file says "kind": "evaluation")."""
    from ppsehr.server.federation import follow

    job = EvaluationJob(release="r", dictionary="d", signing_key="k", site_keys={}, events=str(tmp_path / "events.jsonl"))
    job.save(tmp_path / "job.json")
    assert json.loads((tmp_path / "job.json").read_text())["kind"] == "evaluation"
    assert EvaluationJob.load(tmp_path / "job.json") == job
    done = {"t": 0, "stage": "done", "message": "evaluation x", "out": "r/evaluations/x.json"}
    (tmp_path / "events.jsonl").write_text(json.dumps({"t": 0, "stage": "plan", "message": "p"}) + "\n" + json.dumps(done) + "\n")
    assert follow(job, 1, tmp_path, "none", 10, lambda e: None) == done
