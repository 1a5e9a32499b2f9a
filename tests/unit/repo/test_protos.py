"""The checked-in admin API stubs and the descriptor set inline in Envoy's configs are what
`make protos` builds from protos/."""

from __future__ import annotations

import base64
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[3]
GENERATE = REPO / "protos" / "generate.py"
SCRIPT: dict[str, Any] = runpy.run_path(str(GENERATE))
CONFIGS: tuple[str, ...] = SCRIPT["DESCRIPTOR_IN"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """protos/generate.py run into a fresh directory, as `make protos` would into the repository."""
    root = tmp_path_factory.mktemp("generated")
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--root", str(root)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return root


def _inline_descriptor(path: Path) -> bytes:
    """The transcoder's `proto_descriptor_bin` in the Envoy config at `path`, as Envoy reads it."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k == "proto_descriptor_bin")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert len(found) == 1, path
    return base64.b64decode(found[0], validate=True)


def test_generated_files_are_current(generated: Path) -> None:
    targets = [*SCRIPT["OUTPUTS"].values(), *CONFIGS]
    stale = [target for target in targets if (generated / target).read_bytes() != (REPO / target).read_bytes()]
    assert stale == [], f"{stale} differ from protos/: run `make protos` and commit the result"


@pytest.mark.parametrize("config", CONFIGS)
def test_each_config_carries_the_descriptor_set_compiled_from_protos(generated: Path, config: str) -> None:
    assert _inline_descriptor(REPO / config) == _inline_descriptor(generated / config), (
        f"{config}: run `make protos` and commit the result"
    )


def test_generate_rewrites_only_the_descriptor_line() -> None:
    inline = SCRIPT["inline_descriptor"]
    text = "a: 1\r\n  # keep\n    proto_descriptor_bin: old  \nb: [2]\n"
    assert inline(text, b"\x01\x02", "x.yaml") == "a: 1\r\n  # keep\n    proto_descriptor_bin: AQI=\nb: [2]\n"
    for bad in ("a: 1\n", "proto_descriptor_bin: a\nproto_descriptor_bin: b\n"):
        with pytest.raises(SystemExit, match=r"x.yaml: expected one `proto_descriptor_bin:` line"):
            inline(bad, b"", "x.yaml")


def test_descriptor_set_holds_the_service_and_its_http_rules() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(_inline_descriptor(REPO / "envoy" / "envoy.yaml"))
    names = [f.name for f in files.file]
    # --include_imports: Envoy's transcoder needs the HTTP annotations' own descriptors too.
    assert {"google/api/http.proto", "google/api/annotations.proto", "mcp_authz/admin/v1/admin.proto"} <= set(names)
    (admin,) = [f for f in files.file if f.name == "mcp_authz/admin/v1/admin.proto"]
    (service,) = admin.service
    assert (admin.package, service.name) == ("mcp_authz.admin.v1", "Admin")
    # Every RPC has an HTTP mapping under /admin/v1/, so Envoy exposes all of them as JSON.
    for method in service.method:
        options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
        rule = options.Extensions[annotations_pb2.http]
        path = getattr(rule, rule.WhichOneof("pattern"))
        assert path.startswith("/admin/v1/"), method.name
    assert len(service.method) == 31


def test_only_the_edges_import_the_generated_stubs() -> None:
    """Protobuf stays at the edge: the servicer (api.py), Envoy's JSON field check (jsonbody.py), the
    client (remote.py), the table and translators
    they share (rpcs.py, wire.py); the composition root registers the servicer through api.py."""
    importers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "authz_server").rglob("*.py")
        if "admin.gen" in path.read_text(encoding="utf-8") and "/gen/" not in str(path)
    )
    assert importers == [
        "authz_server/admin/api.py", "authz_server/admin/jsonbody.py", "authz_server/admin/remote.py",
        "authz_server/admin/rpcs.py",
        "authz_server/admin/wire.py",
    ]
