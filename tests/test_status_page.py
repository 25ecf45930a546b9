"""The status page at `/` in a real browser (Debian's chromium, driven by Selenium) against an
in-process service and a real Mosquitto; and the `/status` paging parameters over HTTP.

One headless browser serves the whole module: chromium is heavy and the machine is small.
Each test saves a screenshot under its tmp_path. With SP_README_SCREENSHOT=1 the first test
also writes docs/status-page.png, the picture in the README; CI leaves the tree alone.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.config.shard import Shard
from scheduler_publisher.endpoints import Endpoint
from scheduler_publisher.ops.http import PAGE_POLICY
from scheduler_publisher.service import PublisherService
from tests.support import (
    REPO,
    InProcessServices,
    Mosquitto,
    ServiceStarter,
    SubscriberFactory,
    call,
    entry,
    free_port,
    request,
    unique_topic,
    wait_until,
    write_config,
)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install -e '.[test]'")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
DESKTOP = (1280, 900)
PHONE = (390, 844)
WAIT = 15.0
DASH = "\N{EN DASH}"  # between the first and last row number in the pager


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless chromium for the module, from Debian's packages (scripts/setup installs
    them). The paths are given, so Selenium never tries to download a browser or driver."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "chromium and chromium-driver are missing: run scripts/setup "
            "(apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--force-device-scale-factor=1",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: WebDriver, tmp_path: Path) -> Iterator[Callable[[PublisherService], WebDriver]]:
    """Opens the page of a service at desktop size; a screenshot of the last state at the end."""

    def open_page(service: PublisherService) -> WebDriver:
        browser.set_window_size(*DESKTOP)
        browser_log(browser)  # drop what earlier tests left
        browser.get(f"http://127.0.0.1:{service.http.port}/")
        wait_until(
            lambda: browser.execute_script("return document.body.dataset.ready"),
            WAIT,
            message="the page's first poll rendered",
        )
        return browser

    yield open_page
    browser.save_screenshot(str(tmp_path / "status-page.png"))


# ---- helpers ----------------------------------------------------------------------------


def text(browser: WebDriver, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


def rows(browser: WebDriver) -> list[list[str]]:
    """The table as text, read in one script call (the page may replace text between calls)."""
    found = browser.execute_script(
        "return [...document.querySelectorAll('#rows tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    return [list(r) for r in found]


def column(browser: WebDriver, index: int) -> list[str]:
    return [r[index] for r in rows(browser)]


def wait_rows(
    browser: WebDriver, predicate: Callable[[list[list[str]]], Any], message: str
) -> list[list[str]]:
    def check() -> list[list[str]] | None:
        table = rows(browser)
        return table if predicate(table) else None

    result: list[list[str]] = wait_until(check, WAIT, message=message)
    return result


def visible(browser: WebDriver, element_id: str) -> bool:
    try:
        return bool(browser.find_element(By.ID, element_id).is_displayed())
    except StaleElementReferenceException:
        return False


def sort_button(browser: WebDriver, key: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f"th[data-sort='{key}'] button")


def browser_log(browser: WebDriver) -> list[dict[str, Any]]:
    """The console entries since the last call (Chrome hands each one out once)."""
    log: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]  # selenium leaves get_log unannotated
    return log


def console_errors(browser: WebDriver) -> list[str]:
    return [e["message"] for e in browser_log(browser) if e["level"] == "SEVERE"]


# WCAG 2.1 contrast (1.4.3, AA) of every visible piece of text against the background it is
# drawn on: 4.5:1, or 3:1 for large text. Returns what falls short.
CONTRAST_CHECK = """
const channel = (v) => {
  v /= 255;
  return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
};
const rgba = (s) => (s.match(/[\\d.]+/g) || [0, 0, 0, 0]).map(Number).concat([1]).slice(0, 4);
const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
const over = ([r, g, b, a], [R, G, B]) =>
  [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a), 1];
