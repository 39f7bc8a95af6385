"""The investigation console in a real headless Chromium (Selenium), over a real Parquet journal.

The journal is written with the writers' own code (PartitionFileWriter + signed manifest chain +
exact counters), subjects are tokenized with the journal's real keyring and vault, and the console
runs as a real uvicorn server on a loopback port (and once as a Ray Serve app).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC, split_by_partition
from serve_journal.console import ConsoleSettings, add_user, create_app, run_console
from serve_journal.console.app import (
    build_serve_app,
    journal_forgetter,
    journal_tokenizer,
)
from serve_journal.console.auth import (
    CLOCK_SKEW_S,
    LoginThrottle,
    SessionCodec,
    SessionRevocations,
    UsersFileError,
    UserStore,
    check_password,
    hash_password,
    load_or_create_secret,
)
from serve_journal.counters import CounterSet
from serve_journal.read.query import read_access_log
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from tests.fixtures.ray_cluster import free_port
from tests.helpers.journal import counters_signer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
START = dt.datetime(2025, 3, 4, 9, 0, tzinfo=dt.UTC)
SUBJECTS = [f"cust-{i:04d}" for i in range(40, 52)]
WATCHED = "cust-0042"   # searched by the auditor
FORGOTTEN = "cust-0049"  # forgotten by the privacy officer
PASSWORDS = {"ana": "ana-password-123", "oscar": "oscar-password-123", "pia": "pia-password-123"}
ROLES = {"ana": ["auditor"], "oscar": ["operator"], "pia": ["privacy_officer"]}


# ------------------------------------------------------------------------------------------------
# A journal written by the writers' own code
# ------------------------------------------------------------------------------------------------


def _entries(tokens: dict[str, str], n: int, producer: str, signer) -> tuple[pa.Table, CounterSet,
                                                                            dict]:
    """``n`` captured decisions; every 10th is sampled out and every 50th dropped (counted only)."""
    counters = CounterSet(producer, signer)
    rows, per_subject = [], {s: 0 for s in tokens}
    for seq in range(n):
        subject = SUBJECTS[seq % len(SUBJECTS)]
        ts = START + dt.timedelta(seconds=7 * seq)
        ts_us = int(ts.timestamp() * 1_000_000)
        score = (seq * 37 % 100) / 100
        decision = "block" if score >= 0.7 else "allow"
        outcome = "ok" if seq % 23 else "error"
        if seq % 50 == 7:
            counters.record("fraud", "3", ts_us, decision, "high", 0.9, outcome, seq, "dropped",
                            "buffer_full")
            continue
        keep = seq % 10 != 3
        counters.record_batch("fraud", "3", [ts_us], [decision], ["high"], [0.9], [outcome],
                              [seq], [keep])
        if not keep:
            continue
        per_subject[subject] += 1
        rows.append({
            "schema_version": 1, "request_id": hashlib.sha256(f"req/{seq}".encode()).hexdigest()[:24],
            "ts": ts, "caller": "svc-payments", "subject_token": tokens[subject],
            "model_name": "fraud", "model_version": "3", "dataset_hash": "sha256:" + "ab" * 32,
            "dataset_hash_source": "tag",
            "features_hmac": hashlib.sha256(f"f{seq}".encode()).hexdigest(), "key_id": "k1",
            "outputs": [{"label": "fraud", "score": score}], "score": score, "threshold": 0.7,
            "decision": decision, "explanation_ref": None, "outcome": outcome,
            "error_type": None if outcome == "ok" else "ValueError", "latency_ms": 2.5,
            "risk_tier": "high", "sample_rate": 0.9, "producer_id": producer, "seq": seq,
            "app_name": "fraud-app", "deployment": "FraudModel", "replica": "r1",
        })
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA), counters, per_subject


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Journal (files, manifests, checkpoint, counters), vault tokens and a users file."""
    from serve_journal._private.wrapper import build_privacy
    from serve_journal.config import JournalConfig

    base = tmp_path_factory.mktemp("console")
    journal_uri = str(base / "journal")
    storage = LocalJournalStorage(journal_uri)
    pseudonymizer, _ = build_privacy(JournalConfig.resolve(model="unused", journal_uri=journal_uri))
    protected = pseudonymizer.protect(SUBJECTS, [None] * len(SUBJECTS))
    tokens = {s: p.subject_token for s, p in zip(SUBJECTS, protected, strict=True)}
    pseudonymizer.vault.close()

    table, counters, per_subject = _entries(tokens, 600, "replica-a", counters_signer(journal_uri))
    settings = SinkSettings(journal_uri)
    log = settings.manifest(storage, "console-writer-0")
    writer = PartitionFileWriter(storage, "console-writer-0", roll_seconds=3600,
                                 roll_bytes=1 << 30, on_file_written=[manifest_hook(log)])
    for start in range(0, table.num_rows, 100):  # several files per hour partition
        for key, batch in split_by_partition(table.slice(start, 100).to_batches()[0]):
            writer.add(key, batch)
        writer.roll_all()
    assert log.checkpoint() is not None
    counters.flush_to(storage)

    users_file = str(base / "console" / "users.json")
    for name, password in PASSWORDS.items():
        add_user(users_file, name, ROLES[name], password)
    return {
        "base": base, "journal_uri": journal_uri, "storage": storage, "tokens": tokens,
        "table": table, "per_subject": per_subject, "users_file": users_file,
        "public_key": settings.public_key_path(), "reports_dir": str(base / "reports"),
    }


