#!/usr/bin/env bash
# Writes ffi/include/edgetune.h from the crate with the pinned cbindgen (installed on first
# use); .ci/run then diffs it against the committed header.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.29.4
if [ "$(cbindgen --version 2>/dev/null)" != "cbindgen $version" ]; then
    cargo install --quiet --locked cbindgen --version "$version"
fi
cbindgen --config ffi/cbindgen.toml --crate edgetune-ffi --output ffi/include/edgetune.h ffi
