"""The backend's exceptions. Airflow logs what its backend raises and fails the request."""

from __future__ import annotations


class AirstateError(RuntimeError):
    """airstate refused a request (4xx), or answered something this backend cannot read."""


class AirstateUnavailable(AirstateError):
    """airstate could not be reached in time, or answered 5xx; the same call may be retried."""


class AirstateConfigError(AirstateError):
    """The backend's settings are missing or invalid."""
