"""Shards: `--shard K/N` splits one entries file across processes by a rendezvous hash of the
entry id. The assignment alone (pure), the option from every source, `validate --shard`, and
two shard services on one real Mosquitto that together publish every entry exactly once."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler_publisher.cli import options
from scheduler_publisher.cli.main import main
from scheduler_publisher.config.loader import ConfigurationLoader
from scheduler_publisher.config.shard import MAX_SHARDS, Shard, ShardError, owner, parse_shard
from scheduler_publisher.scheduling.plan import effective_entries, grid_start
from scheduler_publisher.service import PublisherService
from scheduler_publisher.settings import BrokerSettings, ServiceSettings
from tests.support import (
    Mosquitto,
    ServiceProcess,
    ServiceStarter,
    SubscriberFactory,
    barrier,
    cli_args,
    entry,
    in_process_settings,
    metrics,
    online,
    value,
    wait_until,
    write_config,
)

SAMPLE = Path(__file__).resolve().parent.parent / "JSON" / "payloadStaticConfig.json"
DAY = 86400  # the longest interval: an entry publishes at connect, then not for a day


def ids(count: int, prefix: str = "sensor") -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


# ---- the assignment -------------------------------------------------------------------------


def test_assignment_is_pinned_across_releases() -> None:
    """The same id lands on the same shard in every release and process: these owners are
    fixed, so an upgrade of some hosts of a fleet never runs an entry twice or not at all."""
    assert [owner(i, 2) for i in ("pump-circulation", "boiler-temperature", "a", "c")] == [
        1,
        2,
        1,
        2,
    ]
    assert [owner(i, 8) for i in ("a", "b", "c", "g", "power-meter-main")] == [5, 6, 8, 4, 3]


def test_every_id_has_exactly_one_owner() -> None:
    """Of the N shards, exactly one owns each id."""
    for entry_id in ids(500):
        assert sum(Shard(k, 3).owns(entry_id) for k in (1, 2, 3)) == 1


def test_shards_get_a_fair_share() -> None:
    """10,000 ids over 4 shards: each holds 25 % within a few points."""
    counts = Counter(owner(i, 4) for i in ids(10_000))
    assert sorted(counts) == [1, 2, 3, 4]
    assert all(2_200 <= c <= 2_800 for c in counts.values()), counts


def test_adding_a_shard_moves_only_about_one_in_n_and_only_to_it() -> None:
    """N 4 -> 5: about 1/5 of 10,000 entries move, every one of them to the new shard 5;
    the rest stay where they were."""
    before = {i: owner(i, 4) for i in ids(10_000)}
    after = {i: owner(i, 5) for i in before}
    moved = [i for i in before if before[i] != after[i]]
    assert 0.17 <= len(moved) / len(before) <= 0.23, len(moved)
    assert {after[i] for i in moved} == {5}


def test_removing_the_last_shard_moves_only_its_entries() -> None:
    """N 5 -> 4: only shard 5's entries move; the others keep their shard."""
    before = {i: owner(i, 5) for i in ids(5_000)}
    moved = {i for i in before if owner(i, 4) != before[i]}
    assert moved == {i for i, k in before.items() if k == 5}


def test_ids_outside_ascii_are_assigned() -> None:
    """Any valid id (non-ASCII, a lone surrogate from a JSON escape) has an owner."""
    for entry_id in ("Kühlraum-3", "温度", "\ud800x"):
        assert 1 <= owner(entry_id, 7) <= 7


@pytest.mark.parametrize(
    ("text", "shard"),
    [
        ("1/2", Shard(1, 2)),
        ("2-of-2", Shard(2, 2)),
        (" 3 / 4 ", Shard(3, 4)),
        ("1/1", Shard(1, 1)),
        ("1024/1024", Shard(1024, 1024)),
    ],
)
def test_parse_shard_accepts_both_forms(text: str, shard: Shard) -> None:
    """`K/N` and the systemd instance form `K-of-N` both parse."""
    assert parse_shard(text) == shard
    assert parse_shard(shard.name) == shard
    assert parse_shard(str(shard)) == shard


