"""Runtime-metrics lines in Heroku's format, the load EWMA, and the Prometheus exposition,
checked with prometheus_client's own parser."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.observability.metrics import (
    DynoMetrics,
    LoadAverage,
    MemorySample,
    MetricFamily,
    MetricsError,
    MetricType,
    PhaseHistogram,
    Sample,
    format_value,
    load_metrics_line,
    memory_metrics_line,
    render,
    render_dynos,
)
from agent.supervision.states import DynoState

MIB = 2**20


def test_memory_line_has_herokus_fields_and_units() -> None:
    sample = MemorySample(rss_bytes=int(21.22 * MIB), cache_bytes=0, swap_bytes=0,
                          pgpgin_pages=348836, pgpgout_pages=343403, quota_bytes=512 * MIB)
    assert memory_metrics_line("web.1", "d97d0ea7", sample) == (
        "source=web.1 dyno=d97d0ea7 sample#memory_total=21.22MB sample#memory_rss=21.22MB "
        "sample#memory_cache=0.00MB sample#memory_swap=0.00MB "
        "sample#memory_pgpgin=348836pages sample#memory_pgpgout=343403pages "
        "sample#memory_quota=512.00MB")


def test_memory_total_is_rss_cache_swap() -> None:
    sample = MemorySample(10 * MIB, 5 * MIB, 1 * MIB, 0, 0, 512 * MIB)
    assert sample.total_bytes == 16 * MIB
    assert "sample#memory_total=16.00MB" in memory_metrics_line("w.1", "x", sample)


def test_load_average_ewma_on_a_fake_clock() -> None:
    load = LoadAverage().update(2, now=0.0)
    assert (load.avg_1m, load.avg_5m, load.avg_15m) == (2.0, 2.0, 2.0)
    load = load.update(0, now=20.0)
    assert load.avg_1m == pytest.approx(2 * math.exp(-20 / 60))
    assert load.avg_5m == pytest.approx(2 * math.exp(-20 / 300))
    assert load.avg_15m == pytest.approx(2 * math.exp(-20 / 900))
    # The short average reacts faster than the long ones.
    assert load.avg_1m < load.avg_5m < load.avg_15m
    for t in range(40, 3600, 20):
        load = load.update(4, now=float(t))
    assert load.avg_1m == pytest.approx(4.0, abs=1e-6)
    assert load_metrics_line("web.1", "abc", load).startswith(
        "source=web.1 dyno=abc sample#load_avg_1m=4.00 sample#load_avg_5m=")

STATES = [str(state) for state in DynoState]


def dyno(**kw: object) -> DynoMetrics:
    base: dict[str, object] = {
        "id": "d-1", "app": "shop", "name": "web.1", "type": "web", "size": "standard-1x",
        "state": DynoState.UP, "state_since_s": 1_790_000_000.5, "restarts": 3,
        "memory_rss_bytes": 100 * MIB, "memory_cache_bytes": 7 * MIB,
        "memory_swap_bytes": 0, "memory_quota_bytes": 512 * MIB, "cpu_seconds": 12.25,
        "pids": 4, "r14_total": 2, "r15_total": 0}
    base.update(kw)
    return DynoMetrics(**base)  # type: ignore[arg-type]


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → sorted label items → value, via the real parser."""
    result: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            result.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return result


def test_exposition_parses_and_carries_the_numbers() -> None:
    dynos = [dyno(), dyno(id="d-2", name="worker.1", type="worker", state=DynoState.CRASHED,
                          restarts=0)]
    text = render_dynos(dynos, STATES)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client names counter families without their _total suffix.
    assert families["dynoagent_dyno_cpu_seconds"].type == "counter"
    assert families["dynoagent_dyno_restarts"].type == "counter"
    assert families["dynoagent_dyno_memory_bytes"].type == "gauge"
    assert families["dynoagent_dyno_state"].documentation.startswith("1 for the dyno")
    samples = parse(text)
    web = (("app", "shop"), ("dyno", "web.1"), ("id", "d-1"), ("size", "standard-1x"),
           ("type", "web"))
    assert samples["dynoagent_dyno_memory_bytes"][tuple(sorted((*web, ("kind", "rss"))))] \
        == 100 * MIB
    assert samples["dynoagent_dyno_memory_quota_bytes"][web] == 512 * MIB
    assert samples["dynoagent_dyno_cpu_seconds_total"][web] == 12.25
    assert samples["dynoagent_dyno_restarts_total"][web] == 3
    assert samples["dynoagent_dyno_pids"][web] == 4
    assert samples["dynoagent_dyno_state_since_seconds"][web] == 1_790_000_000.5
    assert samples["dynoagent_dyno_memory_errors_total"][tuple(sorted((*web, ("code", "R14"))))] \
        == 2
    states = {dict(k)["state"]: v for k, v in samples["dynoagent_dyno_state"].items()
              if dict(k)["id"] == "d-1"}
    assert states == {"starting": 0, "up": 1, "crashed": 0, "down": 0, "complete": 0}
    worker_state = {dict(k)["state"] for k, v in samples["dynoagent_dyno_state"].items()
                    if dict(k)["id"] == "d-2" and v == 1}
    assert worker_state == {"crashed"}


