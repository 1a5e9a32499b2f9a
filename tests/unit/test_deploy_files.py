"""docker-compose.yml and Dockerfile: structure and references (no Docker engine is needed)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid_and_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"init", "envoy", "authz", "example"} <= set(services)
    for name, service in services.items():
        assert service["build"] == ".", name
        assert "command" in service or "entrypoint" in service, name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"]
    # The sidecar and example share Envoy's network namespace, as envoy.yaml's 127.0.0.1 clusters need.
    assert services["authz"]["network_mode"] == "service:envoy"
    assert services["example"]["network_mode"] == "service:envoy"
    assert services["authz"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    # The listener rewrite must find its target in the shipped config.
    envoy_cmd = " ".join(services["envoy"]["command"])
    target = re.search(r"s/(.+?)/", envoy_cmd).group(1)  # type: ignore[union-attr]
    assert (ROOT / "envoy" / "envoy.yaml").read_text().count(target) == 1
    assert "9001" in " ".join(services["authz"]["command"])


def test_dockerfile_copies_what_the_services_run() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for path in ("authz_server", "envoy", "examples", "constraints.txt", "pyproject.toml"):
        assert f"COPY {path}" in text or f" {path} " in text or f"{path} ./" in text, path
        assert (ROOT / path).exists()
    assert "-c constraints.txt" in text