def _settings(world, **overrides) -> ConsoleSettings:
    values = {
        "journal_uri": world["journal_uri"], "users_file": world["users_file"],
        "secure_cookies": False, "public_key": world["public_key"],
        "reports_dir": world["reports_dir"],
        "tokenizer_factory": functools.partial(journal_tokenizer, world["journal_uri"]),
        "forgetter_factory": functools.partial(journal_forgetter, world["journal_uri"]),
    }
    values.update(overrides)
    return ConsoleSettings(**values)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def console(world):
    """The console on a real uvicorn server in a thread, every server log line captured."""
    import uvicorn

    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error",
                                              "serve_journal", "fastapi")]
    for lg in loggers:
        lg.addHandler(capture)
        lg.setLevel(logging.DEBUG)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(_settings(world)), host="127.0.0.1",
                                           port=port, log_level="debug", access_log=True,
                                           log_config=None))
    thread = threading.Thread(target=server.run, name="console-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "console did not start"
        time.sleep(0.02)  # poll interval of a deadline-bounded wait
    try:
        yield {"url": f"http://127.0.0.1:{port}", "logs": capture.lines, "world": world}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        for lg in loggers:
            lg.removeHandler(capture)


# ------------------------------------------------------------------------------------------------
# The browser
# ------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = subprocess.run(["pgrep", "-P", str(current)], capture_output=True, text=True,
                                  check=False).stdout.split()
        for child in children:
            out.append(int(child))
            todo.append(int(child))
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through chromedriver; every process it started killed by pid."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian chromium and chromium-driver are not installed "
                    "(apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    started = _descendants(driver_pid)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        started = sorted(set(started) | set(_descendants(driver_pid)))
        try:
            driver.quit()
        finally:
            for pid in [driver_pid, *started]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _sign_in(driver, url: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORDS[name])
    driver.find_element(By.ID, "sign-in").click()
    _wait(lambda: driver.find_elements(By.ID, "whoami"), "sign-in did not reach the home page")
    assert driver.find_element(By.ID, "whoami").text.startswith(name)


def _wait(predicate, message: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def _image_loaded(driver, element_id: str) -> bool:
    return bool(_wait(lambda: driver.execute_script(
        "const i = document.getElementById(arguments[0]);"
        "return i && i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0;", element_id),
        f"chart {element_id} did not load"))


def _shot(driver, name: str) -> None:
    driver.set_window_size(1280, 800)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, min(int(height) + 120, 4000)))  # the whole page
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    assert path.stat().st_size > 1000


def _views(storage, actor: str) -> list[dict]:
    return [r for r in read_access_log(storage) if r["actor"] == actor]


# ------------------------------------------------------------------------------------------------
# Browser tests
# ------------------------------------------------------------------------------------------------


