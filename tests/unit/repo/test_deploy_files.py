"""docker-compose.yml and Dockerfile: structure and references (no Docker engine is needed)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]


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


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_mtls_profile_matches_the_certs_it_makes_and_the_config_it_renders(tmp_path: Path) -> None:
    """Profile `mtls`: the sidecar on a host of its own. The certificates `certs` writes are the ones
    the sidecar and Envoy use, the sidecar's flags pass its own refusal rules, and envoy/mtls.py is
    pointed at the sidecar's listeners."""
    from authz_server.cli import build_parser
    from authz_server.config import Settings, TlsFiles
    from authz_server.crypto import certs

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mtls = {name for name, s in services.items() if "mtls" in s.get("profiles", [])}
    assert mtls == {"certs", "authz-mtls", "envoy-mtls", "example-mtls"}
    make = services["certs"]["command"][-1]
    out = re.search(r"--out (\S+)", make).group(1)  # type: ignore[union-attr]
    host = re.search(r"--host (\S+)", make).group(1)  # type: ignore[union-attr]
    assert host == "authz-mtls" and "test -f" in make  # made once, kept on later starts

    serve = services["authz-mtls"]["command"]
    args = build_parser().parse_args(serve[1:])
    assert args.command == "serve"
    files = {args.tls_cert, args.tls_key, args.client_ca, args.admin_tls_cert, args.admin_tls_key}
    assert files == {f"{out}/server.crt", f"{out}/server.key", f"{out}/ca.crt"}
    made = certs.write_cert_set(tmp_path / "certs", [host], client_name="envoy")  # what `certs` runs
    assert {path.name for path in made.written} == {"ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"}
    # Beyond loopback, with mutual TLS: the sidecar's own rules accept it.
    settings = Settings.from_env({}, listen=args.listen, admin_listen=args.admin_listen,
                                 check_tls=TlsFiles(args.tls_cert, args.tls_key, args.client_ca),
                                 admin_tls=TlsFiles(args.admin_tls_cert, args.admin_tls_key))  # fmt: skip
    assert settings.listen.startswith("0.0.0.0:") and settings.check_tls and settings.check_tls.client_ca

    render = services["envoy-mtls"]["command"][-1].split()
    assert render[:2] == ["python", "envoy/mtls.py"] and (ROOT / "envoy" / "mtls.py").is_file()
    assert _flag(render, "--sidecar") == f"{host}:{args.listen.rpartition(':')[2]}"
    assert _flag(render, "--admin") == f"{host}:{args.admin_listen.rpartition(':')[2]}"
    assert _flag(render, "--certs") == out
    assert services["example-mtls"]["network_mode"] == "service:envoy-mtls"
    assert "deploy" in (ROOT / "Dockerfile").read_text()  # envoy/mtls.py needs PyYAML in the image
