"""The journal records the model that actually served (issue 16), with real MLflow models.

Every version of the registered model ``scored`` answers its own constant score
(tests/fixtures/model_versions.py), so each entry's recorded version is checked against the
version decoded from its score. The first part runs in-process (memory transport, fast tier);
the second on real Ray Serve, with traffic flowing while the alias moves, the deployment
reconfigures and its replica is replaced.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import serve_journal
from serve_journal import annotate, journaled
from serve_journal._private.models import JournaledModel
from serve_journal._private.runtime import STALE_WARNING_INTERVAL_S
from serve_journal._private.wrapper import journal_runtime
from tests.fixtures.model_versions import ScoredModels

STALE_GAUGE = "serve_journal_model_stale"
CANARY = "CANARY-FEATURE-5e1d2a"


def frame(features: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in features.items() if not isinstance(v, str)} or {"x": 0}])


def score_of(model: Any, features: dict) -> float:
    return float(model.predict(frame(features))[0])


@pytest.fixture
def deploy(scored_models: ScoredModels, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``deploy(cls, model_uri, **options)``: an in-process journaled instance of ``cls``
    (memory transport); every runtime is closed after the test."""
    instances: list[Any] = []

    def make(cls: type, model_uri: str, *args: Any, **options: Any) -> Any:
        wrapped = journaled(model=model_uri, tracking_uri=scored_models.tracking_uri,
                            transport="memory", dev_mode=True,
                            journal_uri=str(tmp_path / f"journal-{len(instances)}"),
                            extra={"memory_transport": f"t-{uuid.uuid4().hex}"},  # its own
                            **options)(cls)
        instance = wrapped(*args)
        instances.append(instance)
        return instance

    yield make
    for instance in instances:
        runtime = journal_runtime(instance)
        if runtime is not None:
            runtime.close(10)


def entries(instance: Any) -> list[dict]:
    runtime = journal_runtime(instance)
    assert runtime.flush(30)
    return runtime.transport.table().to_pylist()


def alias(models: ScoredModels, version: str) -> str:
    """A fresh alias of this test alone, pointing at ``version``; its ``models:/`` URI."""
    return models.set_alias(f"a{uuid.uuid4().hex[:8]}", version)


def assert_identity(row: dict, models: ScoredModels, version: str, digest: str = "sha256") -> None:
    assert row["model_name"] == models.name
    assert row["model_version"] == version
    assert row["model_run_id"] == models.run_ids[version]
    expected = models.digests if digest == "sha256" else models.mlmodel_digests
    assert row["model_digest"] == expected[version]


def assert_scored_by_recorded(rows: list[dict], models: ScoredModels) -> None:
    """Every entry's recorded version (and its run id and digest) is the one that scored it."""
    assert rows
    for row in rows:
        assert_identity(row, models, models.version_of(row["score"]))


