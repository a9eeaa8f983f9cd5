"""The committed protobuf/gRPC modules are exactly what protos/generate.py produces."""

import importlib.util
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_generated_modules_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert {p.name for p in written} == {"guard_pb2.py", "guard_pb2.pyi", "guard_pb2_grpc.py"}
    for p in written:
        committed = ROOT / "protos" / p.name
        assert committed.exists(), f"{committed} missing: run python protos/generate.py"
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run python protos/generate.py"
