"""Settings, validated once at start.

Every setting has a default and an environment variable (MCP_AUTHZ_*); the CLI
overrides them with flags. `Settings.from_env` refuses unsafe or malformed
values with a ConfigError that names the variable and never echoes a secret.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authz_server.crypto.keys import Argon2Params
from authz_server.errors import ConfigError
from authz_server.rules import KEY_HEADER_RESERVED, SIGNATURE_HEADER, TIMESTAMP_HEADER

_HEADER_RE = re.compile(r"^[a-z0-9-]{1,64}$")


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}.")
    return host.strip("[]"), int(port_text)


UNIX_PREFIX = "unix:"


def parse_listen(value: str, what: str) -> None:
    """A gRPC listen address: HOST:PORT, or `unix:/absolute/path` for a Unix domain socket."""
    if value.startswith(UNIX_PREFIX):
        if not value[len(UNIX_PREFIX) :].startswith("/"):
            raise ConfigError(f"{what} must be HOST:PORT or unix:/absolute/path, got {value!r}.")
        return
    parse_hostport(value, what)


def is_local(address: str) -> bool:
    """Whether only this host can reach `address`: a Unix socket, `localhost`, or a loopback IP."""
    if address.startswith(UNIX_PREFIX):
        return True
    host, _ = parse_hostport(address, "The address")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def read_pem(path: str, what: str, *, private: bool = False) -> bytes:
    """A PEM file's bytes. A private key must not be readable by other users (like the master key)."""
    try:
        info = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read the {what} {path}: {exc.strerror}.") from None
    if private and info.st_mode & (stat.S_IRWXO):
        raise ConfigError(f"The {what} {path} is readable by other users: chmod 600 {path}.")
    if b"-----BEGIN " not in data:
        raise ConfigError(f"The {what} {path} is not a PEM file.")
    return data


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A TLS listener's certificate and key; with `client_ca`, clients must present a certificate it signed."""

    cert: str
    key: str
    client_ca: str = ""

    @classmethod
    def of(cls, cert: str | None, key: str | None, client_ca: str | None, flags: str) -> TlsFiles | None:
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise ConfigError(f"TLS needs both a certificate and its key ({flags}).")
        return cls(cert, key, client_ca or "")


