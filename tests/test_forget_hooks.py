"""Purge and retraining hooks of forget, configured by name for the CLI (options and
SERVE_JOURNAL_* variables) and the console: the built-in purge deletes the subject's history from
the project's Parquet feature store, the retraining hook gets the event (no raw id), and the
receipt records which hooks ran and their results."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.cli import main
from serve_journal.console import ConsoleSettings, journal_forgetter
from serve_journal.console.app import create_app
from serve_journal.console.auth import PRIVACY_OFFICER, add_user
from serve_journal.errors import ConfigError
from serve_journal.fileformat import encode_parquet
from serve_journal.privacy.forget import ForgetEvent, ForgetHooks, resolve_hook
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.replay.featurestore import FeatureStorePurge, ParquetFeatureStore
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, make_entries

EVENTS: list[ForgetEvent] = []
"""What :func:`retrain` received (the retraining hook the tests configure by name)."""

RETRAIN = "tests.test_forget_hooks:retrain"
SUBJECTS = ("alice", "bob")


def retrain(event: ForgetEvent) -> int:
    """A retraining hook: remembers the event, returns how many model versions to retrain."""
    EVENTS.append(event)
    return len(event.model_versions)


def broken(_argument: object) -> None:
    raise RuntimeError("the feature store is down")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A local journal with entries of alice and bob, their keys in the vault (default privacy
    folder), and a Parquet feature store with their history."""
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    for name in ("SERVE_JOURNAL_PURGE_HOOK", "SERVE_JOURNAL_RETRAINING_HOOK"):
        monkeypatch.delenv(name, raising=False)
    EVENTS.clear()
    journal = tmp_path / "journal"
    privacy = tmp_path / "journal-keys"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    tokens = [p.subject_token for p in VaultPseudonymizer(ring, vault).protect(
        list(SUBJECTS), [None] * len(SUBJECTS))]
    vault.close()
    storage = LocalJournalStorage(str(journal))
    table = make_entries(30, tokens=tokens, start=DAY, spread_s=600)
    key = DEFAULT_SPEC.key_for("fraud", DAY)
    storage.put_new(DEFAULT_SPEC.file_path(key, "w-000"), encode_parquet(table))
    features = tmp_path / "features"
    with ParquetFeatureStore(features) as store:
        for i in range(4):
            for subject in SUBJECTS:
                store.write(subject, {"amount": i}, DAY - dt.timedelta(hours=4 - i))
    return {"journal": str(journal), "privacy": str(privacy), "features": str(features),
            "tmp": tmp_path}


def _history(world, subject: str) -> int:
    with ParquetFeatureStore(world["features"]) as store:
        return store.history(subject).num_rows


def _receipt(output: str) -> dict:
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


def test_cli_forget_purges_the_feature_store_and_calls_the_retraining_hook(world):
    result = CliRunner().invoke(main, [
        "forget", "--journal", world["journal"], "--subject", "-",
        "--purge-hook", f"features:{world['features']}", "--retraining-hook", RETRAIN,
    ], input="alice\n")
    assert result.exit_code == 0, result.output
    receipt = _receipt(result.output)
    assert receipt["hooks"] == {"purge": "ok", "forget": "ok"}
    assert receipt["hook_targets"] == {"purge": f"features:{world['features']}",
                                       "forget": RETRAIN}
    assert receipt["hook_results"] == {"purge": 4, "forget": 1}
    assert receipt["entries_unlinkable"] == 15 and receipt["uncounted_files"] == []
    assert _history(world, "alice") == 0 and _history(world, "bob") == 4
    (event,) = EVENTS
    assert event.model_versions == (("fraud", "3"),) and event.versions_complete
    assert "alice" not in result.output and "alice" not in repr(event)


