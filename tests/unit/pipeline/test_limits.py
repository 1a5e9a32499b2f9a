"""pipeline/limits.py: a principal's rate limit, through the pipeline (it comes last, after credentials)."""

from __future__ import annotations

import pytest

from authz_server.errors import Denied

from ..fakes import request, standard_world


async def test_rate_limit_answers_429_with_retry_after() -> None:
    w = standard_world()
    key = w.key(w.principal("kim", rate=2))
    pipeline = w.pipeline()
    for _ in range(2):
        pipeline.decide(request(bearer=key, server="linear"))
    with pytest.raises(Denied) as exc:
        pipeline.decide(request(bearer=key, server="linear"))
    assert exc.value.status == 429 and exc.value.retry_after == 30
    w.now += 31
    pipeline.decide(request(bearer=key, server="linear"))