def test_sign_in_is_required_and_wrong_password_is_refused(console, browser):
    from selenium.webdriver.common.by import By

    url = console["url"]
    storage = console["world"]["storage"]
    browser.delete_all_cookies()
    browser.get(f"{url}/search")
    assert browser.current_url == f"{url}/login"
    _shot(browser, "01-sign-in")
    failed_before = len([r for r in read_access_log(storage)
                         if r["filters"].get("view") == "sign_in_failed"])
    browser.find_element(By.ID, "username").send_keys("ana")
    browser.find_element(By.ID, "password").send_keys("not-the-password")
    browser.find_element(By.ID, "sign-in").click()
    # The click returns before the POST's answer is rendered: wait for it (seen flaky once).
    error = _wait(lambda: browser.find_elements(By.ID, "error"), "no sign-in error shown")[0]
    assert "Wrong user name or password" in error.text
    failed = [r for r in read_access_log(storage) if r["filters"].get("view") == "sign_in_failed"]
    assert len(failed) == failed_before + 1
    assert all(r["actor"] == "anonymous" for r in failed)


@pytest.mark.slow  # over 3 s: kept out of the fast tier, runs in the full suite
def test_auditor_searches_a_subject_opens_an_entry_and_sees_charts(console, browser):
    from selenium.webdriver.common.by import By

    url, world = console["url"], console["world"]
    storage, token = world["storage"], world["tokens"][WATCHED]
    _sign_in(browser, url, "ana")
    _shot(browser, "02-home")
    before = len(read_access_log(storage))

    browser.find_element(By.ID, "subject").send_keys(WATCHED)
    browser.find_element(By.ID, "search").click()
    _wait(lambda: browser.find_elements(By.ID, "summary"), "no results page")
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert len(rows) == world["per_subject"][WATCHED] > 0
    assert browser.find_element(By.ID, "subject-token").text == token
    assert WATCHED not in browser.current_url and WATCHED not in browser.page_source
    _shot(browser, "03-results")

    query_records = [r for r in read_access_log(storage)[before:] if r["actor"] == "ana"
                     and r["filters"].get("subject_token") == token and "view" not in r["filters"]]
    assert len(query_records) == 1 and query_records[0]["rows"] == len(rows)

    browser.find_elements(By.CSS_SELECTOR, "a.entry-link")[0].click()
    status = _wait(lambda: browser.find_elements(By.ID, "verify-status"), "no entry page")[0]
    assert status.text.startswith("verified"), status.text
    file_path = browser.find_element(By.ID, "file-path").text
    sha = hashlib.sha256(storage.read(file_path)).hexdigest()
    assert sha in browser.find_element(By.ID, "manifest-record").text
    cells = {r.find_element(By.TAG_NAME, "th").text: r.find_element(By.TAG_NAME, "td").text
             for r in browser.find_elements(By.CSS_SELECTOR, "#entry tbody tr")}
    assert set(cells) == set(ENTRY_SCHEMA.names)
    assert cells["subject_token"] == token
    _shot(browser, "04-entry")

    browser.find_element(By.LINK_TEXT, "Timeline of this subject").click()
    assert _image_loaded(browser, "timeline-chart")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")) == len(rows)
    _shot(browser, "05-timeline")

    browser.get(f"{url}/models/fraud")
    for kind in ("decisions", "outcomes", "scores", "sampling", "lag"):
        assert _image_loaded(browser, f"chart-{kind}")
    _shot(browser, "06-model-charts")

    browser.get(f"{url}/access")
    shown = int(browser.find_element(By.ID, "access-count").text.split()[0])
    after = read_access_log(storage)
    views = [r["filters"].get("view") for r in after[before:] if r["actor"] == "ana"]
    for view in ("search_results", "entry", "subject_timeline", "model_charts", "access_log"):
        assert view in views, view
    assert shown == len([r for r in after if r["at"][:10] == after[-1]["at"][:10]])
    assert len(after) > before
    assert all(WATCHED not in str(r) for r in after)
    _shot(browser, "07-access-log")


def test_roles_refuse_what_they_do_not_grant(console, browser):
    from selenium.webdriver.common.by import By

    url, storage = console["url"], console["world"]["storage"]
    _sign_in(browser, url, "ana")
    browser.get(f"{url}/stats")
    assert browser.find_element(By.ID, "forbidden").text.startswith("403")
    _shot(browser, "08-forbidden")
    denied = [r for r in _views(storage, "ana") if r["filters"].get("view") == "denied"]
    assert denied and denied[-1]["filters"]["permission"] == "stats"
    cookie = browser.get_cookie("sj_session")["value"]
    with httpx.Client(base_url=url, cookies={"sj_session": cookie}) as client:
        assert client.get("/stats").status_code == 403
        assert client.get("/lifecycle").status_code == 403
        assert client.get("/forget").status_code == 403
        assert client.get("/search").status_code == 200

    _sign_in(browser, url, "oscar")
    browser.get(f"{url}/stats")
    totals = browser.find_element(By.ID, "totals").text
    table = console["world"]["table"]
    assert f"journal rows {table.num_rows}" in totals and "captured 600" in totals
    _shot(browser, "09-stats")
    browser.get(f"{url}/lifecycle")
    assert "partitions to move to cold" in browser.find_element(By.ID, "plan").text
    browser.get(f"{url}/search")
    assert browser.find_element(By.ID, "forbidden").text.startswith("403")


