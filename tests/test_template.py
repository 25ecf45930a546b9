"""Templated values (`"template": true`): placeholders checked at load time, compiled once,
rendered per publish; end to end against a real Mosquitto, across restarts and into wills."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler_publisher.cli.main import main
from scheduler_publisher.config.loader import PublishConfig, parse_config
from scheduler_publisher.config.template import Moment, Template
from scheduler_publisher.scheduling.plan import diff
from scheduler_publisher.statestore import EntryCounters, SavedState, StateStore, Totals
from scheduler_publisher.stats import Stats
from tests.support import (
    InProcessServices,
    Mosquitto,
    Received,
    ServiceProcess,
    SubscriberFactory,
    cli_args,
    entry,
    offline,
    online,
    wait_until,
    write_config,
)

MOMENT = Moment(now_ms=1_795_878_685_123, seq=7, uptime=42, hostname="gw-01", client_id="sp-gw")


def config(data: dict[str, Any], *, entry_id: str = "t", **fields: Any) -> PublishConfig:
    return PublishConfig(
        id=entry_id, topic="site/t", data=data, interval=1, template=True, **fields
    )


def rendered(data: dict[str, Any], moment: Moment = MOMENT, **fields: Any) -> Any:
    renderer = config(data, **fields).renderer
    assert renderer is not None
    return json.loads(renderer.render(moment))


def problems(*entries: dict[str, Any]) -> list[str]:
    return [str(p) for p in parse_config(json.dumps(list(entries)).encode()).problems]


# ---- rendering (pure) -----------------------------------------------------------------------


def test_each_placeholder_renders_its_value() -> None:
    """Every placeholder alone in a string: numbers for the numeric ones, text for the rest."""
    data = {
        "now": "{{now}}",
        "unix": "{{now_unix}}",
        "ms": "{{now_unix_ms}}",
        "seq": "{{seq}}",
        "up": "{{uptime}}",
        "host": "{{hostname}}",
        "cid": "{{client_id}}",
        "id": "{{entry_id}}",
    }
    assert rendered(data) == {
        "online": 1,
        "now": "2026-11-28T15:11:25.123Z",
        "unix": 1795878685.123,
        "ms": 1795878685123,
        "seq": 7,
        "up": 42,
        "host": "gw-01",
        "cid": "sp-gw",
        "id": "t",
    }


def test_numeric_placeholder_alone_is_a_json_number_inside_text_it_is_text() -> None:
    """`"{{now_unix_ms}}"` becomes a number; within a longer string it is substituted as text."""
    renderer = config(
        {"ts": "{{now_unix_ms}}", "label": "n={{seq}}", "two": "{{seq}}{{seq}}"}
    ).renderer
    assert renderer is not None
    assert renderer.render(MOMENT) == b'{"online":1,"ts":1795878685123,"label":"n=7","two":"77"}'


def test_placeholders_anywhere_in_nested_objects_and_arrays() -> None:
    """Strings at any depth are templated; the same moment fills every slot of one message."""
    data = {
        "readings": [{"ts": "{{now_unix_ms}}", "v": 1.5}, ["{{seq}}", None, True]],
        "meta": {"at": "sent {{now}}", "empty": {}, "list": []},
    }
    assert rendered(data) == {
        "online": 1,
        "readings": [{"ts": 1795878685123, "v": 1.5}, [7, None, True]],
        "meta": {"at": "sent 2026-11-28T15:11:25.123Z", "empty": {}, "list": []},
    }


def test_substituted_text_is_json_escaped() -> None:
    """A client id or entry id with quotes, backslashes or newlines still makes valid JSON."""
    odd = 'a"b\\c\nd'
    moment = Moment(MOMENT.now_ms, 1, 0, "h\tx", odd)
    got = rendered({"who": "{{client_id}}/{{entry_id}}@{{hostname}}"}, moment, entry_id=odd)
    assert got["who"] == f"{odd}/{odd}@h\tx"


def test_percent_signs_and_repeated_placeholders_render_as_written() -> None:
    """Literal "%" survives the compiled format; a placeholder used twice fills both slots."""
    renderer = config({"p": "100% {{seq}}%", "a": "{{uptime}}", "b": "{{seq}}"}).renderer
    assert renderer is not None
    assert renderer.render(MOMENT) == b'{"online":1,"p":"100% 7%","a":42,"b":7}'


def test_keys_are_not_templated() -> None:
    """A placeholder in a key is published as written."""
    assert rendered({"{{seq}}": "{{seq}}"}) == {"online": 1, "{{seq}}": 7}


def test_now_unix_keeps_three_decimals_and_iso_pads_milliseconds() -> None:
    """Whole seconds still carry .000; the ISO form always has three digits of milliseconds."""
    moment = Moment(1_795_878_685_000, 1, 0, "h", "c")
    renderer = config({"u": "{{now_unix}}", "i": "{{now}}"}).renderer
    assert renderer is not None
    assert (
        renderer.render(moment) == b'{"online":1,"u":1795878685.000,"i":"2026-11-28T15:11:25.000Z"}'
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8")),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(st.text(max_size=5).filter(lambda k: k != "online"), json_values, max_size=5)
)
def test_a_template_without_slots_renders_the_static_payload_byte_for_byte(
    data: dict[str, Any],
) -> None:
    """The compiler writes JSON exactly as the static path does, so only the slots differ."""
    static = PublishConfig(id="t", topic="site/t", data=data, interval=1)
    if "{{" not in json.dumps(data, ensure_ascii=False):
        template = Template.compile(static.payload, "t")
        assert template.slots == ()
        assert template.render(MOMENT) == static.payload


def test_static_entry_keeps_braces_literal_and_has_no_renderer() -> None:
    """Without template: true, placeholders are plain text and the entry has no renderer."""
    static = PublishConfig(id="t", topic="site/t", data={"ts": "{{now}}"}, interval=1)
    assert static.renderer is None
    assert static.payload == b'{"online":1,"ts":"{{now}}"}'


def test_template_flag_is_part_of_the_wire_identity() -> None:
    """Turning template on or off is an update of what goes on the wire (a reload sends it)."""
    on = config({"ts": "{{now}}"})
    off = PublishConfig(id="t", topic="site/t", data={"ts": "{{now}}"}, interval=1)
    assert not on.same_wire(off)
    assert on.same_schedule(off)
    assert on.same_wire(config({"ts": "{{now}}"}))


def test_turning_template_on_or_editing_templated_data_is_an_update_on_the_same_grid() -> None:
    """A reload plans either change as an update (published now, same grid), never a
    reschedule."""
    static = PublishConfig(id="t", topic="site/t", data={"ts": "{{now}}"}, interval=1)
    templated = config({"ts": "{{now}}"})
    edited = config({"ts": "{{now_unix_ms}}"})
    for before, after in ((static, templated), (templated, static), (templated, edited)):
        plan = diff({"t": before}, {"t": after})
        assert (plan.updated, plan.rescheduled, plan.added, plan.removed) == ((after,), (), (), ())


# ---- validation -------------------------------------------------------------------------------


def test_unknown_placeholder_names_the_entry_and_the_path_inside_data() -> None:
    """The error says which entry, where in data, what was found and what is allowed."""
    found = problems(
        entry("ok", "a/b"),
        entry(
            "t", "a/c", template=True, data={"readings": [{"ts": "{{now}}"}, {"ts": "{{nope}}"}]}
        ),
    )
    assert found == [
        'entry 2 (id "t"): data.readings[1].ts: unknown placeholder {{nope}}; expected one of '
        "{{now}}, {{now_unix}}, {{now_unix_ms}}, {{seq}}, {{uptime}}, {{hostname}}, "
        '{{client_id}}, {{entry_id}}, got "{{nope}}"'
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{{now", 'unclosed placeholder {{now: "{{" without "}}"'),
        (
            "x {{ now }}",
            "malformed placeholder {{ now }}: no spaces inside the braces (write {{now}})",
        ),
        ("{{}}", "unknown placeholder {{}}"),
        ("{{{now}}}", "unknown placeholder {{{now}}"),
        ("{{NOW}}", "unknown placeholder {{NOW}}"),
    ],
)
def test_malformed_placeholders_are_errors(text: str, says: str) -> None:
    """Unclosed, spaced, empty, mis-cased placeholders: each an error at its path."""
    found = problems(entry("t", "a/b", template=True, data={"odd key": [text]}))
    assert len(found) == 1, found
    assert found[0].startswith(f'entry 1 (id "t"): data["odd key"][0]: {says}; expected one of')


def test_every_bad_placeholder_is_reported_and_the_entry_rejected() -> None:
    """All bad strings of the entry are listed; the entry is not loaded, the others are."""
    result = parse_config(
        json.dumps(
            [
                entry("t", "a/b", template=True, data={"a": "{{x}}", "b": {"c": "{{y}}"}}),
                entry("fine", "a/c", template=True, data={"a": "{{seq}}"}),
            ]
        ).encode()
    )
    assert [p.message.split(":")[0] for p in result.errors] == ["data.a", "data.b.c"]
    assert {p.field for p in result.errors} == {"data"}
    assert [e.id for e in result.entries] == ["fine"]
    assert result.invalid_ids == {"t"}


def test_constructing_a_templated_config_with_a_bad_placeholder_raises() -> None:
    """PublishConfig itself refuses what the file validator refuses."""
    with pytest.raises(ValueError, match=r"data\.x: unknown placeholder \{\{nope\}\}"):
        config({"x": "{{nope}}"})


def test_validate_prints_the_placeholder_error_at_its_entry_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scheduler-publisher validate` reports a bad placeholder with its data path."""
    config_file = tmp_path / "entries.json"
    write_config(config_file, [entry("t", "a/b", template=True, data={"r": [{"ts": "{{now"}]})])
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--config", str(config_file), "--options-file", ""])
    assert exited.value.code == 1
    assert (
        'error: entry 1 (id "t"): data.r[0].ts: unclosed placeholder {{now'
        in capsys.readouterr().err
    )


