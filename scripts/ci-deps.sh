#!/usr/bin/env bash
# Installs the system packages the build and tests need, when they are missing.
# Today the workspace needs only the Rust toolchain; the cluster services will add
# protobuf-compiler (etcd-client's build) and etcd-server (membership tests) here.
set -euo pipefail
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
