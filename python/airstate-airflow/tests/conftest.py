"""
The real things the tests run against: the ``airstate`` binary (started here, as often as a
test needs a differently configured one) over a real Redis, and a real PostgreSQL holding
Airflow's metastore, both started by ``tests/it/airflow_backend.rs``, which passes

- ``AIRSTATE_TEST_BINARY``: the ``airstate`` binary cargo built;
- ``AIRSTATE_TEST_REDIS_URL``: a ``redis-server`` of its own;
- ``AIRSTATE_TEST_PG_URL``: a database loaded from ``../shared/airflow/metastore-schema.sql``
  (the tables airstate reads), to which Airflow's other tables are added here;
- ``AIRSTATE_TEST_PORTS``: free loopback ports for the airstate servers.

Airflow reads its configuration at import, so it is set here, before anything imports it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise pytest.UsageError(
            f"{name} is not set: run these tests through `cargo test --test it airflow_backend::`"
        )
    return value


BINARY = _required("AIRSTATE_TEST_BINARY")
REDIS_URL = _required("AIRSTATE_TEST_REDIS_URL")
PG_URL = _required("AIRSTATE_TEST_PG_URL")
_PORTS = [int(p) for p in _required("AIRSTATE_TEST_PORTS").split(",") if p]

SECRET = "test-secret-that-is-long-enough-for-hs512"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123456789abcdef"
AUDIENCE = "urn:airflow.apache.org:task"

_home = tempfile.mkdtemp(prefix="airstate-airflow-home-")
os.environ.update(
    {
        "AIRFLOW_HOME": _home,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": PG_URL.replace("postgresql://", "postgresql+psycopg2://", 1),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(_home, "dags"),
        "AIRFLOW__API_AUTH__JWT_SECRET": SECRET,
        "AIRFLOW__STATE_STORE__BACKEND": "airstate_airflow.AirstateBackend",
        "AIRFLOW__STATE_STORE__CLEAR_ON_SUCCESS": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        # The Task SDK client retries a 5xx (as it does for a metastore error); quickly here.
        "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "3",
        "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MIN": "0.1",
        "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": "0.3",
    }
)


def free_port() -> int:
    """A port from the Rust side's list, else one the kernel picks."""
    if _PORTS:
        return _PORTS.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Airstate:
    """One ``airstate serve`` process."""

    url: str
    prefix: str
    process: subprocess.Popen[bytes]
    log: str
    env: dict[str, str] = field(default_factory=dict)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=10, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_airstate(**overrides: str) -> Airstate:
    """
    ``airstate serve`` on a free port: Redis, the metastore identity and the admin API by
    default; ``overrides`` add or replace variables (an empty value removes one).
    """
    port = free_port()
    prefix = f"py-{uuid.uuid4().hex[:12]}:"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AIRSTATE_LISTEN": f"127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": SECRET,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        "AIRSTATE_REDIS_URL": REDIS_URL,
        "AIRSTATE_KEY_PREFIX": prefix,
        "AIRSTATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "AIRSTATE_IDENTITY_CACHE_SECONDS": "1",
        "AIRSTATE_REDIS_TIMEOUT_MS": "500",
        "RUST_LOG": "warn",
    }
    env.update(overrides)
    env = {k: v for k, v in env.items() if v != ""}
    log = tempfile.NamedTemporaryFile(prefix="airstate-", suffix=".log", delete=False)
    process = subprocess.Popen([BINARY, "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"airstate exited with {process.returncode}: {open(log.name).read()}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"airstate did not start: {open(log.name).read()}")
            time.sleep(0.05)
    return Airstate(url=url, prefix=prefix, process=process, log=log.name, env=env)


@pytest.fixture(scope="session")
def airstate() -> Iterator[Airstate]:
    server = start_airstate()
    os.environ["AIRSTATE_URL"] = server.url
    os.environ["AIRSTATE_ADMIN_TOKEN"] = ADMIN_TOKEN
    yield server
    server.stop()


@pytest.fixture(scope="session")
def metastore() -> Iterator[Any]:
    """Airflow's SQLAlchemy engine over the test database, with all of Airflow's tables."""
    from airflow import settings
    from airflow.utils.db import initdb

    # The tables airstate reads are already there, from the schema file. Airflow's own
    # initialisation of a database without an alembic version (what `airflow db migrate`
    # does on a fresh one: create the rest from its models, stamp the head, add the
    # default pool) adds what Airflow's routes and `airflow dags test` touch besides.
    initdb()
    yield settings.engine


def sql(statement: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg2  # type: ignore[import-untyped]

    with psycopg2.connect(PG_URL) as connection, connection.cursor() as cursor:
        cursor.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Ti:
    id: uuid.UUID
    dag_id: str
    run_id: str
    task_id: str
    map_index: int


def make_ti(
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str = "task",
    map_index: int = -1,
    state: str = "running",
) -> Ti:
    """A dag, dag_run and task_instance row, as Airflow writes them (the NOT NULL columns)."""
    dag_id = dag_id or unique("dag")
    run_id = run_id or f"manual__{unique('run')}+00:00"
    sql("INSERT INTO dag_bundle (name) VALUES ('dags-folder') ON CONFLICT DO NOTHING")
    sql(
        "INSERT INTO dag (dag_id, is_paused, is_stale, exceeds_max_non_backfill, bundle_name, "
        "timetable_type, timetable_partitioned, timetable_periodic, partition_mapper_info, "
        "max_active_tasks, max_consecutive_failed_dag_runs, has_task_concurrency_limits, "
        "fail_fast, owners, fileloc) VALUES (%s, false, false, false, 'dags-folder', '', false, "
        "false, '[]', 16, 0, false, false, 'airflow', '/dags/x.py') ON CONFLICT DO NOTHING",
        dag_id,
    )
    sql(
        "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state, logical_date) "
        "VALUES (%s, %s, 'manual', now(), 'running', now()) ON CONFLICT (dag_id, run_id) DO NOTHING",
        dag_id,
        run_id,
    )
    ti = Ti(uuid.uuid4(), dag_id, run_id, task_id, map_index)
    sql(
        "INSERT INTO task_instance (id, task_id, dag_id, run_id, map_index, try_number, max_tries, "
        "pool, pool_slots, state, start_date) VALUES (%s, %s, %s, %s, %s, 1, 0, 'default_pool', 1, %s, now())",
        str(ti.id),
        task_id,
        dag_id,
        run_id,
        map_index,
        state,
    )
    return ti


def make_asset(active: bool = True) -> tuple[int, str, str]:
    name = unique("asset")
    uri = f"s3://bucket/{name}"
    rows = sql(
        "INSERT INTO asset (name, uri, \"group\", extra, created_at, updated_at) "
        "VALUES (%s, %s, 'asset', '{}', now(), now()) RETURNING id",
        name,
        uri,
    )
    if active:
        sql("INSERT INTO asset_active (name, uri) VALUES (%s, %s)", name, uri)
    return int(rows[0][0]), name, uri


def task_token(ti_id: uuid.UUID) -> str:
    """An execution token as Airflow's api-server mints it for a task."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    generator = JWTGenerator(secret_key=SECRET, valid_for=600, audience=AUDIENCE)
    return generator.generate(extras={"sub": str(ti_id), "scope": "execution"})


def metastore_state_rows() -> tuple[int, int]:
    """Rows of Airflow's own state tables: the backend must never write any."""
    tasks = sql("SELECT count(*) FROM task_state_store")[0][0]
    assets = sql("SELECT count(*) FROM asset_state_store")[0][0]
    return int(tasks), int(assets)