function background(el) {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c[3] > 0) layers.push(c);
    if (c[3] === 1) break;
  }
  return layers.reverse().reduce((below, c) => over(c, below), [255, 255, 255, 1]);
}
const short = [];
for (const el of document.querySelectorAll('body *')) {
  const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!(own || el.matches('input, select')) || !el.getClientRects().length) continue;
  const style = getComputedStyle(el);
  if (style.visibility === 'hidden' || el.closest('[hidden], .sr-only')) continue;
  const bg = background(el);
  const fg = over(rgba(style.color), bg);
  const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
  const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  if (ratio < needed) short.push(`${el.tagName}#${el.id}.${el.className}: ${ratio.toFixed(2)}`);
}
return short;
"""


def contrast_failures(browser: WebDriver) -> list[str]:
    return list(browser.execute_script(CONTRAST_CHECK))


def get_json(port: int, path: str) -> tuple[int, Any]:
    reply = call(port, path)
    return reply.status, reply.json()


ID, TOPIC, SCHEDULE, QOS, RETAIN, LWT, LAST, PUBLISHED, ERRORS = range(9)
CONNECTION = 12


# ---- the page in the browser --------------------------------------------------------------


def test_page_shows_the_service_and_updates_live(
    http_service: ServiceStarter,
    subscriber_factory: SubscriberFactory,
    page: Callable[[PublisherService], WebDriver],
) -> None:
    """The page shows connection, broker, client id, totals and one row per entry, with
    entry text as text (never markup), and its counters rise as the service publishes."""
    topic_base = unique_topic("home")  # short: the topics are in the README's screenshot
    hostile = f"{topic_base}/<img src=x onerror=alert(1)>"
    sub = subscriber_factory(f"{topic_base}/#")
    service = http_service(
        [
            entry("kitchen", f"{topic_base}/kitchen", 0.3, qos=1, retain=True),
            entry("porch", hostile, 0.5),
            entry("garage", f"{topic_base}/garage", 0.4, lwt=True),
        ]
    )
    browser = page(service)
    table = wait_rows(browser, lambda t: len(t) == 3, "three rows")
    assert [r[ID] for r in table] == ["garage", "kitchen", "porch"]
    by_id = {r[ID]: r for r in table}
    assert by_id["kitchen"][TOPIC] == f"{topic_base}/kitchen"
    assert by_id["porch"][TOPIC] == hostile
    assert not browser.find_elements(By.CSS_SELECTOR, "#rows img")
    assert by_id["kitchen"][QOS : LWT + 1] == ["1", "yes", "no"]
    assert by_id["garage"][LWT] == "yes"
    assert by_id["kitchen"][CONNECTION] == "main"
    assert by_id["kitchen"][SCHEDULE] == "every 0.3s"
    wait_until(lambda: text(browser, "conn-state") == "Connected", WAIT, message="connected")
    assert text(browser, "broker") == f"mqtt://127.0.0.1:{service.settings.broker.port}"
    assert text(browser, "client-id") == service.settings.broker.client_id
    assert text(browser, "config-path") == str(service.settings.config_path)
    wait_rows(
        browser,
        lambda t: t[0][CONNECTION] == "connected",
        "the lwt entry's connection shown as connected",
    )

    sub.wait_for(f"{topic_base}/kitchen", count=3)
    before = int(column(browser, PUBLISHED)[1].replace(",", ""))
    sub.wait_for(f"{topic_base}/kitchen", count=before + 3)
    wait_rows(
        browser,
        lambda t: int(t[1][PUBLISHED].replace(",", "")) >= before + 3,
        "kitchen's published count rose without a reload",
    )
    wait_until(
        lambda: int(text(browser, "t-published").replace(",", "")) >= before + 3,
        WAIT,
        message="the total rose",
    )
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#rate-chart polyline"),
        WAIT,
        message="the rate chart drawn",
    )
    assert float(text(browser, "rate-now")) > 0
    assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1
    assert console_errors(browser) == []  # among them: any Content-Security-Policy refusal

    if os.environ.get("SP_README_SCREENSHOT"):
        wait_until(
            lambda: (
                browser.execute_script(
                    "return document.querySelector('#rate-chart polyline').points.length"
                )
                >= 8
            ),
            60,
            message="a minute of the rate chart",
        )
        browser.save_screenshot(str(REPO / "docs" / "status-page.png"))


def test_the_header_names_the_broker_in_use_of_a_failover_list(
    http_service: ServiceStarter, broker: Mosquitto, page: Callable[[PublisherService], WebDriver]
) -> None:
    """A list whose first broker is down: once the service has moved on, the header shows the
    broker in use, which of how many, and the list."""
    dead = Endpoint("mqtt", "127.0.0.1", free_port())
    live = Endpoint("mqtt", "127.0.0.1", broker.port)
    service = http_service(
        [entry("e", f"{unique_topic('failover')}/e", 1)], broker={"endpoints": (dead, live)}
    )
    browser = page(service)
    shown = f"{live.url} (2 of 2: {dead.url}, {live.url})"
    wait_until(lambda: text(browser, "broker") == shown, WAIT * 2, message=shown)
    wait_until(lambda: text(browser, "conn-state") == "Connected", WAIT, message="connected")


def test_page_shows_a_cron_entry_expression_and_time_zone(
    http_service: ServiceStarter, page: Callable[[PublisherService], WebDriver]
) -> None:
    """A cron entry's Schedule cell shows its expression and time zone."""
    topic_base = unique_topic("cron")
    nightly = {
        "id": "nightly",
        "topic": f"{topic_base}/nightly",
        "data": {},
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
    }
    service = http_service([entry("tick", f"{topic_base}/tick", 60), nightly])
    table = wait_rows(page(service), lambda t: len(t) == 2, "two rows")
    by_id = {r[ID]: r for r in table}
    assert by_id["nightly"][SCHEDULE] == "cron 30 2 * * * (Europe/Berlin)"
    assert by_id["tick"][SCHEDULE] == "every 1m"


