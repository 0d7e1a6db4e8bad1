"""Dyno metrics: Heroku's runtime-metrics log lines (`source=web.1 dyno=… sample#…`), the
load-average EWMA behind them, and the Prometheus text exposition of `GET /metrics`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

MIB: Final = 2**20
PAGE_BYTES: Final = 4096


class MetricsError(ValueError):
    """A metric or label name is not valid in the exposition format; carries the name."""

    def __init__(self, message: str, value: str) -> None:
        super().__init__(message)
        self.value = value


# --- runtime-metrics log lines ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MemorySample:
    """One reading of a dyno's memory (cgroup memory.stat), in bytes and pages."""

    rss_bytes: int
    cache_bytes: int
    swap_bytes: int
    pgpgin_pages: int
    pgpgout_pages: int
    quota_bytes: int

    @property
    def total_bytes(self) -> int:
        """Heroku's memory_total: rss + cache + swap."""
        return self.rss_bytes + self.cache_bytes + self.swap_bytes


def _mb(value_bytes: int) -> str:
    return f"{value_bytes / MIB:.2f}MB"


def memory_metrics_line(name: str, dyno_id: str, sample: MemorySample) -> str:
    """`source=web.1 dyno=<id> sample#memory_total=21.00MB … sample#memory_quota=512.00MB`,
    the fields and units of Heroku's log-runtime-metrics."""
    return (f"source={name} dyno={dyno_id}"
            f" sample#memory_total={_mb(sample.total_bytes)}"
            f" sample#memory_rss={_mb(sample.rss_bytes)}"
            f" sample#memory_cache={_mb(sample.cache_bytes)}"
            f" sample#memory_swap={_mb(sample.swap_bytes)}"
            f" sample#memory_pgpgin={sample.pgpgin_pages}pages"
            f" sample#memory_pgpgout={sample.pgpgout_pages}pages"
            f" sample#memory_quota={_mb(sample.quota_bytes)}")


@dataclass(frozen=True, slots=True)
class LoadAverage:
    """Heroku's dyno load: an EWMA of the runnable-task count sampled about every 20 s, over
    1, 5 and 15 minutes: `new = (1 - e) * runnable + e * old`, `e = exp(-dt / period)`."""

    avg_1m: float = 0.0
    avg_5m: float = 0.0
    avg_15m: float = 0.0
    at: float | None = None  # monotonic time of the last sample; None before the first

    def update(self, runnable: int, now: float) -> LoadAverage:
        if self.at is None:
            # No history yet: start from the first reading instead of decaying up from 0.
            value = float(runnable)
            return LoadAverage(value, value, value, now)
        dt = max(0.0, now - self.at)

        def step(old: float, period_s: float) -> float:
            decay = math.exp(-dt / period_s)
            return (1 - decay) * runnable + decay * old

        return LoadAverage(step(self.avg_1m, 60.0), step(self.avg_5m, 300.0),
                           step(self.avg_15m, 900.0), now)


def load_metrics_line(name: str, dyno_id: str, load: LoadAverage) -> str:
    """`source=web.1 dyno=<id> sample#load_avg_1m=2.46 sample#load_avg_5m=1.06 …`"""
    return (f"source={name} dyno={dyno_id} sample#load_avg_1m={load.avg_1m:.2f}"
            f" sample#load_avg_5m={load.avg_5m:.2f} sample#load_avg_15m={load.avg_15m:.2f}")


# --- Prometheus text exposition (format 0.0.4) -----------------------------------------------

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class MetricType(StrEnum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float
    # Appended to the family's name: a histogram's `_bucket`, `_sum` and `_count` lines.
    suffix: str = ""


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One metric: its HELP, TYPE and samples. Counters are named with `_total`."""

    name: str
    help: str
    type: MetricType
    samples: Sequence[Sample] = field(default_factory=tuple)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _check_name(pattern: re.Pattern[str], kind: str, name: str) -> None:
    if not pattern.match(name):
        raise MetricsError(f"invalid {kind} name {name!r}", name)


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition of `families` (each name once, in the order given)."""
    out: list[str] = []
    seen: set[str] = set()
    for family in families:
        _check_name(_METRIC_NAME, "metric", family.name)
        if family.name in seen:
            raise MetricsError(f"metric {family.name!r} rendered twice", family.name)
        seen.add(family.name)
        out.append(f"# HELP {family.name} {escape_help(family.help)}")
        out.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = []
            for key, value in sample.labels.items():
                _check_name(_LABEL_NAME, "label", key)
                labels.append(f'{key}="{escape_label_value(value)}"')
            label_text = "{" + ",".join(labels) + "}" if labels else ""
            out.append(f"{family.name}{sample.suffix}{label_text} "
                       f"{format_value(sample.value)}")
    return "\n".join(out) + "\n" if out else ""


# Upper bounds (s) of the buckets of a start phase: from a fraction of a millisecond (a record
# write, a uid) to seconds (a web dyno's boot, a slug download).
PHASE_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                          1.0, 2.5, 5.0, 10.0)


