"""Regenerate the protobuf/gRPC modules of ppsehr.protos from the .proto files beside this script.

Usage: python protos/generate.py [--out DIR]   (default: this folder; needs grpcio-tools from the
`test` extra). The import path inside the generated code is `ppsehr.protos`, so the .proto files are
compiled from a temporary tree where they sit under ppsehr/protos/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto in this folder into out_dir; return the files written."""
    from grpc_tools import protoc  # deferred: only needed by developers
    import importlib.resources

    protos = sorted(HERE.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "ppsehr" / "protos"
        src.mkdir(parents=True)
        for proto in protos:
            shutil.copy(proto, src / proto.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        well_known = str(importlib.resources.files("grpc_tools") / "_proto")
        args = [
            "protoc",
            f"-I{Path(tmp) / 'src'}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
        ] + [f"ppsehr/protos/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / "ppsehr" / "protos").iterdir()):
            if f.name.endswith(GENERATED_SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