def test_many_entries_are_paged_filtered_and_sorted(
    http_service: ServiceStarter, page: Callable[[PublisherService], WebDriver], topic_base: str
) -> None:
    """With 2,000 entries the DOM holds one page of rows; the filter, the keyboard-driven
    sort (aria-sort follows) and the pager ask the server for the right page."""
    service = http_service([entry(f"e{i:04d}", f"{topic_base}/{i:04d}", 3600) for i in range(2000)])
    browser = page(service)
    table = wait_rows(browser, lambda t: len(t) == 50, "one page of 50 rows")
    assert [r[ID] for r in table] == [f"e{i:04d}" for i in range(50)]
    assert text(browser, "page-info") == f"1{DASH}50 of 2,000"
    assert table[0][SCHEDULE] == "every 1h"

    browser.find_element(By.ID, "next").click()
    wait_rows(browser, lambda t: t[0][ID] == "e0050", "the second page")
    assert text(browser, "page-info") == f"51{DASH}100 of 2,000"
    assert len(rows(browser)) == 50

    header = sort_button(browser, "id")
    header.send_keys(Keys.ENTER)  # already sorted by id ascending: Enter turns it around
    wait_rows(browser, lambda t: t[0][ID] == "e1999", "sorted by id, descending")
    th = browser.find_element(By.CSS_SELECTOR, "th[data-sort='id']")
    assert th.get_attribute("aria-sort") == "descending"
    assert (
        browser.find_element(By.CSS_SELECTOR, "th[data-sort='topic']").get_attribute("aria-sort")
        is None
    )

    box = browser.find_element(By.ID, "filter")
    box.send_keys("e012")  # e0120 .. e0129
    table = wait_rows(browser, lambda t: len(t) == 10, "ten matching rows")
    assert [r[ID] for r in table] == [f"e{i:04d}" for i in range(129, 119, -1)]
    assert text(browser, "page-info") == f"1{DASH}10 of 10 matching (of 2,000)"
    assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None
    assert browser.execute_script("return document.querySelectorAll('#rows tr').length") == 10
    asked = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
        ".filter(n => new URL(n).pathname === '/status')"
    )
    assert asked
    assert all("limit=50" in url for url in asked)  # never the whole snapshot


def test_the_problem_banner_follows_the_entries_file(
    http_service: ServiceStarter,
    page: Callable[[PublisherService], WebDriver],
    config_path: Path,
    topic_base: str,
    tmp_path: Path,
) -> None:
    """A broken edit of the entries file shows a banner with the problem; fixing it hides it."""
    good = [entry("one", f"{topic_base}/one", 5)]
    service = http_service(good)
    browser = page(service)
    assert not visible(browser, "problem")
    config_path.write_text('[{"id": "one", "topic": ')
    wait_until(lambda: visible(browser, "problem"), WAIT, message="the problem banner")
    assert "config.json" in text(browser, "problem-text")
    assert contrast_failures(browser) == []
    browser.save_screenshot(str(tmp_path / "status-page-problem.png"))
    assert text(browser, "problem").startswith("Config problem:")
    write_config(config_path, [*good, entry("two", f"{topic_base}/two", 5)])
    wait_until(lambda: not visible(browser, "problem"), WAIT, message="the banner gone")
    wait_rows(browser, lambda t: [r[ID] for r in t] == ["one", "two"], "the new entry's row")


