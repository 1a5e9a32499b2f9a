"""The checked-in admin API stubs and Envoy descriptor set are what `make protos` builds from protos/."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[3]
GENERATE = REPO / "protos" / "generate.py"


def test_generated_files_are_current(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--root", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    outputs: dict[str, str] = runpy.run_path(str(GENERATE))["OUTPUTS"]
    stale = [
        target
        for target in outputs.values()
        if (tmp_path / target).read_bytes() != (REPO / target).read_bytes()
    ]
    assert stale == [], f"{stale} differ from protos/: run `make protos` and commit the result"


def test_descriptor_set_holds_the_service_and_its_http_rules() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString((REPO / "envoy" / "admin.pb").read_bytes())
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