def test_placeholder_without_template_is_a_warning_that_suggests_it() -> None:
    """A known placeholder in a static entry loads (braces are literal), with a hint."""
    result = parse_config(json.dumps([entry("s", "a/b", data={"m": ["{{seq}}"]})]).encode())
    assert [e.id for e in result.entries] == ["s"]
    assert [str(p) for p in result.warnings] == [
        'entry 1 (id "s"): data.m[0]: {{seq}} is published as literal text because the entry '
        'has no "template": true (did you mean "template": true?)'
    ]


def test_unknown_braces_without_template_are_not_even_a_warning() -> None:
    """Other brace text in a static entry (Mustache, Jinja) is somebody's payload: no finding."""
    assert problems(entry("s", "a/b", data={"m": "{{name}} {%x%}"})) == []


def test_placeholder_in_a_key_of_a_templated_entry_is_a_warning() -> None:
    """Keys are not templated: the service says so instead of silently ignoring it."""
    assert problems(entry("t", "a/b", template=True, data={"{{now}}": 1})) == [
        'entry 1 (id "t"): data["{{now}}"]: keys are not templated; the key is published as written'
    ]


def test_template_must_be_a_boolean() -> None:
    """template: "yes" is refused as a field error, without placeholder noise."""
    assert problems(entry("t", "a/b", template="yes", data={"x": "{{nope}}"})) == [
        'entry 1 (id "t"): template must be true or false, got "yes"'
    ]


