"""Every Prometheus metric of mcp-authz, defined here and nowhere else.

Two kinds:
- recorded per request by the servicer wrapper (`Metrics.observe_check`): decisions
  and Check latency, counted per thread without a lock (Check runs on many
  threads) and summed at scrape time;
- read from the live components at scrape time (`_LiveCollector`): caches, Argon2,
  change-log lag, write-behind queues, entity counts. The hot path pays nothing for these.

Labels stay low-cardinality: decision, reason, server name, queue name. Never a
principal, a key id or a key.
"""

from __future__ import annotations

import platform
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from authz_server import __version__

if TYPE_CHECKING:
    from authz_server.envoy.accesslog import AccessLog
    from authz_server.envoy.health import Health
    from authz_server.live.follower import StateFollower
    from authz_server.live.tables import AuthState
    from authz_server.observability.batch import BatchWriter
    from authz_server.pipeline.authn import Authenticator

# Check is memory-only: most answers take tens of microseconds; first-use Argon2 takes ~50 ms.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _ThreadCounts:
    """One thread's Check counts. Only its own thread writes them, so no lock."""

    __slots__ = ("buckets", "decisions", "seconds")

    def __init__(self, n_buckets: int) -> None:
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.buckets = [0] * (n_buckets + 1)  # the last one is +Inf
        self.seconds = 0.0


class Metrics:
    """The registry, and the per-request recording point for Check."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._local = threading.local()
        self._threads: list[_ThreadCounts] = []
        self._lock = threading.Lock()  # taken once per thread, to register its counts

    def observe_check(self, decision: str, reason: str, server: str, seconds: float) -> None:
        counts: _ThreadCounts | None = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._local.counts = _ThreadCounts(len(_LATENCY_BUCKETS))
            with self._lock:
                self._threads.append(counts)
        labels = (decision, reason, server)
        counts.decisions[labels] = counts.decisions.get(labels, 0) + 1
        counts.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        counts.seconds += seconds

    def collect_checks(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The Check families, summed over threads (each read is a snapshot; a scrape may lag by a request)."""
        decisions: dict[tuple[str, str, str], int] = {}
        buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        seconds = 0.0
        with self._lock:
            threads = list(self._threads)
        for counts in threads:
            for labels, n in list(counts.decisions.items()):
                decisions[labels] = decisions.get(labels, 0) + n
            buckets = [a + b for a, b in zip(buckets, list(counts.buckets), strict=True)]
            seconds += counts.seconds
        family = CounterMetricFamily(
            "mcp_authz_check_decisions", "Check answers by decision, reason and MCP server.",
            labels=["decision", "reason", "server"],
        )
        for labels, n in sorted(decisions.items()):
            family.add_metric(list(labels), n)
        yield family
        cumulative, total = [], 0
        for bound, n in zip([*map(str, _LATENCY_BUCKETS), "+Inf"], buckets, strict=True):
            total += n
            cumulative.append((bound, total))
        yield HistogramMetricFamily(
            "mcp_authz_check_duration_seconds", "Time to answer one Check.", buckets=cumulative, sum_value=seconds
        )


class LiveSources(Protocol):
    """What the scrape-time gauges read: the running components. `app.Sidecar` is one; this module
    names only the parts it reads, so it never imports the composition root that imports it."""

    @property
    def authenticator(self) -> Authenticator: ...
    @property
    def follower(self) -> StateFollower: ...
    @property
    def state(self) -> AuthState: ...
    @property
    def health(self) -> Health: ...
    @property
    def access_log(self) -> AccessLog: ...
    def queues(self) -> Sequence[BatchWriter[Any]]: ...


def create(sidecar: LiveSources | None = None) -> Metrics:
    """A fresh registry with every metric; live gauges are read from `sidecar` when given."""
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry)
    registry.register(_CheckCollector(metrics))
    Info("mcp_authz_build", "Build information.", registry=registry).info(
        {"version": __version__, "python": platform.python_version()}
    )
    if sidecar is not None:
        registry.register(_LiveCollector(sidecar))
    return metrics


class _CheckCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        return self._metrics.collect_checks()


