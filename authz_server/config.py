"""Settings, validated once at start.

Every setting has a default and an environment variable (MCP_AUTHZ_*); the CLI
overrides them with flags. `Settings.from_env` refuses unsafe or malformed
values with a ConfigError that names the variable and never echoes a secret.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from authz_server.crypto.keys import Argon2Params
from authz_server.errors import ConfigError

_HEADER_RE = re.compile(r"^[a-z0-9-]{1,64}$")
_RESERVED_HEADERS = frozenset(
    {"host", "content-type", "content-length", "x-user-id", "x-user-type", "x-user-team", "x-user-roles", "x-request-id"}
)


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}.")
    return host.strip("[]"), int(port_text)


@dataclass(frozen=True, slots=True)
class Settings:
    store_url: str = "sqlite:///mcp-authz.db"
    listen: str = "127.0.0.1:9001"  # gRPC: ext_authz Check, access-log service, health
    metrics_listen: str = "127.0.0.1:9090"  # HTTP: /metrics, /healthz, /readyz ("" turns it off)
    store_outage_limit: float = 30.0  # seconds without the store before health says NOT_SERVING
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
    audit_retention_days: float = 365.0  # 0 keeps everything
    usage_retention_days: float = 90.0
    signature_header: str = "x-mcp-authz-signature"
    timestamp_header: str = "x-mcp-authz-timestamp"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        text = {
            "store_url": "MCP_AUTHZ_STORE",
            "listen": "MCP_AUTHZ_LISTEN",
            "metrics_listen": "MCP_AUTHZ_METRICS_LISTEN",
            "key_header": "MCP_AUTHZ_KEY_HEADER",
            "log_level": "MCP_AUTHZ_LOG_LEVEL",
        }
        for name, var in text.items():
            if env.get(var):
                values[name] = env[var]
        if env.get("MCP_AUTHZ_PATH_KEYS"):
            values["path_keys"] = _bool(env["MCP_AUTHZ_PATH_KEYS"], "MCP_AUTHZ_PATH_KEYS")
        numbers = {
            "poll_interval": ("MCP_AUTHZ_POLL_INTERVAL", float),
            "argon2_workers": ("MCP_AUTHZ_ARGON2_WORKERS", int),
            "grpc_threads": ("MCP_AUTHZ_GRPC_THREADS", int),
            "last_used_flush": ("MCP_AUTHZ_LAST_USED_FLUSH", float),
            "store_outage_limit": ("MCP_AUTHZ_STORE_OUTAGE_LIMIT", float),
            "audit_retention_days": ("MCP_AUTHZ_AUDIT_RETENTION_DAYS", float),
            "usage_retention_days": ("MCP_AUTHZ_USAGE_RETENTION_DAYS", float),
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

    def validated(self) -> Settings:
        parse_hostport(self.listen, "The listen address")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "The metrics address")
        if self.store_outage_limit <= 0:
            raise ConfigError("The store outage limit must be a positive number of seconds.")
        if self.audit_retention_days < 0 or self.usage_retention_days < 0:
            raise ConfigError("Retention must be a number of days, or 0 to keep everything.")
        if not self.store_url.startswith(("sqlite://", "postgresql://", "postgres://", "memory://")):
            raise ConfigError("The store URL must start with sqlite://, postgresql:// or memory://.")
        header = self.key_header.lower()
        if not _HEADER_RE.match(header) or header in _RESERVED_HEADERS or header == "authorization":
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


def _bool(text: str, var: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{var} must be true or false, got {text!r}.")
