"""The audit trail of the admin use cases: exactly one event per call, whatever its outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType

from authz_server.admin.policy import Actor
from authz_server.errors import AuthzError, PermissionDenied, StoreError
from authz_server.models import AuditEvent
from authz_server.store.base import Store


@dataclass
class Audit:
    """Appends exactly one audit event when the operation ends: outcome `ok`, `denied` or `error`.

    The operation fills in `target` and `details` as it learns them; details never
    hold a secret, and an error's reason and message (secret-free by the error
    tree's contract) are added. An error while writing the audit row of a *failed*
    operation is dropped so the caller sees the original error; for a successful
    one it propagates.
    """

    store: Store
    clock: Callable[[], datetime]
    actor: Actor
    action: str
    target: str
    details: dict[str, str] = field(default_factory=dict)

    async def __aenter__(self) -> Audit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, PermissionDenied):
            outcome = "denied"
        else:
            outcome = "error"
        details = dict(self.details)
        if isinstance(exc, AuthzError):
            details["reason"] = exc.reason
            details["message"] = exc.message  # safe by the error tree's contract
        elif exc is not None:
            details["reason"] = "internal"
        if self.actor.source:
            details["source"] = self.actor.source
        event = AuditEvent(
            at=self.clock(),
            actor=self.actor.principal_id,
            action=self.action,
            target=self.target,
            outcome=outcome,
            request_id=self.actor.request_id,
            details=details,
        )
        try:
            await self.store.append_audit([event])
        except StoreError:
            if exc is None:
                raise