class Follows:
    """Loads the alias through the journal in ``__init__`` and again in ``reconfigure``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.model = serve_journal.load_model(uri)

    def reconfigure(self, config: dict) -> None:
        self.model = serve_journal.load_model(self.uri)

    def __call__(self, payload: dict) -> dict:
        return {"score": score_of(self.model, payload["features"])}


# -- in-process -----------------------------------------------------------------------------


def test_load_model_pins_version_run_and_full_artifact_digest(scored_models, deploy):
    uri = alias(scored_models, "1")
    d = deploy(Follows, uri, uri)
    runtime = journal_runtime(d)
    pinned = runtime.model
    assert (pinned.name, pinned.version) == (scored_models.name, "1")
    assert pinned.run_id == scored_models.run_ids["1"]
    assert pinned.digest == scored_models.digests["1"] and pinned.digest.startswith("sha256:")
    assert isinstance(d.model, JournaledModel) and d.model.journal_model == pinned
    for i in range(3):
        assert d({"features": {"x": float(i)}}) == {"score": 0.11}
    rows = entries(d)
    assert len(rows) == 3
    assert_scored_by_recorded(rows, scored_models)
    assert all(r["models"] is None and r["schema_version"] == 3 for r in rows)


def test_alias_moving_without_reload_keeps_the_served_version_and_warns_once(
        scored_models, deploy, caplog):
    uri = alias(scored_models, "1")
    d = deploy(Follows, uri, uri)
    runtime = journal_runtime(d)
    d({"features": {"x": 1.0}})
    scored_models.set_alias(uri.rsplit("@", 1)[1], "2")
    with caplog.at_level(logging.WARNING, logger="serve_journal"):
        for _ in range(4):  # the periodic check, several times within one warning interval
            runtime.refresh_model()
            d({"features": {"x": 2.0}})
    assert runtime.model_stale is True
    assert runtime.metrics.totals()[STALE_GAUGE] == 1
    warnings = [r for r in caplog.records if "now points at version 2" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "serves version 1" in warnings[0].getMessage()
    assert STALE_WARNING_INTERVAL_S >= 60
    rows = entries(d)
    assert [r["model_version"] for r in rows] == ["1"] * 5
    assert_scored_by_recorded(rows, scored_models)


def test_reconfigure_that_reloads_records_the_new_version_from_the_first_call_after(
        scored_models, deploy):
    name = f"a{uuid.uuid4().hex[:8]}"
    uri = scored_models.set_alias(name, "1")
    d = deploy(Follows, uri, uri)
    runtime = journal_runtime(d)
    scores = [d({"features": {"x": 1.0}})["score"]]
    scored_models.set_alias(name, "2")
    runtime.refresh_model()
    assert runtime.model_stale
    scores.append(d({"features": {"x": 1.0}})["score"])
    d.reconfigure({"round": 2})
    assert not runtime.model_stale and runtime.metrics.totals()[STALE_GAUGE] == 0
    assert runtime.model.version == "2"
    scores += [d({"features": {"x": 1.0}})["score"] for _ in range(3)]
    assert scores == [0.11, 0.11, 0.22, 0.22, 0.22]
    rows = entries(d)
    assert [r["model_version"] for r in rows] == ["1", "1", "2", "2", "2"]
    assert_scored_by_recorded(rows, scored_models)


class Fixed:
    """Loads one fixed version, given as a registered name plus ``version=``."""

    def __init__(self) -> None:
        self.model = serve_journal.load_model("scored", version="1")

    def __call__(self, payload: dict) -> dict:
        return {"score": score_of(self.model, payload["features"])}


def test_a_fixed_version_loaded_by_name_is_never_stale(scored_models, deploy, caplog):
    d = deploy(Fixed, alias(scored_models, "3"))  # the journal's own reference names another
    runtime = journal_runtime(d)
    with caplog.at_level(logging.WARNING, logger="serve_journal"):
        runtime.refresh_model()
        d({"features": {"x": 1.0}})
    assert not runtime.model_stale and runtime.metrics.totals()[STALE_GAUGE] == 0
    assert not [r for r in caplog.records if "now points at version" in r.getMessage()]
    assert_scored_by_recorded(entries(d), scored_models)


class Router:
    """Routes between two versions itself (models unwrapped: their calls are not noted), and
    says which decided with annotate."""

    def __init__(self) -> None:
        self.a = serve_journal.load_model("models:/scored/1").unwrap()
        self.b = serve_journal.load_model("models:/scored/2").unwrap()

    def __call__(self, payload: dict) -> dict:
        use_b = payload["features"]["x"] > 0
        annotate(model_name="scored", model_version="2" if use_b else 1)
        return {"score": score_of(self.b if use_b else self.a, payload["features"])}


class Switch:
    """Routes between two loaded (wrapped) models: the one called records itself."""

    def __init__(self) -> None:
        self.a = serve_journal.load_model("models:/scored/1")
        self.b = serve_journal.load_model("models:/scored/2")

    def __call__(self, payload: dict) -> dict:
        model = self.b if payload["features"]["x"] > 0 else self.a
        return {"score": score_of(model, payload["features"])}


@pytest.mark.parametrize("cls", [Router, Switch])
def test_routing_between_two_loaded_models_records_the_one_that_decided(scored_models, deploy, cls):
    d = deploy(cls, alias(scored_models, "3"))
    xs = [1.0, -1.0, -2.0, 3.0, 0.0, 5.0]
    for x in xs:
        d({"features": {"x": x}})
    rows = entries(d)
    assert [r["model_version"] for r in rows] == ["2" if x > 0 else "1" for x in xs]
    assert_scored_by_recorded(rows, scored_models)  # full identity, from the loaded models
    assert all(r["models"] is None for r in rows)


class Ensemble:
    """A shadow challenger, then two decision models; answers the first decision model's score."""

    def __init__(self) -> None:
        self.shadow = serve_journal.load_model("models:/scored/3", role="shadow")
        self.second = serve_journal.load_model("models:/scored/2")
        self.first = serve_journal.load_model("models:/scored/1")

    def __call__(self, payload: dict) -> dict:
        features = payload["features"]
        score_of(self.shadow, features)
        deciding = score_of(self.second, features)
        score_of(self.first, features)
        return {"score": deciding}