def test_the_banner_lists_a_partly_bad_edits_errors_and_the_entries_it_keeps_out(
    http_service: ServiceStarter,
    page: Callable[[PublisherService], WebDriver],
    config_path: Path,
    topic_base: str,
    tmp_path: Path,
) -> None:
    """An edit with invalid entries shows the banner too: each error with entry, id, field
    and line, the invalid entries not running, and those running their last good version;
    a fixed file hides it."""
    good = [entry("a", f"{topic_base}/a", 5), entry("b", f"{topic_base}/b", 5)]
    service = http_service(good)
    browser = page(service)
    wait_rows(browser, lambda t: [r[ID] for r in t] == ["a", "b"], "both rows")
    write_config(
        config_path,
        [*good[:1], entry("b", f"{topic_base}/b", 0), entry("c", f"{topic_base}/c", 5, qos=5)],
    )
    wait_until(lambda: visible(browser, "problem"), WAIT, message="the problem banner")
    assert text(browser, "problem-text") == "2 invalid entries in the file"
    assert not visible(browser, "problem-kept")
    errors = text(browser, "problem-errors")
    assert 'entry 2 (id "b"): interval must be' in errors
    assert 'entry 3 (id "c"): qos must be' in errors
    assert "(line " in errors
    assert text(browser, "problem-skipped") == "Not running (invalid): c (entry 3)"
    assert text(browser, "problem-held") == "Running their last good version: b"
    assert contrast_failures(browser) == []
    browser.save_screenshot(str(tmp_path / "status-page-entry-errors.png"))
    write_config(config_path, good)
    wait_until(lambda: not visible(browser, "problem"), WAIT, message="the banner gone")


def test_the_config_card_names_the_shard(
    http_service: ServiceStarter, page: Callable[[PublisherService], WebDriver], topic_base: str
) -> None:
    """A service run with --shard 2/3 says "Shard 2 of 3" in the config card and lists only
    its own entries ("c" is shard 2's of 3, "a" shard 1's)."""
    service = http_service(
        [entry("a", f"{topic_base}/a", 5), entry("c", f"{topic_base}/c", 5)], shard=Shard(2, 3)
    )
    browser = page(service)
    wait_rows(browser, lambda t: [r[ID] for r in t] == ["c"], "shard 2's one entry")
    assert visible(browser, "config-shard-row")
    assert text(browser, "config-shard") == "2 of 3"


def test_an_unsharded_page_shows_no_shard(
    http_service: ServiceStarter, page: Callable[[PublisherService], WebDriver], topic_base: str
) -> None:
    """Without --shard the config card has no Shard line."""
    service = http_service([entry("a", f"{topic_base}/a", 5)])
    browser = page(service)
    wait_rows(browser, lambda t: len(t) == 1, "the entry's row")
    assert not visible(browser, "config-shard-row")


def test_page_says_when_the_broker_or_the_service_is_gone(
    http_service: ServiceStarter,
    broker: Mosquitto,
    page: Callable[[PublisherService], WebDriver],
    topic_base: str,
) -> None:
    """The badge turns to Disconnected with the broker down; with the service gone the page
    keeps its last rows and says it cannot read /status."""
    service = http_service([entry("one", f"{topic_base}/one", 5)])
    browser = page(service)
    wait_until(lambda: text(browser, "conn-state") == "Connected", WAIT, message="connected")
    broker.stop()
    wait_until(
        lambda: text(browser, "conn-state") == "Disconnected",
        WAIT,
        message="the badge says disconnected",
    )
    assert "badge-down" in str(browser.find_element(By.ID, "conn-state").get_attribute("class"))
    wait_rows(browser, lambda t: t[0][CONNECTION] == "main: down", "the entry's link down")
    assert contrast_failures(browser) == []
    service.stop()
    wait_until(lambda: visible(browser, "fetch-error"), WAIT, message="the fetch error")
    assert text(browser, "fetch-error").startswith("Cannot read /status")
    assert column(browser, ID) == ["one"]


