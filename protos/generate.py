"""Compile protos/ into the checked-in Python stubs and Envoy's inline descriptor set: `make protos`.

    python protos/generate.py                 # write into the repository
    python protos/generate.py --root DIR      # write the same files under DIR (the freshness test)

Outputs, relative to the root:
    authz_server/admin/gen/admin_pb2.py, admin_pb2.pyi, admin_pb2_grpc.py
    envoy/envoy.yaml, envoy/snippet.yaml
        the grpc_json_transcoder's `proto_descriptor_bin:` line, the FileDescriptorSet (with
        its imports) in base64, so Envoy needs no descriptor file and the config validates
        from any directory; the rest of each file is left byte for byte

It uses grpcio-tools' bundled protoc (`python -m grpc_tools.protoc`) and the
google/api/*.proto files of googleapis-common-protos, both pinned in
constraints.txt, so the output is byte-for-byte reproducible.
`tests/unit/repo/test_protos.py` regenerates into a temporary directory and compares.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
SOURCES = ("mcp_authz/admin/v1/admin.proto",)
GEN_PACKAGE = "authz_server.admin.gen"
OUTPUTS = {
    "mcp_authz/admin/v1/admin_pb2.py": "authz_server/admin/gen/admin_pb2.py",
    "mcp_authz/admin/v1/admin_pb2.pyi": "authz_server/admin/gen/admin_pb2.pyi",
    "mcp_authz/admin/v1/admin_pb2_grpc.py": "authz_server/admin/gen/admin_pb2_grpc.py",
}
# The Envoy configs whose grpc_json_transcoder carries the descriptor set inline.
DESCRIPTOR_IN = ("envoy/envoy.yaml", "envoy/snippet.yaml")
DESCRIPTOR_LINE = re.compile(r"^(?P<indent>[ \t]*proto_descriptor_bin:)[ \t]*\S*[ \t]*$", re.M)
# protoc writes absolute imports named after the proto package; the stubs live in our package.
IMPORT_FIXES = {"from mcp_authz.admin.v1 import admin_pb2": f"from {GEN_PACKAGE} import admin_pb2"}


def _include_dirs() -> list[Path]:
    """protoc's well-known types (grpc_tools) and google/api (googleapis-common-protos)."""
    tools = importlib.util.find_spec("grpc_tools")
    if tools is None or tools.origin is None:
        sys.exit("grpcio-tools is not installed: pip install -c constraints.txt -e '.[dev]'")
    well_known = Path(tools.origin).parent / "_proto"
    api = importlib.util.find_spec("google.api.annotations_pb2")
    googleapis = Path(api.origin).parents[2] if api is not None and api.origin else None
    if googleapis is None or not (googleapis / "google" / "api" / "annotations.proto").is_file():
        sys.exit("google/api/annotations.proto not found: pip install -c constraints.txt googleapis-common-protos")
    return [PROTO_ROOT, googleapis, well_known]


def inline_descriptor(text: str, descriptor: bytes, name: str) -> str:
    """`text` with the value of its one `proto_descriptor_bin:` line set to `descriptor` in base64."""
    found = DESCRIPTOR_LINE.findall(text)
    if len(found) != 1:
        sys.exit(f"{name}: expected one `proto_descriptor_bin:` line, found {len(found)}")
    value = base64.b64encode(descriptor).decode("ascii")
    return DESCRIPTOR_LINE.sub(lambda m: f"{m['indent']} {value}", text)


def generate(root: Path) -> list[Path]:
    """Compile every source and write the outputs under `root`; return the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        argv = [
            sys.executable, "-m", "grpc_tools.protoc",
            *(f"-I{d}" for d in _include_dirs()),
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={out / 'admin.pb'}",
            "--include_imports",
            *SOURCES,
        ]  # fmt: skip
        subprocess.run(argv, check=True, cwd=PROTO_ROOT)
        written = []
        for produced, target in OUTPUTS.items():
            data = (out / produced).read_bytes()
            if produced.endswith(".py"):
                text = data.decode("utf-8")
                for wrong, right in IMPORT_FIXES.items():
                    text = text.replace(wrong, right)
                data = text.encode("utf-8")
            dest = root / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            written.append(dest)
        descriptor = (out / "admin.pb").read_bytes()
    for target in DESCRIPTOR_IN:
        dest = root / target
        # Under another root (the freshness test), start from the repository's own file.
        source = dest if dest.exists() else REPO / target
        text = inline_descriptor(source.read_bytes().decode("utf-8"), descriptor, target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(text.encode("utf-8"))
        written.append(dest)
    init = root / "authz_server/admin/gen/__init__.py"
    if not init.exists():
        init.write_text('"""Generated by protos/generate.py (`make protos`): do not edit."""\n', encoding="utf-8")
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="write under this directory (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.root):
        print(path.relative_to(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
