"""observability/metrics.py: the exposition parses, labels stay low-cardinality, and counts made on
many threads add up exactly."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz_server.live.tables import AuthState, KeyEntry
from authz_server.observability import metrics as metrics_module
from authz_server.crypto.cipher import Keyring
from authz_server.observability.batch import BatchWriter

from ..fakes import Sink


def test_metrics_exposition_parses_and_labels_stay_low_cardinality() -> None:
    state = AuthState()
    now = time.time()
    state.keys = {
        "A": KeyEntry("A", "p_alice", "h", None, None, ()),
        "B": KeyEntry("B", "p_alice", "h", None, now - 1, ()),  # revoked
        "C": KeyEntry("C", "p_bob", "h", now - 1, None, ()),  # expired
    }
    queue: BatchWriter[int] = BatchWriter("usage", Sink().write, 10)
    queue.put(1)
    sidecar = SimpleNamespace(
        authenticator=SimpleNamespace(cache_hits=7, cache_misses=2, negative_hits=3, negative=[1, 2], argon2_runs=2,
                                      inflight=0, verified=SimpleNamespace(evictions=1)),
        follower=SimpleNamespace(last_success=time.monotonic(), seen_seq=12,
                                 keyring=Keyring.from_spec(f"{Keyring.generate_spec(3)},{Keyring.generate_spec(2)}")),
        state=state,
        health=SimpleNamespace(serving=True, ready=True),
        access_log=SimpleNamespace(streams=2, unreadable=3, unreadable_messages=1),
        queues=lambda: [queue],
    )
    state.seq = 10
    m = metrics_module.create(sidecar)  # type: ignore[arg-type]
    m.observe_check("allow", "", "github", 0.0002)
    m.observe_check("deny", "key_revoked", "github", 0.0001)
    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("mcp_authz_check_decisions_total", (("decision", "deny"), ("reason", "key_revoked"), ("server", "github")))] == 1
    assert values[("mcp_authz_key_cache_total", (("result", "hit"),))] == 7
    assert values[("mcp_authz_key_cache_evictions_total", ())] == 1
    assert values[("mcp_authz_entities", (("kind", "active_keys"),))] == 1
    assert values[("mcp_authz_changelog_lag_sequence", ())] == 2
    assert values[("mcp_authz_queue_depth", (("queue", "usage"),))] == 1
    assert values[("mcp_authz_queue_retries_total", (("queue", "usage"),))] == 0
    assert values[("mcp_authz_queue_failing", (("queue", "usage"),))] == 0
    assert values[("mcp_authz_access_log_streams", ())] == 2
    assert values[("mcp_authz_master_key_version", (("role", "active"),))] == 3
    assert values[("mcp_authz_master_key_version", (("role", "oldest"),))] == 2
    assert values[("mcp_authz_master_key_version", (("role", "newest"),))] == 3
    assert values[("mcp_authz_access_log_unreadable_total", (("part", "entry"),))] == 3
    assert values[("mcp_authz_access_log_unreadable_total", (("part", "message"),))] == 1
    assert values[("mcp_authz_check_duration_seconds_count", ())] == 2
    assert "mcp_authz_build_info" in {s.name for f in families.values() for s in f.samples}
    for (_, labels), _v in values.items():
        for _k, v in labels:
            assert "p_alice" not in v and "p_bob" not in v and "mgw_" not in v


def test_check_metrics_counted_on_many_threads_add_up_exactly() -> None:
    m = metrics_module.create()

    def work() -> None:
        for i in range(2000):
            m.observe_check("allow", "", "github", 0.0001 if i % 2 else 0.003)  # 0.0001 is a bucket bound: le

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.observe_check("deny", "key_unknown", "", 0.0002)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}
    assert samples[("mcp_authz_check_decisions_total", (("decision", "allow"), ("reason", ""), ("server", "github")))] == 8000
    assert samples[("mcp_authz_check_duration_seconds_count", ())] == 8001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.0001"),))] == 4000
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.00025"),))] == 4001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.0025"),))] == 4001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "+Inf"),))] == 8001
    assert abs(samples[("mcp_authz_check_duration_seconds_sum", ())] - (4000 * 0.0001 + 4000 * 0.003 + 0.0002)) < 1e-9