class _LiveCollector(Collector):
    def __init__(self, sidecar: LiveSources) -> None:
        self._s = sidecar

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._s
        authn, follower, state = s.authenticator, s.follower, s.state

        cache = CounterMetricFamily("mcp_authz_key_cache", "Verified-key cache lookups.", labels=["result"])
        cache.add_metric(["hit"], authn.cache_hits)
        cache.add_metric(["miss"], authn.cache_misses)
        yield cache
        yield CounterMetricFamily(
            "mcp_authz_key_cache_evictions", "Verified keys evicted (revoked, rehashed or removed).",
            value=authn.verified.evictions,
        )
        yield CounterMetricFamily("mcp_authz_negative_cache_hits", "Wrong keys refused from the negative cache.",
                                  value=authn.negative_hits)
        yield GaugeMetricFamily("mcp_authz_negative_cache_size", "Entries in the negative cache.", value=len(authn.negative))
        yield CounterMetricFamily("mcp_authz_argon2_verifications", "Argon2id verifications run.", value=authn.argon2_runs)
        yield GaugeMetricFamily("mcp_authz_argon2_inflight", "Argon2id verifications running or queued.",
                                value=authn.inflight)

        yield GaugeMetricFamily("mcp_authz_changelog_lag_seconds",
                                "Seconds since the in-memory state was last confirmed current with the store.",
                                value=max(0.0, time.monotonic() - follower.last_success) if follower.last_success else 0.0)
        yield GaugeMetricFamily("mcp_authz_changelog_lag_sequence",
                                "Change-log entries seen in the store but not yet applied.",
                                value=max(0, follower.seen_seq - state.seq))
        yield GaugeMetricFamily("mcp_authz_changelog_applied_sequence", "Newest change-log entry applied.", value=state.seq)
        keyring = GaugeMetricFamily("mcp_authz_master_key_version",
                                    "Master key versions held: the one that seals (role=active), the oldest and the "
                                    "newest it opens (role=oldest, newest).", labels=["role"])  # fmt: skip
        versions = follower.keyring.versions
        keyring.add_metric(["active"], follower.keyring.active)
        keyring.add_metric(["oldest"], versions[0])
        keyring.add_metric(["newest"], versions[-1])
        yield keyring

        yield GaugeMetricFamily("mcp_authz_access_log_streams", "Envoy access-log streams open now (one per worker).",
                                value=s.access_log.streams)
        unreadable = CounterMetricFamily(
            "mcp_authz_access_log_unreadable",
            "Access-log entries skipped unread (part=entry), and messages whose framing broke (part=message).",
            labels=["part"],
        )
        unreadable.add_metric(["entry"], s.access_log.unreadable)
        unreadable.add_metric(["message"], s.access_log.unreadable_messages)
        yield unreadable

        depth = GaugeMetricFamily("mcp_authz_queue_depth", "Records waiting in a write-behind queue.", labels=["queue"])
        dropped = CounterMetricFamily("mcp_authz_queue_dropped", "Records a write-behind queue dropped.", labels=["queue"])
        written = CounterMetricFamily("mcp_authz_queue_written", "Records a write-behind queue wrote.", labels=["queue"])
        retries = CounterMetricFamily("mcp_authz_queue_retries",
                                      "Failed batch writes a write-behind queue kept and retried (the store was unreachable).",
                                      labels=["queue"])
        failing = GaugeMetricFamily("mcp_authz_queue_failing",
                                    "1 while a write-behind queue's last write failed and is being retried.", labels=["queue"])
        spilled = CounterMetricFamily("mcp_authz_queue_spilled",
                                      "Records a write-behind queue spilled to its local spool while the store was unreachable.",
                                      labels=["queue"])
        spooled = GaugeMetricFamily("mcp_authz_queue_spooled_bytes", "Bytes in a queue's spool not yet in the store.",
                                    labels=["queue"])
        for queue in s.queues():
            depth.add_metric([queue.name], queue.depth)
            spilled.add_metric([queue.name], queue.spilled)
            spooled.add_metric([queue.name], queue.spooled_bytes)
            dropped.add_metric([queue.name], queue.dropped)
            written.add_metric([queue.name], queue.written)
            retries.add_metric([queue.name], queue.retries)
            failing.add_metric([queue.name], 1 if queue.failing else 0)
        yield depth
        yield dropped
        yield written
        yield retries
        yield failing
        yield spilled
        yield spooled

        now = time.time()
        keys = list(state.keys.values())  # one C-level copy: safe against the event loop's writes
        active = sum(1 for k in keys if (k.revoked_at is None or k.revoked_at > now) and (k.expires_at is None or k.expires_at > now))
        entities = GaugeMetricFamily("mcp_authz_entities", "Entities in memory.", labels=["kind"])
        entities.add_metric(["active_keys"], active)
        entities.add_metric(["principals"], len(state.principals))
        entities.add_metric(["servers"], len(state.servers))
        entities.add_metric(["overrides"], len(state.overrides))
        entities.add_metric(["teams"], len(state.teams))
        yield entities
        yield GaugeMetricFamily("mcp_authz_ready", "1 when the sidecar asks for Check (not loading, not draining).",
                                 value=1 if s.health.ready else 0)
