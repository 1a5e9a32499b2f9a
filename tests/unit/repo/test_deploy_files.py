"""docker-compose.yml and Dockerfile: structure and references (no Docker engine is needed)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]


COMPOSE = ROOT / "docker-compose.yml"
IMAGE = "mcp-authz:local"
SECRETS_VOLUME = "authz-data"  # the store and the master key
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _compose() -> dict[str, Any]:
    """docker-compose.yml with every `${VAR:-default}` at its default, as a newcomer runs it."""
    return yaml.safe_load(_DEFAULT.sub(lambda m: m.group(2), COMPOSE.read_text()))  # type: ignore[no-any-return]


def _envoy() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())  # type: ignore[no-any-return]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _cluster_port(config: dict[str, Any], name: str) -> int:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    return int(endpoint["endpoint"]["address"]["socket_address"]["port_value"])


def _probe_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", test
    return str(test[-1])


def test_compose_builds_one_image_and_every_service_reuses_it() -> None:
    services = _compose()["services"]
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["init"] and services["init"]["build"] == "."
    for name, service in services.items():
        if name == "postgres":
            continue
        assert service["image"] == IMAGE, name
        assert "build" in service or service["pull_policy"] == "never", name  # never pulled from a registry


def test_compose_mounts_the_secrets_volume_only_where_it_is_used() -> None:
    compose = _compose()
    mounts = {name: [v.split(":")[0] for v in s.get("volumes", [])] for name, s in compose["services"].items()}
    for name, volumes in mounts.items():
        assert set(volumes) <= set(compose["volumes"]), name
    assert {n for n, v in mounts.items() if SECRETS_VOLUME in v} == {"init", "authz", "cli", "authz-mtls"}
    assert {n for n, v in mounts.items() if "mtls-ca" in v} == {"certs"}  # the CA key stays with its maker
    for name in ("envoy", "example", "envoy-mtls", "example-mtls"):
        assert all(v.endswith(":ro") for v in compose["services"][name].get("volumes", [])), name


def test_compose_publishes_the_gateway_on_loopback_at_envoys_listener() -> None:
    services, envoy = _compose()["services"], _envoy()
    (listener,) = envoy["static_resources"]["listeners"]
    for name in ("envoy", "envoy-mtls"):
        (published,) = services[name]["ports"]
        host_ip, _, rest = published.partition(":")
        assert host_ip == "127.0.0.1", name
        assert int(rest.rpartition(":")[2]) == listener["address"]["socket_address"]["port_value"]
    assert not any("ports" in s for n, s in services.items() if n not in ("envoy", "envoy-mtls"))


def test_compose_ports_match_envoy_yaml_and_the_healthchecks() -> None:
    """The sidecar listens where envoy.yaml's clusters point, the example where its cluster and the
    demo server's upstream URL point, and each healthcheck asks the port its service serves."""
    from authz_server.cli import build_parser

    services, envoy = _compose()["services"], _envoy()
    serve = build_parser().parse_args(services["authz"]["command"][1:])
    assert _port(serve.listen) == _cluster_port(envoy, "mcp_authz")
    assert _port(serve.admin_listen) == _cluster_port(envoy, "mcp_authz_admin")
    example = services["example"]["command"]
    example_port = int(_flag(example, "--port"))
    assert example_port == _cluster_port(envoy, "mcp_example")
    assert f"127.0.0.1:{example_port}/mcp/demo" in _flag(services["init"]["command"], "--upstream-url")
    assert _probe_url(services["authz"]) == f"http://{serve.metrics_listen}/readyz"
    assert _probe_url(services["example"]) == f"http://127.0.0.1:{example_port}/_stats"
    admin = envoy["admin"]["address"]["socket_address"]
    assert _probe_url(services["envoy"]) == f"http://{admin['address']}:{admin['port_value']}/ready"
    long_running = {n for n, s in services.items() if n not in ("init", "certs", "cli")}
    assert long_running == {n for n, s in services.items() if "healthcheck" in s}
    # The listener rewrite must find its target in the shipped config.
    envoy_cmd = " ".join(services["envoy"]["command"])
    target = re.search(r"s/(.+?)/", envoy_cmd).group(1)  # type: ignore[union-attr]
    assert (ROOT / "envoy" / "envoy.yaml").read_text().count(target) == 1
    assert services["authz"]["network_mode"] == "service:envoy"
    assert services["example"]["network_mode"] == "service:envoy"
    assert services["authz"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_commands_use_flags_their_programs_have() -> None:
    """Every program a service runs, with flags it knows: mcp-authz's parser, the example scripts'
    --help, Envoy's --help."""
    from authz_server.cli import build_parser

    services = _compose()["services"]
    for name in ("authz", "authz-mtls"):
        assert build_parser().parse_args(services[name]["command"][1:]).command == "serve"
    certs = re.search(r"mcp-authz (certs create [^)]+)\)", services["certs"]["command"][-1]).group(1)  # type: ignore[union-attr]
    assert build_parser().parse_args(certs.split()).command == "certs"
    header = [shlex.split(line[1:].split("   #")[0]) for line in COMPOSE.read_text().splitlines()
              if line.startswith("#   docker compose run --rm cli ")]  # fmt: skip
    assert len(header) == 2
    for argv in header:  # what the file's header tells a newcomer to run, after the entrypoint mcp-authz
        assert services["cli"]["entrypoint"] == ["mcp-authz"]
        build_parser().parse_args(argv[5:])
    init = services["init"]["command"]
    assert init[:2] == ["python", "examples/run_demo.py"]
    helps = {script: subprocess.run([sys.executable, f"examples/{script}", "--help"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout for script in ("run_demo.py", "mcp_server.py")}  # fmt: skip
    for argv in (init, services["example"]["command"], services["example-mtls"]["command"]):
        script = argv[1].removeprefix("examples/")
        for word in argv[2:]:
            if word.startswith("--"):
                assert word in helps[script], (script, word)
    envoy_help = subprocess.run([str(Path(sys.executable).parent / "envoy"), "--help"], capture_output=True, text=True).stdout
    for name in ("envoy", "envoy-mtls"):
        for flag in re.findall(r"\s(--[a-z-]+)", services[name]["command"][-1].split("exec envoy", 1)[1]):
            assert flag in envoy_help, (name, flag)


def test_readme_shows_the_commands_the_compose_file_starts_with() -> None:
    header = [line[1:].strip() for line in COMPOSE.read_text().splitlines() if line.startswith("#   docker compose ")]
    readme = (ROOT / "README.md").read_text()
    for line in header[:3]:
        assert line in readme, line


def test_the_documented_validation_of_envoy_yaml_prints_only_its_verdict() -> None:
    """envoy.yaml's own first instruction, as written (from the repository root)."""
    text = (ROOT / "envoy" / "envoy.yaml").read_text()
    command = re.search(r"^# Check it after every edit:\s+(.+)$", text, re.M).group(1).split()  # type: ignore[union-attr]
    assert command[0] == "envoy"
    done = subprocess.run([str(Path(sys.executable).parent / "envoy"), *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and (done.stdout + done.stderr).strip() == "configuration 'envoy/envoy.yaml' OK"


def test_envoy_yaml_validates_from_any_directory(tmp_path: Path) -> None:
    """Nothing in envoy/envoy.yaml is relative to Envoy's working directory: the admin API's
    descriptor set is inline."""
    config = ROOT / "envoy" / "envoy.yaml"
    done = subprocess.run([str(Path(sys.executable).parent / "envoy"), "--mode", "validate", "-c", str(config),
                           "--log-level", "error"], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and (done.stdout + done.stderr).strip() == f"configuration '{config}' OK"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last pattern that matches a path or one of its parents decides."""
    verdict = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, glob) or (glob.startswith("**/") and fnmatch.fnmatch(parts[i - 1], glob[3:])):
                verdict = not negate
                break
    return verdict


def test_dockerignore_keeps_secrets_and_the_virtualenv_out_of_the_build_context() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    for path in (".venv/bin/python", ".git", ".git/config", ".run/mcp-authz.key", ".run/admin.key",
                 ".run/mcp-authz.db", "tests/e2e/harness.py", "mcp-authz.db-wal", "envoy/test.key",
                 "authz_server/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert _ignored(path, patterns), path
    copied = re.findall(r"^COPY (.+?) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert not _ignored(source, patterns), source
            assert (ROOT / source).exists(), source
    for path in ("authz_server/cli.py", "envoy/envoy.yaml", "examples/run_demo.py"):
        assert not _ignored(path, patterns), path


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_mtls_profile_matches_the_certs_it_makes_and_the_config_it_renders(tmp_path: Path) -> None:
    """Profile `mtls`: the sidecar on a host of its own. The certificates `certs` writes are the ones
    the sidecar and Envoy use, the sidecar's flags pass its own refusal rules, and envoy/mtls.py is
    pointed at the sidecar's listeners."""
    from authz_server.cli import build_parser
    from authz_server.config import Settings, TlsFiles
    from authz_server.crypto import certs

    services = _compose()["services"]
    mtls = {name for name, s in services.items() if "mtls" in s.get("profiles", [])}
    assert mtls == {"certs", "authz-mtls", "envoy-mtls", "example-mtls"}
    make = services["certs"]["command"][-1]
    out = re.search(r"--out (\S+)", make).group(1)  # type: ignore[union-attr]
    host = re.search(r"--host (\S+)", make).group(1)  # type: ignore[union-attr]
    assert host == "authz-mtls" and "test -f" in make  # made once, kept on later starts
    # `certs` hands each side its own files, by volume: {volume: file names}.
    certs_mounts = {target: volume for volume, target in (v.split(":")[:2] for v in services["certs"]["volumes"])}
    handed = {certs_mounts[dest.rstrip("/")]: {Path(f).name for f in files.split()}
              for files, dest in re.findall(rf"cp ((?:{out}/\S+ )+)(\S+)", make)}  # fmt: skip

    def given(service: str) -> dict[str, set[str]]:
        """The service's mount point -> the certificate files it finds there."""
        mounts = (v.split(":")[:2] for v in services[service]["volumes"])
        return {target: handed[volume] for volume, target in mounts if volume in handed}

    serve = services["authz-mtls"]["command"]
    args = build_parser().parse_args(serve[1:])
    assert args.command == "serve"
    files = {args.tls_cert, args.tls_key, args.client_ca, args.admin_tls_cert, args.admin_tls_key}
    assert files == {f"{d}/{name}" for d, names in given("authz-mtls").items() for name in names}
    assert given("authz-mtls") == {"/certs": {"ca.crt", "server.crt", "server.key"}}
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
    assert given("envoy-mtls") == {_flag(render, "--certs"): {"ca.crt", "client.crt", "client.key"}}
    assert services["example-mtls"]["network_mode"] == "service:envoy-mtls"
    assert "deploy" in (ROOT / "Dockerfile").read_text()  # envoy/mtls.py needs PyYAML in the image
