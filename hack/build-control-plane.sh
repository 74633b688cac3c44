#!/usr/bin/env bash
# Build (once) and cache the local Kubernetes control-plane binaries used by tests/k8s:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm.
# They land in ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin/<component>-<version>/.
# Needs the `go` toolchain and the Go module proxy. Arguments are passed on, e.g.
#   hack/build-control-plane.sh --only etcd,kube-apiserver
#   hack/build-control-plane.sh --print-dir
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root/operator:$root/devkit${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m kubeinfer_devkit.devcluster.build "$@"
