"""
Airflow 3.3.2's own code calling the configured backend
(``AIRFLOW__STATE_STORE__BACKEND=airstate_airflow.AirstateBackend``, set in conftest):
``get_state_backend()``, the Execution API's state routes served in-process exactly as the
triggerer and ``airflow dags test`` serve them, the same routes behind Airflow's real JWT
auth (as the api-server serves workers), and ``clear_on_success``. What they write is read
back through airstate's own Execution API, as a worker pointed at airstate reads it, and
Airflow's metastore state tables stay empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

import airflow.state
from airstate_airflow import AirstateBackend, AirstateUnavailable, Settings
from conftest import (
    ADMIN_TOKEN,
    Airstate,
    Ti,
    make_asset,
    make_ti,
    metastore_state_rows,
    sql,
    task_token,
)


@pytest.fixture
def configured(airstate: Airstate, metastore: Any) -> Iterator[Airstate]:
    """Airflow's cached backend made afresh from the configuration (pointing at ``airstate``)."""
    airflow.state._backend_instance = None
    yield airstate
    airflow.state._backend_instance = None


@pytest.fixture(scope="module")
def triggerer_client(airstate: Airstate, metastore: Any) -> Any:
    """The Task SDK client the triggerer builds: Airflow's Execution API served in-process."""
    from airflow.jobs.triggerer_job_runner import TriggerRunnerSupervisor

    # The triggerer's own factory; it reads nothing of its instance.
    return TriggerRunnerSupervisor.make_client(None)  # type: ignore[arg-type]


def worker_get(airstate: Airstate, path: str, token: str, **params: str) -> httpx.Response:
    """A read through airstate's own Execution API, as a worker pointed at airstate makes it."""
    return httpx.get(
        f"{airstate.url}/execution{path}", params=params, headers={"Authorization": f"Bearer {token}"}
    )