def test_operator_runs_verify_and_auditor_sees_the_summary(console, browser):
    from selenium.webdriver.common.by import By

    url, world = console["url"], console["world"]
    _sign_in(browser, url, "oscar")
    browser.get(f"{url}/reports")
    browser.find_element(By.ID, "run-verify").click()
    message = _wait(lambda: browser.find_elements(By.ID, "message"), "verify did not finish")[0]
    assert message.text == "verify finished: OK"
    reports = sorted(os.listdir(world["reports_dir"]))
    assert len(reports) == 1 and reports[0].startswith("verify-")

    _sign_in(browser, url, "ana")
    browser.get(f"{url}/reports")
    section = browser.find_element(By.ID, "verify-report").text
    assert reports[0] in section and "OK" in section
    assert not browser.find_elements(By.ID, "run-verify")  # auditors read, operators run
    _shot(browser, "10-reports")


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_privacy_officer_forgets_and_the_subject_is_gone(console, browser):
    from selenium.webdriver.common.by import By

    url, world = console["url"], console["world"]
    _sign_in(browser, url, "pia")
    browser.get(f"{url}/forget")
    browser.find_element(By.ID, "forget-subject").send_keys(FORGOTTEN)
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "forget").click()
    receipt = _wait(lambda: browser.find_elements(By.ID, "receipt"), "no receipt")[0].text
    assert "shredded" in receipt
    assert f"entries_unlinkable {world['per_subject'][FORGOTTEN]}" in receipt
    assert FORGOTTEN not in browser.page_source and world["tokens"][FORGOTTEN] not in receipt
    _shot(browser, "11-forget")

    _sign_in(browser, url, "ana")
    browser.get(f"{url}/search")
    browser.find_element(By.ID, "subject").send_keys(FORGOTTEN)
    browser.find_element(By.ID, "search").click()
    assert _wait(lambda: browser.find_elements(By.ID, "unknown-subject"), "subject still found")
    assert not browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")


# ------------------------------------------------------------------------------------------------
# HTTP-level security properties (same real server)
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _http_sign_in(url: str, name: str):
    with httpx.Client(base_url=url) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        response = client.post("/login", data={"csrf": csrf, "username": name,
                                               "password": PASSWORDS[name]})
        assert response.status_code == 303
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=1800" in cookie
        yield client


def test_forms_need_the_csrf_token(console):
    with _http_sign_in(console["url"], "ana") as client:
        assert client.post("/search", data={"request_id": "x"}).status_code == 403
        assert client.post("/search", data={"request_id": "x", "csrf": "forged"}).status_code == 403
        assert client.post("/logout", data={}).status_code == 403
        home = client.get("/")
        csrf = re.search(r'name="csrf" value="([^"]+)"', home.text).group(1)
        ok = client.post("/search", data={"request_id": "x", "csrf": csrf})
        assert ok.status_code == 200 and "0 entries" in ok.text
    with httpx.Client(base_url=console["url"]) as anonymous:  # login form needs its own token
        assert anonymous.post("/login", data={"username": "ana",
                                              "password": PASSWORDS["ana"]}).status_code == 403


def test_sessions_expire_and_forged_cookies_are_refused(console):
    world = console["world"]
    codec = SessionCodec(load_or_create_secret(f"{world['users_file']}.secret"), 1800)
    expired = codec.issue("ana", now=time.time() - 3600)
    fresh = codec.issue("ana")
    other_key = SessionCodec(os.urandom(32), 1800).issue("ana")
    with httpx.Client(base_url=console["url"]) as client:
        for cookie, status in ((expired, 303), (other_key, 303), (fresh[:-2] + "AA", 303),
                               (fresh, 200)):
            response = client.get("/search", cookies={"sj_session": cookie})
            assert response.status_code == status
            if status == 303:
                assert response.headers["location"].endswith("/login")