class PhaseHistogram:
    """A Prometheus histogram by phase (the `phase` label): observe() is a bisect and two
    additions; the cumulative bucket counts are made when rendered."""

    def __init__(self, name: str, help_text: str,
                 buckets: Sequence[float] = PHASE_BUCKETS_S) -> None:
        _check_name(_METRIC_NAME, "metric", name)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise MetricsError(f"the buckets of {name!r} must be distinct and sorted", name)
        self.name = name
        self.help = help_text
        self.buckets = tuple(float(bound) for bound in buckets)
        # phase → [count per bucket (not cumulative), then those above the last], sum
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, phase: str, seconds: float) -> None:
        counts = self._counts.get(phase)
        if counts is None:
            counts = self._counts[phase] = [0] * (len(self.buckets) + 1)
            self._sums[phase] = 0.0
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self._sums[phase] += seconds

    def family(self) -> MetricFamily:
        samples: list[Sample] = []
        for phase, counts in self._counts.items():
            cumulative = 0
            for bound, count in zip(self.buckets, counts, strict=False):
                cumulative += count
                samples.append(Sample({"phase": phase, "le": format_value(bound)}, cumulative,
                                      "_bucket"))
            total = cumulative + counts[-1]
            samples.append(Sample({"phase": phase, "le": "+Inf"}, total, "_bucket"))
            samples.append(Sample({"phase": phase}, self._sums[phase], "_sum"))
            samples.append(Sample({"phase": phase}, total, "_count"))
        return MetricFamily(self.name, self.help, MetricType.HISTOGRAM, samples)


@dataclass(frozen=True, slots=True)
class DynoMetrics:
    """What `GET /metrics` shows of one dyno; the daemon fills it from its records and the
    cgroup's stat files."""

    id: str
    app: str
    name: str
    type: str
    size: str
    state: str  # one of the `states` the metrics are rendered with
    state_since_s: float  # unix time of the last state change
    restarts: int
    memory_rss_bytes: int = 0
    memory_cache_bytes: int = 0
    memory_swap_bytes: int = 0
    memory_quota_bytes: int = 0
    cpu_seconds: float = 0.0
    pids: int = 0
    r14_total: int = 0
    r15_total: int = 0

    def labels(self) -> dict[str, str]:
        return {"app": self.app, "dyno": self.name, "id": self.id, "type": self.type,
                "size": self.size}


def dyno_families(dynos: Iterable[DynoMetrics], states: Sequence[str]) -> list[MetricFamily]:
    """The per-dyno metric families (a dyno appears in every family); `states` are every
    state a dyno can be in."""
    memory: list[Sample] = []
    quota: list[Sample] = []
    cpu: list[Sample] = []
    pids: list[Sample] = []
    restarts: list[Sample] = []
    state: list[Sample] = []
    since: list[Sample] = []
    errors: list[Sample] = []
    for dyno in dynos:
        base = dyno.labels()
        for kind, value in (("rss", dyno.memory_rss_bytes), ("cache", dyno.memory_cache_bytes),
                            ("swap", dyno.memory_swap_bytes)):
            memory.append(Sample({**base, "kind": kind}, value))
        quota.append(Sample(base, dyno.memory_quota_bytes))
        cpu.append(Sample(base, dyno.cpu_seconds))
        pids.append(Sample(base, dyno.pids))
        restarts.append(Sample(base, dyno.restarts))
        # One sample per possible state (1 for the current one), so that a query can
        # count dynos by state without knowing them in advance.
        for candidate in states:
            state.append(Sample({**base, "state": candidate},
                                1 if candidate == dyno.state else 0))
        since.append(Sample(base, dyno.state_since_s))
        errors.append(Sample({**base, "code": "R14"}, dyno.r14_total))
        errors.append(Sample({**base, "code": "R15"}, dyno.r15_total))
    return [
        MetricFamily("dynoagent_dyno_memory_bytes", "Memory of the dyno's cgroup by kind "
                     "(rss, cache, swap).", MetricType.GAUGE, memory),
        MetricFamily("dynoagent_dyno_memory_quota_bytes", "Memory quota of the dyno's size.",
                     MetricType.GAUGE, quota),
        MetricFamily("dynoagent_dyno_cpu_seconds_total", "CPU time used by the dyno's "
                     "processes.", MetricType.COUNTER, cpu),
        MetricFamily("dynoagent_dyno_pids", "Processes and threads in the dyno.",
                     MetricType.GAUGE, pids),
        MetricFamily("dynoagent_dyno_restarts_total", "Times the dyno was restarted.",
                     MetricType.COUNTER, restarts),
        MetricFamily("dynoagent_dyno_state", "1 for the dyno's current state, 0 for the others.",
                     MetricType.GAUGE, state),
        MetricFamily("dynoagent_dyno_state_since_seconds", "Unix time of the dyno's last "
                     "state change.", MetricType.GAUGE, since),
        MetricFamily("dynoagent_dyno_memory_errors_total", "Memory quota errors reported "
                     "(R14 exceeded, R15 vastly exceeded).", MetricType.COUNTER, errors),
    ]


def render_dynos(dynos: Iterable[DynoMetrics], states: Sequence[str],
                 extra: Iterable[MetricFamily] = ()) -> str:
    """The whole `GET /metrics` body: per-dyno families, then agent-wide ones from `extra`."""
    return render([*dyno_families(dynos, states), *extra])