def test_ensemble_and_shadow_list_every_model_in_call_order_the_decider_on_top(
        scored_models, deploy):
    d = deploy(Ensemble, alias(scored_models, "1"))
    assert journal_runtime(d).model.version == "1"  # the last decision model loaded is pinned
    for i in range(3):
        assert d({"features": {"x": float(i)}}) == {"score": 0.22}
    rows = entries(d)
    assert_scored_by_recorded(rows, scored_models)  # top level: version 2, which decided
    for row in rows:
        assert [(m["version"], m["role"]) for m in row["models"]] == [
            ("3", "shadow"), ("2", "decision"), ("1", "decision")]
        for m in row["models"]:
            assert m["name"] == scored_models.name
            assert m["run_id"] == scored_models.run_ids[m["version"]]
            assert m["digest"] == scored_models.digests[m["version"]]


class Annotated:
    """Scores with version 1 (loaded, pinned); names other models through annotate(models=)."""

    def __init__(self) -> None:
        self.model = serve_journal.load_model("models:/scored/1")
        self.shadow = serve_journal.load_model("models:/scored/3", role="shadow")

    def __call__(self, payload: dict) -> dict:
        kind = payload["kind"]
        if kind == "mapping-shadow":
            annotate(models=[{"name": "scored", "version": "2", "role": "shadow"},
                             {"name": "external", "version": "7", "role": "shadow"}])
            return {"score": score_of(self.model.unwrap(), payload["features"])}
        if kind == "mapping-decision":
            annotate(models=[{"name": "scored", "version": 2}])
            return {"score": score_of(self.model.unwrap(), payload["features"]) * 2}
        annotate(models=[self.shadow])  # a loaded model, not called
        return {"score": score_of(self.model, payload["features"])}


def test_annotate_models_with_mappings_and_loaded_models(scored_models, deploy):
    uri = alias(scored_models, "2")
    deploy(Follows, uri, uri)  # version 2 loaded in this process: its full identity is known
    d = deploy(Annotated, uri)  # starts after, resolving the alias to version 2 (MLmodel digest)
    for kind in ("mapping-shadow", "mapping-decision", "loaded"):
        d({"kind": kind, "features": {"x": 1.0}})
    shadow, decision, loaded = entries(d)
    # Shadows only: the pinned model decides and is listed first.
    assert_identity(shadow, scored_models, "1")
    assert [(m["name"], m["version"], m["role"]) for m in shadow["models"]] == [
        ("scored", "1", "decision"), ("scored", "2", "shadow"), ("external", "7", "shadow")]
    assert shadow["models"][1]["run_id"] == scored_models.run_ids["2"]  # known: loaded above
    assert shadow["models"][1]["digest"] == scored_models.digests["2"]
    assert shadow["models"][2]["run_id"] is None and shadow["models"][2]["digest"] is None
    # A decision mapping decides (0.11 * 2 is version 2's score).
    assert_identity(decision, scored_models, "2")
    assert decision["models"] is None
    assert_identity(loaded, scored_models, "1")
    assert [(m["version"], m["role"]) for m in loaded["models"]] == [
        ("1", "decision"), ("3", "shadow")]


class LoadsItself:
    """Loads nothing through the journal (the start-time version is recorded)."""

    def __init__(self) -> None:
        self.reconfigured = 0

    def reconfigure(self, config: dict) -> None:
        self.reconfigured += 1

    def __call__(self, payload: dict) -> dict:
        return {"score": 0.5}


def test_deployment_not_loading_through_the_journal_keeps_its_start_time_version(
        scored_models, deploy, caplog):
    name = f"a{uuid.uuid4().hex[:8]}"
    d = deploy(LoadsItself, scored_models.set_alias(name, "2"))
    runtime = journal_runtime(d)
    d({"features": {"x": 1.0}})
    scored_models.set_alias(name, "3")
    with caplog.at_level(logging.WARNING, logger="serve_journal"):
        d.reconfigure({"round": 2})  # checks the alias; never moves what is recorded
        d({"features": {"x": 1.0}})
        runtime.refresh_model()
    assert d.reconfigured == 1
    assert runtime.model_stale and runtime.metrics.totals()[STALE_GAUGE] == 1
    warnings = [r.getMessage() for r in caplog.records if "now points at version 3" in r.getMessage()]
    assert len(warnings) == 1 and "entries keep the version resolved at replica start" in warnings[0]
    rows = entries(d)
    assert len(rows) == 2
    for row in rows:
        assert_identity(row, scored_models, "2", digest="mlmodel")
        assert row["model_digest"].startswith("mlmodel-sha256:")
        assert row["models"] is None