# ---- seq bookkeeping (pure) -------------------------------------------------------------------


def test_seq_counts_from_one_and_restarts_for_a_removed_and_readded_entry() -> None:
    """next_seq counts per entry from 1; an entry removed and added again starts over."""
    stats = Stats()
    stats.add_entry("a")
    stats.add_entry("b")
    assert [stats.next_seq("a") for _ in range(3)] == [1, 2, 3]
    assert stats.next_seq("b") == 1
    stats.remove_entry("a")
    stats.add_entry("a")
    assert stats.next_seq("a") == 1


def test_seq_is_checkpointed_and_restored(tmp_path: Path) -> None:
    """The state DB keeps each entry's seq; a new run continues after it."""
    store = StateStore(tmp_path / "state.db")
    store.open()
    store.checkpoint(SavedState(Totals(), {"a": EntryCounters(5, seq=41)}), now=1.0)
    store.close()
    stats = Stats()
    stats.restore(store.open())
    store.close()
    stats.add_entry("a")
    assert stats.next_seq("a") == 42


# ---- on the wire -----------------------------------------------------------------------------


def seqs(messages: list[Received]) -> list[int]:
    return [m.json()["seq"] for m in messages]


def test_templated_messages_carry_increasing_seq_and_the_current_time(
    broker: Mosquitto,
    services: InProcessServices,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
) -> None:
    """seq goes 1, 2, 3 ...; ts is a JSON number near the test's own clock; a static entry
    next to it keeps its braces."""
    sub = subscriber_factory(f"{topic_base}/#")
    before = time.time()
    services.start(
        broker.port,
        [
            entry(
                "t",
                f"{topic_base}/t",
                0.2,
                template=True,
                data={
                    "seq": "{{seq}}",
                    "ts": "{{now_unix_ms}}",
                    "at": "{{now}}",
                    "who": "{{entry_id}}@{{client_id}}",
                },
            ),
            entry("s", f"{topic_base}/s", 0.2, data={"seq": "{{seq}}"}),
        ],
        broker={"client_id": "sp-tmpl"},
        watch=False,
    )
    got = sub.wait_for(f"{topic_base}/t", count=4, timeout=20)
    after = time.time()
    assert seqs(got) == list(range(1, len(got) + 1))
    for message in got:
        body = message.json()
        assert isinstance(body["ts"], int)
        assert before * 1000 - 2000 <= body["ts"] <= after * 1000 + 2000  # a generous window
        assert body["at"].endswith("Z")
        assert abs(_iso_ms(body["at"]) - body["ts"]) <= 1  # one clock reading per message
        assert body["who"] == "t@sp-tmpl"
    static = sub.wait_for(f"{topic_base}/s", timeout=10)[0]
    assert static.payload == b'{"online":1,"seq":"{{seq}}"}'