def test_label_values_are_escaped() -> None:
    nasty = 'a"b\\c\nd'
    text = render([MetricFamily("x_total", "help with \\ and\nnewline", MetricType.COUNTER,
                                [Sample({"app": nasty}, 1)])])
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == "help with \\ and\nnewline"
    assert family.samples[0].labels == {"app": nasty}
    assert family.samples[0].value == 1


def test_empty_and_extra_families() -> None:
    assert render([]) == ""
    text = render_dynos([], STATES, extra=[MetricFamily("dynoagent_log_lines_dropped_total",
                                                "Lines lost by slow followers.",
                                                MetricType.COUNTER, [Sample({}, 7)])])
    assert parse(text)["dynoagent_log_lines_dropped_total"][()] == 7
    assert "# TYPE dynoagent_dyno_state gauge" in text


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (3, "3"), (2.5, "2.5"), (1e300, "1e+300"), (math.inf, "+Inf"),
    (-math.inf, "-Inf"), (math.nan, "NaN"), (2**60, repr(float(2**60))),
])
def test_values(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize("family", [
    MetricFamily("bad-name", "h", MetricType.GAUGE),
    MetricFamily("9lives", "h", MetricType.GAUGE),
    MetricFamily("ok", "h", MetricType.GAUGE, [Sample({"bad-label": "v"}, 1)]),
])
def test_invalid_names_are_refused(family: MetricFamily) -> None:
    with pytest.raises(MetricsError):
        render([family])


def test_a_family_is_rendered_once() -> None:
    twice = MetricFamily("dup", "h", MetricType.GAUGE)
    with pytest.raises(MetricsError) as caught:
        render([twice, twice])
    assert caught.value.value == "dup"


def _phase_histogram() -> PhaseHistogram:
    histogram = PhaseHistogram("dynoagent_start_phase_seconds", "Wall time of each phase.")
    for phase, seconds in (("cgroup", 0.0079), ("cgroup", 0.004), ("netns", 0.0117),
                           ("netns", 0.001), ("launch", 0.027), ("exit", 42.0)):
        histogram.observe(phase, seconds)
    return histogram


def test_phase_histogram_has_cumulative_buckets_sum_and_count() -> None:
    text = render([_phase_histogram().family()])
    assert "# TYPE dynoagent_start_phase_seconds histogram\n" in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="cgroup",le="0.0025"} 0\n' in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="cgroup",le="0.005"} 1\n' in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="cgroup",le="0.01"} 2\n' in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="netns",le="0.001"} 1\n' in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="exit",le="10"} 0\n' in text
    assert 'dynoagent_start_phase_seconds_bucket{phase="exit",le="+Inf"} 1\n' in text
    assert 'dynoagent_start_phase_seconds_count{phase="cgroup"} 2\n' in text
    assert 'dynoagent_start_phase_seconds_sum{phase="exit"} 42\n' in text
    [family] = text_string_to_metric_families(text)
    assert family.type == "histogram"
    count = {s.labels["phase"]: s.value for s in family.samples if s.name.endswith("_count")}
    assert count == {"cgroup": 2, "netns": 2, "launch": 1, "exit": 1}


def test_metrics_with_phase_histograms_pass_promtool() -> None:
    promtool = shutil.which("promtool") or (
        "/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    dynos = [DynoMetrics(id="d1", app="shop", name="web.1", type="web", size="standard-1x",
                         state="up", state_since_s=1_700_000_000.5, restarts=1)]
    text = render_dynos(dynos, [str(s) for s in DynoState], [_phase_histogram().family()])
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