def test_reload_button_without_a_token(
    http_service: ServiceStarter,
    page: Callable[[PublisherService], WebDriver],
    config_path: Path,
    topic_base: str,
) -> None:
    """Without --http-token-file the button reloads at once (no token field) and says so; a
    refused reload says why."""
    service = http_service([entry("one", f"{topic_base}/one", 5)], watch=False)
    browser = page(service)
    assert not visible(browser, "token-row")
    write_config(
        config_path, [entry("one", f"{topic_base}/one", 5), entry("two", f"{topic_base}/two", 5)]
    )
    browser.find_element(By.ID, "reload").click()
    wait_until(
        lambda: text(browser, "reload-result") == "Reloaded: 2 entries active.",
        WAIT,
        message="the reload result",
    )
    wait_rows(browser, lambda t: len(t) == 2, "the reloaded entry's row")
    assert service.active_configs == 2

    config_path.write_text("[{]")
    browser.find_element(By.ID, "reload").click()
    wait_until(
        lambda: text(browser, "reload-result").startswith("Not applied: "),
        WAIT,
        message="the refused reload's reason",
    )
    assert "not valid JSON" in text(browser, "reload-result")
    wait_until(lambda: visible(browser, "problem"), WAIT, message="the problem banner")
    assert len(rows(browser)) == 2  # the last good entries run on


def test_reload_button_with_a_token(
    http_service: ServiceStarter,
    page: Callable[[PublisherService], WebDriver],
    config_path: Path,
    topic_base: str,
) -> None:
    """With a token the page asks for it (a password field), refuses a wrong one as the server
    does, and reloads with the right one sent as a bearer token."""
    service = http_service(
        [entry("one", f"{topic_base}/one", 5)], watch=False, http_token="s3cret-token"
    )
    browser = page(service)
    assert visible(browser, "token-row")
    field = browser.find_element(By.ID, "token")
    assert field.get_attribute("type") == "password"
    write_config(
        config_path, [entry("one", f"{topic_base}/one", 5), entry("two", f"{topic_base}/two", 5)]
    )
    button = browser.find_element(By.ID, "reload")

    button.click()
    wait_until(
        lambda: text(browser, "reload-result") == "Enter the reload token first.",
        WAIT,
        message="asked for the token",
    )
    field.send_keys("wrong")
    button.click()
    wait_until(
        lambda: text(browser, "reload-result") == "Wrong token.",
        WAIT,
        message="a wrong token refused",
    )
    assert service.active_configs == 1

    field.clear()
    field.send_keys("s3cret-token", Keys.ENTER)  # Enter in the field submits the form
    wait_until(
        lambda: text(browser, "reload-result") == "Reloaded: 2 entries active.",
        WAIT,
        message="reloaded with the token",
    )
    assert service.active_configs == 2


def test_entries_named_like_object_properties_show_their_own_state(
    http_service: ServiceStarter,
    broker: Mosquitto,
    page: Callable[[PublisherService], WebDriver],
    topic_base: str,
) -> None:
    """lwt entries named `constructor`, `__proto__`, `toString`... show their own connection:
    connected while the broker is up, down with the reason once it is gone; never a value
    every JavaScript object inherits (`down: function Object() { [native code] }`)."""
    ids = ["constructor", "__proto__", "toString", "hasOwnProperty", "valueOf", "plain"]
    service = http_service([entry(i, f"{topic_base}/{n}", 5, lwt=True) for n, i in enumerate(ids)])
    browser = page(service)
    table = wait_rows(
        browser,
        lambda t: len(t) == len(ids) and all(r[CONNECTION] == "connected" for r in t),
        "every lwt entry shown connected",
    )
    assert sorted(r[ID] for r in table) == sorted(ids)
    assert all(r[TOPIC].startswith(f"{topic_base}/") for r in table)

    broker.stop()
    table = wait_rows(
        browser,
        lambda t: all(r[CONNECTION].startswith("down: ") for r in t),
        "every lwt entry shown down",
    )
    (reason,) = {r[CONNECTION] for r in table}  # the same outage for all, the plain one too
    assert not any(word in reason for word in ("function", "[object", "native code")), reason
    assert console_errors(browser) == []