def worker_put(airstate: Airstate, path: str, token: str, body: str, **params: str) -> httpx.Response:
    return httpx.put(
        f"{airstate.url}/execution{path}",
        params=params,
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def test_get_state_backend_loads_the_configured_class(configured: Airstate) -> None:
    backend = airflow.state.get_state_backend()
    assert type(backend) is AirstateBackend
    assert backend.settings.url == configured.url
    assert airflow.state.get_state_backend() is backend  # one per process, as Airflow caches it


def test_triggerer_watcher_writes_reach_tasks_reading_through_airstate(
    configured: Airstate, triggerer_client: Any
) -> None:
    asset_id, name, uri = make_asset()
    reader = make_ti()
    before = metastore_state_rows()
    # A watcher's write, as an event trigger's asset_state_store makes it in the triggerer.
    triggerer_client.asset_state_store.set("offset", {"n": 1180591620717411303424, "f": 1.5}, name=name)
    seen = worker_get(configured, "/store/asset/by-uri/value", task_token(reader.id), uri=uri, key="offset")
    assert seen.status_code == 200, seen.text
    assert seen.json() == {"value": {"n": 1180591620717411303424, "f": 1.5}}
    entry = configured.admin("GET", f"/admin/v1/assets/by-id/{asset_id}/state-store/offset").json()
    assert entry["last_updated_by"] == {"kind": "watcher"}
    # And the other way: a task writes through airstate, the watcher reads it.
    put = worker_put(
        configured, "/store/asset/by-name/value", task_token(reader.id), '{"value": [1, 2]}', name=name, key="from-task"
    )
    assert put.status_code == 204, put.text
    assert triggerer_client.asset_state_store.get("from-task", uri=uri).value == [1, 2]
    triggerer_client.asset_state_store.delete("offset", name=name)
    assert worker_get(configured, "/store/asset/by-name/value", task_token(reader.id), name=name, key="offset").status_code == 404
    triggerer_client.asset_state_store.clear(uri=uri)
    assert triggerer_client.asset_state_store.get("from-task", name=name).error.value == "ASSET_STORE_NOT_FOUND"
    assert metastore_state_rows() == before == (0, 0)


def test_in_process_task_state_routes_share_state_with_airstate(
    configured: Airstate, triggerer_client: Any
) -> None:
    # `airflow dags test` runs its task against this same in-process API.
    ti = make_ti(map_index=2)
    token = task_token(ti.id)
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    triggerer_client.task_state_store.set(ti.id, "job/id", {"job": "j-7", "f": 1.0}, expires)
    seen = worker_get(configured, f"/store/ti/{ti.id}/job%2Fid", token)
    assert seen.status_code == 200, seen.text
    # The JSON text Airflow's route made (json.dumps), stored and served unchanged.
    assert seen.text == '{"value":{"job": "j-7", "f": 1.0}}'
    put = worker_put(configured, f"/store/ti/{ti.id}/lease", token, '{"value": "worker-3"}')
    assert put.status_code == 204, put.text
    assert triggerer_client.task_state_store.get(ti.id, "lease").value == "worker-3"
    triggerer_client.task_state_store.delete(ti.id, "lease")
    assert worker_get(configured, f"/store/ti/{ti.id}/lease", token).status_code == 404
    triggerer_client.task_state_store.clear(ti.id)
    assert worker_get(configured, f"/store/ti/{ti.id}/job%2Fid", token).status_code == 404
    assert metastore_state_rows() == (0, 0)


@pytest.fixture(scope="module")
def execution_api(airstate: Airstate, metastore: Any) -> Iterator[Any]:
    """Airflow's Execution API app as the api-server mounts it, with its real JWT checks."""
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app

    with TestClient(create_app(apps="execution")) as client:
        yield client


def test_api_server_routes_record_the_task_writer(configured: Airstate, execution_api: Any) -> None:
    asset_id, name, _ = make_asset()
    ti = make_ti(task_id="publish", map_index=4)
    headers = {"Authorization": f"Bearer {task_token(ti.id)}"}
    refused = execution_api.put(
        "/execution/store/asset/by-name/value", params={"name": name, "key": "k"}, json={"value": 1},
        headers={"Authorization": "Bearer not-a-token"},
    )
    assert refused.status_code == 403, refused.text
    put = execution_api.put(
        "/execution/store/asset/by-name/value", params={"name": name, "key": "k"}, json={"value": {"v": 1}}, headers=headers
    )
    assert put.status_code == 204, put.text
    entry = configured.admin("GET", f"/admin/v1/assets/by-id/{asset_id}/state-store/k").json()
    assert entry["value"] == {"v": 1}
    assert entry["last_updated_by"] == {
        "kind": "task",
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": "publish",
        "map_index": 4,
    }
    put = execution_api.put(f"/execution/store/ti/{ti.id}/k", json={"value": "t"}, headers=headers)
    assert put.status_code == 204, put.text
    assert worker_get(configured, f"/store/ti/{ti.id}/k", task_token(ti.id)).json() == {"value": "t"}
    got = execution_api.get(f"/execution/store/ti/{ti.id}/k", headers=headers)
    assert got.json() == {"value": "t"}
    assert metastore_state_rows() == (0, 0)


def _succeed(client: Any, ti: Ti) -> None:
    client.task_instances.succeed(
        ti.id, when=datetime.now(timezone.utc), task_outlets=[], outlet_events=[], rendered_map_index=None
    )


def test_clear_on_success_clears_airstate(configured: Airstate, triggerer_client: Any) -> None:
    dag_run = make_ti(task_id="other")
    done = make_ti(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id="mapped", map_index=0)
    sibling = make_ti(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id="mapped", map_index=1)
    for ti in (done, sibling):
        put = worker_put(configured, f"/store/ti/{ti.id}/k", task_token(ti.id), '{"value": 1}')
        assert put.status_code == 204, put.text
    # The task's success, as its supervisor reports it.
    _succeed(triggerer_client, done)
    assert sql("SELECT state FROM task_instance WHERE id = %s", str(done.id)) == [("success",)]
    assert worker_get(configured, f"/store/ti/{done.id}/k", task_token(done.id)).status_code == 404
    # Only the succeeded map index is cleared.
    assert worker_get(configured, f"/store/ti/{sibling.id}/k", task_token(sibling.id)).json() == {"value": 1}
    assert metastore_state_rows() == (0, 0)


def test_airstate_down_fails_airflows_routes_and_the_metastore_stays_empty(
    configured: Airstate, triggerer_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    ti = make_ti()
    put = worker_put(configured, f"/store/ti/{ti.id}/kept", task_token(ti.id), '{"value": "before"}')
    assert put.status_code == 204, put.text
    airflow.state._backend_instance = AirstateBackend(Settings(url=dead, token=ADMIN_TOKEN))
    with pytest.raises(AirstateUnavailable, match=f"airstate at {dead} is unreachable"):
        airflow.state.get_state_backend().set(airflow.state.TaskScope(ti.dag_id, ti.run_id, ti.task_id), "k", "1")
    from airflow.sdk.api.client import ServerResponseError

    with pytest.raises(ServerResponseError) as caught:
        triggerer_client.task_state_store.set(ti.id, "k", 1, None)
    assert caught.value.response.status_code == 500
    # clear_on_success logs and swallows a backend failure (Airflow's rule): the task still
    # succeeds, and airstate still holds what it held.
    _succeed(triggerer_client, ti)
    assert sql("SELECT state FROM task_instance WHERE id = %s", str(ti.id)) == [("success",)]
    assert worker_get(configured, f"/store/ti/{ti.id}/kept", task_token(ti.id)).json() == {"value": "before"}
    assert metastore_state_rows() == (0, 0)
