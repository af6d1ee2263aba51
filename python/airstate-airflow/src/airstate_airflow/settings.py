"""Where airstate is and how to reach it, read from Airflow's config or the environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from airstate_airflow.errors import AirstateConfigError

#: Airflow config section read first (so also ``AIRFLOW__AIRSTATE__URL`` and friends).
SECTION = "airstate"

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 2.0
DEFAULT_MAX_CONNECTIONS = 16
# The gateway refuses shorter admin tokens, so a shorter one is a mistake here too.
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class Settings:
    """How the backend reaches airstate's admin API."""

    url: str
    token: str
    #: Longest wait for one request: connecting, a pooled connection, sending, the reply.
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    #: Connections kept per process (and the most opened at once).
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __repr__(self) -> str:
        # Never print the token (Airflow logs the backend on errors).
        return (
            f"Settings(url={self.url!r}, timeout_seconds={self.timeout_seconds}, "
            f"connect_timeout_seconds={self.connect_timeout_seconds}, "
            f"max_connections={self.max_connections})"
        )

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        airflow_conf: Callable[[str], str | None] | None = None,
    ) -> Settings:
        """
        Read each setting from Airflow's ``[airstate]`` section, else from ``AIRSTATE_<NAME>``.

        ``environ`` and ``airflow_conf`` exist for tests; by default they are ``os.environ``
        and Airflow's own config.
        """
        env = os.environ if environ is None else environ
        lookup = _airflow_lookup if airflow_conf is None else airflow_conf

        def read(name: str) -> str | None:
            value = lookup(name)
            if value is None or value.strip() == "":
                value = env.get(f"AIRSTATE_{name.upper()}")
            if value is None or value.strip() == "":
                return None
            return value.strip()

        url = read("url")
        if url is None:
            raise AirstateConfigError(
                "airstate_airflow.AirstateBackend needs airstate's address: set AIRSTATE_URL "
                "(or [airstate] url), e.g. http://airstate:8080"
            )
        if not url.startswith(("http://", "https://")):
            raise AirstateConfigError(f"AIRSTATE_URL must be an http:// or https:// URL, got {url!r}")
        token = read("admin_token")
        token_file = read("admin_token_file")
        if token is None and token_file is not None:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    token = handle.read().strip()
            except OSError as error:
                raise AirstateConfigError(
                    f"cannot read AIRSTATE_ADMIN_TOKEN_FILE {token_file!r}: {error}"
                ) from error
        if not token:
            raise AirstateConfigError(
                "airstate_airflow.AirstateBackend needs airstate's admin token: set "
                "AIRSTATE_ADMIN_TOKEN or AIRSTATE_ADMIN_TOKEN_FILE (or [airstate] admin_token / "
                "admin_token_file), the value airstate itself runs with"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise AirstateConfigError(
                f"the airstate admin token must be at least {MIN_TOKEN_CHARS} characters "
                f"(airstate refuses shorter ones); got {len(token)}"
            )
        return cls(
            url=url.rstrip("/"),
            token=token,
            timeout_seconds=_positive(read, "timeout_seconds", DEFAULT_TIMEOUT_SECONDS),
            connect_timeout_seconds=_positive(
                read, "connect_timeout_seconds", DEFAULT_CONNECT_TIMEOUT_SECONDS
            ),
            max_connections=int(_positive(read, "max_connections", DEFAULT_MAX_CONNECTIONS, whole=True)),
        )


def _positive(read: Callable[[str], str | None], name: str, default: float, whole: bool = False) -> float:
    text = read(name)
    if text is None:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = 0
    # An unbounded wait or pool is never what a deployment wants; refuse it rather than guess.
    if not value > 0 or value == float("inf"):
        kind = "a positive whole number" if whole else "a positive number of seconds"
        raise AirstateConfigError(f"AIRSTATE_{name.upper()} must be {kind}, got {text!r}")
    return value


def _airflow_lookup(name: str) -> str | None:
    from airflow.configuration import conf

    value = conf.get(SECTION, name, fallback=None)
    return None if value is None else str(value)
