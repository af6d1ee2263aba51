"""An Apache Airflow 3.3 ``[state_store]`` backend that keeps state in airstate."""

from __future__ import annotations

from airstate_airflow.backend import AirstateBackend
from airstate_airflow.errors import AirstateConfigError, AirstateError, AirstateUnavailable
from airstate_airflow.settings import Settings

__all__ = [
    "AirstateBackend",
    "AirstateConfigError",
    "AirstateError",
    "AirstateUnavailable",
    "Settings",
]
