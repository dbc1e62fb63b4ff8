"""Regenerate the committed protobuf and gRPC code from ``protos/``.

Usage: ``python scripts/gen_protos.py`` (writes ``heartline/v1/*_pb2*.py[i]``), or
``python scripts/gen_protos.py --check`` to fail when the committed code drifts.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "heartline" / "v1"


def generate(into: Path) -> list[Path]:
    """Run protoc on every .proto under protos/ and return the generated files."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            *sources,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((into / "heartline" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        if opts.check:
            drifted = [
                g.name
                for g in generated
                if not (OUT / g.name).exists() or not filecmp.cmp(g, OUT / g.name, shallow=False)
            ]
            stale = {p.name for p in OUT.glob("*_pb2*.py*")} - {g.name for g in generated}
            if drifted or stale:
                print(
                    "generated code drifts from protos/: "
                    f"{sorted(drifted + list(stale))}; run python scripts/gen_protos.py",
                    file=sys.stderr,
                )
                return 1
            print("generated code matches protos/")
            return 0
        for g in generated:
            shutil.copyfile(g, OUT / g.name)
            print(f"wrote {(OUT / g.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
