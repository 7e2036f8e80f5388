#!/usr/bin/env bash
# Sets up and runs every test: installs what is missing (clamd, clamdscan,
# clamav-testfiles, ...), checks formatting and lints, runs the unit and
# integration tests against a real clamd, validates the deployment files.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace
if [ -x deploy/check.sh ]; then
    echo "==> deploy/check.sh"
    deploy/check.sh
fi
