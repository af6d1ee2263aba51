#!/usr/bin/env bash
# Makes a virtualenv holding schemathesis (pinned) and prints its executable's path on the
# last line. Quick when it already exists.
set -euo pipefail
version=4.32.5
venv="${1:-$(dirname "$0")/../target/schemathesis-venv}"
st="$venv/bin/schemathesis"
if [ -x "$st" ] && "$st" --version 2>/dev/null | grep -q "$version"; then
  echo "$st"
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$version" >&2
"$st" --version >&2
echo "$st"