def test_a_quarantined_entry_shows_why(
    page: Callable[[PublisherService], WebDriver], tmp_path: Path, topic_base: str
) -> None:
    """An entry the broker refuses (a payload over its max_packet_size) shows as quarantined,
    with the broker's reason; the others keep their connection."""
    strict = Mosquitto(tmp_path, extra="max_packet_size 400")
    strict.start()
    services = InProcessServices(tmp_path)
    try:
        big = entry("big", f"{topic_base}/big", 1, data={"blob": "x" * 600})
        service = services.start(
            strict.port,
            [entry("small", f"{topic_base}/small", 1), big],
            http_port=free_port(),
            http_host="127.0.0.1",
        )
        browser = page(service)
        table = wait_rows(
            browser,
            lambda t: any(r[ID] == "big" and r[CONNECTION].startswith("quarantined: ") for r in t),
            "the refused entry shown quarantined",
        )
        shown = {r[ID]: r[CONNECTION] for r in table}
        assert "the broker dropped the connection" in shown["big"], shown
        assert shown["small"] == "main", shown
    finally:
        services.close()
        strict.stop()


class _AttackerPage(BaseHTTPRequestHandler):
    """Another site's page: it posts to the service's /reload with fetch() and a form."""

    target = ""

    def do_GET(self) -> None:
        body = ATTACKER_PAGE.replace("TARGET", self.target).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


ATTACKER_PAGE = """<!doctype html><html><body>
<form id="f" method="POST" action="TARGET" enctype="text/plain"><input name="a" value="b"></form>
<script>
fetch("TARGET", {method: "POST", mode: "no-cors"})
  .catch(() => null)
  .then(() => document.getElementById("f").submit());
</script></body></html>"""


def test_another_site_s_page_cannot_reload(
    http_service: ServiceStarter,
    browser: WebDriver,
    config_path: Path,
    topic_base: str,
) -> None:
    """Without a token, a page of another origin that posts to /reload (fetch in no-cors mode,
    then a form) reloads nothing: the browser shows the refusal."""
    service = http_service([entry("one", f"{topic_base}/one", 5)], watch=False)
    write_config(
        config_path, [entry("one", f"{topic_base}/one", 5), entry("two", f"{topic_base}/two", 5)]
    )
    target = f"http://127.0.0.1:{service.http.port}/reload"
    handler = type("Attacker", (_AttackerPage,), {"target": target})
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{attacker.server_address[1]}/")
        wait_until(
            lambda: browser.current_url == target, WAIT, message="the form posted to /reload"
        )
        wait_until(
            lambda: "refused" in browser.find_element(By.TAG_NAME, "body").text,
            WAIT,
            message="the refusal shown",
        )
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert service.active_configs == 1
    assert get_json(service.http.port, "/status")[1]["active_configs"] == 1


def test_page_passes_an_accessibility_check(
    http_service: ServiceStarter, page: Callable[[PublisherService], WebDriver], topic_base: str
) -> None:
    """Every control has a label, every sortable header is a button in a header with
    aria-sort, text meets WCAG AA contrast, and the filter and sort work from the keyboard."""
    service = http_service(
        [
            entry("b", f"{topic_base}/b", 60),
            entry("a", f"{topic_base}/a", 60),
            entry("c", f"{topic_base}/c", 60),
        ],
        http_token="t",
    )
    browser = page(service)
    wait_rows(browser, lambda t: len(t) == 3, "three rows")
    assert browser.execute_script("return document.documentElement.lang") == "en"
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select')]"
        ".filter(e => !e.labels.length || !e.labels[0].textContent.trim()).map(e => e.id)"
    )
    assert unlabelled == []
    headers = browser.find_elements(By.CSS_SELECTOR, "th[data-sort]")
    assert len(headers) == 12
    assert all(h.find_element(By.TAG_NAME, "button").text for h in headers)
    assert contrast_failures(browser) == []

    keyboard = ActionChains(browser)  # keys go to whatever has the focus, as a person types
    browser.execute_script("document.activeElement.blur()")
    for _ in range(40):  # Tab from the top until the filter box has the focus
        keyboard.send_keys(Keys.TAB).perform()
        if browser.switch_to.active_element.get_attribute("id") == "filter":
            break
    else:
        pytest.fail("Tab never reached the filter box")
    keyboard.send_keys("a").perform()  # matches every topic, and the id `a`
    keyboard.send_keys(Keys.TAB).perform()  # on to the first sort button
    assert browser.switch_to.active_element.text == "Id"
    keyboard.send_keys(Keys.SPACE).perform()
    wait_rows(browser, lambda t: [r[ID] for r in t] == ["c", "b", "a"], "id descending")
    assert headers[0].get_attribute("aria-sort") == "descending"


