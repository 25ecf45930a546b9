"""/metrics: bounded series, gzip, the standard collectors, and promtool's verdict on a real
scrape and on the alert rules in docs/."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from scheduler_publisher import __version__
from scheduler_publisher.cli.arguments import build_parser
from scheduler_publisher.cli.main import build_settings
from scheduler_publisher.ops.metrics import OVERDUE_SLACK, PerEntrySwitch, overdue, per_entry_series
from scheduler_publisher.service import PublisherService
from tests.support import (
    REPO,
    Mosquitto,
    ServiceStarter,
    counter,
    entry,
    post,
    request,
    value,
    wait_until,
    write_config,
)

RULES = REPO / "docs" / "prometheus-rules.yml"
RULES_TESTS = REPO / "docs" / "prometheus-rules.test.yml"
DOC = REPO / "docs" / "metrics.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's `prometheus` package, which scripts/setup installs."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed and could not be: run scripts/setup as root "
            "(apt-get install prometheus)"
        )
    return found


def scrape(service: PublisherService, **headers: str) -> str:
    reply = request(service.http.port, "GET", "/metrics", headers)
    assert reply.status == 200
    return reply.body.decode()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def series(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


def many(topic_base: str, count: int) -> list[dict[str, Any]]:
    # An hour apart: the test is about series, not about publishing 10,000 messages.
    return [entry(f"e{i}", f"{topic_base}/{i}", 3600) for i in range(count)]


# ---- the pure decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "entries", "expected"),
    [
        ("auto", 0, True),
        ("auto", 1000, True),
        ("auto", 1001, False),
        ("auto", 10_000, False),
        ("on", 10_000, True),
        ("off", 1, False),
    ],
)
def test_per_entry_series_follow_the_mode_and_limit(
    mode: Any, entries: int, expected: bool
) -> None:
    """auto keeps per-entry series up to the limit (inclusive); on and off are absolute."""
    assert per_entry_series(mode, 1000, entries) is expected


def test_the_switch_logs_once_when_auto_turns_per_entry_series_off_and_once_back_on() -> None:
    """One metrics_per_entry_disabled line when the entries outgrow the limit, however many
    scrapes follow, and one metrics_per_entry_enabled when they shrink back under it."""
    switch = PerEntrySwitch("auto", 10)
    with capture_logs() as logs:
        assert switch.update(5) is True
        assert [switch.update(11) for _ in range(3)] == [False] * 3
        assert [switch.update(10) for _ in range(3)] == [True] * 3
    assert [(e["event"], e["entries"], e["limit"]) for e in logs] == [
        ("metrics_per_entry_disabled", 11, 10),
        ("metrics_per_entry_enabled", 10, 10),
    ]
    assert logs[0]["log_level"] == "info"


def test_the_switch_says_nothing_when_per_entry_series_are_on_from_the_start() -> None:
    """Nothing is logged when per-entry series are on, or when the operator chose off."""
    with capture_logs() as logs:
        PerEntrySwitch("auto", 10).update(10)
        PerEntrySwitch("on", 10).update(10_000)
        PerEntrySwitch("off", 10).update(1)
    assert logs == []


def test_an_entry_is_overdue_after_a_whole_slot_and_some_slack() -> None:
    """Overdue: no publish for 2 intervals (at least interval + slack) since the later of its
    last publish and the last apply of the entries."""
    assert not overdue(60, last_published_at=1000, applied_at=0, now=1000 + 119)
    assert overdue(60, last_published_at=1000, applied_at=0, now=1000 + 121)
    assert not overdue(0.5, last_published_at=1000, applied_at=0, now=1000 + OVERDUE_SLACK)
    assert overdue(0.5, last_published_at=1000, applied_at=0, now=1000 + OVERDUE_SLACK + 1)
    # Never published: counted from the apply; a reload restarts the clock.
    assert overdue(60, last_published_at=None, applied_at=1000, now=1000 + 121)
    assert not overdue(60, last_published_at=1000, applied_at=2000, now=2000 + 60)
    assert not overdue(60, last_published_at=None, applied_at=None, now=10_000)


# ---- a real service ----------------------------------------------------------------------------


def test_ten_thousand_entries_expose_at_most_400_series(
    http_service: ServiceStarter, config_path: Path, topic_base: str
) -> None:
    """At 10,000 entries with the defaults, /metrics has only the service-wide series (said
    once in the log); a reload down to 5 entries brings the per-entry series back (said once)."""
    with capture_logs() as logs:
        service = http_service(many(topic_base, 10_000), watch=False)
        text = scrape(service)
        scrape(service)
    assert series(text) <= 400, series(text)
    found = families(text)
    assert value(found, "scheduler_publisher_active_configs") == 10_000
    assert value(found, "scheduler_publisher_metrics_per_entry") == 0
    assert not [name for name in found if name.startswith("scheduler_publisher_entry_")]
    off = [e for e in logs if e["event"].startswith("metrics_per_entry")]
    assert [(e["event"], e["entries"], e["limit"]) for e in off] == [
        ("metrics_per_entry_disabled", 10_000, 1000)
    ]

    write_config(config_path, many(topic_base, 5))
    with capture_logs() as logs:
        assert post(service, "/reload").json()["success"] is True
        small = families(scrape(service))
        scrape(service)
    assert value(small, "scheduler_publisher_metrics_per_entry") == 1
    assert len(small["scheduler_publisher_entry_published"].samples) == 5
    assert [e["event"] for e in logs if e["event"].startswith("metrics_per_entry")] == [
        "metrics_per_entry_enabled"
    ]


def test_per_entry_series_can_be_forced_on_or_off(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """--metrics-per-entry on exposes them past the limit; off never does; a small limit
    under auto turns them off."""
    on = http_service(many(topic_base, 20), metrics_per_entry="on", metrics_entry_limit=10)
    assert len(families(scrape(on))["scheduler_publisher_entry_errors"].samples) == 20
    off = http_service(many(topic_base, 2), metrics_per_entry="off")
    assert "scheduler_publisher_entry_errors" not in families(scrape(off))
    limited = http_service(many(topic_base, 11), metrics_entry_limit=10)
    assert "scheduler_publisher_entry_errors" not in families(scrape(limited))


def test_metrics_are_gzipped_when_the_scraper_accepts_it(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Accept-Encoding: gzip gets a gzip body (Content-Encoding: gzip) of the same metrics;
    without it the body is plain text."""
    service = http_service(many(topic_base, 3))
    plain = request(service.http.port, "GET", "/metrics")
    assert plain.headers.get("Content-Encoding") is None
    zipped = request(
        service.http.port, "GET", "/metrics", {"Accept-Encoding": "deflate, gzip;q=1.0, *;q=0.5"}
    )
    assert zipped.status == 200
    assert zipped.headers.get("Content-Encoding") == "gzip"
    assert zipped.content_type.startswith("text/plain")
    assert int(zipped.headers["Content-Length"]) == len(zipped.body)
    assert len(zipped.body) < len(plain.body)
    assert (
        families(gzip.decompress(zipped.body).decode()).keys()
        == families(plain.body.decode()).keys()
    )


