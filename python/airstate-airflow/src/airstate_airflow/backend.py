"""
``AirstateBackend``: Airflow's ``[state_store] backend``, storing in airstate over HTTP.

It subclasses ``MetastoreBackend`` for one reason: Airflow's Execution API passes the asset
writer (task, watcher, api) only to a ``MetastoreBackend``, through
``set_asset_state_store(kind=...)``. Every method of ``MetastoreBackend`` is overridden here,
and any that is not (a private helper, or one a later Airflow adds) is replaced by one that
raises, so no call ever reaches the metastore: state lives in airstate or nowhere.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import httpx

from airflow._shared.state import AssetScope, AssetStateStoreWriterKind, StoreScope, TaskScope
from airflow.state.metastore import MetastoreBackend
from airstate_airflow.errors import AirstateError, AirstateUnavailable
from airstate_airflow.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

_USER_AGENT = "airstate-airflow/0.1.0"
# The admin API splices the stored JSON text in first, so it can be returned unchanged.
_ENTRY_PREFIX = '{"value":'


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    #: A 200 carries an entry whose value is the result; a missing key is ``None``.
    reads_value: bool = False


def _segment(text: str) -> str:
    return quote(text, safe="")


def _task_path(scope: TaskScope, key: str | None = None) -> str:
    path = (
        f"/admin/v1/dags/{_segment(scope.dag_id)}/dagRuns/{_segment(scope.run_id)}"
        f"/taskInstances/{_segment(scope.task_id)}/state-store"
    )
    return path if key is None else f"{path}/{_segment(key)}"


def _asset_target(scope: AssetScope, key: str | None = None) -> tuple[str, dict[str, str]]:
    # Server-side, Airflow always hands over the asset id; name and URI are what a
    # worker-side caller has.
    if scope.asset_id is not None:
        path = f"/admin/v1/assets/by-id/{int(scope.asset_id)}/state-store"
        return (path if key is None else f"{path}/{_segment(key)}"), {}
    by, ident = ("name", scope.name) if scope.name is not None else ("uri", scope.uri)
    params = {by: str(ident)}
    if key is None:
        return f"/admin/v1/assets/by-{by}/state-store", params
    params["key"] = key
    return f"/admin/v1/assets/by-{by}/state-store/value", params


def _unknown_scope(scope: object) -> NoReturn:
    raise TypeError(
        f"AirstateBackend takes airflow.state.TaskScope or AssetScope, got {type(scope).__qualname__} "
        "(it is a server-side [state_store] backend, not a [workers] state_store_backend)"
    )


def _checked_json(key: str, value: str) -> str:
    # The value is spliced into the request body as JSON text: refuse anything that is not.
    try:
        json.loads(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the value of state key {key!r} is not JSON text: {error}") from error
    return value


def _expiry(expires_at: datetime | None) -> str:
    if expires_at is None:
        return "null"
    if expires_at.tzinfo is None or expires_at.utcoffset() is None:
        raise ValueError(f"expires_at must carry a time zone, got {expires_at.isoformat()!r}")
    return json.dumps(expires_at.isoformat())


def _writer(
    kind: AssetStateStoreWriterKind,
    dag_id: str | None,
    run_id: str | None,
    task_id: str | None,
    map_index: int | None,
) -> dict[str, Any]:
    kind.validate_writer_fields(dag_id, run_id, task_id, map_index)
    writer: dict[str, Any] = {"kind": kind.value}
    if kind is AssetStateStoreWriterKind.TASK:
        writer.update(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)
    return writer


def _detail(response: httpx.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return body.get("detail", body) if isinstance(body, dict) else body


def _is_missing_key(detail: object) -> bool:
    """A key that does not exist, as opposed to an unknown asset or an absent route."""
    if not isinstance(detail, dict) or detail.get("reason") != "not_found":
        return False
    message = str(detail.get("message", ""))
    return message.startswith(("Task state store key ", "Asset state store key "))


class AirstateBackend(MetastoreBackend):
    """
    Keeps Airflow's task and asset state in airstate, through airstate's admin API.

    Configure with ``[state_store] backend = airstate_airflow.AirstateBackend`` on the
    api-server, the triggerer and the scheduler. Settings: see :class:`Settings`.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = Settings.load() if settings is None else settings
        self._client = httpx.Client(**self._client_options())

    def __repr__(self) -> str:
        return f"AirstateBackend({self.settings!r})"

    def _client_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "base_url": s.url,
            "timeout": httpx.Timeout(s.timeout_seconds, connect=s.connect_timeout_seconds),
            "limits": httpx.Limits(
                max_connections=s.max_connections, max_keepalive_connections=s.max_connections
            ),
            "headers": {"Authorization": f"Bearer {s.token}", "User-Agent": _USER_AGENT},
        }

    def close(self) -> None:
        """Closes the pooled connections (Airflow never does; a process exit does)."""
        self._client.close()

    # --- requests -------------------------------------------------------------------

    def _get(self, scope: StoreScope, key: str) -> _Request:
        match scope:
            case TaskScope():
                return _Request(
                    "GET", _task_path(scope, key), {"map_index": str(scope.map_index)}, reads_value=True
                )
            case AssetScope():
                path, params = _asset_target(scope, key)
                return _Request("GET", path, params, reads_value=True)
            case _:
                _unknown_scope(scope)

    def _set(
        self,
        scope: StoreScope,
        key: str,
        value: str,
        expires_at: datetime | None = None,
        writer: dict[str, Any] | None = None,
    ) -> _Request:
        # Airflow's Execution API stores values over max_value_storage_bytes (the worker only
        # warns), so these writes skip the admin API's copy of that Core REST API limit.
        value = _checked_json(key, value)
        match scope:
            case TaskScope():
                body = f'{{"value":{value},"expires_at":{_expiry(expires_at)}}}'
                params = {"map_index": str(scope.map_index), "skip_value_limit": "true"}
                return _Request("PUT", _task_path(scope, key), params, body)
            case AssetScope():
                # Without a writer (a plain set()) airstate records Airflow's `api` kind.
                extra = "" if writer is None else f',"last_updated_by":{json.dumps(writer)}'
                path, params = _asset_target(scope, key)
                params["skip_value_limit"] = "true"
                return _Request("PUT", path, params, f'{{"value":{value}{extra}}}')
            case _:
                _unknown_scope(scope)

    def _delete(self, scope: StoreScope, key: str) -> _Request:
        match scope:
            case TaskScope():
                return _Request("DELETE", _task_path(scope, key), {"map_index": str(scope.map_index)})
            case AssetScope():
                path, params = _asset_target(scope, key)
                return _Request("DELETE", path, params)
            case _:
                _unknown_scope(scope)

    def _clear(self, scope: StoreScope, all_map_indices: bool) -> _Request:
        match scope:
            case TaskScope():
                params = {"map_index": str(scope.map_index)}
                if all_map_indices:
                    params["all_map_indices"] = "true"
                return _Request("DELETE", _task_path(scope), params)
            case AssetScope():
                path, params = _asset_target(scope)
                return _Request("DELETE", path, params)
            case _:
                _unknown_scope(scope)

    # --- sending ----------------------------------------------------------------------

    def _where(self, request: _Request) -> str:
        return f"{request.method} {self.settings.url}{request.path}"

    def _unreachable(self, request: _Request, error: Exception) -> AirstateUnavailable:
        return AirstateUnavailable(
            f"airstate at {self.settings.url} is unreachable ({type(error).__name__}: {error}) "
            f"on {self._where(request)}; Airflow's metastore is not used instead"
        )

    def _send(self, request: _Request) -> str | None:
        try:
            response = self._client.request(
                request.method, request.path, params=request.params, content=request.body,
                headers=_content_type(request),
            )
        except (httpx.TimeoutException, httpx.TransportError) as error:
            raise self._unreachable(request, error) from error
        return self._finish(request, response)

    async def _asend(self, request: _Request) -> str | None:
        # A client per call: an AsyncClient belongs to one event loop, and Airflow 3.3.2
        # calls only the sync methods (from worker threads), so the twins stay simple.
        try:
            async with httpx.AsyncClient(**self._client_options()) as client:
                response = await client.request(
                    request.method, request.path, params=request.params, content=request.body,
                    headers=_content_type(request),
                )
        except (httpx.TimeoutException, httpx.TransportError) as error:
            raise self._unreachable(request, error) from error
        return self._finish(request, response)

    def _finish(self, request: _Request, response: httpx.Response) -> str | None:
        status = response.status_code
        if 200 <= status < 300:
            return _value_text(response, self._where(request)) if request.reads_value else None
        detail = _detail(response)
        if status == 404 and _is_missing_key(detail):
            return None
        url = self.settings.url
        if status >= 500:
            raise AirstateUnavailable(
                f"airstate at {url} answered {status} to {self._where(request)}: {detail}"
            )
        if status in (401, 403):
            raise AirstateError(
                f"airstate at {url} refused the admin token ({status}: {detail}): give the backend "
                "the AIRSTATE_ADMIN_TOKEN that airstate runs with"
            )
        if status == 404 and detail == "Not Found":
            raise AirstateError(
                f"airstate at {url} serves no admin API (404 on {self._where(request)}): start "
                "airstate with AIRSTATE_ADMIN_TOKEN set"
            )
        raise AirstateError(f"airstate at {url} refused {self._where(request)}: {status} {detail}")

    # --- BaseStoreBackend -------------------------------------------------------------

    def get(self, scope: StoreScope, key: str, *, session: Session | None = None) -> str | None:
        return self._send(self._get(scope, key))

    def set(
        self,
        scope: StoreScope,
        key: str,
        value: str,
        *,
        expires_at: datetime | None = None,
        session: Session | None = None,
    ) -> None:
        self._send(self._set(scope, key, value, expires_at))

    def delete(self, scope: StoreScope, key: str, *, session: Session | None = None) -> None:
        self._send(self._delete(scope, key))

    def clear(
        self, scope: StoreScope, *, all_map_indices: bool = False, session: Session | None = None
    ) -> None:
        self._send(self._clear(scope, all_map_indices))

    async def aget(self, scope: StoreScope, key: str, *, session: AsyncSession | None = None) -> str | None:
        return await self._asend(self._get(scope, key))

    async def aset(
        self,
        scope: StoreScope,
        key: str,
        value: str,
        *,
        expires_at: datetime | None = None,
        session: AsyncSession | None = None,
    ) -> None:
        await self._asend(self._set(scope, key, value, expires_at))

    async def adelete(self, scope: StoreScope, key: str, *, session: AsyncSession | None = None) -> None:
        await self._asend(self._delete(scope, key))

    async def aclear(
        self, scope: StoreScope, *, all_map_indices: bool = False, session: AsyncSession | None = None
    ) -> None:
        await self._asend(self._clear(scope, all_map_indices))

    # --- what Airflow calls on a MetastoreBackend only --------------------------------

    def set_asset_state_store(
        self,
        scope: AssetScope,
        key: str,
        value: str,
        *,
        kind: AssetStateStoreWriterKind,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        map_index: int | None = None,
        session: Session | None = None,
    ) -> None:
        """An asset write with its writer, recorded by airstate as Airflow records it."""
        writer = _writer(kind, dag_id, run_id, task_id, map_index)
        self._send(self._set(scope, key, value, writer=writer))

    async def aset_asset_state_store(
        self,
        scope: AssetScope,
        key: str,
        value: str,
        *,
        kind: AssetStateStoreWriterKind,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        map_index: int | None = None,
        session: AsyncSession | None = None,
    ) -> None:
        writer = _writer(kind, dag_id, run_id, task_id, map_index)
        await self._asend(self._set(scope, key, value, writer=writer))

    def cleanup(self) -> None:
        """airstate never serves an expired key and reclaims it itself: nothing to do here."""
        log.info("airstate reclaims expired state keys itself; nothing to clean in the metastore")

    def _summary_dry_run(self) -> dict[str, list[Any]]:
        # `airflow state-store clean --dry-run` asks; airstate holds nothing left to expire.
        return {"expired": []}