@dataclass(frozen=True, slots=True)
class Settings:
    store_url: str = "sqlite:///mcp-authz.db"
    # gRPC for Envoy alone: ext_authz Check, the access-log service, health. Local, or mutual TLS.
    listen: str = "127.0.0.1:9001"
    check_tls: TlsFiles | None = None  # mutual TLS on the Check listener (client_ca required)
    insecure_check_listener: bool = False  # allow a non-local Check listener without mutual TLS
    # gRPC for people: the admin API, health, reflection. "" turns it off. Local, or TLS.
    admin_listen: str = "127.0.0.1:9002"
    admin_tls: TlsFiles | None = None  # server TLS on the admin listener
    insecure_admin_listener: bool = False  # allow a non-local admin listener without TLS
    metrics_listen: str = "127.0.0.1:9090"  # HTTP: /metrics, /healthz, /readyz ("" turns it off)
    # HTTP for people: the web console (console/), reached through Envoy's /console/ route. "" turns it off.
    console_listen: str = "127.0.0.1:9003"
    insecure_console_listener: bool = False  # allow a non-local console listener (something else encrypts it)
    store_outage_limit: float = 30.0  # seconds without the store before health says NOT_SERVING
    # Seconds between SIGTERM and no longer taking Checks: health says NOT_SERVING at once, and Check keeps
    # answering until Envoy's health checks have moved traffic away. At least envoy/envoy.yaml's health-check
    # interval plus its jitter (1 s + 0.1 s), with room for the answer to reach every Envoy worker.
    drain_seconds: float = 2.0
    key_header: str = "x-api-key"  # custom header a gateway key may come in
    path_keys: bool = True  # accept a key as a path segment (MCPGate URL form)
    poll_interval: float = 0.1  # seconds between change-log polls
    argon2: Argon2Params = field(default_factory=Argon2Params)
    grpc_threads: int = 16  # gRPC worker threads: admin calls, health, reflection (Check has its own thread)
    argon2_workers: int = 2  # threads for first-use verification
    argon2_queue: int = 256  # first-use verifications waiting at most; beyond: 503 overloaded
    negative_cache_size: int = 100_000
    negative_cache_ttl: float = 300.0
    last_used_flush: float = 5.0  # seconds between last_used_at writes
    audit_queue: int = 10_000
    usage_queue: int = 100_000
    # Where the write-behind queues spill records while the store is unreachable (observability/spool.py).
    # "": beside a SQLite store (`<file>.spool`); none for PostgreSQL or memory:// unless set.
    spool_dir: str = ""
    spool_max_mb: float = 256.0  # per queue and sidecar; past it, records are dropped (counted)
    audit_retention_days: float = 365.0  # 0 keeps everything
    usage_retention_days: float = 90.0
    # The change log: rows older than this many hours, and past the newest N rows, are trimmed
    # (0: no such bound). A sidecar that falls behind the trimmed point reloads the whole state.
    change_log_retention_hours: float = 168.0
    change_log_max_rows: int = 100_000
    signature_header: str = SIGNATURE_HEADER
    timestamp_header: str = TIMESTAMP_HEADER
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        text = {
            "store_url": "MCP_AUTHZ_STORE",
            "listen": "MCP_AUTHZ_LISTEN",
            "admin_listen": "MCP_AUTHZ_ADMIN_LISTEN",
            "metrics_listen": "MCP_AUTHZ_METRICS_LISTEN",
            "console_listen": "MCP_AUTHZ_CONSOLE_LISTEN",
            "key_header": "MCP_AUTHZ_KEY_HEADER",
            "log_level": "MCP_AUTHZ_LOG_LEVEL",
            "spool_dir": "MCP_AUTHZ_SPOOL_DIR",
        }
        for name, var in text.items():
            if env.get(var):
                values[name] = env[var]
        if "MCP_AUTHZ_ADMIN_LISTEN" in env:  # set but empty: no admin listener
            values["admin_listen"] = env["MCP_AUTHZ_ADMIN_LISTEN"]
        if "MCP_AUTHZ_CONSOLE_LISTEN" in env:  # set but empty: no console
            values["console_listen"] = env["MCP_AUTHZ_CONSOLE_LISTEN"]
        values["check_tls"] = TlsFiles.of(env.get("MCP_AUTHZ_TLS_CERT"), env.get("MCP_AUTHZ_TLS_KEY"),
                                          env.get("MCP_AUTHZ_CLIENT_CA"), "--tls-cert, --tls-key")  # fmt: skip
        values["admin_tls"] = TlsFiles.of(env.get("MCP_AUTHZ_ADMIN_TLS_CERT"), env.get("MCP_AUTHZ_ADMIN_TLS_KEY"),
                                          None, "--admin-tls-cert, --admin-tls-key")  # fmt: skip
        if env.get("MCP_AUTHZ_PATH_KEYS"):
            values["path_keys"] = _bool(env["MCP_AUTHZ_PATH_KEYS"], "MCP_AUTHZ_PATH_KEYS")
        numbers = {
            "poll_interval": ("MCP_AUTHZ_POLL_INTERVAL", float),
            "argon2_workers": ("MCP_AUTHZ_ARGON2_WORKERS", int),
            "grpc_threads": ("MCP_AUTHZ_GRPC_THREADS", int),
            "last_used_flush": ("MCP_AUTHZ_LAST_USED_FLUSH", float),
            "store_outage_limit": ("MCP_AUTHZ_STORE_OUTAGE_LIMIT", float),
            "drain_seconds": ("MCP_AUTHZ_DRAIN_SECONDS", float),
            "audit_retention_days": ("MCP_AUTHZ_AUDIT_RETENTION_DAYS", float),
            "usage_retention_days": ("MCP_AUTHZ_USAGE_RETENTION_DAYS", float),
            "spool_max_mb": ("MCP_AUTHZ_SPOOL_MAX_MB", float),
            "change_log_retention_hours": ("MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS", float),
            "change_log_max_rows": ("MCP_AUTHZ_CHANGE_LOG_MAX_ROWS", int),
        }
        for name, (var, kind) in numbers.items():
            if env.get(var):
                try:
                    values[name] = kind(env[var])
                except ValueError:
                    raise ConfigError(f"{var} must be a number, got {env[var]!r}.") from None
        argon2 = {}
        for field_name, var in (("memory_cost_kib", "MCP_AUTHZ_ARGON2_MEMORY_KIB"), ("time_cost", "MCP_AUTHZ_ARGON2_TIME_COST")):
            if env.get(var):
                try:
                    argon2[field_name] = int(env[var])
                except ValueError:
                    raise ConfigError(f"{var} must be a whole number, got {env[var]!r}.") from None
        if argon2:
            values["argon2"] = replace(Argon2Params(), **argon2)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values).validated()

    def spool_directory(self) -> Path | None:
        """Where the write-behind queues spill: the setting; else beside a SQLite store; else, for
        PostgreSQL, a directory of this database's own under the user's state directory
        ($XDG_STATE_HOME, else ~/.local/state), so records spooled for one database are never
        replayed into another; none for memory://."""
        if self.spool_dir:
            return Path(self.spool_dir)
        if self.store_url.startswith("sqlite:///") and len(self.store_url) > len("sqlite:///"):
            return Path(self.store_url[len("sqlite:///"):] + ".spool")
        if self.store_url.startswith(("postgres://", "postgresql://")):
            parts = urlsplit(self.store_url)
            where = f"{parts.netloc.rpartition('@')[2].lower()}{parts.path}?{parts.query}"  # no user or password
            try:
                state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            except RuntimeError:  # no home directory: set MCP_AUTHZ_SPOOL_DIR
                return None
            return Path(state) / "mcp-authz" / "spool" / f"postgres-{hashlib.sha256(where.encode()).hexdigest()[:16]}"
        return None

    def validated(self) -> Settings:
        parse_listen(self.listen, "The listen address")
        self._check_listeners()
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "The metrics address")
        if self.store_outage_limit <= 0:
            raise ConfigError("The store outage limit must be a positive number of seconds.")
        if not 0 <= self.drain_seconds <= 300:
            raise ConfigError("The drain must be between 0 and 300 seconds.")
        if not 1 <= self.spool_max_mb <= 1024 * 1024:
            raise ConfigError("The spool bound (MCP_AUTHZ_SPOOL_MAX_MB) must be between 1 and 1048576 MB.")
        if self.audit_retention_days < 0 or self.usage_retention_days < 0:
            raise ConfigError("Retention must be a number of days, or 0 to keep everything.")
        if self.change_log_retention_hours != 0 and not 1 <= self.change_log_retention_hours <= 24 * 3650:
            raise ConfigError("The change-log retention (MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS) must be 0 (no age "
                              "bound) or 1 to 87600 hours.")  # fmt: skip
        if self.change_log_max_rows != 0 and not 1000 <= self.change_log_max_rows <= 10**9:
            raise ConfigError("The change-log bound (MCP_AUTHZ_CHANGE_LOG_MAX_ROWS) must be 0 (no count bound) or "
                              "1000 to 1000000000 rows.")  # fmt: skip
        if not self.store_url.startswith(("sqlite://", "postgresql://", "postgres://", "memory://")):
            raise ConfigError("The store URL must start with sqlite://, postgresql:// or memory://.")
        header = self.key_header.lower()
        if not _HEADER_RE.match(header) or header in KEY_HEADER_RESERVED:
            raise ConfigError(
                f"The key header {self.key_header!r} is not allowed: use a lowercase custom header such as x-api-key."
            )
        if not 0.01 <= self.poll_interval <= 60:
            raise ConfigError("The poll interval must be between 0.01 and 60 seconds.")
        if not 1024 <= self.argon2.memory_cost_kib <= 4 * 1024 * 1024 or not 1 <= self.argon2.time_cost <= 10:
            raise ConfigError("Argon2 cost: memory must be 1024 KiB to 4 GiB, and time cost 1 to 10.")
        if not 1 <= self.argon2_workers <= 64:
            raise ConfigError("Argon2 workers must be between 1 and 64.")
        if not 4 <= self.grpc_threads <= 256:
            raise ConfigError("gRPC threads must be between 4 and 256.")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("The log level must be DEBUG, INFO, WARNING or ERROR.")
        return replace(self, key_header=header, log_level=self.log_level.upper())


    def _check_listeners(self) -> None:
        """The trust boundaries (README, "Trust boundaries"): Check only for Envoy, the admin API never in clear text
        beyond this host, unless the operator says in so many words that something else guards it."""
        if self.check_tls is not None and not self.check_tls.client_ca:
            raise ConfigError(
                "TLS on the Check listener must be mutual: give --client-ca (the CA that signed Envoy's client "
                "certificate) with --tls-cert and --tls-key. Server TLS alone lets any client call Check."
            )
        if not is_local(self.listen) and self.check_tls is None and not self.insecure_check_listener:
            raise ConfigError(
                f"Check would listen on {self.listen} without mutual TLS. Anyone who reaches it with any valid "
                "gateway key could read the credentials Check injects, and forge usage records. Listen on "
                "127.0.0.1 or a Unix socket (unix:/path), or give --tls-cert, --tls-key and --client-ca "
                "('mcp-authz certs create' makes them), or, if a network policy already lets only Envoy reach it, "
                "pass --insecure-check-listener."
            )
        self._check_console_listener()
        if not self.admin_listen:
            return
        parse_listen(self.admin_listen, "The admin listen address")
        if self.admin_listen == self.listen:
            raise ConfigError("The admin API needs a listener of its own: --admin-listen must differ from --listen.")
        if not is_local(self.admin_listen) and self.admin_tls is None and not self.insecure_admin_listener:
            raise ConfigError(
                f"The admin API would listen on {self.admin_listen} without TLS, so gateway keys would cross the "
                "network in clear text. Give --admin-tls-cert and --admin-tls-key, listen on 127.0.0.1, or pass "
                "--insecure-admin-listener if something else encrypts the traffic."
            )

    def _check_console_listener(self) -> None:
        """The console takes gateway keys at sign-in and then holds sessions: like the admin API, never in clear
        text beyond this host. It has no TLS of its own; Envoy, in front of it, terminates TLS."""
        if not self.console_listen:
            return
        parse_hostport(self.console_listen, "The console listen address")
        if self.console_listen in (self.listen, self.admin_listen, self.metrics_listen):
            raise ConfigError("The console needs a listener of its own: --console-listen must differ from --listen, "
                              "--admin-listen and --metrics-listen.")  # fmt: skip
        if not is_local(self.console_listen) and not self.insecure_console_listener:
            raise ConfigError(
                f"The console would listen on {self.console_listen} without TLS, so gateway keys and session cookies "
                "would cross the network in clear text. Listen on 127.0.0.1 and reach it through Envoy's /console/ "
                "route, or pass --insecure-console-listener if something else encrypts the traffic."
            )


def _bool(text: str, var: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{var} must be true or false, got {text!r}.")
