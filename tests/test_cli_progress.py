"""serve_journal.progress: silent for library callers, a tqdm bar on a terminal, plain periodic
lines elsewhere, never on standard output; the CLI turns it on and off again."""

from __future__ import annotations

import io
import threading

import pytest
from click.testing import CliRunner

from serve_journal import progress
from serve_journal.cli import main


@pytest.fixture(autouse=True)
def _silent_afterwards():
    yield
    progress.disable()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_library_callers_see_nothing_by_default(capsys):
    assert not progress.enabled()
    with progress.task("verify files", total=3) as bar:
        bar.advance(3)
    assert list(progress.track(range(4), "compact partitions")) == [0, 1, 2, 3]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress.enable(stream, interval=0)
    for _ in progress.track(["a", "b"], "verify files"):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["verify files: 1/2", "verify files: 2/2"]
    assert lines[2].startswith("verify files: 2/2 done in ")


def test_a_task_shorter_than_the_interval_writes_nothing():
    stream = io.StringIO()
    progress.enable(stream, interval=3600)
    with progress.task("replay entries") as bar:
        bar.advance(10)
    assert stream.getvalue() == ""


def test_a_bar_on_a_terminal():
    stream = _Terminal()
    progress.enable(stream)
    with progress.task("move partitions to cold", total=2) as bar:
        bar.advance()
        bar.advance()
    out = stream.getvalue()
    assert "move partitions to cold" in out and "2/2" in out and "100%" in out


def test_advance_is_thread_safe_and_close_is_idempotent():
    stream = io.StringIO()
    progress.enable(stream, interval=3600)
    bar = progress.start("replay entries", total=8000)
    threads = [threading.Thread(target=lambda: [bar.advance() for _ in range(1000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    bar.close()
    assert bar.done == 8000


def test_the_cli_enables_progress_for_its_run_only(tmp_path):
    result = CliRunner().invoke(main, ["--progress-interval", "0", "bytes-per-entry", "--journal",
                                       str(tmp_path / "journal"), "--json"])
    assert result.exit_code == 0, result.output
    assert not progress.enabled()  # library code after the command is silent again
    refused = CliRunner().invoke(main, ["--progress-interval", "-1", "bytes-per-entry"])
    assert refused.exit_code == 2


@pytest.mark.slow
def test_replay_reports_its_progress_from_the_cli(ray_cluster, tmp_path):
    """``replay`` advances the same reporter per batch of results: lines on stderr, the JSON
    report alone on stdout."""
    import json

    from serve_journal.storage import LocalJournalStorage
    from tests.helpers.entries import make_entries, write_rolled

    journal = tmp_path / "journal"
    write_rolled(LocalJournalStorage(str(journal)), make_entries(60), files_per_partition=3)
    key_file = tmp_path / "static.key"
    key_file.write_text(("6b" * 32) + "\n")
    (tmp_path / "features").mkdir()
    result = CliRunner().invoke(main, [
        "--progress-interval", "0", "replay", "--model", "fraud", "--journal", str(journal),
        "--features", str(tmp_path / "features"), "--static-key-file", str(key_file),
        "--output", str(tmp_path / "out.parquet"), "--json"])
    assert result.exit_code in (0, 1), result.output  # 1: no features, nothing verifies
    assert json.loads(result.stdout)["total"] == 60
    assert "replay entries: 60 done in" in result.stderr


def test_raylet_notices_during_replay_do_not_reach_stdout(tmp_path, monkeypatch):
    """Ray's driver prints raylet notices (e.g. "8 PYTHON worker processes have been started")
    to ``sys.stdout`` as they arrive, whatever ``log_to_driver`` says: one landed in the middle
    of a ``replay --json`` report on a busy CI run. Here Ray's own printer is called from a
    thread, as its listener does, while replay runs: the notice goes to stderr and stdout holds
    the report alone."""
    import json
    import threading

    from ray._private.worker import print_to_stdstream

    from serve_journal.replay import driver

    def fake_replay(*, echo, **options):
        notice = {"lines": ["WARNING: 8 PYTHON worker processes have been started"],
                  "pid": "raylet", "is_err": False}
        thread = threading.Thread(target=print_to_stdstream, args=(notice, False))
        thread.start()
        thread.join()
        echo(json.dumps({"total": 60}))
        return 0

    monkeypatch.setattr(driver, "run_replay_cli", fake_replay)
    result = CliRunner().invoke(main, ["replay", "--model", "fraud", "--journal",
                                       str(tmp_path / "journal"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"total": 60}
    assert "worker processes have been started" in result.stderr


def test_a_failing_shutdown_of_the_commands_own_ray_does_not_undo_the_report(tmp_path, monkeypatch):
    """``replay`` shuts down a Ray it started, inside the redirect and after the report; an
    error there leaves the exit code and the report as they were."""
    import json
    import sys
    import types

    from serve_journal.replay import driver

    connected = iter([False, True])  # not connected before the command, connected after
    monkeypatch.setattr(driver, "_ray_connected", lambda: next(connected))
    fake_ray = types.SimpleNamespace(shutdown=lambda: (_ for _ in ()).throw(RuntimeError("gone")))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(driver, "run_replay_cli",
                        lambda *, echo, **options: echo(json.dumps({"total": 1})) or 0)
    result = CliRunner().invoke(main, ["replay", "--model", "fraud", "--journal",
                                       str(tmp_path / "journal"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"total": 1}
