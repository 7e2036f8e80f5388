#!/usr/bin/env bash
# Sets up and runs avgate: installs ClamAV if missing, builds, and starts
# `avgate serve` with its own supervised clamd on http://127.0.0.1:8080.
# Extra arguments go to `avgate serve` (see `avgate serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
cargo build --release --locked -p avgate
# Where cargo put it: CARGO_TARGET_DIR, when set, moves the build.
exec "${CARGO_TARGET_DIR:-target}/release/avgate" serve "$@"
