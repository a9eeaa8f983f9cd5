"""The LLM stage end to end through the real `openai` client against a local fake server (127.0.0.1)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FAKE_NAME, FAKE_PHONE, FakeOpenAI  # noqa: E402

from ppsehr.deploy.local import demo_dir  # noqa: E402
from ppsehr.common.mapping import load_mapping  # noqa: E402
from ppsehr.common.source import load_site_table  # noqa: E402
from ppsehr.server.llm.client import LLMClient, LLMConfig, LLMError  # noqa: E402
from ppsehr.deploy.bench.llm import demo_measurements
from ppsehr.server.llm.knowledge import knowledge_dependencies
from ppsehr.server.llm.generate import marginal_tvd
from ppsehr.server.llm.stage import run_llm_stage
from ppsehr.server.model.graphical import estimate  # noqa: E402
from ppsehr.server.llm.prompts import (DPAggregates, SyntheticRecord, generation_prompt, in_domain,  # noqa: E402
                                   knowledge_prompt, note_prompt)
from ppsehr.server.model.records import decode  # noqa: E402

# Values planted in Cleveland's table. They are valid measurements (inside the dictionary's
# bins) but with decimals no synthetic value at the dictionary's precision can have.
CANARIES = {"age": "63.4817", "trestbps": "147.3829", "chol": "231.9157", "thalach": "151.6243", "oldpeak": "2.3719"}
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num"]
SITE_STRINGS = ["Cleveland", "cleveland", "processed."]


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """DP marginals from the 4 demo guards (Cleveland's table carries canaries) and 30 synthetic records."""
    root = tmp_path_factory.mktemp("llm-dp")
    demo = demo_dir()
    data = (demo / "data" / "processed.cleveland.data").read_text().splitlines()
    first = data[0].split(",")
    for name, value in CANARIES.items():
        first[COLUMNS.index(name)] = value
    (root / "data").mkdir()
    (root / "data" / "processed.cleveland.data").write_text("\n".join([",".join(first)] + data[1:]) + "\n")
    (root / "sites").mkdir()
    mapping = root / "sites" / "cleveland.toml"
    shutil.copy(demo / "sites" / "cleveland.toml", mapping)
    dictionary, measurements = demo_measurements(root / "work", epsilon=4.0, mappings={"cleveland": mapping})
    site_mapping = load_mapping(mapping, dictionary)
    assert site_mapping.path == root / "data" / "processed.cleveland.data"  # the guard read the planted table
    table, _ = load_site_table(site_mapping, dictionary)
    assert table.n_rows == len(data)
    model = estimate(dictionary.domain(), measurements, iters=100)
    rng = np.random.default_rng(3)
    columns = decode(model.sample(30, rng), dictionary, rng)
    return {"dictionary": dictionary, "measurements": measurements, "columns": columns, "mapping": mapping}


@pytest.fixture
def fake():
    server = FakeOpenAI().start()
    try:
        yield server
    finally:
        server.stop()


def config(server_or_url, tmp_path=None, **kw) -> LLMConfig:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    base = dict(base_url=url, model="fake-model", timeout=0.4, max_retries=3, backoff=0.01, backoff_max=0.05,
                cache_dir=str(tmp_path / "cache") if tmp_path else "", concurrency=4)
    return LLMConfig(**(base | kw))


def stage(dp, cfg, progress=None, seed=0):
    return run_llm_stage(cfg, dp["dictionary"], dp["measurements"], dp["columns"], np.random.default_rng(seed),
                         progress or (lambda m: None))


def bodies(server, template: str | None = None) -> list[dict]:
    out = [r["body"] for r in server.requests]
    return [b for b in out if template is None or template in b["messages"][0]["content"]]


KNOWLEDGE, NOTE, GENERATE = "clinical data scientist", "clinician writing", "generate synthetic patient records"


# ----------------------------------------------------------------------------- offline
def test_offline_release_touches_no_network(dp, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network used while offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    result = stage(dp, LLMConfig())
    assert result.files == {} and result.columns is dp["columns"]
    assert result.manifest_section["used"] is False
    assert "statistical engine alone" in result.manifest_section["reason"]
    assert knowledge_dependencies(LLMConfig(), dp["dictionary"]) == []


def test_unreachable_endpoint_gives_up_quickly_and_release_goes_on(dp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    result = stage(dp, config(f"http://127.0.0.1:{port}/v1", uses=("knowledge", "notes"), fail_fast_after=4))
    m = result.manifest_section
    assert m["used"] is False and "statistical engine alone" in m["reason"]
    assert m["uses"]["knowledge"]["ran"] is False and m["uses"]["notes"]["ran"] is False
    assert m["requests"] <= 4 + 4  # fail-fast: a handful of connection attempts, not one per record
    assert result.columns == dp["columns"] and "notes.jsonl" not in result.files


# ----------------------------------------------------------------------------- every use, and the privacy invariant
def test_every_use_end_to_end_and_no_site_value_reaches_a_prompt(dp, fake, tmp_path):
    seen = []
    cfg = config(fake, tmp_path, uses=("knowledge", "generate", "notes"), styles=("definition", "example", "rule"),
                 generate_rows=40, batch_size=10, timeout=10.0)  # one request per call: no timeout on a loaded machine
    result = stage(dp, cfg, seen.append)
    m = result.manifest_section
    d = dp["dictionary"]
    assert m["used"] is True and m["model"] == "fake-model" and m["base_url_host"] == "127.0.0.1"
    assert set(m["uses"]) == {"knowledge", "generate", "notes"} and all(u["ran"] for u in m["uses"].values())
    assert m["calls"] == m["requests"] == len(fake.requests) and m["failed_calls"] == 0
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0 and m["structured_output"] == "json_schema"
    assert {"knowledge@2", "generate-definition@2", "generate-example@2", "generate-rule@2", "note@2"} <= set(m["templates"])
    assert set(result.files) == {"llm_rules.json", "llm_records.csv", "notes.jsonl", "llm_calls.jsonl"}
    notes = [json.loads(line) for line in result.files["notes.jsonl"].decode().splitlines()]
    assert [n["record"] for n in notes] == list(range(30)) and all(n["note"] for n in notes)
    rows = list(csv.DictReader(io.StringIO(result.files["llm_records.csv"].decode())))
    assert len(rows) == 40 and all(in_domain(d[k], v) for r in rows for k, v in r.items())
    cal = m["uses"]["generate"]["calibration"]
    assert cal["pool"] >= 40 and set(cal["tvd_before"]) == {"1", "2"}
    calls = [json.loads(line) for line in result.files["llm_calls.jsonl"].decode().splitlines()]
    assert len(calls) == m["calls"] and all(c["prompt_hash"].startswith("sha256:") for c in calls)
    # The prompts carry the public dictionary and DP statistics ...
    everything = json.dumps([r["body"] for r in fake.requests])
    assert "Population percentages" in everything and "Serum total cholesterol" in everything
    # ... and nothing from a site: no planted value, no site name or file name.
    for value in list(CANARIES.values()) + SITE_STRINGS:
        assert value not in everything, f"{value!r} reached a prompt"
        assert value not in " ".join(seen)


def test_prompt_builders_refuse_a_site_table(dp):
    d = dp["dictionary"]
    table, _ = load_site_table(load_mapping(dp["mapping"], d), d)
    aggregates = DPAggregates.from_measurements(d, dp["measurements"])
    with pytest.raises(TypeError, match="EncodedTable"):
        knowledge_prompt(table)
    with pytest.raises(TypeError, match="EncodedTable"):
        generation_prompt("definition", d, table, 5, 0)
    with pytest.raises(TypeError, match="EncodedTable"):
        DPAggregates.from_measurements(d, [table])
    with pytest.raises(TypeError):
        generation_prompt("example", d, aggregates, 5, 0, examples=[table.columns])
    with pytest.raises(TypeError, match="dict"):
        note_prompt(d, {n: "" for n in d.names}, "en")
    # A synthetic record can only hold values at the dictionary's precision: a raw site value does not fit.
    row = {n: dp["columns"][n][0] for n in d.names}
    with pytest.raises(ValueError, match="age"):
        SyntheticRecord.from_values(d, row | {"age": CANARIES["age"]})
    assert "Population percentages" in generation_prompt("definition", d, aggregates, 5, 0).messages[1][1]


# ----------------------------------------------------------------------------- failure cases
@pytest.mark.parametrize("supports, expected", [({"json_schema": False}, "json_object_schema"),
                                                ({"json_schema": False, "json_object_schema": False}, "json_object"),
                                                ({"json_schema": False, "json_object": False}, "prompt"),
                                                ({"ignore_schema": True}, "json_schema")])
def test_servers_without_structured_output(dp, tmp_path, supports, expected):
    with FakeOpenAI(**supports) as server:
        result = stage(dp, config(server, uses=("knowledge", "generate"), styles=("definition",), generate_rows=20, batch_size=10,
                                  pool_factor=1.0))
    m = result.manifest_section
    assert m["structured_output"] == expected and m["failed_calls"] == 0
    assert m["uses"]["generate"]["styles"][0]["records_valid"] == 20
    formats = [b.get("response_format", {}).get("type") for b in bodies(server)]
    assert formats[0] == "json_schema"
    if expected != "json_schema":
        # after the refusal, the schema travels in the prompt instead
        later = [b for b in bodies(server) if b.get("response_format", {}).get("type") != "json_schema"]
        assert later and all("Reply with one JSON object only" in b["messages"][0]["content"] for b in later)
        first = {"prompt": None, "json_object_schema": "json_object"}.get(expected, expected)
        assert all(f != "json_schema" for f in formats[formats.index(first):])


def test_malformed_json_is_reasked_a_bounded_number_of_times(dp, fake):
    fake.script("malformed", KNOWLEDGE)
    result = stage(dp, config(fake, uses=("knowledge",)))
    k = result.manifest_section["uses"]["knowledge"]
    assert k["ran"] is True and result.manifest_section["reasks"] == 1
    reask = bodies(fake, KNOWLEDGE)[-1]["messages"]
    assert reask[-2]["role"] == "assistant" and "not valid" in reask[-1]["content"]
    # Always malformed: 1 + reask requests, then the use fails and the release goes on.
    fake.requests.clear()
    fake.script("malformed", KNOWLEDGE, times=5)
    result = stage(dp, config(fake, uses=("knowledge", "notes"), reask=2, notes_limit=3))
    m = result.manifest_section
    assert m["uses"]["knowledge"]["ran"] is False and "no valid JSON after 2 re-ask" in m["uses"]["knowledge"]["error"]
    assert len(bodies(fake, KNOWLEDGE)) == 3 and m["uses"]["notes"]["notes"] == 3 and m["used"] is True


def test_timeouts_429_and_500_are_retried_with_backoff(dp, fake):
    fake.slow_seconds = 1.0
    fake.script("timeout", KNOWLEDGE).script("429", KNOWLEDGE).script("500", KNOWLEDGE)
    result = stage(dp, config(fake, uses=("knowledge",), timeout=0.3))
    m = result.manifest_section
    assert m["uses"]["knowledge"]["ran"] is True and m["requests"] == 4 and m["calls"] == 1
    # more failures than retries: a structured request that fails twice falls back to the next mode
    # (json_schema 2, json_object with a schema 2, json_object 2); without response_format the call fails for
    # good after max_retries + 1
    fake.requests.clear()
    fake.script("500", KNOWLEDGE, times=10)
    client = LLMClient(config(fake, max_retries=2))
    with pytest.raises(LLMError, match="HTTP 500 after 3 attempt"):
        client.json(knowledge_prompt(dp["dictionary"]))
    formats = [b.get("response_format", {}).get("type") for b in bodies(fake)]
    assert formats == ["json_schema"] * 2 + ["json_object"] * 4 + [None] * 3


def test_out_of_domain_values_are_repaired_or_rejected(dp, fake):
    fake.script("ood", GENERATE)
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=10, batch_size=10,
                              pool_factor=1.0))
    gen = result.manifest_section["uses"]["generate"]["styles"][0]
    assert gen["records_returned"] == 12 and gen["topup_batches"] == 1  # the 2 rejected are made up by one more call
    assert gen["records_valid"] == 10 and gen["valid_rate"] == 1.0
    assert gen["records_rejected"] == 2  # "banana" and an absurd number
    assert gen["values_repaired"] >= 2, gen  # "MALE"-style spelling, a number slightly out of range (clipped)
    assert set(gen["rejections"]) == {"age", "thal"}
    d = dp["dictionary"]
    rows = list(csv.DictReader(io.StringIO(result.files["llm_records.csv"].decode())))
    assert rows and all(in_domain(d[k], v) for r in rows for k, v in r.items())


def test_pii_in_llm_text_is_replaced(dp, fake, tmp_path):
    fake.script("pii", NOTE).script("pii", KNOWLEDGE)
    result = stage(dp, config(fake, uses=("knowledge", "notes"), notes_limit=2))
    notes = result.files["notes.jsonl"].decode()
    rules = result.files["llm_rules.json"].decode()
    raw = json.dumps([r for r in fake.requests])  # the fake did write them (into its replies)
    for text in (notes, rules):
        assert FAKE_NAME not in text and FAKE_PHONE not in text and "555" not in text
        assert "[NAME]" in text and "[PHONE]" in text
    assert FAKE_NAME not in raw  # requests never carry them: they only came back in replies
    report = result.manifest_section["pii_guard"]
    assert report["identifiers_replaced"]["NAME"] >= 2 and report["identifiers_replaced"]["PHONE"] >= 2
    assert [json.loads(line).get("pii") for line in notes.splitlines()].count({"NAME": 1, "PHONE": 1}) == 1


# ----------------------------------------------------------------------------- knowledge
def test_knowledge_rules_are_checked_against_dictionary_and_dp_and_repair_records(dp, fake):
    proposal = {
        "dependencies": [{"variables": ["chol", "trestbps"], "reason": "both rise with atherosclerosis"},
                         {"variables": ["age", "nonexistent"], "reason": "x"},
                         {"variables": ["sex", "sex"], "reason": "x"},
                         {"variables": ["heart_disease", "cp"], "reason": "already declared"}],
        "rules": [
            {"description": "test rule: no male with typical angina", "repair": "cp",
             "conditions": [{"variable": "sex", "op": "in", "values": ["Male"], "value": None},
                            {"variable": "cp", "op": "in", "values": ["typical angina"], "value": None}]},
            {"description": "adults only", "repair": "age",
             "conditions": [{"variable": "age", "op": "<", "values": [], "value": 18}]},
            {"description": "no men (contradicted by the data)", "repair": "sex",
             "conditions": [{"variable": "sex", "op": "in", "values": ["male"], "value": None}]},
            {"description": "pregnancy", "repair": "cp",
             "conditions": [{"variable": "cp", "op": "in", "values": ["pregnant"], "value": None}]},
            {"description": "bad repair", "repair": "age",
             "conditions": [{"variable": "fbs", "op": "in", "values": ["yes"], "value": None}]}]}
    fake.handlers["knowledge"] = lambda body: json.dumps(proposal)
    d = dp["dictionary"]
    columns = {k: list(v) for k, v in dp["columns"].items()}
    columns["sex"][:10], columns["cp"][:10] = ["male"] * 10, ["typical_angina"] * 10  # plant violations
    result = run_llm_stage(config(fake, uses=("knowledge",)), d, dp["measurements"], columns,
                           np.random.default_rng(0), lambda m: None)
    rules = json.loads(result.files["llm_rules.json"])
    assert [r["text"] for r in rules["rules"]] == ["sex in {male} AND cp in {typical_angina}", "age < 18"]
    assert rules["rules"][0]["status"].startswith("not checkable") and rules["rules"][1]["dp_mass"] == 0
    reasons = " ".join(r["reason"] for r in rules["rules_rejected"])
    assert "contradicted by the DP aggregates" in reasons and "no category 'pregnant'" in reasons and "repair variable" in reasons
    assert rules["repairs"]["violations"]["sex in {male} AND cp in {typical_angina}"] >= 10 and rules["repairs"]["unrepaired"] == 0
    out = result.columns
    assert not any(s == "male" and c == "typical_angina" for s, c in zip(out["sex"], out["cp"]))
    assert out["age"] == columns["age"] and all(in_domain(d["cp"], v) for v in out["cp"])
    # The planner's helper: new, valid dependencies only (the dictionary already declares heart_disease-cp).
    assert knowledge_dependencies(config(fake), d) == [("chol", "trestbps")]


# ----------------------------------------------------------------------------- cache, key, concurrency, calibration
def test_cache_makes_a_rerun_free(dp, fake, tmp_path):
    cfg = config(fake, tmp_path, uses=("knowledge", "notes"), notes_limit=5)
    first = stage(dp, cfg)
    n = len(fake.requests)
    second = stage(dp, cfg)
    assert len(fake.requests) == n  # nothing sent
    m = second.manifest_section
    assert m["cached_calls"] == m["calls"] == first.manifest_section["calls"] and m["prompt_tokens"] == 0
    assert second.files["notes.jsonl"] == first.files["notes.jsonl"]


def test_api_key_comes_from_the_environment_and_is_never_written(dp, fake, tmp_path, monkeypatch):
    key = "sk-ppsehr-canary-7f3e9a"
    monkeypatch.setenv("PPSEHR_LLM_API_KEY", key)
    seen = []
    cfg = config(fake, tmp_path, uses=("knowledge", "notes"), notes_limit=2)
    result = stage(dp, cfg, seen.append)
    headers = {k.lower(): v for k, v in fake.requests[0]["headers"].items()}
    assert headers["authorization"] == f"Bearer {key}"
    assert result.manifest_section["api_key_from_environment"] is True
    written = [*result.files.values(), json.dumps(result.manifest_section).encode(), " ".join(seen).encode(),
               repr(cfg).encode(), json.dumps(cfg.to_dict()).encode()]
    written += [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(written) > 6 and not any(key.encode() in w for w in written)


def test_concurrency_is_limited(dp):
    with FakeOpenAI(delay=0.05) as server:
        stage(dp, config(server, uses=("notes",), concurrency=2, notes_limit=12))
    assert len(server.requests) == 12 and server.max_inflight <= 2


def test_calibration_brings_llm_first_records_back_to_the_dp_marginals(dp, fake):
    result = stage(dp, config(fake, uses=("generate",), styles=("definition",), generate_rows=300, batch_size=50,
                              pool_factor=2.0))
    cal = result.manifest_section["uses"]["generate"]["calibration"]
    assert cal["tvd_after"]["1"] < 0.8 * cal["tvd_before"]["1"]
    assert cal["tvd_after"]["2"] < cal["tvd_before"]["2"]
    # and the reported figures are what the file holds
    d = dp["dictionary"]
    rows = list(csv.DictReader(io.StringIO(result.files["llm_records.csv"].decode())))
    from ppsehr.server.model.records import encode
    cells = encode(d, {n: [r[n] for r in rows] for n in d.names})
    assert marginal_tvd(d, DPAggregates.from_measurements(d, dp["measurements"]), cells) == cal["tvd_after"]


# ----------------------------------------------------------------------------- command line
def test_llm_check_command(fake, capsys):
    from ppsehr.deploy.cli import main

    assert main(["llm", "check", "--llm-base-url", fake.base_url, "--llm-model", "fake-model", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chat"] is True and out["json_schema"] is True and out["structured_output"] == "json_schema"
    assert out["model_listed"] is True
    with FakeOpenAI(json_schema=False) as limited:
        assert main(["llm", "check", "--llm-base-url", limited.base_url, "--llm-model", "fake-model", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["json_schema"] is False and out["structured_output"] == "json_object_schema"


def test_bench_llm_command(tmp_path, capsys):
    from ppsehr.deploy.cli import main

    assert main(["bench", "llm", "--rows", "60", "--batch-size", "30", "--llm-styles", "definition,example",
                 "--engine-iters", "50", "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "bench-llm.json").read_text())
    assert result["endpoint"]["fake_server"] is True and set(result["styles"]) == {"definition", "example"}
    for s in result["styles"].values():
        assert s["records_valid"] == 90 and s["tokens_per_1000_records"] > 0 and s["records_per_second"] > 0
        assert set(s["tvd_before"]) == set(s["tvd_after"]) == {"1", "2"}
    assert "| definition |" in (tmp_path / "b" / "bench-llm.md").read_text()


def test_note_prompt_language_and_tier_policy(dp):
    import tomllib

    from ppsehr.common.dictionary import parse_dictionary

    raw = tomllib.loads((demo_dir() / "dictionary.toml").read_text())
    raw["variables"]["hiv_status"] = {"type": "categorical", "categories": ["negative", "positive"], "tier": 3,
                                      "description": "HIV serology"}
    d = parse_dictionary(raw)
    values = {n: dp["columns"][n][0] for n in dp["dictionary"].names} | {"hiv_status": "positive"}
    record = SyntheticRecord.from_values(d, values)
    text = note_prompt(d, record, "de", max_tier=2).messages[1][1]
    assert "Write the note in German" in text and "HIV" not in text and "Serum total cholesterol" in text
    assert "HIV serology: positive" in note_prompt(d, record, "fr", max_tier=3).messages[1][1]