@pytest.mark.parametrize(
    "text",
    [
        *("0/2", "3/2", "1/1025", "x", "1/", "-1/2", "1.5/2", "", "1/2/3", "1 of 2"),
        *("\u0661/\u0662", "1/\uff12", "1/2\n", "\u20031/2", "1_0/20"),  # ASCII digits only
    ],
)
def test_parse_shard_refuses_with_what_was_expected(text: str) -> None:
    """A bad spec says what it got and that K/N with 1 <= K <= N <= 1024 was expected."""
    with pytest.raises(ShardError) as info:
        parse_shard(text)
    assert str(info.value) == (
        f"must be K/N or K-of-N with 1 <= K <= N <= {MAX_SHARDS}, got {text!r}"
    )


def test_shard_value_checks_its_range() -> None:
    """Shard(k, n) refuses what --shard refuses."""
    with pytest.raises(ShardError, match="got 3/2"):
        Shard(3, 2)


# ---- what a shard runs ----------------------------------------------------------------------


def test_only_the_shards_entries_run_and_validation_stays_file_wide(tmp_path: Path) -> None:
    """The running set holds only the shard's valid entries; an invalid entry of another shard
    is still a problem of the file, and a duplicate id is reported whoever owns it."""
    config = tmp_path / "c.json"
    write_config(
        config,
        [
            entry("a", "t/a"),
            entry("c", "t/c"),
            entry("g", "t/g"),
            entry("d", "t/d", interval=0),
            entry("c", "t/c2"),
        ],
    )
    result = ConfigurationLoader(config).load()
    wanted, kept = effective_entries({}, result, Shard(1, 2))
    assert sorted(wanted) == ["a", "g"]  # c is shard 2's (and a duplicate); d is invalid
    assert kept == ()
    assert {p.entry_id for p in result.errors} == {"c", "d"}


def test_a_broken_entry_of_the_shard_keeps_its_last_good_version(tmp_path: Path) -> None:
    """Last-good applies to the shard's own entries; another shard's broken entry stays away."""
    config = tmp_path / "c.json"
    write_config(config, [entry("a", "t/a"), entry("c", "t/c")])
    running, _ = effective_entries({}, ConfigurationLoader(config).load(), Shard(1, 2))
    write_config(config, [entry("a", "t/a", interval=0), entry("c", "t/c", interval=0)])
    wanted, kept = effective_entries(running, ConfigurationLoader(config).load(), Shard(1, 2))
    assert kept == ("a",)
    assert sorted(wanted) == ["a"]


def test_for_shard_suffixes_client_ids_and_status_topics() -> None:
    """Each shard connects with `<id>-K-of-N` (its lwt entries' ids follow), publishes its
    status under that id, and an explicit status topic gets `/K-of-N`."""
    base = ServiceSettings(broker=BrokerSettings(client_id="gw"))
    one, two = base.for_shard(Shard(1, 2)), base.for_shard(Shard(2, 2))
    assert (one.shard, one.broker.client_id, two.broker.client_id) == (
        Shard(1, 2),
        "gw-1-of-2",
        "gw-2-of-2",
    )
    assert one.broker.effective_status_topic == "scheduler-publisher/gw-1-of-2/status"
    assert one.broker.entry_client_id("valve") == "gw-1-of-2/valve"
    explicit = ServiceSettings(broker=BrokerSettings(client_id="gw", status_topic="site/st"))
    assert explicit.for_shard(Shard(2, 3)).broker.effective_status_topic == "site/st/2-of-3"
    assert base.shard is None
    assert base.broker.client_id == "gw"