def test_a_model_called_outside_a_journaled_call_records_nothing(scored_models, deploy):
    class WarmsUp(Follows):
        def __init__(self, uri: str) -> None:
            super().__init__(uri)
            self.warm = score_of(self.model, {"x": 0.0})  # in __init__: no call in progress

    uri = alias(scored_models, "2")
    d = deploy(WarmsUp, uri, uri)
    assert d.warm == 0.22
    assert score_of(d.model, {"x": 1.0}) == 0.22  # outside any journaled call
    assert d.model.note_use() is None
    assert entries(d) == []
    d({"features": {"x": 1.0}})
    rows = entries(d)
    assert len(rows) == 1 and rows[0]["models"] is None
    assert_scored_by_recorded(rows, scored_models)


@pytest.mark.parametrize(("values", "message"), [
    ({"model_version": 1.5}, "annotate(model_version=...) must be a string, got float"),
    ({"model_name": ["scored"]}, "annotate(model_name=...) must be a string, got list"),
    ({"models": "scored"}, "annotate(models=...) must be a list of models"),
    ({"models": [{"name": "scored"}]}, "must be a loaded model or a mapping with 'name' and 'version'"),
    ({"models": [{"name": "scored", "version": "1", "role": "judge"}]}, "role must be one of"),
    ({"models": [object()]}, "must be a loaded model or a mapping"),
])
def test_bad_annotate_values_raise_type_error_naming_the_key(values, message):
    with pytest.raises(TypeError) as excinfo:
        annotate(**values)
    assert message in str(excinfo.value)


def test_journaled_model_passes_attributes_through_and_unwraps(scored_models, deploy):
    uri = alias(scored_models, "1")
    d = deploy(Follows, uri, uri)
    wrapped = d.model
    inner = wrapped.unwrap()
    assert type(inner).__name__ == "PyFuncModel"
    assert wrapped.metadata is inner.metadata
    assert wrapped.metadata.run_id == scored_models.run_ids["1"]
    wrapped.marker = "set-through"
    assert inner.marker == "set-through"
    assert wrapped.journal_role == "decision"
    assert "models:/scored/1" in repr(wrapped)
    assert float(inner.predict(frame({"x": 1.0}))[0]) == 0.11


def test_no_raw_feature_value_reaches_the_model_identity_columns(scored_models, deploy):
    d = deploy(Ensemble, alias(scored_models, "1"))
    d({"subject_id": CANARY, "features": {"x": 1.0, "merchant": CANARY}})
    (row,) = entries(d)
    for column in ("model_name", "model_version", "model_run_id", "model_digest", "models"):
        assert CANARY not in repr(row[column])
    assert CANARY not in repr(row)


# -- real Serve ------------------------------------------------------------------------------


class ServedFollows:
    """On Serve: loads the alias through the journal in ``__init__`` and ``reconfigure``."""

    def __init__(self, uri: str, generation: int = 0) -> None:
        self.uri = uri
        self.instance = uuid.uuid4().hex
        self.model = serve_journal.load_model(uri)

    def reconfigure(self, config: dict) -> None:
        self.model = serve_journal.load_model(self.uri)

    async def __call__(self, request: Any) -> dict:
        body = await request.json()
        return {"score": score_of(self.model, body["features"])}

    def journal_state(self) -> dict:
        """Not journaled: what the replica's journal attributes calls to, and the stale flag."""
        runtime = journal_runtime(self)
        return {"version": runtime.model.version, "stale": runtime.model_stale,
                "instance": self.instance}


class ServedLoadsItself(ServedFollows):
    """On Serve: loads the alias with MLflow itself, once, in ``__init__`` (not through the
    journal); ``reconfigure`` reloads nothing."""

    def __init__(self, uri: str, tracking_uri: str, generation: int = 0) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.instance = uuid.uuid4().hex
        self.model = mlflow.pyfunc.load_model(uri)

    def reconfigure(self, config: dict) -> None:
        pass