def test_times_are_told_by_the_service_s_clock(
    http_service: ServiceStarter,
    browser: WebDriver,
    page: Callable[[PublisherService], WebDriver],
    topic_base: str,
) -> None:
    """With the browser's clock an hour ahead of the gateway's, "last published" still says
    seconds ago, not an hour: the page reads the service's clock from each answer's Date."""
    ahead = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": "const realNow = Date.now; Date.now = () => realNow() + 3600e3;"},
    )
    try:
        service = http_service([entry("one", f"{topic_base}/one", 0.5)])
        page(service)
        assert browser.execute_script("return Date.now() - new Date().getTime()") > 3500e3
        wait_rows(browser, lambda t: t[0][PUBLISHED] not in ("0", "1"), "a few publishes")
        assert rows(browser)[0][LAST] in ("just now", "1s ago", "2s ago", "3s ago")
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": ahead["identifier"]}
        )


def test_page_fits_a_phone(
    http_service: ServiceStarter,
    page: Callable[[PublisherService], WebDriver],
    topic_base: str,
    tmp_path: Path,
) -> None:
    """On a phone-sized window the page does not scroll sideways and each entry is a block of
    labelled fields."""
    service = http_service([entry("a-long-entry-id", f"{topic_base}/{'x' * 60}", 5, lwt=True)])
    browser = page(service)
    browser.set_window_size(*PHONE)
    wait_until(
        lambda: browser.execute_script("return innerWidth") <= PHONE[0],
        WAIT,
        message="the window resized",
    )
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    label = browser.execute_script(
        "const c = document.querySelector('#rows td.topic');"
        "return getComputedStyle(c, '::before').content"
    )
    assert label == '"Topic"'
    browser.execute_script("document.getElementById('entries').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "status-page-phone.png"))


# ---- what the server sends -------------------------------------------------------------------


def test_page_and_assets_carry_a_strict_policy(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """`/`, its script and its style sheet come from the package with their types, a strict
    Content-Security-Policy and nosniff; the page knows whether reload needs a token."""
    service = http_service([entry("one", f"{topic_base}/one", 5)], http_token="t")
    port = service.http.port
    expected = {"/": "text/html", "/page.js": "text/javascript", "/page.css": "text/css"}
    for path, kind in expected.items():
        r = call(port, path)
        assert r.status == 200
        assert r.headers["Content-Type"] == f"{kind}; charset=utf-8"
        assert r.headers["Content-Security-Policy"] == PAGE_POLICY
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.body
    html = call(port, "/").body.decode()
    assert 'data-token-required="yes"' in html
    r = request(port, "HEAD", "/")
    assert r.status == 200
    assert int(r.headers["Content-Length"]) == len(html.encode())
    assert r.body == b""
    assert call(port, "/status").headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in html
    assert "style=" not in html
    assert "script-src 'self'" in PAGE_POLICY
    assert "unsafe" not in PAGE_POLICY


def test_status_paging_over_http(http_service: ServiceStarter, topic_base: str) -> None:
    """`/status` without parameters is the whole snapshot as before; with them one page, in
    the order asked; a bad parameter is a 400 naming it, what came and what is expected."""
    service = http_service([entry(f"n{i}", f"{topic_base}/{i}", 60) for i in range(12)])
    port = service.http.port
    code, whole = get_json(port, "/status")
    assert code == 200
    assert "page" not in whole
    assert len(whole["entries"]) == 12
    code, paged = get_json(port, "/status?offset=2&limit=3&sort=id&order=desc&q=N1")
    assert code == 200
    assert paged["page"]["ids"] == ["n1"]
    assert list(paged["entries"]) == ["n1"]
    code, paged = get_json(port, "/status?limit=2&sort=id&order=desc&q=N1")
    assert paged["page"]["ids"] == ["n11", "n10"]
    assert list(paged["entries"]) == ["n11", "n10"]
    assert paged["page"]["matched"] == 3
    assert paged["page"]["total"] == 12
    code, error = get_json(port, "/status?limit=0")
    assert code == 400
    assert error == {
        "error": "limit: expected an integer from 1 to 1000, got '0'",
        "parameter": "limit",
        "received": "0",
        "expected": "an integer from 1 to 1000",
    }