def test_openmetrics_is_served_when_asked_for(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """A scraper that asks for OpenMetrics gets it (prometheus_client's negotiation)."""
    service = http_service(many(topic_base, 1))
    reply = request(
        service.http.port,
        "GET",
        "/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert reply.content_type.startswith("application/openmetrics-text")
    assert reply.body.decode().endswith("# EOF\n")


def test_name_filter_returns_exactly_the_named_series(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """`?name[]=` (as prometheus_client's own handler takes it, brackets encoded or not, the
    body gzipped or not) answers with the named samples of every collector, the service's and
    the standard ones, and nothing else; a name no collector has gives an empty answer."""
    service = http_service(many(topic_base, 2))
    wait_until(service.is_connected, 10, message="connected")
    names = (
        "scheduler_publisher_ready",
        "scheduler_publisher_published_total",
        "scheduler_publisher_entry_published_total",
        "process_open_fds",
    )
    query = "&".join(f"name[]={n}" for n in names[:2]) + "".join(
        f"&name%5B%5D={n}" for n in names[2:]
    )
    plain = request(service.http.port, "GET", f"/metrics?{query}")
    zipped = request(service.http.port, "GET", f"/metrics?{query}", {"Accept-Encoding": "gzip"})
    for text in (plain.body.decode(), gzip.decompress(zipped.body).decode()):
        found = families(text)
        sample_names = {s.name for f in found.values() for s in f.samples}
        assert sample_names == set(names), text
        assert value(found, "scheduler_publisher_ready") == 1
        assert value(found, "process_open_fds") > 0
        assert len(found["scheduler_publisher_entry_published"].samples) == 2
    unknown = request(service.http.port, "GET", "/metrics?name[]=no_such_metric")
    assert (unknown.status, families(unknown.body.decode())) == (200, {})


def test_process_python_and_build_info_are_exposed(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """The standard process_* and python_* collectors run, and build_info names the versions."""
    service = http_service(many(topic_base, 1))
    found = families(scrape(service))
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_open_fds") > 0
    assert value(found, "process_max_fds") > 0
    assert counter(found, "process_cpu_seconds") > 0
    assert "python_info" in found
    assert "python_gc_collections" in found
    (info,) = found["scheduler_publisher_build_info"].samples
    assert info.value == 1
    assert info.labels["version"] == __version__
    assert re.fullmatch(r"2\.\d+\.\d+.*", info.labels["paho_mqtt"])
    assert re.fullmatch(r"3\.\d+\.\d+.*", info.labels["apscheduler"])
    assert info.labels["python"].startswith("3.")


def test_an_entry_that_stops_publishing_counts_as_overdue(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """entries_overdue is 0 while entries publish; with the broker gone, an entry that misses a
    whole slot and the slack is counted."""
    service = http_service([entry("fast", f"{topic_base}/fast", 0.2)])
    wait_until(lambda: service.stats.entry("fast").published >= 2, 10, message="publishing")
    assert value(families(scrape(service)), "scheduler_publisher_entries_overdue") == 0
    broker.stop()
    wait_until(
        lambda: value(families(scrape(service)), "scheduler_publisher_entries_overdue") == 1,
        OVERDUE_SLACK + 15,
        message="the entry counted as overdue",
    )


def test_promtool_check_metrics_passes_on_a_real_scrape(
    http_service: ServiceStarter, promtool: str, topic_base: str
) -> None:
    """promtool check metrics finds no problem in a real scrape, per-entry series included."""
    service = http_service(
        [*many(topic_base, 3), entry('odd "id" \\ with ünïcode', f"{topic_base}/odd", 0.2)]
    )
    wait_until(lambda: service.stats.totals().published >= 3, 10, message="publishes")
    text = scrape(service)
    assert 'entry="odd \\"id\\" \\\\ with ünïcode"' in text
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "", result.stdout.decode()  # no lint advice


# ---- the alert rules in docs/ ----------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    """docs/prometheus-rules.yml is a valid Prometheus rules file."""
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "SUCCESS" in result.stdout.decode()


def test_the_alert_rules_fire_as_documented(promtool: str) -> None:
    """promtool test rules: each alert fires on the series that describe its case, not before."""
    result = subprocess.run(
        [promtool, "test", "rules", str(RULES_TESTS)],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=RULES_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_the_alert_rules_use_metrics_the_service_exposes(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Every metric named in the rules (and their tests) exists in a real scrape, with the
    per-entry series off as they are at scale."""
    service = http_service(many(topic_base, 2), metrics_per_entry="off")
    names = {s.name for f in text_string_to_metric_families(scrape(service)) for s in f.samples}
    for path in (RULES, RULES_TESTS):
        used = set(
            re.findall(r"\b((?:scheduler_publisher|process|python)_[a-z_]+)", path.read_text())
        )
        assert used, path
        assert used <= names, f"{path.name}: not in a scrape: {sorted(used - names)}"


def test_the_metrics_doc_carries_the_rules_file_verbatim() -> None:
    """docs/metrics.md shows the rules file as it is, so the doc cannot drift from the tests."""
    assert RULES.read_text().strip() in DOC.read_text()


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_flags_set_the_metrics_settings() -> None:
    """--metrics-per-entry and --metrics-entry-limit reach ServiceSettings; defaults auto/1000."""
    parser = build_parser()
    default = build_settings(parser.parse_args(["run"]), {})
    assert (default.metrics_per_entry, default.metrics_entry_limit) == ("auto", 1000)
    args = parser.parse_args(["run", "--metrics-per-entry", "off", "--metrics-entry-limit", "50"])
    settings = build_settings(args, {})
    assert (settings.metrics_per_entry, settings.metrics_entry_limit) == ("off", 50)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--metrics-per-entry", "sometimes"], "invalid choice: 'sometimes'"),
        (["--metrics-entry-limit", "0"], "must be an integer at least 1, got 0"),
        (["--metrics-entry-limit", "-3"], "must be an integer at least 1, got -3"),
        (["--metrics-entry-limit", "many"], "must be an integer at least 1, got 'many'"),
    ],
)
def test_cli_rejects_bad_metrics_values_with_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits 2 with one line naming the option, what came and what is expected."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err
    assert expected in err