def _content_type(request: _Request) -> dict[str, str]:
    return {} if request.body is None else {"Content-Type": "application/json"}


def _value_text(response: httpx.Response, where: str) -> str:
    text = response.text
    if text.startswith(_ENTRY_PREFIX):
        try:
            _, end = json.JSONDecoder().raw_decode(text, len(_ENTRY_PREFIX))
            return text[len(_ENTRY_PREFIX) : end]
        except ValueError:
            pass
    try:
        return json.dumps(response.json()["value"])
    except (ValueError, KeyError, TypeError) as error:
        raise AirstateError(f"airstate answered {where} with an unreadable entry: {text[:200]!r}") from error


def _refuse_metastore(name: str) -> Callable[..., NoReturn]:
    def refused(self: AirstateBackend, *args: object, **kwargs: object) -> NoReturn:
        raise AirstateError(
            f"MetastoreBackend.{name} would use Airflow's metastore; AirstateBackend keeps state "
            "in airstate only"
        )

    refused.__name__ = refused.__qualname__ = name
    return refused


#: The MetastoreBackend methods replaced by refusals (none is expected on Airflow 3.3.2
#: beyond its private helpers; tests check that nothing public is among them).
REFUSED: tuple[str, ...] = tuple(
    name
    for name, member in vars(MetastoreBackend).items()
    if inspect.isfunction(member) and not name.startswith("__") and name not in vars(AirstateBackend)
)
for _name in REFUSED:
    setattr(AirstateBackend, _name, _refuse_metastore(_name))