def test_cli_forget_hooks_from_the_environment(world, monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_PURGE_HOOK", f"features:{world['features']}")
    monkeypatch.setenv("SERVE_JOURNAL_RETRAINING_HOOK", RETRAIN)
    result = CliRunner().invoke(main, ["forget", "--journal", world["journal"], "--subject", "-"],
                                input="bob\n")
    assert result.exit_code == 0, result.output
    assert _receipt(result.output)["hooks"] == {"purge": "ok", "forget": "ok"}
    assert _history(world, "bob") == 0 and _history(world, "alice") == 4 and len(EVENTS) == 1


def test_a_hook_name_that_does_not_load_fails_before_any_key_is_destroyed(world):
    for spec in ("no_such_module_xyz:fn", "tests.test_forget_hooks:missing", "nocolon", "features:"):
        result = CliRunner().invoke(main, ["forget", "--journal", world["journal"], "--subject",
                                           "-", "--purge-hook", spec], input="alice\n")
        assert result.exit_code == 2, result.output
        assert "forget hook" in result.output or "features:PATH" in result.output
    assert _history(world, "alice") == 4
    ok = CliRunner().invoke(main, ["forget", "--journal", world["journal"], "--subject", "-"],
                            input="alice\n")
    assert _receipt(ok.output)["status"] == "shredded"  # the key was still there


def test_a_failing_hook_is_in_the_receipt_and_the_exit_code(world):
    missing = world["tmp"] / "no-features-here"
    result = CliRunner().invoke(main, [
        "forget", "--journal", world["journal"], "--subject", "-",
        "--purge-hook", f"features:{missing}", "--retraining-hook", "tests.test_forget_hooks:broken",
    ], input="alice\n")
    assert result.exit_code == 2
    assert "hook(s) ['forget', 'purge'] failed" in result.output
    assert not missing.exists(), "a mistyped feature store path is not created and not 'purged'"


def test_resolve_hook_forms():
    assert resolve_hook("tests.test_forget_hooks:retrain") is retrain
    purge = resolve_hook("features:/tmp/x")
    assert isinstance(purge, FeatureStorePurge) and purge.root == "/tmp/x"
    with pytest.raises(ConfigError, match="module:function"):
        resolve_hook("")
    with pytest.raises(ConfigError, match="not callable"):
        resolve_hook("tests.test_forget_hooks:SUBJECTS")
    assert ForgetHooks.resolve(environ={}) == ForgetHooks()
    assert ForgetHooks.resolve("features:/a", environ={"SERVE_JOURNAL_PURGE_HOOK": "features:/b",
                                                       "SERVE_JOURNAL_RETRAINING_HOOK": RETRAIN}) \
        == ForgetHooks("features:/a", RETRAIN)


def test_console_forget_runs_the_configured_hooks(world):
    users = str(world["tmp"] / "console" / "users.json")
    add_user(users, "pia", [PRIVACY_OFFICER], "pia-password-123")
    hooks = ForgetHooks(purge=f"features:{world['features']}", retraining=RETRAIN)
    settings = ConsoleSettings(
        journal_uri=world["journal"], users_file=users, secure_cookies=False,
        forgetter_factory=functools.partial(journal_forgetter, world["journal"],
                                            privacy_dir=world["privacy"], hooks=hooks),
        forget_hooks=hooks)
    with TestClient(create_app(settings)) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert client.post("/login", data={"csrf": csrf, "username": "pia",
                                           "password": "pia-password-123"},
                           follow_redirects=False).status_code == 303
        form = client.get("/forget")
        assert f"purge hook <code>features:{world['features']}</code>" in form.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        done = client.post("/forget", data={"csrf": csrf, "subject": "alice", "confirm": "yes"})
    assert done.status_code == 200, done.text
    assert "hook_targets" in done.text and f"features:{world['features']}" in done.text
    assert RETRAIN in done.text and 'id="error"' not in done.text
    assert _history(world, "alice") == 0 and _history(world, "bob") == 4 and len(EVENTS) == 1
    assert "alice" not in done.text.replace('id="forget-subject"', "")


def test_console_shows_a_failed_hook_with_the_receipt(world):
    users = str(world["tmp"] / "console" / "users.json")
    add_user(users, "pia", [PRIVACY_OFFICER], "pia-password-123")
    hooks = ForgetHooks(retraining="tests.test_forget_hooks:broken")
    settings = ConsoleSettings(
        journal_uri=world["journal"], users_file=users, secure_cookies=False,
        forgetter_factory=functools.partial(journal_forgetter, world["journal"],
                                            privacy_dir=world["privacy"], hooks=hooks))
    with TestClient(create_app(settings)) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        client.post("/login", data={"csrf": csrf, "username": "pia",
                                    "password": "pia-password-123"})
        form = client.get("/forget")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        unconfirmed = client.post("/forget", data={"csrf": csrf, "subject": "bob"})
        assert unconfirmed.status_code == 400 and "confirmation box" in unconfirmed.text
        done = client.post("/forget", data={"csrf": csrf, "subject": "bob", "confirm": "yes"})
    assert done.status_code == 200
    assert "hook(s) failed: forget" in done.text and "failed:RuntimeError" in done.text
