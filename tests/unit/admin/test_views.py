"""admin/views.py: what a result may hold."""

from __future__ import annotations

from authz_server.admin.views import GatewayKeyView
from authz_server.models import GatewayKey

from ..fakes import T0


def test_views_never_carry_hashes_or_ciphertext() -> None:
    key = GatewayKey("AAAAAAA", "p_x", "$argon2id$v=19$secret-hash", "l", created_at=T0)
    view = GatewayKeyView.of(key, "bob", T0)
    assert "$argon2" not in repr(view) and "$argon2" not in str(view.to_json())