class Traffic:
    """HTTP calls from background threads, each tagged with the phase it was sent in."""

    def __init__(self, url: str, threads: int = 2) -> None:
        import requests

        self.url = url
        self.phase = "start"
        self.sent: list[tuple[str, str, int, float | None, int]] = []
        """(request id, phase, HTTP status, score, thread)."""
        self.errors: list[str] = []
        """The exception of each call that got no HTTP answer."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sessions = [requests.Session() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        session = self._sessions[index]
        n = 0
        while not self._stop.is_set():
            phase = self.phase
            rid = f"{phase}-{index}-{n}-{uuid.uuid4().hex[:6]}"
            n += 1
            body = {"subject_id": f"s{n % 7}", "features": {"x": float(n)}}
            try:
                response = session.post(self.url, json=body, headers={"x-request-id": rid},
                                        timeout=60)
            except Exception as exc:  # noqa: BLE001 - counted as unanswered below
                with self._lock:
                    self.sent.append((rid, phase, 0, None, index))
                    self.errors.append(type(exc).__name__)
                continue
            score = response.json()["score"] if response.status_code == 200 else None
            with self._lock:
                self.sent.append((rid, phase, response.status_code, score, index))

    def answered(self, phase: str | None = None) -> int:
        with self._lock:
            return sum(1 for _, p, status, _, _ in self.sent
                       if status == 200 and (phase is None or p == phase))

    def wait_for(self, phase: str, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.answered(phase) < n:
            assert time.monotonic() < deadline, f"fewer than {n} answers in phase {phase!r}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        for session in self._sessions:
            session.close()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def journal_rows(root: Path) -> dict[str, dict]:
    from serve_journal import flush_journal
    from tests.helpers.journal import read_journal

    assert flush_journal(str(root), timeout=120), "journal flush did not complete in time"
    rows = read_journal(root).to_pylist()
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows), "an entry was written twice"
    return by_id


def check_traffic(traffic: Traffic, rows: dict[str, dict], models: ScoredModels,
                  digest: str = "sha256") -> dict[str, list[str]]:
    """Every entry records the version that scored it (decoded from its own score), with that
    version's run id and digest; every answered call has its entry, with the score answered;
    the versions each client thread saw never go back. Returns the versions answered per phase.

    A call the client gave up on (Serve overloaded on a busy machine) may or may not have an
    entry: it is not an answered call, and its entry, if any, is checked like every other."""
    sent = {rid: (phase, status, score, thread) for rid, phase, status, score, thread in traffic.sent}
    unanswered = [(rid, phase, status) for rid, (phase, status, _, _) in sent.items() if status != 200]
    if unanswered:
        print(f"{len(unanswered)} of {len(sent)} calls unanswered: {unanswered[:10]}, "
              f"client errors {traffic.errors[:10]}")
    assert set(rows) <= set(sent), "an entry for a call never sent"
    failed = [(rid, r["outcome"], r["error_type"]) for rid, r in rows.items() if r["outcome"] != "ok"]
    assert not failed, f"calls failed in the deployment: {failed[:10]}"
    for row in rows.values():
        assert_identity(row, models, models.version_of(row["score"]), digest)
        assert row["models"] is None
    per_phase: dict[str, list[str]] = {}
    per_thread: dict[int, list[int]] = {}
    for rid, (phase, status, score, thread) in sent.items():
        if status != 200:
            continue
        assert rid in rows, f"answered call {rid} has no entry"
        assert rows[rid]["score"] == pytest.approx(score)
        version = models.version_of(score)
        per_phase.setdefault(phase, []).append(version)
        per_thread.setdefault(thread, []).append(int(version))
    for seen in per_thread.values():
        assert seen == sorted(seen), "a client saw the version go back"
    return per_phase


def in_place(deployment: Any, round_: int, generation: int) -> Any:
    """``deployment`` with ``user_config={"round": round_}`` and a code version fixed per
    ``generation``: a new round alone reconfigures the running replica in place (as ``serve
    deploy`` of a config file does; ``serve.run`` gives every run a new code version, which
    replaces the replicas), a new generation replaces it."""
    return deployment.options(user_config={"round": round_}, version=f"generation-{generation}",
                              _internal=True)


@pytest.fixture
def serve_app(serve_instance) -> Iterator[str]:
    from ray import serve

    name = f"m{uuid.uuid4().hex[:8]}"
    yield name
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001 - already gone
        pass


@pytest.mark.timeout(600)
def test_on_serve_every_entry_records_the_version_that_scored_it(
        serve_instance, serve_app, scored_models, tmp_path):
    from ray import serve

    root = tmp_path / "journal"
    alias_name = f"a{uuid.uuid4().hex[:8]}"
    uri = scored_models.set_alias(alias_name, "1")

    dep = journaled(model=uri, tracking_uri=scored_models.tracking_uri, journal_uri=str(root),
                    registry_refresh_s=0.5)(serve.deployment(ServedFollows, name="Follows"))

    def app(round_: int, generation: int = 0):
        return in_place(dep, round_, generation).bind(uri, generation)

    handle = serve.run(app(1), name=serve_app, route_prefix=f"/{serve_app}")
    state = lambda: handle.journal_state.remote().result(timeout_s=60)  # noqa: E731
    traffic = Traffic(f"{serve_instance}/{serve_app}")
    try:
        traffic.phase = "v1"
        traffic.wait_for("v1", 20)
        # (a) The alias moves; nothing reloads: entries and scores stay version 1.
        scored_models.set_alias(alias_name, "2")
        traffic.phase = "moved"
        wait_until(lambda: state()["stale"], "the replica saw the alias move")
        traffic.wait_for("moved", 20)
        first = state()
        assert (first["version"], first["stale"]) == ("1", True)
        # (b) A new user_config: reconfigure reloads version 2.
        traffic.phase = "reconfiguring"
        serve.run(app(2), name=serve_app, route_prefix=f"/{serve_app}")
        traffic.phase = "v2"
        assert state() == {"version": "2", "stale": False, "instance": first["instance"]}
        traffic.wait_for("v2", 20)
        # (c) The alias moves to 3, then the replica is replaced (new init argument).
        scored_models.set_alias(alias_name, "3")
        traffic.phase = "moved3"
        traffic.wait_for("moved3", 10)
        traffic.phase = "redeploying"
        handle = serve.run(app(2, generation=1), name=serve_app, route_prefix=f"/{serve_app}")
        traffic.phase = "v3"
        traffic.wait_for("v3", 20)
        last = state()
        assert (last["version"], last["stale"]) == ("3", False)
        assert last["instance"] != first["instance"]
    finally:
        traffic.stop()
    per_phase = check_traffic(traffic, journal_rows(root), scored_models)
    assert set(per_phase["v1"]) == set(per_phase["moved"]) == {"1"}
    assert set(per_phase["v2"]) == set(per_phase["moved3"]) == {"2"}
    # A router may still send a few calls to the draining replica after serve.run returns.
    assert set(per_phase["v3"]) <= {"2", "3"} and per_phase["v3"][-1] == "3"


@pytest.mark.timeout(600)
def test_on_serve_a_deployment_loading_itself_records_its_start_time_version(
        serve_instance, serve_app, scored_models, tmp_path):
    from ray import serve

    root = tmp_path / "journal"
    alias_name = f"a{uuid.uuid4().hex[:8]}"
    uri = scored_models.set_alias(alias_name, "1")

    dep = journaled(model=uri, tracking_uri=scored_models.tracking_uri,
                    journal_uri=str(root))(serve.deployment(ServedLoadsItself, name="Itself"))

    def app(round_: int, generation: int = 0):
        return in_place(dep, round_, generation).bind(uri, scored_models.tracking_uri, generation)

    handle = serve.run(app(1), name=serve_app, route_prefix=f"/{serve_app}")
    first = handle.journal_state.remote().result(timeout_s=60)
    traffic = Traffic(f"{serve_instance}/{serve_app}", threads=1)
    try:
        traffic.phase = "v1"
        traffic.wait_for("v1", 10)
        scored_models.set_alias(alias_name, "2")
        traffic.phase = "moved"
        # Reconfigure checks the alias: stale, and the recorded version stays the start-time one.
        handle = serve.run(app(2), name=serve_app, route_prefix=f"/{serve_app}")
        traffic.phase = "reconfigured"
        assert handle.journal_state.remote().result(timeout_s=60) == {
            "version": "1", "stale": True, "instance": first["instance"]}  # not restarted
        traffic.wait_for("reconfigured", 10)
        traffic.phase = "restarting"
        handle = serve.run(app(2, generation=1), name=serve_app, route_prefix=f"/{serve_app}")
        traffic.phase = "restarted"
        traffic.wait_for("restarted", 10)
        last = handle.journal_state.remote().result(timeout_s=60)
        assert (last["version"], last["stale"]) == ("2", False)
        assert last["instance"] != first["instance"]
    finally:
        traffic.stop()
    per_phase = check_traffic(traffic, journal_rows(root), scored_models, digest="mlmodel")
    assert set(per_phase["v1"]) == set(per_phase["reconfigured"]) == {"1"}
    assert set(per_phase["restarted"]) <= {"1", "2"} and per_phase["restarted"][-1] == "2"
