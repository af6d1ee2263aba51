#!/usr/bin/env bash
# Makes (once) a virtualenv holding the real Apache Airflow 3.3.2 with PostgreSQL support,
# pytest, and the airstate-airflow package from python/ installed editable, and prints its
# python's path on the last line. It lives outside the work tree
# (${AIRSTATE_CACHE_DIR:-~/.cache/airstate}) so that every clone and CI run on this
# machine reuses it; delete the folder to rebuild it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${AIRSTATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airstate}"
venv="${1:-$cache/airflow-3.3.2-venv}"
python="$venv/bin/python"
# Several clones (and test binaries) share the venv: one pip at a time.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock -w 900 9
if ! [ -x "$python" ] || ! "$python" -c 'import airflow.state, psycopg2, pytest' >/dev/null 2>&1; then
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$python" -m pip install --quiet --disable-pip-version-check \
    'apache-airflow[postgres]==3.3.2' 'pytest>=8,<9' >&2
  "$python" -c 'import airflow.state, psycopg2, pytest' >&2
fi
# The backend package is installed from this clone each time (cheap: editable, no deps).
# The install points at whichever clone ran last, so tests of the package put their own
# clone's src/ first on PYTHONPATH (tests/it/airflow_backend.rs).
# Without build isolation that needs a setuptools that builds wheels by itself (>= 70.1;
# the venv's own 65 needs the separate `wheel` package).
if [ -d "$root/python/airstate-airflow" ]; then
  if ! "$python" -c 'import sys, setuptools; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' >/dev/null 2>&1; then
    "$python" -m pip install --quiet --disable-pip-version-check 'setuptools>=70.1' >&2
  fi
  # tests/it/airflow_backend.rs type-checks the package with mypy --strict.
  if ! "$python" -c 'import mypy' >/dev/null 2>&1; then
    "$python" -m pip install --quiet --disable-pip-version-check 'mypy>=1.10,<3' >&2
  fi
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -e "$root/python/airstate-airflow" >&2
fi
echo "$python"
