"""AirstateBackend called directly, with Airflow 3.3.2's own scope and writer classes."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from airflow.state import AssetScope, TaskScope
from airflow._shared.state import AssetStateStoreWriterKind
from airflow.state.metastore import MetastoreBackend

from airstate_airflow import (
    AirstateBackend,
    AirstateConfigError,
    AirstateError,
    AirstateUnavailable,
    Settings,
)
from airstate_airflow.backend import REFUSED
from conftest import (
    ADMIN_TOKEN,
    Airstate,
    free_port,
    make_asset,
    make_ti,
    metastore_state_rows,
    start_airstate,
    unique,
)


def backend_for(url: str, token: str = ADMIN_TOKEN, **settings: float) -> AirstateBackend:
    return AirstateBackend(Settings(url=url, token=token, **settings))  # type: ignore[arg-type]


@pytest.fixture
def backend(airstate: Airstate) -> Iterator[AirstateBackend]:
    b = backend_for(airstate.url)
    yield b
    b.close()


def task_scope(map_index: int = -1) -> TaskScope:
    """The scope of a task instance of a new DAG run: with the metastore identity airstate
    keys task state by the run's dag_run.id, and refuses writes for a run Airflow lacks."""
    ti = make_ti(run_id=f"scheduled__{unique('r')}+00:00", task_id="t/1", map_index=map_index)
    return TaskScope(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=map_index)


def admin_task_entry(airstate: Airstate, scope: TaskScope, key: str) -> httpx.Response:
    from urllib.parse import quote

    path = (
        f"/admin/v1/dags/{quote(scope.dag_id, safe='')}/dagRuns/{quote(scope.run_id, safe='')}"
        f"/taskInstances/{quote(scope.task_id, safe='')}/state-store/{quote(key, safe='')}"
    )
    return airstate.admin("GET", path, params={"map_index": scope.map_index})


def test_task_state_round_trip_keeps_the_json_text(airstate: Airstate, backend: AirstateBackend) -> None:
    scope = task_scope()
    text = '{"n": 1180591620717411303424, "f": 1.0, "s": "é/ü", "z": [true, null]}'
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    backend.set(scope, "wm/a b", text, expires_at=expires, session=None)
    # Returned exactly as stored: Airflow's route json.loads() it.
    assert backend.get(scope, "wm/a b") == text
    # expires_at passes through (default_retention_days, as Airflow computes it).
    entry = admin_task_entry(airstate, scope, "wm/a b").json()
    stored = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    assert abs((stored - expires).total_seconds()) < 0.001
    assert backend.get(scope, "other") is None
    # Another map index is another scope.
    assert backend.get(TaskScope(scope.dag_id, scope.run_id, scope.task_id, 0), "wm/a b") is None
    backend.set(scope, "wm/a b", '"second"')
    assert backend.get(scope, "wm/a b") == '"second"'
    assert admin_task_entry(airstate, scope, "wm/a b").json()["expires_at"] is None
    backend.delete(scope, "wm/a b")
    assert backend.get(scope, "wm/a b") is None
    backend.delete(scope, "wm/a b")  # idempotent, as Airflow's


def test_task_clear_of_one_map_index_and_of_all(backend: AirstateBackend) -> None:
    base = task_scope()
    scopes = [TaskScope(base.dag_id, base.run_id, base.task_id, i) for i in (-1, 0, 1, 2)]
    for s in scopes:
        backend.set(s, "k", str(s.map_index))
    backend.clear(scopes[1])
    assert [backend.get(s, "k") for s in scopes] == ["-1", None, "1", "2"]
    backend.clear(scopes[2], all_map_indices=True)
    assert [backend.get(s, "k") for s in scopes] == [None, None, None, None]


def test_a_value_over_max_value_storage_bytes_is_stored_as_airflows_execution_api_does(
    backend: AirstateBackend,
) -> None:
    scope = task_scope()
    big = json.dumps("x" * 70_000)
    backend.set(scope, "big", big)
    assert backend.get(scope, "big") == big
    asset_id, _, _ = make_asset()
    backend.set_asset_state_store(AssetScope(asset_id=asset_id), "big", big, kind=AssetStateStoreWriterKind.API)
    assert backend.get(AssetScope(asset_id=asset_id), "big") == big


