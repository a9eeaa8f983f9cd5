"""The LLM stage against a real model: opt-in, skipped unless an endpoint is named.

    PPSEHR_REAL_LLM_BASE_URL=http://127.0.0.1:8080/v1 PPSEHR_REAL_LLM_MODEL=qwen2.5-0.5b-instruct \
        python -m pytest -m realmodel tests/realmodel -s

(docs/local-model.md says how to serve a small GGUF model on this machine.) One request at a
time; with a small model on a few CPU cores it takes several minutes. PPSEHR_REAL_LLM_ROWS sets
the bench's rows per style (default 20). The figures go to stdout (-s) and to
$PPSEHR_REAL_LLM_OUT (default: a temporary directory).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

BASE_URL = os.environ.get("PPSEHR_REAL_LLM_BASE_URL")
MODEL = os.environ.get("PPSEHR_REAL_LLM_MODEL")
ROWS = int(os.environ.get("PPSEHR_REAL_LLM_ROWS", "20"))

pytestmark = [pytest.mark.realmodel,
              pytest.mark.skipif(not (BASE_URL and MODEL), reason="set PPSEHR_REAL_LLM_BASE_URL and PPSEHR_REAL_LLM_MODEL")]


@pytest.fixture(scope="module")
def out_dir():
    path = Path(os.environ.get("PPSEHR_REAL_LLM_OUT") or tempfile.mkdtemp(prefix="ppsehr-realmodel-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def profile(out_dir):
    """`ppsehr llm check` once: what the endpoint supports, its context and speed (the profile the rest uses)."""
    from ppsehr.deploy.cli import main

    path = out_dir / "profile.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["llm", "check", "--llm-base-url", BASE_URL, "--llm-model", MODEL, "--json", "--llm-profile", str(path)])
    result = json.loads(buf.getvalue())
    print(json.dumps({k: result.get(k) for k in ("chat", "chat_latency_s", "structured_output", "json_schema_note",
                                                  "json_object_note", "context_tokens", "context_source", "speed")}, indent=1))
    assert code == 0 and result["chat"], result.get("error")
    assert path.exists()
    return path


def test_llm_check_writes_a_usable_profile(profile):
    p = json.loads(profile.read_text())
    assert p["structured_output"] in ("json_schema", "json_object_schema", "json_object", "prompt")
    assert p["settings"]["max_tokens"] >= 256 and p["settings"]["concurrency"] >= 1


def test_bench_llm_gives_valid_records_per_style_or_says_why(profile, out_dir):
    """>= 80% of the requested records valid per prompt style, or the reason in why_not; never a crash."""
    from ppsehr.deploy.cli import main

    code = main(["bench", "llm", "--llm-base-url", BASE_URL, "--llm-model", MODEL, "--rows", str(ROWS),
                 "--llm-profile", str(profile), "--engine-iters", "200", "--out", str(out_dir / "bench")])
    assert code == 0
    result = json.loads((out_dir / "bench" / "bench-llm.json").read_text())
    for style, s in result["styles"].items():
        print(f"{style}: {s['records_valid']}/{s['records_requested']} valid ({s.get('seconds')} s)"
              + (f"; why not: {s['why_not']}" if s.get("why_not") else ""))
        assert s["valid_rate"] >= 0.8 or s.get("why_not"), s


def test_notes_are_narratives_checked_against_their_records(profile):
    from ppsehr.server.llm.client import LLMConfig, apply_profile, load_profile
    from ppsehr.server.llm.notes import NoteChecker, list_like
    from ppsehr.server.llm.prompts import SyntheticRecord
    from ppsehr.server.llm.stage import run_llm_stage
    from ppsehr.deploy.bench.llm import demo_measurements
    from ppsehr.server.model.graphical import estimate
    from ppsehr.server.model.records import decode

    with tempfile.TemporaryDirectory() as tmp:
        d, measurements = demo_measurements(Path(tmp), 4.0)
    rng = np.random.default_rng(0)
    columns = decode(estimate(d.domain(), measurements, iters=100).sample(5, rng), d, rng)
    cfg = apply_profile(LLMConfig(base_url=BASE_URL, model=MODEL, cache_dir="", uses=("notes",), notes_limit=3,
                                  time_budget=900), load_profile(profile), str(profile))
    result = run_llm_stage(cfg, d, measurements, columns, rng, print)
    notes = result.manifest_section["uses"]["notes"]
    print(json.dumps({k: notes.get(k) for k in ("notes", "failed", "dropped_contradicting", "regenerated", "list_like",
                                               "skipped_time_budget", "contradictions")}, indent=1))
    checker = NoteChecker(d)
    for line in result.files.get("notes.jsonl", b"").decode().splitlines():
        entry = json.loads(line)
        print(entry)
        if entry["note"]:
            record = SyntheticRecord.from_columns(d, columns, entry["record"])
            assert checker.check(record, entry["note"]) == [] or "[" in entry["note"]  # kept notes do not contradict
    assert notes["records"] == 3 and notes["notes"] + notes["failed"] + notes["skipped_time_budget"] == 3
