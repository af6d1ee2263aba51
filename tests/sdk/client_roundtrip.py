"""Drives a running airstate with Airflow's real Task SDK client (apache-airflow-task-sdk 1.3.2).

Environment: AIRSTATE_BASE_URL (".../execution/"), AIRSTATE_TOKEN (execution JWT whose subject
is AIRSTATE_TI_ID), AIRSTATE_TI_ID, AIRSTATE_ASSET_NAME and AIRSTATE_ASSET_URI (one active
asset). Prints one line per case and a closing "N passed, M failed"; exits 1 on any failure.
"""

import os
import sys
import traceback
import uuid
from datetime import datetime, timedelta, timezone

from airflow.sdk.api.client import Client
from airflow.sdk.execution_time.comms import ErrorResponse
from airflow.sdk.exceptions import ErrorType

BASE = os.environ["AIRSTATE_BASE_URL"]
TI = uuid.UUID(os.environ["AIRSTATE_TI_ID"])
ASSET_NAME = os.environ["AIRSTATE_ASSET_NAME"]
ASSET_URI = os.environ["AIRSTATE_ASSET_URI"]

client = Client(base_url=BASE, token=os.environ["AIRSTATE_TOKEN"])
tasks = client.task_state_store
assets = client.asset_state_store
results = []


def case(name):
    def run(check):
        try:
            check()
        except Exception as error:  # every failure is reported, none stops the run
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            results.append((name, detail))
            print(f"FAIL {name}: {detail}", flush=True)
        else:
            results.append((name, None))
            print(f"ok {name}", flush=True)
        return check

    return run


def expect(actual, wanted, what=""):
    if actual != wanted or type(actual) is not type(wanted):
        raise AssertionError(f"{what} expected {wanted!r} ({type(wanted).__name__}), got {actual!r} ({type(actual).__name__})")


def task_value(key):
    reply = tasks.get(TI, key)
    if isinstance(reply, ErrorResponse):
        raise AssertionError(f"{key!r}: {reply}")
    return reply.value


def task_missing(key):
    reply = tasks.get(TI, key)
    if not (isinstance(reply, ErrorResponse) and reply.error == ErrorType.TASK_STORE_NOT_FOUND):
        raise AssertionError(f"{key!r} should be not-found, got {reply!r}")


VALUES = {
    "string": "spark_001",
    "empty string": "",
    "unicode": "Grüße ✓ 日本",
    "int": 42,
    "negative": -7,
    "big int": 2**70,
    "float one": 1.0,
    "float": 3.25,
    "true": True,
    "false": False,
    "list": [1, "two", [3.0, None]],
    "nested dict": {"job": {"id": "abc", "attempt": 2, "tags": ["x", "y"]}},
    "empty list": [],
    "empty dict": {},
}

for label, value in VALUES.items():

    @case(f"task round trip: {label}")
    def _(label=label, value=value):
        key = f"type/{label}"
        tasks.set(TI, key, value, None)
        expect(task_value(key), value, label)


@case("task round trip with an aware expires_at")
def _():
    tasks.set(TI, "expiring", {"a": 1}, datetime.now(timezone.utc) + timedelta(hours=1))
    expect(task_value("expiring"), {"a": 1})


@case("key with a slash")
def _():
    tasks.set(TI, "spark/job_id", "application_123", None)
    expect(task_value("spark/job_id"), "application_123")
    task_missing("spark")


@case("key with spaces and unicode")
def _():
    tasks.set(TI, "mein schlüssel #1?", [1, 2], None)
    expect(task_value("mein schlüssel #1?"), [1, 2])


@case("never-set key is not found")
def _():
    task_missing(f"never-{uuid.uuid4().hex}")


@case("overwrite returns the second value")
def _():
    tasks.set(TI, "overwrite", "first", None)
    tasks.set(TI, "overwrite", {"second": True}, None)
    expect(task_value("overwrite"), {"second": True})


@case("delete, and delete of a missing key")
def _():
    tasks.set(TI, "to-delete", 1, None)
    tasks.delete(TI, "to-delete")
    task_missing("to-delete")
    tasks.delete(TI, "to-delete")


@case("clear removes every key")
def _():
    tasks.set(TI, "a", 1, None)
    tasks.clear(TI)
    for key in ["a", "spark/job_id", "type/string", "overwrite"]:
        task_missing(key)


def asset_value(key, **where):
    reply = assets.get(key, **where)
    if isinstance(reply, ErrorResponse):
        raise AssertionError(f"{key!r}: {reply}")
    return reply.value


def asset_missing(key, **where):
    reply = assets.get(key, **where)
    if not (isinstance(reply, ErrorResponse) and reply.error == ErrorType.ASSET_STORE_NOT_FOUND):
        raise AssertionError(f"{key!r} should be not-found, got {reply!r}")


@case("asset set by name, read by uri")
def _():
    assets.set("watermark", {"date": "2026-04-29", "rows": 2**64}, name=ASSET_NAME)
    expect(asset_value("watermark", uri=ASSET_URI), {"date": "2026-04-29", "rows": 2**64})
    expect(asset_value("watermark", name=ASSET_NAME), {"date": "2026-04-29", "rows": 2**64})


@case("asset missing key and unknown asset are not found")
def _():
    asset_missing("nope", name=ASSET_NAME)
    asset_missing("watermark", name=f"no-such-asset-{uuid.uuid4().hex}")


@case("asset delete and clear")
def _():
    assets.set("a", 1, uri=ASSET_URI)
    assets.set("b", 2.0, name=ASSET_NAME)
    expect(asset_value("b", uri=ASSET_URI), 2.0)
    assets.delete("a", name=ASSET_NAME)
    asset_missing("a", uri=ASSET_URI)
    assets.delete("a", name=ASSET_NAME)
    assets.clear(uri=ASSET_URI)
    asset_missing("b", name=ASSET_NAME)
    asset_missing("watermark", name=ASSET_NAME)


failed = [name for name, error in results if error]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