def test_session_cookie_with_another_users_name_is_refused(console):
    world = console["world"]
    codec = SessionCodec(load_or_create_secret(f"{world['users_file']}.secret"), 1800)
    payload, timestamp, signature = codec.issue("ana").split(".")
    other = base64.urlsafe_b64encode(json.dumps({"u": "oscar", "s": "x"}).encode()).rstrip(b"=")
    swapped = f"{other.decode()}.{timestamp}.{signature}"
    with httpx.Client(base_url=console["url"]) as client:
        response = client.get("/stats", cookies={"sj_session": swapped})
        assert response.status_code == 303 and response.headers["location"].endswith("/login")
        assert "sj_session=" in response.headers["set-cookie"]  # the bad cookie is deleted


def _csrf(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def test_sign_out_revokes_the_session_on_every_replica(console):
    from starlette.testclient import TestClient

    world = console["world"]
    with _http_sign_in(console["url"], "ana") as client:
        copied = client.cookies["sj_session"]
        csrf = _csrf(client.get("/"))
        other_replica = TestClient(create_app(_settings(world)), base_url="http://127.0.0.1")
        other_replica.cookies.set("sj_session", copied)
        assert other_replica.get("/search", follow_redirects=False).status_code == 200
        out = client.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"].endswith("/login")
    with httpx.Client(base_url=console["url"], cookies={"sj_session": copied}) as thief:
        refused = thief.get("/search")
        assert refused.status_code == 303 and refused.headers["location"].endswith("/login")
        assert thief.post("/search", data={"request_id": "x", "csrf": csrf}).status_code == 303
    refused = other_replica.get("/search", follow_redirects=False)  # a replica started before
    assert refused.status_code == 303 and refused.headers["location"].endswith("/login")
    with _http_sign_in(console["url"], "ana") as client:  # signing in again works
        assert client.get("/search").status_code == 200
    # The record names a hash of the session id, never the id; nothing else is in the folder.
    revoked = Path(f"{world['users_file']}.revoked")
    session = SessionCodec(load_or_create_secret(f"{world['users_file']}.secret"), 1800) \
        .parse(copied)
    names = [p.name for p in revoked.iterdir()]
    assert names and all(session.sid not in n for n in names)
    assert all(session.sid not in p.read_text() for p in revoked.iterdir())
    assert revoked.stat().st_mode & 0o777 == 0o700


def test_revocations_are_create_only_and_pruned_after_the_session_lifetime(tmp_path):
    revocations = SessionRevocations(str(tmp_path / "revoked"))
    now = time.time()
    revocations.revoke("sid-old", expires=now - CLOCK_SKEW_S - 1, now=now)  # prunes itself
    revocations.revoke("sid-live", expires=now + 600, now=now)
    revocations.revoke("sid-live", expires=now + 900, now=now)  # already revoked: kept as is
    assert revocations.is_revoked("sid-live") and not revocations.is_revoked("sid-other")
    assert not revocations.is_revoked("sid-old")  # expired anyway: its record was pruned
    assert revocations.prune(now + 600) == 0  # within the clock-skew allowance
    assert revocations.is_revoked("sid-live")
    assert revocations.prune(now + 600 + CLOCK_SKEW_S + 1) == 1
    assert not revocations.is_revoked("sid-live") and not os.listdir(revocations.directory)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_failed_sign_ins_for_one_account_throttle_it_from_every_address(tmp_path, world):
    from starlette.testclient import TestClient

    users_file = str(tmp_path / "users.json")
    add_user(users_file, "tess", ["auditor"], "tess-password-123")
    add_user(users_file, "uma", ["auditor"], "uma-password-123")
    settings = _settings(world, users_file=users_file)
    replicas = [create_app(settings), create_app(settings)]  # they share the failure records

    def attempt(address: str, name: str, password: str, replica: int = 0) -> int:
        client = TestClient(replicas[replica], base_url="http://127.0.0.1", client=(address, 4000))
        page = client.get("/login")
        return client.post("/login", data={"csrf": _csrf(page), "username": name,
                                           "password": password},
                           follow_redirects=False).status_code

    for i in range(10):  # ten guesses, each from another address, through both replicas
        assert attempt(f"10.0.0.{i}", "tess", f"guess-{i}-password", replica=i % 2) == 401
    assert attempt("10.0.1.1", "tess", "tess-password-123") == 429  # even the right password
    assert attempt("10.0.1.2", "tess", "tess-password-123", replica=1) == 429
    assert attempt("10.0.1.3", "uma", "uma-password-123") == 303  # other accounts are unaffected
    for i in range(10):  # a name that is no account is throttled the same way
        assert attempt(f"10.0.2.{i}", "nobody", "guess-password-x") == 401
    assert attempt("10.0.3.1", "nobody", "guess-password-x") == 429
    records = list(Path(f"{users_file}.failures").iterdir())
    assert len(records) == 20 and not any("tess" in p.name or "nobody" in p.name for p in records)
    # Once the window has passed, the account may sign in again (and stale records go).
    throttle = LoginThrottle(directory=f"{users_file}.failures")
    assert throttle.account_blocked("tess")
    assert not throttle.account_blocked("tess", now=time.time() + 301)
    assert not list(Path(f"{users_file}.failures").iterdir())


def test_timeline_refuses_what_is_not_a_subject_token(console):
    pasted = "pasted-subject-id-77"  # not one of SUBJECTS: URLs are in the server's log
    with _http_sign_in(console["url"], "ana") as client:
        for bad in (pasted, "A" * 32):
            page = client.get(f"/subject/{bad}")
            assert page.status_code == 404 and bad not in page.text
            assert client.get(f"/subject/{bad}/chart.png").status_code == 404
        home = client.get("/")
        form = client.post("/search", data={"csrf": _csrf(home), "subject_token": pasted})
        assert form.status_code == 400 and "must be a subject token" in form.text
        assert pasted not in form.text


def test_session_codec_signs_with_itsdangerous(tmp_path):
    secret = os.urandom(32)
    codec = SessionCodec(secret, 600)
    now = time.time()
    value = codec.issue("ana", now=now)
    session = codec.parse(value, now=now)
    assert session is not None and session.username == "ana" and len(session.sid) >= 24
    assert session.expires == pytest.approx(int(now) + 600)
    assert codec.parse(value, now=now + 599) is not None  # within the lifetime
    assert codec.parse(value, now=now + 602) is None  # older than the lifetime
    assert codec.parse(value, now=now - 60) is None  # issued in the future
    # Another console replica's clock a few seconds ahead: its cookie still works here.
    assert codec.parse(codec.issue("ana", now=now + 3), now=now) is not None
    assert SessionCodec(os.urandom(32), 600).parse(value, now=now) is None  # another key
    # The payload is signed: changing the user name or session id breaks the signature.
    payload, timestamp, signature = value.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"u": "root", "s": session.sid}).encode())
    assert codec.parse(f"{forged.rstrip(b'=').decode()}.{timestamp}.{signature}", now=now) is None
    assert codec.parse(f"{payload}.{timestamp}", now=now) is None
    for garbage in (None, "", ".", "a.b.c", "a.b.c.d", value + "x", "é" * 10):
        assert codec.parse(garbage, now=now) is None
    # Values signed for one purpose (salt) are refused for another.
    pre = codec.issue_presession()
    nonce = codec.parse_presession(pre)
    assert nonce and codec.parse(pre, now=now) is None
    assert codec.parse_presession(value) is None and codec.parse_presession("x.y") is None
    token = codec.csrf_token(session.sid)
    assert codec.check_csrf(session.sid, token)
    assert not codec.check_csrf(nonce, token) and not codec.check_csrf(session.sid, None)
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert not codec.check_csrf(session.sid, flipped)
    assert codec.csrf_token(nonce) != token
    # The hand-made format of earlier versions (<payload>.<HMAC-SHA256>) is not a session.
    legacy_body = json.dumps({"u": "ana", "s": "x", "e": int(now) + 600}).encode()
    legacy_mac = hmac.new(secret, b"session\0" + legacy_body, hashlib.sha256).digest()
    legacy = f"{base64.urlsafe_b64encode(legacy_body).decode()}." \
             f"{base64.urlsafe_b64encode(legacy_mac).decode()}"
    assert codec.parse(legacy, now=now) is None
    assert secret.hex() not in repr(codec) and "ttl_s=600" in repr(codec)