# ---- the option and validate ----------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No option variable from the caller's shell, and no /etc options file, leaks in."""
    for name in list(os.environ):
        if name.startswith("SCHEDULER_PUBLISHER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(options, "DEFAULT_OPTIONS_FILE", tmp_path / "absent" / "default.toml")


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return code if isinstance(code, int) else 0


def test_shard_option_from_flag_environment_and_options_file(
    clean_environment: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--shard, SCHEDULER_PUBLISHER_SHARD and `shard = "K/N"` in the options file all set it,
    in that precedence; show-options shows the suffixed client id."""
    opts = tmp_path / "o.toml"
    opts.write_text('shard = "3-of-4"\nclient-id = "gw"\n')

    def shown() -> dict[str, str]:
        assert run_main(["show-options", "--options-file", str(opts)]) == 0
        out = capsys.readouterr().out.splitlines()
        return {line.split(" = ")[0]: line.split(" = ")[1] for line in out if " = " in line}

    assert shown()["shard"] == f'"3/4"  # file {opts}'
    monkeypatch.setenv("SCHEDULER_PUBLISHER_SHARD", "2/4")
    assert shown()["shard"] == '"2/4"  # env SCHEDULER_PUBLISHER_SHARD'
    assert run_main(["show-options", "--options-file", str(opts), "--shard", "1-of-4"]) == 0
    assert '\nshard = "1/4"  # flag --shard' in capsys.readouterr().out
    monkeypatch.delenv("SCHEDULER_PUBLISHER_SHARD")
    opts.write_text('shard = "1/2"\n')
    assert "-1-of-2/status" in shown()["status-topic"]


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("flag", "argument --shard: must be K/N or K-of-N with 1 <= K <= N <= 1024, got '3/2'"),
        (
            "env",
            "SCHEDULER_PUBLISHER_SHARD: must be K/N or K-of-N with 1 <= K <= N <= 1024, got '3/2'",
        ),
        ("file", "shard: must be K/N or K-of-N with 1 <= K <= N <= 1024, got '3/2'"),
    ],
)
def test_bad_shard_is_a_usage_error_naming_the_option(
    clean_environment: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    error: str,
) -> None:
    """--shard 3/2 from a flag, the environment or the options file: exit 2 and one line that
    names the option, the value and what was expected; nothing starts."""
    opts = tmp_path / "o.toml"
    opts.write_text('shard = "3/2"\n' if where == "file" else "")
    argv = ["run", "--options-file", str(opts), "--config", str(SAMPLE)]
    if where == "flag":
        argv += ["--shard", "3/2"]
    if where == "env":
        monkeypatch.setenv("SCHEDULER_PUBLISHER_SHARD", "3/2")
    assert run_main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert error in line


def test_a_shard_as_a_toml_number_is_refused(
    clean_environment: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shard = 1` (a number, not "1/2") names the option and the string it expects."""
    opts = tmp_path / "o.toml"
    opts.write_text("shard = 1\n")
    assert run_main(["validate", "--options-file", str(opts), "--config", str(SAMPLE)]) == 2
    assert f"options file {opts}: shard: expected a string, got integer 1" in (
        capsys.readouterr().err
    )


def test_validate_shard_lists_the_entries_the_shard_runs(
    clean_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate --shard K/N` lists, in file order, the valid entries shard K runs; the two
    shards' lists together are every entry, once."""
    listed = {}
    for k in (1, 2):
        assert (
            run_main(
                ["validate", "--config", str(SAMPLE), "--shard", f"{k}/2", "--options-file", ""]
            )
            == 0
        )
        out = capsys.readouterr().out.splitlines()
        assert out[0].endswith("valid: 4 valid entries, 0 errors, 0 warnings")
        listed[k] = [line.strip() for line in out[2:]]
        assert out[1] == f"shard {k}/2 runs {len(listed[k])} of 4 valid entries:"
        assert all(owner(i, 2) == k for i in listed[k])
    assert listed == {
        1: ["pump-circulation", "door-plant-room", "power-meter-main"],
        2: ["boiler-temperature"],
    }


def test_validate_shard_json_and_problems_anywhere(
    clean_environment: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In JSON, `shard` holds k, n, name and the entries; an invalid entry that shard 1 would
    not run still makes the file invalid (exit 1)."""
    config = tmp_path / "c.json"
    write_config(config, [entry("a", "t/a"), entry("g", "t/g"), entry("c", "t/c", qos=7)])
    code = run_main(
        [
            "validate",
            "--config",
            str(config),
            "--shard",
            "1/2",
            "--format",
            "json",
            "--options-file",
            "",
        ]
    )
    body = json.loads(capsys.readouterr().out)
    assert code == 1
    assert body["shard"] == {"k": 1, "n": 2, "name": "1-of-2", "entries": ["a", "g"]}
    assert [p["id"] for p in body["problems"]] == ["c"]


def test_validate_without_shard_prints_what_it_always_did(
    clean_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --shard: one summary line and no `shard` key in JSON."""
    assert run_main(["validate", "--config", str(SAMPLE), "--options-file", ""]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert (
        run_main(["validate", "--config", str(SAMPLE), "--options-file", "", "--format", "json"])
        == 0
    )
    assert "shard" not in json.loads(capsys.readouterr().out)


# ---- two shards on one broker ---------------------------------------------------------------


def quiet_ids(count: int, within: timedelta) -> list[str]:
    """Ids of daily entries whose grid slot is not due within `within`: in that window each
    publishes once, at connect, and only a second publisher of it would add another."""
    now = datetime.now(UTC)
    found = []
    for entry_id in ids(count * 2, f"q{uuid.uuid4().hex[:6]}"):
        start = grid_start(entry_id, DAY)
        next_slot = start + timedelta(days=(now - start) // timedelta(days=1) + 1)
        if next_slot - now > within:
            found.append(entry_id)
    return found[:count]


@pytest.fixture
def shard_pair(broker: Mosquitto, tmp_path: Path) -> Iterator[list[PublisherService]]:
    """Shards 1/2 and 2/2 on one entries file, one base client id (as two processes with the
    default id on one host), not started yet."""
    base = f"sp-test-{uuid.uuid4().hex[:8]}"
    pair = [
        PublisherService(
            in_process_settings(
                tmp_path / "entries.json", broker.port, broker={"client_id": base}, http_port=0
            ).for_shard(Shard(k, 2))
        )
        for k in (1, 2)
    ]
    yield pair
    for service in pair:
        service.stop()


def test_two_shards_publish_every_entry_exactly_once(
    shard_pair: list[PublisherService],
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    topic_base: str,
) -> None:
    """Two shards on one file: the union of what they run is every entry and the intersection
    is empty; on the wire every entry's topic arrives once (from its one owner), each lwt
    entry's own connection stays up, and both shards' retained statuses say online."""
    entry_ids = quiet_ids(40, timedelta(minutes=10))
    lwt_ids = {next(i for i in entry_ids if owner(i, 2) == k) for k in (1, 2)}
    entries = [entry(i, f"{topic_base}/{i}", DAY, lwt=i in lwt_ids) for i in entry_ids]
    write_config(tmp_path / "entries.json", entries)
    one, two = shard_pair
    status_topics = [s.settings.broker.effective_status_topic for s in shard_pair]
    sub = subscriber_factory(f"{topic_base}/#", *status_topics)
    for service in shard_pair:
        service.start()

    for e in entries:
        sub.wait_for(e["topic"], where=online if e["lwt"] else lambda m: True, timeout=20)
    for topic in status_topics:
        sub.wait_for(topic, where=online)
    runs = [set(one.get_status()["entries"]), set(two.get_status()["entries"])]
    assert runs[0] | runs[1] == set(entry_ids)
    assert runs[0] & runs[1] == set()
    assert all(owner(i, 2) == k for k, run in ((1, runs[0]), (2, runs[1])) for i in run)
    data = Counter(
        m.topic
        for m in sub.snapshot()
        if m.topic.startswith(topic_base) and not (m.payload and m.json().get("online") == 0)
    )
    assert data == dict.fromkeys((e["topic"] for e in entries), 1)
    wait_until(
        lambda: all(s.get_status()["connection"]["connections_up"] == 2 for s in shard_pair),
        10,
        message="every connection up",
    )
    for service, k in ((one, 1), (two, 2)):
        status = service.get_status()
        assert status["shard"] == {"k": k, "n": 2, "name": f"{k}-of-2"}
        assert status["connection"]["client_id"].endswith(f"-{k}-of-2")
        assert status["connection"]["client_id_conflict"] is None
        assert service.is_connected()
    assert status_topics[0] != status_topics[1]


def test_shard_processes_with_one_client_id_both_stay_connected(
    broker: Mosquitto, subscriber_factory: SubscriberFactory, tmp_path: Path, topic_base: str
) -> None:
    """The real CLI twice with the same --client-id and --shard 1/2, 2/2: each connects as
    `<id>-K-of-N` and publishes only its own entries; neither is knocked off."""
    config = tmp_path / "entries.json"
    entry_ids = ["a", "c", "g", "d"]  # shards 1, 2, 1, 2
    write_config(config, [entry(i, f"{topic_base}/{i}", DAY) for i in entry_ids])
    sub = subscriber_factory(f"{topic_base}/#")
    client_id = f"sp-test-{uuid.uuid4().hex[:8]}"
    procs = [
        ServiceProcess(
            cli_args(broker.port, config, "--shard", f"{k}/2", client_id=client_id), tmp_path
        )
        for k in (1, 2)
    ]
    try:
        started = [p.wait_for_event("service_started") for p in procs]
        connected = [p.wait_for_event("mqtt_connected") for p in procs]
        for i in entry_ids:
            sub.wait_for(f"{topic_base}/{i}")
        assert [e["shard"] for e in started] == ["1/2", "2/2"]
        assert [e["active_configs"] for e in started] == [2, 2]
        assert [e["client_id"] for e in connected] == [f"{client_id}-1-of-2", f"{client_id}-2-of-2"]
        assert Counter(m.topic for m in sub.snapshot()) == {
            f"{topic_base}/{i}": 1 for i in entry_ids
        }
        assert not [
            e
            for p in procs
            for e in p.events()
            if e.get("message") in ("mqtt_disconnected", "mqtt_client_id_conflict")
        ]
    finally:
        for p in procs:
            p.stop()


def test_metrics_and_status_name_the_shard(http_service: ServiceStarter, topic_base: str) -> None:
    """/metrics has scheduler_publisher_shard_info{shard="2",shards="3"} 1 and /status a
    `shard` object; the unsharded service has neither."""
    sharded = http_service([entry("a", f"{topic_base}/a", DAY)], shard=Shard(2, 3))
    families = metrics(sharded)
    assert value(families, "scheduler_publisher_shard_info", shard="2", shards="3") == 1
    assert sharded.get_status()["shard"] == {"k": 2, "n": 3, "name": "2-of-3"}


def test_an_unsharded_service_has_no_shard_in_status_or_metrics(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Without --shard, /status has no `shard` key and /metrics no shard_info."""
    plain = http_service([entry("a", f"{topic_base}/a", DAY)])
    assert "scheduler_publisher_shard_info" not in metrics(plain)
    assert "shard" not in plain.get_status()


# ---- shards in one folder: their own files (issue 27 #2) ------------------------------------


def test_two_shards_in_one_folder_keep_their_own_counters_and_log_files(
    broker: Mosquitto, subscriber_factory: SubscriberFactory, tmp_path: Path, topic_base: str
) -> None:
    """Shards 1/2 and 2/2 started in one folder with the default --state-db and --log-file
    (docs/scaling.md's first example) write logs/state-K-of-2.db and
    logs/mqtt_publisher-K-of-2.log, never one shared file; stopped one after the other and
    started again, every templated entry's {{seq}} continues where it stopped."""
    config = tmp_path / "entries.json"
    entry_ids = ["a", "c", "g", "d"]  # shards 1, 2, 1, 2
    topics = {i: f"{topic_base}/{i}" for i in entry_ids}
    write_config(
        config,
        [entry(i, topics[i], 0.3, qos=1, template=True, data={"n": "{{seq}}"}) for i in entry_ids],
    )
    sub = subscriber_factory(f"{topic_base}/#")
    client_id = f"sp-test-{uuid.uuid4().hex[:8]}"

    def start(k: int) -> ServiceProcess:
        args = ["run", "--options-file", "", "--broker", "127.0.0.1", "--port", str(broker.port)]
        args += ["--config", str(config), "--http-port", "0", "--client-id", client_id]
        return ServiceProcess([*args, "--shard", f"{k}/2"], tmp_path)

    def seqs(entry_id: str) -> list[int]:
        return [int(m.json()["n"]) for m in sub.on(topics[entry_id])]

    first_run = [start(1), start(2)]
    try:
        for i in entry_ids:
            sub.wait_for(topics[i], count=3, timeout=20)
        for proc in first_run:  # one after the other: the last one's checkpoint is the last
            proc.signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        for proc in first_run:
            proc.stop()
    barrier(broker.port, sub, f"{topic_base}/barrier")
    last = {i: seqs(i)[-1] for i in entry_ids}
    seen = {i: len(seqs(i)) for i in entry_ids}

    second_run = [start(1), start(2)]
    try:
        for i in entry_ids:
            sub.wait_for(topics[i], count=seen[i] + 1, timeout=20)
        assert {i: seqs(i)[seen[i]] for i in entry_ids} == {i: last[i] + 1 for i in entry_ids}
    finally:
        for proc in second_run:
            proc.stop()

    logs = tmp_path / "logs"
    assert {p.name for p in logs.iterdir() if not p.name.startswith(".")} >= {
        "state-1-of-2.db",
        "state-2-of-2.db",
        "mqtt_publisher-1-of-2.log",
        "mqtt_publisher-2-of-2.log",
    }
    assert not (logs / "state.db").exists()
    assert not (logs / "mqtt_publisher.log").exists()
    for k, proc in ((1, first_run[0]), (2, first_run[1])):
        lines = (logs / f"mqtt_publisher-{k}-of-2.log").read_text().splitlines()
        assert proc.proc.pid in {json.loads(line)["process.pid"] for line in lines}
