"""pipeline/resolve.py: the credentials a request gets, and header templates (placeholders,
several per header, optional ones, literal headers).

The order of server, scope and credentials is the pipeline's contract: test_pipeline.py."""

from __future__ import annotations

import pytest

from authz_server.errors import Denied
from authz_server.live.tables import ServerEntry
from authz_server.models import AuthMode, HeaderTemplate, Secret
from authz_server.pipeline.resolve import render

from ..fakes import bob_key, request, standard_world


async def test_individual_denial_names_server_and_how_to_add() -> None:
    w = standard_world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=bob_key(w)))
    assert "'github'" in exc.value.message
    assert "mcp-authz overrides set --server github" in exc.value.hint


# --- header templates ----------------------------------------------------------------------


def _server(headers: list[tuple[str, str]], optional: set[str] = set()) -> ServerEntry:  # noqa: B006
    return ServerEntry("s", AuthMode.SHARED, tuple(HeaderTemplate(n, t) for n, t in headers), frozenset(optional), {}, b"k")


@pytest.mark.parametrize(
    ("headers", "optional", "values", "expected"),
    [
        ([("Authorization", "Bearer {{API_KEY}}")], set(), {"API_KEY": "t1"}, [("authorization", "Bearer t1")]),
        ([("X-API-Key", "{{ API_KEY }}")], set(), {"API_KEY": "t2"}, [("x-api-key", "t2")]),  # spaces inside braces
        (
            [("Authorization", "Basic {{USER}}:{{PASS}}")],
            set(),
            {"USER": "u", "PASS": "p"},
            [("authorization", "Basic u:p")],
        ),
        (
            [("X-API-Key", "{{API_KEY}}"), ("X-Client-ID", "{{CLIENT_ID}}"), ("X-User-Tag", "{{TAG}}")],
            {"CLIENT_ID", "TAG"},
            {"API_KEY": "k", "TAG": "t"},
            [("x-api-key", "k"), ("x-user-tag", "t")],  # the unset optional header is left out
        ),
        ([("X-Static", "literal-value")], set(), {}, [("x-static", "literal-value")]),
        ([("X-Trace", "{{A}}-{{B}}")], {"B"}, {"A": "a"}, [("x-trace", "a-")]),  # partly filled: kept
    ],
)
def test_render(headers, optional, values, expected) -> None:  # type: ignore[no-untyped-def]
    rendered = render(_server(headers, optional), {k: Secret(v) for k, v in values.items()})
    assert list(rendered) == expected


def test_missing_required_placeholder_is_403_naming_it_not_its_value() -> None:
    with pytest.raises(Denied) as exc:
        render(_server([("Authorization", "Bearer {{API_KEY}}"), ("X-C", "{{CLIENT_ID}}")]), {"CLIENT_ID": Secret("cid-9")})
    assert exc.value.status == 403 and "API_KEY" in exc.value.message and "cid-9" not in exc.value.message


def test_template_placeholders_are_listed() -> None:
    assert HeaderTemplate("A", "x {{ONE}} y {{TWO}}").placeholders() == ("ONE", "TWO")
    assert HeaderTemplate("A", "no placeholder {{lower}}").placeholders() == ()
