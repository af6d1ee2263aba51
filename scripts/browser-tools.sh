#!/usr/bin/env bash
# Makes (once) a folder holding playwright-core from npm, pinned, outside the work tree
# (${AIRSTATE_CACHE_DIR:-~/.cache/airstate}/node), and prints the package's folder on the last
# line. The browser is Debian's `chromium` (apt; `.ci/run` installs it), driven through
# playwright-core's executablePath, so no browser is downloaded from npm.
set -euo pipefail
version=1.65.1
cache="${AIRSTATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airstate}"
dir="${1:-$cache/node}"
package="$dir/node_modules/playwright-core"
command -v chromium >/dev/null || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 1; }
if ! [ -f "$package/package.json" ] \
  || [ "$(node -p "require('$package/package.json').version")" != "$version" ]; then
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --no-save --prefix "$dir" "playwright-core@$version" >&2
fi
echo "$package"
