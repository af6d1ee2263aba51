#!/usr/bin/env bash
# Installs @redocly/cli (npm, pinned) into a folder (default target/tmp/redocly) once, and
# prints the path of its `redocly` command on the last line.
set -euo pipefail
version=2.77.0
dir="$(realpath -m "${1:-$(dirname "$0")/../target/tmp/redocly}")"
bin="$dir/node_modules/.bin/redocly"
if ! [ -x "$bin" ] || ! grep -q "\"version\": \"$version\"" "$dir/node_modules/@redocly/cli/package.json" 2>/dev/null; then
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --no-save --prefix "$dir" "@redocly/cli@$version" >&2
fi
echo "$bin"
