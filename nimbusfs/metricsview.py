"""The metrics for a person: what ``nimbusfs status`` shows of a metaserver's and a mount's.

Each endpoint's Prometheus text is read (``/metrics``) and summed up in a few
lines: requests, errors, the busiest operations with their mean latency and
p99 (an estimate from the histogram's buckets, interpolated as Prometheus's
``histogram_quantile`` does), connections, the database pool, push lag, GC,
and for a mount its FUSE operations, cache, transfers and connection. Given
the previous reading (``status --watch``), counts are those of the interval
between the two, as rates, and latencies those of the interval's requests.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Reading:
    """One scrape of an endpoint: its samples, and when (``time.monotonic``)."""

    samples: dict[Key, float]
    at: float


def fetch(url: str, token: str | None = None, timeout: float = 5.0) -> Reading:
    """Scrape ``url``; raise OSError (urllib's errors are OSErrors) if it cannot be read."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return Reading(samples, time.monotonic())


class Figures:
    """Sums over a reading's samples, or over the difference of two readings' counters."""

    def __init__(self, now: Reading, before: Reading | None) -> None:
        self.now = now.samples
        self.before = before.samples if before is not None else {}
        self.seconds = now.at - before.at if before is not None else 0.0

    def count(self, name: str, **match: str) -> float:
        """A counter's total (or increase since ``before``) over the matching label sets."""
        want = set(match.items())
        return sum(v - self.before.get(k, 0.0) for k, v in self.now.items()
                   if k[0] == name and want <= k[1])

    def gauge(self, name: str, **match: str) -> float:
        want = set(match.items())
        return sum(v for k, v in self.now.items() if k[0] == name and want <= k[1])

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """A counter's totals (increases) per value of ``label``."""
        want = set(match.items())
        out: dict[str, float] = {}
        for k, v in self.now.items():
            labels = dict(k[1])
            if k[0] == name and want <= k[1] and label in labels:
                out[labels[label]] = out.get(labels[label], 0.0) + v - self.before.get(k, 0.0)
        return out

    def quantile(self, q: float, name: str, **match: str) -> float | None:
        """Seconds under which a fraction ``q`` of the histogram's observations fall."""
        buckets = self.by(f"{name}_bucket", "le", **match)
        bounds = sorted((float(le), n) for le, n in buckets.items())
        total = bounds[-1][1] if bounds else 0.0
        if total <= 0:
            return None
        rank, low, below = q * total, 0.0, 0.0
        for le, n in bounds:
            if n >= rank:
                if math.isinf(le):
                    return low
                return low + (le - low) * (rank - below) / (n - below) if n > below else le
            low, below = le, n
        return low

    def amount(self, n: float) -> str:
        """A count, or its rate per second over the interval."""
        return f"{n / self.seconds:,.1f}/s" if self.seconds else f"{n:,.0f}"

    def bytes(self, n: float) -> str:
        """A number of bytes, or their rate per second over the interval."""
        return f"{_size(n / self.seconds)}/s" if self.seconds else _size(n)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f} ms"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _errors(f: Figures, name: str, label: str) -> str:
    """A counter of errors, with its most frequent kinds (``label``): "3 (ENOENT 2, ...)".

    Most are answers, not faults: ENOENT for a name that does not exist,
    ENODATA for an extended attribute a file does not have, 404.
    """
    kinds = sorted(((n, k) for k, n in f.by(name, label).items() if n > 0), reverse=True)
    listed = ", ".join(f"{k} {f.amount(n)}" for n, k in kinds[:4])
    return f.amount(sum(n for n, _ in kinds)) + (f" ({listed})" if listed else "")


def _ops(f: Figures, name: str, label: str, top: int) -> list[str]:
    """The ``top`` busiest operations of a latency histogram: count, mean, p99."""
    counts = f.by(f"{name}_count", label)
    sums = f.by(f"{name}_sum", label)
    busiest = sorted(((n, op) for op, n in counts.items() if n > 0), reverse=True)[:top]
    return [f"    {op:34} {f.amount(n):>12}  mean {_ms(sums.get(op, 0.0) / n):>11}"
            f"  p99 {_ms(f.quantile(.99, name, **{label: op})):>11}" for n, op in busiest]