def test_asset_state_by_id_records_airflows_writer(airstate: Airstate, backend: AirstateBackend) -> None:
    asset_id, name, _ = make_asset()
    scope = AssetScope(asset_id=asset_id)
    backend.set_asset_state_store(
        scope,
        "wm",
        '{"offset": 1.0}',
        kind=AssetStateStoreWriterKind.TASK,
        dag_id="etl",
        run_id="manual__1",
        task_id="load",
        map_index=2,
    )
    assert backend.get(scope, "wm") == '{"offset": 1.0}'
    entry = airstate.admin("GET", f"/admin/v1/assets/by-id/{asset_id}/state-store/wm").json()
    assert entry["last_updated_by"] == {
        "kind": "task",
        "dag_id": "etl",
        "run_id": "manual__1",
        "task_id": "load",
        "map_index": 2,
    }
    backend.set_asset_state_store(scope, "wm", "2", kind=AssetStateStoreWriterKind.WATCHER)
    entry = airstate.admin("GET", f"/admin/v1/assets/by-name/state-store/value", params={"name": name, "key": "wm"})
    assert entry.json()["last_updated_by"] == {"kind": "watcher"}
    assert entry.json()["value"] == 2
    # A plain set() carries no writer: airstate records Airflow's `api` kind.
    backend.set(scope, "plain", "3")
    entry = airstate.admin("GET", f"/admin/v1/assets/by-id/{asset_id}/state-store/plain").json()
    assert entry["last_updated_by"] == {"kind": "api"}
    # Airflow's own writer rule is applied before anything is sent.
    with pytest.raises(ValueError, match="kind='task' requires"):
        backend.set_asset_state_store(scope, "wm", "9", kind=AssetStateStoreWriterKind.TASK, dag_id="d")
    assert backend.get(scope, "wm") == "2"
    backend.delete(scope, "wm")
    assert backend.get(scope, "wm") is None
    assert backend.get(scope, "plain") == "3"
    backend.clear(scope)
    assert backend.get(scope, "plain") is None
    # Name and URI scopes (what a worker-side caller has) reach the same asset.
    backend.set(AssetScope(name=name), "by-name", "4")
    assert backend.get(scope, "by-name") == "4"


def test_an_asset_id_airstate_does_not_know_is_an_error_not_a_miss(backend: AirstateBackend) -> None:
    missing = AssetScope(asset_id=2_000_000_000)
    calls: list[Callable[[], object]] = [
        lambda: backend.get(missing, "k"),
        lambda: backend.set(missing, "k", "1"),
        lambda: backend.delete(missing, "k"),
        lambda: backend.clear(missing),
    ]
    for call in calls:
        with pytest.raises(AirstateError, match="Asset with id 2000000000 not found"):
            call()


def test_async_twins(airstate: Airstate, backend: AirstateBackend) -> None:
    scope = task_scope(map_index=3)
    asset_id, _, _ = make_asset()
    asset = AssetScope(asset_id=asset_id)

    async def run() -> None:
        await backend.aset(scope, "k", "[1, 2.0]", expires_at=datetime.now(timezone.utc) + timedelta(days=1))
        assert await backend.aget(scope, "k") == "[1, 2.0]"
        await backend.adelete(scope, "k")
        assert await backend.aget(scope, "k") is None
        await backend.aset(scope, "a", "1")
        await backend.aclear(scope, all_map_indices=True)
        assert await backend.aget(scope, "a") is None
        await backend.aset_asset_state_store(asset, "w", '"v"', kind=AssetStateStoreWriterKind.WATCHER)
        assert await backend.aget(asset, "w") == '"v"'
        await backend.aclear(asset)
        assert await backend.aget(asset, "w") is None

    asyncio.run(run())
    assert backend.get(scope, "k") is None


def test_bad_input_is_refused_before_anything_is_sent(backend: AirstateBackend) -> None:
    scope = task_scope()
    backend.set(scope, "k", '"kept"')
    with pytest.raises(ValueError, match="not JSON text"):
        backend.set(scope, "k", '1, "expires_at": null')
    with pytest.raises(ValueError, match="time zone"):
        backend.set(scope, "k", "1", expires_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="must not be empty"):
        backend.delete(scope, "")
    with pytest.raises(ValueError, match="must not be empty"):
        backend.get(AssetScope(asset_id=1), "")
    with pytest.raises(TypeError, match="TaskScope or AssetScope"):
        backend.get(("d", "r", "t"), "k")  # type: ignore[arg-type]
    # airstate's own validation (a key over 512 characters) surfaces as a clear error.
    with pytest.raises(AirstateError, match="422"):
        backend.set(scope, "k" * 513, "1")
    assert backend.get(scope, "k") == '"kept"'


