"""Regenerate the Python modules of the public API from protos/levante/v1/*.proto.

    python protos/generate.py            # rewrite the committed modules beside the .proto files
    python protos/generate.py --out DIR  # write them under DIR instead (tests compare the two)

Uses grpc_tools.protoc, pinned in pyproject's ``test`` extra so the output is byte-for-byte stable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # import paths are relative to this: levante/v1/...


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("levante/**/*.proto"))


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # a test-only dependency: import it only when regenerating

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *proto_files(),
    ]
    # Inputs are named relative to PROTO_ROOT (levante/v1/x.proto): the import paths the generated code uses.
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: beside the .proto files)")
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])