def test_security_headers_and_no_cdn_assets(console):
    with _http_sign_in(console["url"], "ana") as client:
        page = client.get("/")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "img-src 'self'" in csp
        assert page.headers["cache-control"] == "no-store"
        assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from elsewhere
        assert "<script" not in page.text


def test_server_logs_never_hold_a_typed_subject_id(console):
    # Runs after the browser tests in this module: they typed WATCHED and FORGOTTEN into forms.
    logs = "\n".join(console["logs"])
    assert "POST /search" in logs  # the capture does see the server's access log
    for subject in SUBJECTS:
        assert subject not in logs


# ------------------------------------------------------------------------------------------------
# Accounts, without a browser
# ------------------------------------------------------------------------------------------------


def test_password_hashes_are_salted_scrypt_and_files_private(tmp_path):
    first, second = hash_password("correct horse battery"), hash_password("correct horse battery")
    assert first != second and first.startswith("scrypt$")
    assert check_password("correct horse battery", first)
    assert not check_password("correct horse batterY", first)
    with pytest.raises(ValueError, match="at least 12"):
        hash_password("short")
    path = str(tmp_path / "users.json")
    add_user(path, "ana", ["auditor"], "ana-password-123")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "ana-password-123" not in Path(path).read_text()
    store = UserStore(path)
    assert store.authenticate("ana", "ana-password-123").roles == {"auditor"}
    assert store.authenticate("ana", "wrong-password-123") is None
    assert store.authenticate("nobody", "ana-password-123") is None
    with pytest.raises(ValueError, match="unknown role"):
        add_user(path, "bob", ["admin"], "bob-password-123")