def _iso_ms(text: str) -> int:
    from datetime import datetime  # noqa: PLC0415 - only this helper parses dates

    return round(datetime.fromisoformat(text).timestamp() * 1000)


def test_seq_continues_after_a_restart_with_the_same_state_db(
    broker: Mosquitto, tmp_path: Path, topic_base: str, subscriber_factory: SubscriberFactory
) -> None:
    """A graceful restart with the same state DB continues seq where the last run stopped."""
    sub = subscriber_factory(f"{topic_base}/#")
    topic = f"{topic_base}/t"
    entries = [entry("t", topic, 0.2, template=True, data={"seq": "{{seq}}"})]
    config_file, db = tmp_path / "config.json", tmp_path / "state.db"
    first_run = InProcessServices(tmp_path)
    first = first_run.start(broker.port, entries, config=config_file, state_db=db, watch=False)
    sub.wait_for(topic, count=3, timeout=20)
    first_run.close()
    last = first.stats.entries["t"].seq
    assert max(seqs(sub.on(topic))) <= last
    seen = len(sub.on(topic))

    second_run = InProcessServices(tmp_path)
    try:
        second_run.start(broker.port, entries, config=config_file, state_db=db, watch=False)
        wait_until(lambda: len(sub.on(topic)) >= seen + 2, 20, message="the second run")
        assert seqs(sub.on(topic)[seen:])[:2] == [last + 1, last + 2]
    finally:
        second_run.close()


def test_seq_keeps_counting_through_a_data_edit(
    broker: Mosquitto,
    services: InProcessServices,
    tmp_path: Path,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
) -> None:
    """Editing a templated entry's data is an update: its seq carries on, no restart at 1."""
    sub = subscriber_factory(f"{topic_base}/#")
    topic = f"{topic_base}/t"
    config_file = tmp_path / "edit.json"
    service = services.start(
        broker.port,
        [entry("t", topic, 0.2, template=True, data={"v": 1, "seq": "{{seq}}"})],
        config=config_file,
        watch=False,
    )
    sub.wait_for(topic, count=2, timeout=20)
    write_config(
        config_file, [entry("t", topic, 0.2, template=True, data={"v": 2, "seq": "{{seq}}"})]
    )
    assert service.reload_config()
    edited = sub.wait_for(topic, where=lambda m: m.json()["v"] == 2, count=2, timeout=20)
    all_seqs = seqs(sub.on(topic))
    assert all_seqs == list(range(1, len(all_seqs) + 1))  # no restart, no gap
    assert edited[0].json()["seq"] > 2


def test_will_holds_the_values_of_the_connect_not_of_the_death(
    broker: Mosquitto,
    tmp_path: Path,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    processes: list[ServiceProcess],
) -> None:
    """SIGKILL: the broker publishes the will rendered at CONNECT (its time, seq 0 and client
    id), not values of the moment the process died."""
    topic = f"{topic_base}/t"
    sub = subscriber_factory(topic)
    config_file = tmp_path / "config.json"
    write_config(
        config_file,
        [
            entry(
                "t",
                topic,
                0.2,
                lwt=True,
                template=True,
                qos=1,
                data={"ts": "{{now_unix_ms}}", "seq": "{{seq}}", "cid": "{{client_id}}"},
            )
        ],
    )
    client_id = f"sp-will-{uuid.uuid4().hex[:8]}"
    before_ms = time.time() * 1000
    proc = ServiceProcess(
        cli_args(
            broker.port,
            config_file,
            client_id=client_id,
            state_db=tmp_path / "state.db",
            backoff=(0.2, 1),
        ),
        cwd=tmp_path,
    )
    processes.append(proc)
    alive = sub.wait_for(topic, where=online, count=5, timeout=30)
    proc.signal(signal.SIGKILL)
    proc.wait(10)

    will = sub.wait_for(topic, where=offline, timeout=15)[0].json()
    first = alive[0].json()
    assert will["cid"] == f"{client_id}/t"
    assert will["seq"] == 0  # rendered before the first publish of the connection
    assert before_ms - 2000 <= will["ts"] <= first["ts"]  # the connect came before the birth
    assert will["ts"] < alive[-1].json()["ts"]  # not the time of death
