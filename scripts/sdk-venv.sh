#!/usr/bin/env bash
# Makes a virtualenv holding Airflow's real Task SDK client (apache-airflow-task-sdk 1.3.2)
# and prints its python's path on the last line. Quick when it already exists.
set -euo pipefail
venv="${1:-$(dirname "$0")/../target/sdk-venv}"
python="$venv/bin/python"
if [ -x "$python" ] && "$python" -c 'import airflow.sdk.api.client' >/dev/null 2>&1; then
  echo "$python"
  exit 0
fi
python3 -m venv "$venv" >&2
"$python" -m pip install --quiet --disable-pip-version-check 'apache-airflow-task-sdk==1.3.2' >&2
"$python" -c 'import airflow.sdk.api.client' >&2
echo "$python"