def test_every_metastore_method_is_overridden_or_refused(backend: AirstateBackend) -> None:
    public = {
        name
        for name, member in vars(MetastoreBackend).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }
    assert public <= set(vars(AirstateBackend)) - set(REFUSED)
    assert {"get", "set", "delete", "clear", "aget", "aset", "adelete", "aclear"} <= public
    assert {"set_asset_state_store", "aset_asset_state_store", "cleanup"} <= public
    assert all(name.startswith("_") for name in REFUSED) and REFUSED
    for name in REFUSED:
        with pytest.raises(AirstateError, match="keeps state in airstate only"):
            getattr(backend, name)(task_scope(), "k", session=None)
    assert isinstance(backend, MetastoreBackend)
    backend.cleanup()
    assert backend._summary_dry_run() == {"expired": []}


# --- failures ---------------------------------------------------------------------------


def test_unreachable_airstate_raises_naming_the_url_and_writes_nothing(metastore: object) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"http://127.0.0.1:{closed}"
    before = metastore_state_rows()
    b = backend_for(url)
    calls: list[Callable[[], object]] = [
        lambda: b.get(task_scope(), "k"),
        lambda: b.set(task_scope(), "k", "1"),
        lambda: b.clear(task_scope()),
        lambda: b.set_asset_state_store(AssetScope(asset_id=1), "k", "1", kind=AssetStateStoreWriterKind.WATCHER),
        lambda: asyncio.run(b.aset(task_scope(), "k", "1")),
    ]
    for call in calls:
        with pytest.raises(AirstateUnavailable, match=f"airstate at {url} is unreachable") as caught:
            call()
        assert "ConnectError" in str(caught.value)
    assert metastore_state_rows() == before


