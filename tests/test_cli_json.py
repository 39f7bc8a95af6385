"""The friendlier CLI (issue 19 item 5): ``--json`` on every command that prints a result (one
JSON document on standard output, nothing else there, even with progress on), ``query``
searching every tier by default, and progress lines on standard error."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import pyarrow as pa
import pytest
from click.testing import CliRunner

from serve_journal.catalog import live_files
from serve_journal.cli import main
from serve_journal.privacy.keyring import KEK_ENV, FileKek, Keyring
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import open_storage
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import write_signed
from tests.test_archived import archived_journal  # noqa: F401 - the fixture

LATER = (DAY + dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S")
ROWS = 120


def run(*args: str, exit_code: int = 0):
    """Invoke the CLI with progress on and a line per step (as in CI, where stderr is no TTY)."""
    result = CliRunner().invoke(main, ["--progress", "--progress-interval", "0", *args])
    assert result.exit_code == exit_code, result.output
    return result


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A local journal provisioned by init-keys, ROWS signed entries over 4 hours (3 files each)."""
    monkeypatch.delenv(KEK_ENV, raising=False)
    monkeypatch.delenv("SERVE_JOURNAL_PRIVACY_DIR", raising=False)
    root = str(tmp_path / "journal")
    run("init-keys", "--journal", root)
    keys = tmp_path / "journal-keys" / "keys"
    ring = Keyring(keys / "keyring.json", FileKek(keys / "kek"), create=False)
    table = make_entries(ROWS, spread_s=4 * 3600)
    table = table.set_column(table.schema.get_field_index("key_id"), "key_id",
                             pa.array([ring.current_key_id] * ROWS))
    settings = SinkSettings(root)
    write_signed(settings, settings.storage(), "w00", table, files=3)
    return root


def test_init_keys_json_names_paths_and_fingerprint_never_key_material(tmp_path, monkeypatch):
    monkeypatch.delenv(KEK_ENV, raising=False)
    result = run("init-keys", "--journal", str(tmp_path / "journal"), "--json")
    doc = json.loads(result.stdout)
    assert set(doc) == {"keyring", "counters_key", "public_key", "fingerprint"}
    assert len(doc["fingerprint"]) == 64
    kek = (tmp_path / "journal-keys" / "keys" / "kek").read_text().strip()
    assert "PRIVATE KEY" not in result.output and kek not in result.output


def test_verify_json_stays_clean_while_progress_goes_to_stderr(journal):
    public = os.path.join(os.path.dirname(journal), "journal-signing", "manifest-signing.pub.pem")
    result = run("verify", "--journal", journal, "--public-key", public, "--json")
    files = json.loads(result.stdout)["files"]
    assert files == len(live_files(open_storage(journal))) > 1
    assert f"verify files: {files}/{files} done in" in result.stderr
    quiet = CliRunner().invoke(main, ["--no-progress", "verify", "--journal", journal,
                                      "--public-key", public, "--json"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_compact_lifecycle_and_query_every_tier_by_default(journal):
    hot_files = len(live_files(open_storage(journal)))
    planned = json.loads(run("compact", "--journal", journal, "--as-of", LATER, "--json").stdout)
    assert planned["dry_run"] is True and len(planned["planned"]) == 1
    done = run("compact", "--journal", journal, "--as-of", LATER, "--apply", "--json")
    doc = json.loads(done.stdout)
    assert doc["replaced_files"] == hot_files and doc["manifest_chain"].startswith("compactor-")
    assert "compact partitions: 1/1" in done.stderr
    moved = run("lifecycle", "run", "--journal", journal, "--hot-days", "0", "--as-of", LATER,
                "--apply", "--json")
    doc = json.loads(moved.stdout)
    assert doc["dry_run"] is False and len(doc["moved"]) == 1 and len(doc["cold_files"]) == 1
    assert doc["plan"]["moves"][0]["partition"].startswith("hot/")
    assert "move partitions to cold: 1/1" in moved.stderr
    # Everything lives in the cold tier now: the default query finds it, --tier hot does not.
    found = json.loads(run("query", "--journal", journal, "--model", "fraud", "--json").stdout)
    assert len(found) == ROWS
    hot = json.loads(run("query", "--journal", journal, "--model", "fraud", "--tier", "hot",
                         "--json").stdout)
    assert hot == []
    sizes = json.loads(run("bytes-per-entry", "--journal", journal, "--json").stdout)
    assert sizes["hot"] is None and sizes["cold"] > 0


def test_small_result_commands_print_one_json_document(journal, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    manifest = json.loads(run("manifest", str(data), "--json").stdout)
    assert manifest["files"] == 1 and manifest["digest"]
    config = json.loads(run("lifecycle", "s3-config", "--json").stdout)
    assert config["Rules"]
    restore = json.loads(run("restore", "--journal", journal, "--json").stdout)
    assert restore["files"] == {} and restore["pending"] == 0
    rewrap = json.loads(run("vault-rewrap", "--journal", journal, "--json").stdout)
    assert "wrap_key_id" in rewrap
    public = os.path.join(os.path.dirname(journal), "journal-signing", "manifest-signing.pub.pem")
    request_id = hashlib.md5(b"p-1/7").hexdigest()  # make_entries' request ids
    bundle = json.loads(run("evidence", "--journal", journal, "--request-id", request_id,
                            "--out", str(tmp_path / "bundle.zip"), "--public-key", public,
                            "--json").stdout)
    assert bundle["entries"] == 1 and bundle["journal_verify_ok"] is True
    assert bundle["path"].endswith("bundle.zip") and len(bundle["bundle_sha256"]) == 64


def test_forget_json_holds_receipts_with_tokens_never_the_id(journal):
    result = run("forget", "--journal", journal, "--subject", "alice-4711", "--json")
    doc = json.loads(result.stdout)
    assert len(doc["receipts"]) == 1 and doc["hooks_failed"] is False
    assert "alice-4711" not in result.output


def test_every_result_command_has_json():
    """Audit of ``serve-journal --help``: every command that prints a result takes --json; the
    long-running servers and account management are the exceptions, named here."""
    import click

    exempt = {"sink", "console", "console-user"}  # servers, and account changes (no result)
    missing = []

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in group.commands.items():
            full = f"{prefix}{name}"
            if isinstance(command, click.Group):
                if full not in exempt:
                    walk(command, f"{full} ")
            elif full not in exempt and not any("--json" in p.opts for p in command.params):
                missing.append(full)

    walk(main, "")
    assert not missing, f"commands without --json: {missing}"


def test_query_of_archived_cold_files_names_the_restore_and_the_hot_only_search(
        archived_journal, monkeypatch):  # noqa: F811 - the fixture imported above
    """The default search reaches the cold tier; archived (Glacier) files there stop it with the
    restore command, never a traceback, and --tier hot still answers."""
    journal = archived_journal["journal"]
    monkeypatch.setenv("SERVE_JOURNAL_PRIVACY_DIR", archived_journal["privacy"])
    result = CliRunner().invoke(main, ["--no-progress", "query", "--journal", journal,
                                       "--model", "fraud", "--json"])
    assert result.exit_code == 3, result.output
    assert "serve-journal restore --journal" in result.stderr and "--tier hot" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    hot = CliRunner().invoke(main, ["--no-progress", "query", "--journal", journal, "--model",
                                    "fraud", "--tier", "hot", "--json"])
    assert hot.exit_code == 0 and json.loads(hot.stdout) == []