def test_user_commands_and_dev_mode(tmp_path):
    from click.testing import CliRunner

    from serve_journal.console import dev_users_file
    from serve_journal.console.commands import console_user

    path = str(tmp_path / "users.json")
    runner = CliRunner()
    result = runner.invoke(console_user, ["add", "--users-file", path, "--role", "auditor",
                                          "--role", "operator", "--password-stdin", "oli"],
                           input="oli-password-123\n")
    assert result.exit_code == 0, result.output
    assert "oli-password-123" not in result.output
    assert UserStore(path).authenticate("oli", "oli-password-123").roles == {"auditor", "operator"}
    assert runner.invoke(console_user, ["remove", "--users-file", path, "oli"]).exit_code == 0
    assert runner.invoke(console_user, ["remove", "--users-file", path, "oli"]).exit_code != 0

    dev_path, password = dev_users_file(str(tmp_path / "dev"))
    user = UserStore(dev_path).authenticate("dev", password)
    assert user is not None and user.can("query") and user.can("stats") and user.can("forget")
    assert dev_users_file(str(tmp_path / "dev2"))[1] != password  # random each time


def test_no_working_default_credentials(tmp_path, world):
    with pytest.raises(UsersFileError, match="no console users"):
        UserStore(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="users_file is required"):
        run_console(world["journal_uri"], users_file=None, dev=False)
    with pytest.raises(UsersFileError):
        create_app(_settings(world, users_file=str(tmp_path / "none.json")))


# ------------------------------------------------------------------------------------------------
# As a Ray Serve application
# ------------------------------------------------------------------------------------------------


def test_console_deploys_as_a_serve_app(world, serve_instance):
    import requests
    from ray import serve

    serve.run(build_serve_app(_settings(world)), name="journal-console-test",
              route_prefix="/console")
    try:
        page = requests.get(f"{serve_instance}/console/login", timeout=30)
        assert page.status_code == 200 and "Sign in" in page.text
        assert 'href="/console/static/console.css"' in page.text
        css = requests.get(f"{serve_instance}/console/static/console.css", timeout=30)
        assert css.status_code == 200 and "font-family" in css.text
        protected = requests.get(f"{serve_instance}/console/search", timeout=30,
                                 allow_redirects=False)
        assert protected.status_code == 303
        assert protected.headers["location"] == "/console/login"
    finally:
        serve.delete("journal-console-test")


def test_partition_layout_of_the_fixture(world):
    # The fixture is what the tests think it is: several files per hour, each with a record.
    files = world["storage"].list_files("hot/", ".parquet")
    hours = {DEFAULT_SPEC.parse(f)[1] for f in files}
    assert len(files) > len(hours) >= 1
    records = world["storage"].list_files("_manifest/", ".json")
    assert len(records) == len(files)