class SilentServer:
    """Accepts connections and never answers; counts the connections it got."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.listener.close()


def test_a_silent_airstate_times_out_within_the_configured_bound() -> None:
    server = SilentServer()
    try:
        b = backend_for(server.url, timeout_seconds=0.5)
        started = time.monotonic()
        with pytest.raises(AirstateUnavailable, match=f"airstate at {server.url} is unreachable.*Timeout"):
            b.get(task_scope(), "k")
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 1.5, elapsed
    finally:
        server.close()


def test_connections_are_capped_by_max_connections() -> None:
    server = SilentServer()
    try:
        b = backend_for(server.url, timeout_seconds=1.5, max_connections=2)
        errors: list[BaseException] = []

        def call() -> None:
            try:
                b.get(task_scope(), "k")
            except BaseException as error:  # noqa: BLE001 - collected for the assertion
                errors.append(error)

        threads = [threading.Thread(target=call) for _ in range(6)]
        started = time.monotonic()
        for t in threads:
            t.start()
        # Before any timeout, six calls in flight hold two connections: the rest wait.
        while len(server.held) < 2 and time.monotonic() - started < 1.0:
            time.sleep(0.02)
        time.sleep(0.2)
        in_flight = len(server.held)
        for t in threads:
            t.join()
        assert in_flight == 2, in_flight
        # Every call ended, bounded: waiting for a pooled connection counts against the timeout.
        assert time.monotonic() - started < 5
        assert len(errors) == 6 and all(isinstance(e, AirstateUnavailable) for e in errors), errors
        assert any("PoolTimeout" in str(e) for e in errors), errors
    finally:
        server.close()


def test_connecting_is_bounded_by_connect_timeout() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    try:
        b = backend_for(f"http://127.0.0.1:{port}", timeout_seconds=5, connect_timeout_seconds=0.3)
        started = time.monotonic()
        with pytest.raises(AirstateUnavailable, match="ConnectTimeout"):
            b.get(task_scope(), "k")
        assert time.monotonic() - started < 1.5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_airstate_answering_5xx_raises_unavailable() -> None:
    # A Redis of this test's own, killed under a running airstate: airstate answers 503
    # within its Redis timeout.
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        server = start_airstate(AIRSTATE_REDIS_URL=f"redis://127.0.0.1:{port}", AIRSTATE_REDIS_TIMEOUT_MS="300")
        b = backend_for(server.url)
        b.set(task_scope(), "k", "1")
        redis.kill()
        redis.wait()
        with pytest.raises(AirstateUnavailable, match=f"airstate at {server.url} answered 503"):
            b.set(task_scope(), "k", "1")
        with pytest.raises(AirstateUnavailable, match="answered 503"):
            b.get(task_scope(), "k")
    finally:
        redis.kill()
        redis.wait()
        if server is not None:
            server.stop()


def test_refusals_say_what_to_fix(airstate: Airstate) -> None:
    with pytest.raises(AirstateError, match="refused the admin token \\(403"):
        backend_for(airstate.url, token="x" * 40).get(task_scope(), "k")
    without_admin = start_airstate(AIRSTATE_ADMIN_TOKEN="")
    claims = start_airstate(AIRSTATE_IDENTITY="claims", AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="")
    try:
        with pytest.raises(AirstateError, match="serves no admin API"):
            backend_for(without_admin.url).get(task_scope(), "k")
        with pytest.raises(AirstateError, match="asset_ids_need_metastore"):
            backend_for(claims.url).get(AssetScope(asset_id=1), "k")
    finally:
        without_admin.stop()
        claims.stop()


# --- settings ---------------------------------------------------------------------------


def no_conf(name: str) -> str | None:
    return None


def test_settings_from_the_environment_or_airflow_config(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    s = Settings.load(
        {"AIRSTATE_URL": "http://airstate:8080/", "AIRSTATE_ADMIN_TOKEN_FILE": str(token_file)}, no_conf
    )
    assert (s.url, s.token, s.timeout_seconds, s.connect_timeout_seconds, s.max_connections) == (
        "http://airstate:8080",
        ADMIN_TOKEN,
        5.0,
        2.0,
        16,
    )
    assert ADMIN_TOKEN not in repr(s)
    conf = {"url": "https://state.example", "timeout_seconds": "1.5", "max_connections": "4"}
    s = Settings.load({"AIRSTATE_URL": "http://ignored", "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN}, conf.get)
    assert (s.url, s.timeout_seconds, s.max_connections) == ("https://state.example", 1.5, 4)


def test_settings_through_airflows_own_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__AIRSTATE__URL", "http://from-airflow-config:8080")
    monkeypatch.setenv("AIRFLOW__AIRSTATE__ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("AIRFLOW__AIRSTATE__CONNECT_TIMEOUT_SECONDS", "0.25")
    s = Settings.load({})
    assert (s.url, s.token, s.connect_timeout_seconds) == ("http://from-airflow-config:8080", ADMIN_TOKEN, 0.25)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN}, "set AIRSTATE_URL"),
        ({"AIRSTATE_URL": "airstate:8080", "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN}, "http:// or https://"),
        ({"AIRSTATE_URL": "http://a"}, "AIRSTATE_ADMIN_TOKEN or AIRSTATE_ADMIN_TOKEN_FILE"),
        ({"AIRSTATE_URL": "http://a", "AIRSTATE_ADMIN_TOKEN": "short"}, "at least 32"),
        ({"AIRSTATE_URL": "http://a", "AIRSTATE_ADMIN_TOKEN_FILE": "/nonexistent/t"}, "cannot read"),
        (
            {"AIRSTATE_URL": "http://a", "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN, "AIRSTATE_TIMEOUT_SECONDS": "0"},
            "AIRSTATE_TIMEOUT_SECONDS must be a positive",
        ),
        (
            {"AIRSTATE_URL": "http://a", "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN, "AIRSTATE_TIMEOUT_SECONDS": "inf"},
            "AIRSTATE_TIMEOUT_SECONDS must be a positive",
        ),
        (
            {"AIRSTATE_URL": "http://a", "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN, "AIRSTATE_MAX_CONNECTIONS": "1.5"},
            "AIRSTATE_MAX_CONNECTIONS must be a positive whole",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(AirstateConfigError, match=message):
        Settings.load(environ, no_conf)