def server(f: Figures, top: int = 8) -> list[str]:
    """A metaserver's figures."""
    requests = "nimbusfs_server_request_seconds"
    retries = f.by("nimbusfs_server_db_retries_total", "reason")
    lines = [
        f"  mounts connected {f.gauge('nimbusfs_server_mounts'):.0f}, protocol connections"
        f" {f.gauge('nimbusfs_server_connections'):.0f}",
        f"  database pool {f.gauge('nimbusfs_server_db_pool_connections'):.0f} open of"
        f" {f.gauge('nimbusfs_server_db_pool_max'):.0f}"
        f" ({f.gauge('nimbusfs_server_db_pool_idle'):.0f} idle), transactions running"
        f" {f.gauge('nimbusfs_server_db_transactions'):.0f}, waiting"
        f" {f.gauge('nimbusfs_server_db_transactions_waiting'):.0f}; retried"
        f" {f.amount(sum(retries.values()))}"
        + (" (" + ", ".join(f"{r} {f.amount(n)}" for r, n in sorted(retries.items())) + ")"
           if any(retries.values()) else ""),
        "  requests: " + ", ".join(
            f"{iface} {f.amount(f.count(f'{requests}_count', interface=iface))}"
            for iface in ("protocol", "http"))
        + f"; errors {_errors(f, 'nimbusfs_server_request_errors_total', 'error')}",
        *_ops(f, requests, "op", top),
    ]
    lag = "nimbusfs_server_push_lag_seconds"
    pushes = f.count(f"{lag}_count")
    lines.append(f"  pushes {f.amount(pushes)}, changes pushed"
                 f" {f.amount(f.count('nimbusfs_server_pushed_changes_total'))}; push lag"
                 f" mean {_ms(f.count(f'{lag}_sum') / pushes if pushes else None)},"
                 f" p99 {_ms(f.quantile(.99, lag))}")
    last = f.gauge("nimbusfs_gc_last_run_timestamp_seconds")
    if last:
        lines.append(f"  GC: runs {f.amount(f.count('nimbusfs_gc_runs_total'))}, blocks deleted"
                     f" {f.amount(f.count('nimbusfs_gc_deleted_blocks_total'))},"
                     f" reclaimed {f.bytes(f.count('nimbusfs_gc_reclaimed_bytes_total'))};"
                     f" last pass {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}")
    else:
        lines.append("  GC: no pass yet")
    return lines


def mount(f: Figures, top: int = 8) -> list[str]:
    """A mount's figures."""
    ops = "nimbusfs_mount_fuse_op_seconds"
    hits = f.by("nimbusfs_mount_cache_hits_total", "tier")
    misses = f.count("nimbusfs_mount_cache_misses_total")
    reads = sum(hits.values()) + misses
    connected = f.gauge("nimbusfs_mount_server_connected")
    limit = f.gauge("nimbusfs_mount_cache_limit_bytes", tier="disk")
    disk = (f"{_size(f.gauge('nimbusfs_mount_cache_bytes', tier='disk'))} of {_size(limit)}"
            if limit else "none (the store is on this machine's disk)")
    return [
        f"  FUSE operations {f.amount(f.count(f'{ops}_count'))}, answered with an errno"
        f" {_errors(f, 'nimbusfs_mount_fuse_errors_total', 'errno')}",
        *_ops(f, ops, "op", top),
        f"  cache: {100 * (reads - misses) / reads if reads else 0:.1f}% of block reads hit"
        f" (memory {f.amount(hits.get('memory', 0))}, disk {f.amount(hits.get('disk', 0))},"
        f" misses {f.amount(misses)}, {f.bytes(f.count('nimbusfs_mount_cache_miss_bytes_total'))}"
        f" fetched); on disk {disk}, in memory"
        f" {_size(f.gauge('nimbusfs_mount_cache_bytes', tier='memory'))}",
        f"  store: uploaded"
        f" {f.bytes(f.count('nimbusfs_mount_store_bytes_total', direction='upload'))}, downloaded"
        f" {f.bytes(f.count('nimbusfs_mount_store_bytes_total', direction='download'))};"
        f" uploads in flight {f.gauge('nimbusfs_mount_uploads_in_flight'):.0f}, files not"
        f" committed {f.gauge('nimbusfs_mount_dirty_files'):.0f}",
        f"  metaserver {'connected' if connected else 'NOT CONNECTED'}, reconnects"
        f" {f.amount(f.count('nimbusfs_mount_reconnects_total'))}",
    ]


def show(title: str, url: str, token: str | None, before: Reading | None) -> Reading | None:
    """Print an endpoint's figures under ``title``; return the reading (None if unreadable)."""
    try:
        now = fetch(url, token)
    except (OSError, ValueError) as e:
        print(f"{title}: metrics unavailable from {url}: {e}")
        return None
    f = Figures(now, before)
    span = f" (rates over the last {f.seconds:.1f} s)" if f.seconds else " (since it started)"
    print(f"{title}{span}:")
    is_server = any(k[0] == "nimbusfs_server_mounts" for k in now.samples)
    for line in server(f) if is_server else mount(f):
        print(line)
    return now
