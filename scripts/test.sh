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
# The README's Node.js example needs Node 20+ (Debian 12 packages 18):
# its test is ignored by default and run here where node is recent enough.
node_version=$(node --version 2>/dev/null || true)
node_major=${node_version#v}
node_major=${node_major%%.*}
if [ -n "$node_version" ] && [ "$node_major" -ge 20 ] 2>/dev/null; then
    echo "==> the README's Node.js example (node $node_version)"
    cargo test --locked -p avgate --test readme -- --ignored
else
    echo "==> the README's Node.js example: NOT RUN (needs Node.js 20+; node: ${node_version:-not found})"
fi
if [ -x deploy/check.sh ]; then
    echo "==> deploy/check.sh"
    deploy/check.sh
fi
