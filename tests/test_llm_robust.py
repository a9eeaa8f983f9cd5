"""The LLM stage against endpoints that misbehave the way real small local models do (issue #15).

Everything runs through the real `openai` client against the scriptable fake server on 127.0.0.1:
llama.cpp's HTTP 500 for json_schema, context overflows (first call and re-ask), slow endpoints
and time budgets, short/long/cut-off batches, copied examples, tiny calibration pools and notes
that contradict their record.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAI, note_from_facts  # noqa: E402
from test_llm import GENERATE, KNOWLEDGE, NOTE, bodies, config, dp, fake, stage  # noqa: E402,F401

from ppsehr.server.llm.client import (LLMClient, LLMContextError, LLMError, _Unsupported, classify,  # noqa: E402
                                      context_from_message, salvage_json)
from ppsehr.server.llm.generate import calibrate, generate_pool  # noqa: E402
from ppsehr.server.llm.knowledge import propose_knowledge  # noqa: E402
from ppsehr.server.llm.notes import NoteChecker  # noqa: E402
from ppsehr.server.llm.prompts import DPAggregates, SyntheticRecord, knowledge_prompt  # noqa: E402


def records(result) -> list[dict]:
    return list(csv.DictReader(io.StringIO(result.files["llm_records.csv"].decode())))


# ----------------------------------------------------------------------------- classifying answers
@pytest.mark.parametrize("status, message, structured, kind", [
    (500, "Internal Server Error", True, "transient"),  # the caller counts a repeat as unsupported
    (500, "Failed to parse grammar from json_schema", True, "unsupported"),
    (400, "response_format type json_schema is not supported", True, "unsupported"),
    (400, "This model's maximum context length is 2048 tokens. However, you requested 7046 tokens", True, "overflow"),
    (400, "Requested tokens (7046) exceed context window of 2048", False, "overflow"),
    (400, "the request exceeds the available context size, try increasing it", True, "overflow"),
    (400, "invalid temperature", False, "fatal"),
    (401, "bad key", False, "auth"), (404, "no such model", True, "not_found"),
    (429, "slow down", True, "transient"), (503, "loading model", False, "transient"),
])
def test_endpoint_answers_are_classified(status, message, structured, kind):
    assert classify(status, message, structured) == kind


def test_context_size_is_read_from_overflow_messages():
    assert context_from_message("This model's maximum context length is 2048 tokens. However, you requested "
                                "7046 tokens (6000 in the messages, 1046 in the completion).") == (2048, 6000)
    assert context_from_message("Requested tokens (7046) exceed context window of 4096") == (4096, 7046)
    assert context_from_message("the request exceeds the available context size",
                                {"error": {"n_prompt_tokens": 3000, "n_ctx": 2048}}) == (2048, 3000)
    assert context_from_message("too long") == (0, 0)


def test_a_reply_cut_off_is_salvaged_to_its_last_complete_item():
    assert salvage_json('{"records": [{"a": 1}, {"a": 2}, {"a": "x') == {"records": [{"a": 1}, {"a": 2}]}
    assert salvage_json('{"dependencies": [{"variables": ["a", "b"]}], "rules": [{"d": "}"}, {"d') == {
        "dependencies": [{"variables": ["a", "b"]}], "rules": [{"d": "}"}]}
    with pytest.raises(ValueError):
        salvage_json('{"records": [{"a": 1')


# ----------------------------------------------------------------------------- structured-output fallback
@pytest.mark.parametrize("schema_field, expected", [(True, "json_object_schema"), (False, "json_object")])
def test_http_500_on_json_schema_falls_back_to_json_object_and_works(dp, schema_field, expected):
    """llama.cpp answers json_schema with HTTP 500: the client retries once, then uses json_object (with the
    schema in response_format, as llama-cpp-python accepts, else without) for the rest of the run."""
    with FakeOpenAI(json_schema=False, json_schema_status=500, json_object_schema=schema_field) as server:
        result = stage(dp, config(server, uses=("knowledge", "generate"), styles=("definition",), generate_rows=60,
                                  batch_size=20, pool_factor=1.0))
    m = result.manifest_section
    assert m["structured_output"] == expected and m["failed_calls"] == 0
    assert not [x for x in m["degradations"] if "calibrat" not in x]  # (the fake's skewed pool may not calibrate)
    assert "HTTP 500" in m["structured_fallbacks"]["json_schema"]
    assert m["uses"]["knowledge"]["ran"] and m["uses"]["generate"]["styles"][0]["records_valid"] == 60
    formats = [(b.get("response_format", {}).get("type"), "schema" in b.get("response_format", {})) for b in bodies(server)]
    assert formats[:2] == [("json_schema", False)] * 2
    if schema_field:
        assert set(formats[2:]) == {("json_object", True)}
    else:  # refused (400) once, then plain json_object for the run
        assert formats[2] == ("json_object", True) and set(formats[3:]) == {("json_object", False)}


def test_grammar_constrained_servers_get_numeric_ranges_as_enums(dp):
    """llama-cpp-python compiles json_object + schema into a grammar but ignores minimum/maximum (a small model
    then writes ages of 1 and cholesterol of 38.27645): in that mode the records schema lists each numeric
    variable's values at its precision, so every number written is in the domain. The prompt keeps the short hint;
    validation still uses the plain schema; other modes never see the enums."""
    from ppsehr.server.llm.prompts import numeric_grid, records_schema

    d = dp["dictionary"]
    with FakeOpenAI(json_schema=False, json_schema_status=500) as server:
        result = stage(dp, config(server, uses=("generate",), styles=("definition",), generate_rows=30, batch_size=10,
                                  pool_factor=1.0, concurrency=1))
    gen = result.manifest_section["uses"]["generate"]["styles"][0]
    assert result.manifest_section["structured_output"] == "json_object_schema"
    assert gen["records_valid"] == 30 and gen["records_rejected"] == 0 and gen["values_repaired"] == 0
    sent = [b for b in bodies(server, GENERATE) if b.get("response_format", {}).get("type") == "json_object"]
    assert sent
    for b in sent:
        props = b["response_format"]["schema"]["properties"]["records"]["items"]["properties"]
        assert props["age"] == {"enum": list(range(25, 81))}  # never missing: no null
        assert props["oldpeak"]["enum"][:2] == [-3.0, -2.9] and props["oldpeak"]["enum"][-2:] == [6.5, None]
        assert props["sex"]["enum"] == ["female", "male"] and "type" not in props["chol"]
        assert "[25, 26, 27" not in json.dumps(b["messages"])  # the prompt itself is not longer
    for b in bodies(server, GENERATE):
        if b.get("response_format", {}).get("type") == "json_schema":  # the strict JSON Schema keeps ranges
            assert "minimum" in b["response_format"]["json_schema"]["schema"]["properties"]["records"]["items"]["properties"]["age"]
    # a grid too large to list keeps its range (the record is then validated and repaired as before)
    wide = type("V", (), {"type": "numeric", "bins": [0.0, 5000.0], "precision": 1})()
    assert numeric_grid(wide) is None and numeric_grid(d["oldpeak"])[:3] == [-3.0, -2.9, -2.8]
    assert "minimum" in records_schema(d, 2)["properties"]["records"]["items"]["properties"]["age"]


def test_a_batch_is_no_larger_than_one_reply_can_hold(dp, fake):
    """A batch of 20 records does not fit a max_tokens of 400: batches are cut to what fits (no reply is cut
    off at max_tokens), the tokens a record takes are learnt from the replies, and the bench says so."""
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=12, batch_size=20,
                              pool_factor=1.0, concurrency=1, max_tokens=400))
    gen = result.manifest_section["uses"]["generate"]["styles"][0]
    assert gen["records_valid"] == 12 and gen["replies_cut_off"] == 0 and result.manifest_section["truncated_replies"] == 0
    assert gen["batch_size"] < 20 and "fits max_tokens 400" in gen["batch_size_note"]
    assert 0 < gen["reply_tokens_per_record"] < 400
    assert all(b["max_tokens"] <= 400 for b in bodies(fake, GENERATE))


def test_llm_check_measures_the_endpoint_and_writes_a_profile_releases_reuse(tmp_path, monkeypatch, capsys):
    from ppsehr.deploy.cli import build_parser, job_options, main
    from ppsehr.server.llm.client import default_profile_path, llm_config_from_args

    monkeypatch.setenv("PPSEHR_LLM_PROFILE_DIR", str(tmp_path / "profiles"))
    with FakeOpenAI(json_schema=False, json_schema_status=500, json_object_schema=False, context=3000) as server:
        flags = ["--llm-base-url", server.base_url, "--llm-model", "fake-model"]
        assert main(["llm", "check", *flags, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["json_schema"] is False and "HTTP 500" in out["json_schema_note"]
        assert out["json_object"] is True and out["structured_output"] == "json_object"
        assert out["context_tokens"] == 3000 and out["context_source"] == "the endpoint's overflow answer"
        assert out["speed"]["completion_tokens_per_s"] > 0 and out["speed"]["prompt_tokens_per_s"] > 0
        # the write speed is also measured as the stage writes: a structured reply after a long prompt
        assert out["speed"]["structured_completion_tokens_per_s"] > 0 and out["speed"]["structured_context_tokens"] > 300
        probe = [b for b in bodies(server) if "listing the whole numbers" in b["messages"][-1]["content"]]
        assert len(probe) == 1 and probe[0]["response_format"] == {"type": "json_object"}
        path = Path(out["profile_path"])
        assert path == default_profile_path(server.base_url, "fake-model") and path.exists()
        profile = json.loads(path.read_text())
        assert profile["format"] == "ppsehr-llm-profile" and profile["settings"]["structured"] == "json_object"
        assert profile["settings"]["context"] == 3000 and "PPSEHR_LLM_API_KEY" not in path.read_text()
        # a release with this endpoint picks the profile up; flags win over it
        args = build_parser().parse_args(["demo", *flags, "--llm-concurrency", "3", "--llm-notes-limit", "5"])
        cfg = llm_config_from_args(args)
        assert cfg.structured == "json_object" and cfg.context == 3000 and cfg.concurrency == 3 and cfg.notes_limit == 5
        assert cfg.completion_tps > 0 and cfg.profile == str(path)
        assert job_options(args)["llm"]["context"] == 3000
        args = build_parser().parse_args(["demo", *flags, "--llm-context", "2048", "--llm-profile", "none"])
        cfg = llm_config_from_args(args)
        assert cfg.context == 2048 and cfg.structured == "auto" and cfg.profile == ""


# ----------------------------------------------------------------------------- context overflow
def test_context_overflow_on_a_first_call_is_learnt_and_the_prompt_trimmed(dp):
    """A 400 'maximum context length' is not read as missing JSON support: the context is learnt from the
    message, the rule-style prompt is trimmed by priority to fit, and nothing sent afterwards exceeds it."""
    with FakeOpenAI(context=1500) as server:
        result = stage(dp, config(server, uses=("knowledge", "generate"), styles=("rule",), generate_rows=10,
                                  batch_size=10, pool_factor=1.0))
    m = result.manifest_section
    assert m["structured_output"] == "json_schema" and not m["structured_fallbacks"]  # not a capability problem
    assert m["context_tokens"] == 1500 and m["uses"]["knowledge"]["ran"]
    gen = m["uses"]["generate"]["styles"][0]
    assert gen["records_valid"] == 10 and gen["prompt_trimmed"].get("conditionals", 0) > 0
    sizes = [sum(len(x["content"]) for x in b["messages"]) // 4 + 1 for b in bodies(server)]
    refused = [i for i, s in enumerate(sizes) if s > 1500]
    assert len(refused) == 1  # the first (rule-style) generation request, before the size was known; then none


def test_a_prompt_that_cannot_fit_is_a_clear_llm_error_and_is_never_sent(dp, fake):
    cfg = config(fake, uses=("knowledge", "generate"), styles=("definition",), generate_rows=10, context=300)
    client = LLMClient(cfg)
    with pytest.raises(LLMContextError, match="does not fit the endpoint's context of 300 tokens"):
        propose_knowledge(client, dp["dictionary"], None)
    result = stage(dp, cfg)
    m = result.manifest_section
    assert fake.requests == [] and m["degraded"] and result.columns == dp["columns"]
    assert "context of 300 tokens" in m["uses"]["knowledge"]["error"]
    assert "does not fit" in m["uses"]["generate"]["error"]


def test_context_overflow_without_a_size_and_on_a_tiny_context_fails_cleanly(dp):
    with FakeOpenAI(context=200, overflow_numbers=False) as server:
        client = LLMClient(config(server))
        with pytest.raises(LLMContextError):
            propose_knowledge(client, dp["dictionary"], None)
        assert client.context and client.memory.context_source.startswith("guessed")
        result = stage(dp, config(server, uses=("knowledge", "notes"), notes_limit=2))
    m = result.manifest_section
    assert m["uses"]["knowledge"]["ran"] is False and m["degraded"]


def test_a_400_on_a_reask_is_an_llm_error_or_a_fresh_request_never_an_internal_exception(dp):
    """The re-ask carries the invalid reply; when that overflows the context, the client asks afresh."""
    d = dp["dictionary"]
    replies = iter(['{"dependencies": "' + "x" * 6000, json.dumps({"dependencies": [], "rules": []})])
    with FakeOpenAI(context=1500) as server:
        server.handlers["knowledge"] = lambda body: next(replies)
        obj, rec = LLMClient(config(server)).json(knowledge_prompt(d))
        assert obj == {"dependencies": [], "rules": []} and rec.reasks == 1 and rec.mode == "json_schema"
        statuses = [sum(len(x["content"]) for x in b["messages"]) // 4 + 1 > 1500 for b in bodies(server)]
        assert statuses == [False, True, False]  # ok (invalid), re-ask refused (400), fresh request
        # always invalid: a clear LLMError, not _Unsupported
        server.requests.clear()
        server.handlers["knowledge"] = lambda body: '{"dependencies": "' + "x" * 6000
        with pytest.raises(LLMError, match="no valid JSON after 2 re-ask") as e:
            LLMClient(config(server)).json(knowledge_prompt(d))
        assert not isinstance(e.value, _Unsupported)
        # with the context known, the re-ask is shortened to fit instead of being refused
        server.requests.clear()
        replies = iter(['{"dependencies": "' + "x" * 6000, json.dumps({"dependencies": [], "rules": []})])
        server.handlers["knowledge"] = lambda body: next(replies)
        obj, rec = LLMClient(config(server, context=1500)).json(knowledge_prompt(d))
        assert rec.reasks == 1 and len(server.requests) == 2
        assert all(sum(len(x["content"]) for x in b["messages"]) // 4 + 1 <= 1500 for b in bodies(server))


# ----------------------------------------------------------------------------- slow endpoints and the time budget
def test_a_slow_endpoint_times_out_once_per_request_and_the_stage_degrades(dp):
    with FakeOpenAI(delay=1.0) as server:
        t0 = time.monotonic()
        result = stage(dp, config(server, uses=("knowledge", "notes"), timeout=0.2, notes_limit=3, concurrency=1,
                                  fail_fast_after=100))
        took = time.monotonic() - t0
    m = result.manifest_section
    assert m["used"] is False and m["degraded"] and result.columns == dp["columns"]
    assert "timed out after 2 attempt" in m["uses"]["knowledge"]["error"]
    assert m["timeouts"] == m["requests"] == 2 * 4  # each request once more with twice the time, then given up
    assert took < 20


def test_a_timeout_teaches_the_speed_and_is_not_retried_when_the_budget_cannot_cover_it(dp):
    """A request that times out was slower than predicted (a grammar, a long context, other load): the speed
    model believes it. A server that does not cancel keeps computing the abandoned request, so a retry that the
    time left cannot cover is not sent (it would queue behind it and keep the endpoint busy past the budget)."""
    with FakeOpenAI(slow_seconds=2.5) as server:
        server.script("timeout", KNOWLEDGE)
        client = LLMClient(config(server, timeout=None, completion_tps=5000.0, prompt_tps=50000.0, concurrency=1))
        client.set_deadline(1.5)
        t0 = time.monotonic()
        with pytest.raises(LLMError, match="not retried"):
            client.json(knowledge_prompt(dp["dictionary"]), max_tokens=1000)
        assert time.monotonic() - t0 < 2.4 and len(server.requests) == 1
        sp = client.memory.speed
        assert sp.factor > 1 and sp.predict(500, 1000) >= 1.25 * 1.4
    from ppsehr.server.llm.client import Speed

    unknown = Speed()
    unknown.slower_than(1000, 500, 60.0)  # nothing measured before: a first speed from the timeout
    assert unknown.known and unknown.predict(1000, 500) >= 60.0


def test_the_time_budget_ends_the_notes_and_says_so(dp):
    from ppsehr.server.llm import pii

    pii._engine()  # the PII guard's one-time load (spaCy, Presidio) is not what this budget measures
    with FakeOpenAI(delay=0.15) as server:
        progress = []
        result = stage(dp, config(server, uses=("notes",), concurrency=1, time_budget=1.2),
                       lambda m, **kw: progress.append((m, kw)))
    m = result.manifest_section
    notes = m["uses"]["notes"]
    assert 0 < notes["notes"] < 30 and notes["skipped_time_budget"] == 30 - notes["notes"] - notes["failed"]
    assert notes["status"] == "partial" and m["degraded"] and "time budget" in " ".join(m["degradations"])
    assert m["elapsed_s"] < 5
    assert any(kw.get("total") == 30 and "done" in kw for _, kw in progress)  # progress with a count


def test_a_release_with_a_slow_llm_is_still_written_and_verifies(guards, tmp_path, all_sites, consortium_keys, demo):
    from ppsehr.deploy.transports import DirectTransport
    from ppsehr.server.pipeline import Events, ReleaseJob, run_release
    from ppsehr.server.release.bundle import verify_release

    gs = guards(*all_sites[:2])
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    seen = []
    with FakeOpenAI(delay=1.0) as server:
        llm = {"base_url": server.base_url, "model": "fake-model", "timeout": 0.2, "cache_dir": "",
               "uses": ["knowledge", "notes"], "time_budget": 4.0, "backoff": 0.01}
        job = ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp_path / "rel"),
                                signing_key=str(consortium_keys.coordinator_key),
                                site_keys={s: str(p[1]) for s, p in consortium_keys.site_keys.items()},
                                epsilon=2.0, seed=4, rows=40, llm=llm, formats=["csv"], report=True)
        run_release(job, transport, Events(echo=seen.append))
    manifest = verify_release(tmp_path / "rel")
    llm_section = manifest["llm"]
    assert llm_section["degraded"] and llm_section["uses"]["knowledge"]["ran"] is False
    assert "not asked again" in llm_section["uses"]["knowledge"]["error"]  # failed for the plan: not retried
    assert "notes.jsonl" not in manifest["files"] and "records.csv" in manifest["files"]
    assert "degraded" in (tmp_path / "rel" / "report.html").read_text()
    assert any("LLM stage degraded" in s for s in seen)


def test_follow_gives_llm_steps_their_own_clock(tmp_path, monkeypatch):
    from ppsehr.server import federation
    from ppsehr.server.pipeline import ReleaseJob

    monkeypatch.setattr(federation, "run_status", lambda *a: "running")
    monkeypatch.setattr(federation, "LLM_GRACE", 0.5)
    events = tmp_path / "events.jsonl"

    def job(budget):
        return ReleaseJob(dictionary="d", out="o", signing_key="k", site_keys={}, events=str(events),
                          llm={"base_url": "http://127.0.0.1:9/v1", "model": "m", "time_budget": budget})

    def play(script):
        events.write_text("")

        def run():
            for stage, wait, extra in script:
                time.sleep(wait)
                with events.open("a") as f:
                    f.write(json.dumps({"stage": stage, "message": stage, **extra}) + "\n")
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    # the sites take 0.5 s, the LLM stage 2 s: far over the 1.2 s timeout, within its own budget of 3 s
    play([("start", 0.0, {}), ("measure", 0.5, {}), ("llm", 0.1, {"budget_s": 3.0}), ("llm", 1.0, {}),
          ("export", 1.0, {}), ("done", 0.2, {"out": "o"})])
    assert federation.follow(job(3.0), 1, tmp_path, "c", 1.2, lambda e: None)["stage"] == "done"
    # an LLM step past its budget and grace is given up on
    play([("start", 0.0, {}), ("llm", 0.1, {"budget_s": 0.5}), ("done", 3.0, {"out": "o"})])
    with pytest.raises(federation.RunFailed, match="LLM step"):
        federation.follow(job(0.5), 2, tmp_path, "c", 10.0, lambda e: None)
    # the sites' part is still bounded by the timeout
    play([("start", 0.0, {}), ("measure", 0.1, {}), ("done", 3.0, {"out": "o"})])
    with pytest.raises(federation.RunFailed, match="did not finish within"):
        federation.follow(job(100.0), 3, tmp_path, "c", 1.0, lambda e: None)


# ----------------------------------------------------------------------------- generation worth its tokens
def test_short_and_long_batches_are_topped_up_to_the_requested_size(dp, fake):
    fake.script("short", GENERATE).script("long", GENERATE)
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=20, batch_size=10,
                              pool_factor=1.0, concurrency=1))
    gen = result.manifest_section["uses"]["generate"]["styles"][0]
    assert gen["records_valid"] == gen["records_requested"] == 20 and gen["valid_rate"] == 1.0
    assert gen["records_returned"] == 5 + 13 + 5 and gen["topup_batches"] == 1
    assert gen["records_beyond_batch_size"] == 3 and len(records(result)) == 20


def test_a_reply_cut_off_at_max_tokens_keeps_its_complete_records_and_is_topped_up(dp, fake):
    fake.script("truncate", GENERATE)
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=10, batch_size=10,
                              pool_factor=1.0))
    m = result.manifest_section
    gen = m["uses"]["generate"]["styles"][0]
    assert m["salvaged_replies"] == 1 and m["reasks"] == 0 and gen["replies_cut_off"] == 1
    assert gen["records_returned"] == 10 and gen["records_valid"] == 10 and gen["topup_batches"] == 1


def test_verbatim_copies_of_prompt_examples_are_dropped_and_counted(dp, fake):
    fake.script("copy", GENERATE)
    result = stage(dp, config(fake, uses=("generate",), styles=("example",), generate_rows=16, batch_size=8,
                              pool_factor=1.0, concurrency=1))
    gen = result.manifest_section["uses"]["generate"]["styles"][0]
    assert gen["example_copies_dropped"] >= 8 and gen["records_valid"] == 16 and gen["topup_batches"] >= 1
    d = dp["dictionary"]
    shown = set()
    for b in bodies(fake, GENERATE):
        for line in b["messages"][1]["content"].splitlines():
            if line.startswith("{"):
                shown.add(tuple(str(v) for v in json.loads(line).values()))
    out = {tuple(r[n] for n in d.names) for r in records(result)}
    assert shown and not (out & shown)


def test_calibration_refuses_a_pool_too_small_and_never_reports_nan(dp, fake):
    d = dp["dictionary"]
    aggregates = DPAggregates.from_measurements(d, dp["measurements"])
    pool = {n: dp["columns"][n][:12] for n in d.names}
    out, cal = calibrate(d, aggregates, pool, 40, np.random.default_rng(0))
    assert cal["status"] == "refused" and "too small" in cal["warnings"][0] and len(out[d.names[0]]) == 40
    assert np.isfinite(cal["effective_sample_size"]) and cal["tvd_after"] and "repeat" in cal["warnings"][-1]
    # degenerate pool: one record 60 times; raking cannot help and no NaN comes out
    same = {n: [dp["columns"][n][0]] * 60 for n in d.names}
    _, cal = calibrate(d, aggregates, same, 60, np.random.default_rng(0))
    assert np.isfinite(cal["effective_sample_size"]) and cal["status"] in ("calibrated", "refused")
    # in the stage: the warning reaches the manifest's degradations
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=10, pool_factor=1.0))
    m = result.manifest_section
    assert m["uses"]["generate"]["calibration"]["status"] == "refused" and "too small" in " ".join(m["degradations"])


def test_the_pool_is_generated_within_a_bounded_number_of_extra_calls(dp, fake):
    fake.script("ood", GENERATE, times=50)  # every batch loses 2 of its records
    client = LLMClient(config(fake, batch_size=5, topup_calls=2))
    d = dp["dictionary"]
    cols, stats = generate_pool(client, d, DPAggregates.from_measurements(d, dp["measurements"]), 20, "definition")
    assert stats["batches"] == 4 and stats["topup_batches"] <= 2 and len(fake.requests) <= 6
    assert stats["records_valid"] < 20 and "short" in stats["shortfall_reason"] and stats["valid_rate"] < 1


# ----------------------------------------------------------------------------- notes
def test_a_note_that_contradicts_its_record_is_written_again_or_dropped(dp, fake):
    fake.script("contradict", NOTE, times=3)  # record 0: both draws contradict (dropped); record 1: the first
    result = stage(dp, config(fake, uses=("notes",), notes_limit=3, concurrency=1))
    notes = [json.loads(x) for x in result.files["notes.jsonl"].decode().splitlines()]
    stats = result.manifest_section["uses"]["notes"]
    assert [n["note"] is not None for n in notes] == [False, True, True]
    assert "chol" in notes[0]["contradictions"][0] and notes[0]["error"] == "contradicts its record"
    assert stats["dropped_contradicting"] == 1 and stats["regenerated"] == 2 and stats["notes"] == 2
    assert "contradicting" in " ".join(result.manifest_section["degradations"])
    # the prompt asks for prose conditioned on the record
    assert "connected prose" in bodies(fake, NOTE)[0]["messages"][1]["content"]


def test_a_looping_note_loses_its_repeats_and_its_unfinished_last_sentence(dp, fake):
    """A small model repeats a sentence until max_tokens cuts it off mid-word: the repeats are dropped, the note
    ends at its last finished sentence, and the manifest counts both."""
    fake.handlers["note"] = lambda body: (note_from_facts(body["messages"][1]["content"]) + " "
                                          + "Symptoms are evaluated in clinic today. " * 6 + "Further evaluat")
    fake.script("truncate", NOTE)  # the first reply is cut off (finish_reason "length")
    result = stage(dp, config(fake, uses=("notes",), notes_limit=2, concurrency=1))
    notes = [json.loads(x)["note"] for x in result.files["notes.jsonl"].decode().splitlines()]
    stats = result.manifest_section["uses"]["notes"]
    assert notes[0].endswith(". Symptoms are evaluated in clinic today.") and notes[0].count("Symptoms") == 1
    assert notes[1].endswith("Further evaluat")  # not cut off: kept as written, less its repeats
    assert notes[1].count("Symptoms are evaluated") == 1
    assert stats["cut_to_last_sentence"] == 1 and stats["repeated_sentences_dropped"] >= 5 and stats["notes"] == 2


def test_a_note_that_states_none_of_its_record_is_dropped_and_an_introduction_is_cut(dp, fake):
    """A small model writes about itself or about nothing ("I am Dr. Smith, a cardiologist..."): a note that
    states fewer than 2 of its record's facts is written again, then dropped as not about its record. A first
    line that only introduces the note ("Here's a possible clinical narrative:") is cut."""
    from ppsehr.server.llm.notes import NoteChecker, tidy_note

    replies = iter(["I am a cardiologist at a large clinic and I have written many such letters before today.",
                    "Here's a possible clinical narrative:\n\n\"The patient attends the clinic for a routine review of the heart.\""])
    fake.handlers["note"] = lambda body: next(replies, None) or note_from_facts(body["messages"][1]["content"])
    result = stage(dp, config(fake, uses=("notes",), notes_limit=2, concurrency=1))
    entry, second = [json.loads(x) for x in result.files["notes.jsonl"].decode().splitlines()]
    stats = result.manifest_section["uses"]["notes"]
    assert entry["note"] is None and entry["error"] == "not about its record" and "of the record's" in entry["why"]
    assert second["note"] and stats["notes"] == 1  # the fake's own note states the facts it was given
    assert stats["dropped_unrelated"] == 1 and stats["dropped_contradicting"] == 0 and stats["regenerated"] == 1
    assert "1 dropped as not about their record" in " ".join(result.manifest_section["degradations"])
    assert tidy_note("Here's a possible clinical narrative:\n\n\"The patient, 54 years old, has typical angina.\"", False)[0] \
        == "The patient, 54 years old, has typical angina."
    d = dp["dictionary"]
    record = SyntheticRecord.from_columns(d, dp["columns"], 0)
    values = record.as_dict()
    stated, possible = NoteChecker(d).grounding(record, f"A {values['age']}-year-old patient was seen.", 2)
    assert stated == 1 and possible >= 4


def test_the_note_checker_finds_contradictions_and_accepts_faithful_notes(dp):
    d = dp["dictionary"]
    rec = SyntheticRecord.from_values(d, {"age": "54", "sex": "male", "cp": "atypical_angina", "trestbps": "130",
                                          "chol": "246", "fbs": "no", "restecg": "normal", "thalach": "150", "exang": "yes",
                                          "oldpeak": "1.5", "slope": "flat", "ca": "0", "thal": "normal",
                                          "heart_disease": "present"})
    check = NoteChecker(d).check
    good = ("A 54-year-old man presented with atypical angina. His resting blood pressure was 130/85 mmHg and serum "
            "cholesterol 246 mg/dL; fasting glucose was not above 120 mg/dL. He reached 150 bpm on the treadmill with "
            "1.5 mm ST depression, and angiography showed coronary artery disease.")
    assert check(rec, good) == []
    bad = ("A 54-year-old woman with typical angina. Her cholesterol was 320 mg/dL and fasting glucose 145 mg/dL; "
           "two vessels were coloured by fluoroscopy.")
    found = " ".join(check(rec, bad))
    for name in ("chol", "fbs", "cp", "ca", "sex"):
        assert f"{name}:" in found


def test_bench_llm_never_crashes_and_says_why(tmp_path, capsys):
    from ppsehr.deploy.cli import main

    with FakeOpenAI(context=120) as server:  # a context too small for any batch
        assert main(["bench", "llm", "--llm-base-url", server.base_url, "--llm-model", "fake-model", "--rows", "10",
                     "--llm-styles", "definition,example", "--engine-iters", "30", "--llm-timeout", "2",
                     "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "bench-llm.json").read_text())
    for s in result["styles"].values():
        assert s["records_valid"] == 0 and "does not fit" in s["why_not"] and "120 tokens" in s["why_not"]
    assert "below 80% valid" in (tmp_path / "b" / "bench-llm.md").read_text()


def test_batches_the_time_budget_leaves_unsent_are_counted_apart_from_calls(dp):
    """Past the time budget a batch is not sent: it is counted as not sent, not as a call or a failed call."""
    d = dp["dictionary"]
    with FakeOpenAI(delay=0.4) as server:
        client = LLMClient(config(server, concurrency=1, batch_size=5, timeout=None))
        client.set_deadline(1.0)
        cols, stats = generate_pool(client, d, DPAggregates.from_measurements(d, dp["measurements"]), 60, "definition")
        sent = len(server.requests)
    assert 1 <= sent < 12 and stats["batches"] + stats["topup_batches"] == sent and stats["batches_failed"] == 0
    assert stats["batches_not_sent"] >= 12 - sent and "time budget" in stats["shortfall_reason"]
    assert len(cols[d.names[0]]) == stats["records_valid"] < 60


def test_requests_are_sized_to_what_a_slow_endpoint_can_write_in_the_time_left(dp, fake):
    """At 10 tokens/s with 30 s left, the knowledge call asks for 2 items and a batch for a few records."""
    from ppsehr.server.llm.generate import _Batches
    from ppsehr.server.llm.knowledge import _knowledge_request

    d = dp["dictionary"]
    client = LLMClient(config(fake, context=4096, completion_tps=10.0, prompt_tps=200.0, batch_size=20))
    client.set_deadline(30)
    prompt, max_tokens = _knowledge_request(client, d)
    assert prompt.info["max_items"] == 2 and "at most 2 dependencies" in prompt.messages[1][1] and max_tokens <= 300
    batch, batch_tokens = _Batches(client, d, DPAggregates.from_measurements(d, dp["measurements"]), "definition", (),
                                   ()).build(20, 0)
    assert 1 <= batch.info["n"] <= 3 and batch_tokens <= 300
    client.set_deadline(None)  # no deadline: the context alone decides
    prompt, _ = _knowledge_request(client, d)
    assert prompt.info["max_items"] > 2
