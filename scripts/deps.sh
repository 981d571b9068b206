#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing: protoc (etcd-client
# compiles etcd's protos with it at build time, and needs the well-known types such as
# google/protobuf/descriptor.proto, which Debian ships in libprotobuf-dev; Sluice's own protos
# use protox). With --test, also etcd (the cluster tests start a throw-away etcd server).
# With --python, Python 3 with venv (the Python SDK's tests in .ci/run). Debian/Ubuntu, via
# apt-get.
set -euo pipefail

need=()
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc finds the well-known types next to itself or in /usr/include.
[ -f /usr/include/google/protobuf/descriptor.proto ] || [ -n "${PROTOC_INCLUDE:-}" ] ||
    need+=(libprotobuf-dev)
for flag in "$@"; do
    case "$flag" in
    --test) command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || need+=(etcd-server) ;;
    --python) python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3 python3-venv) ;;
    *) echo "usage: $0 [--test] [--python]" >&2; exit 2 ;;
    esac
done
[ ${#need[@]} -eq 0 ] && exit 0

command -v apt-get >/dev/null || {
    echo "please install: ${need[*]} (no apt-get here)" >&2
    exit 1
}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
