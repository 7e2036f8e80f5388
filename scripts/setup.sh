#!/usr/bin/env bash
# Installs what avgate needs on Debian 12 / Ubuntu 22.04+, only what is
# missing. Usage: scripts/setup.sh run|test
set -euo pipefail

mode=${1:-run}
packages=(clamav-daemon clamav-freshclam)
if [ "$mode" = test ]; then
    # clamdscan: the reference client the tests compare with;
    # clamav-testfiles: 44 test files (archives, packed EXEs, documents);
    # zip: makes an encrypted archive; docker-compose: validates deploy/;
    # pebble: an ACME test CA; openssl: s_client offers old TLS versions;
    # prometheus: promtool checks the metrics output and the alert rules;
    # clamav: sigtool builds versioned test databases (.cud);
    # curl, python3-requests: the README's examples are run as written.
    packages+=(clamdscan clamav-testfiles zip docker-compose pebble openssl prometheus clamav
        curl python3-requests)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The README's Python example uses requests. Debian's package serves the
# system python3; a python3 of its own (pyenv, a virtualenv) gets it from
# PyPI.
if [ "$mode" = test ] && ! python3 -c 'import requests' >/dev/null 2>&1; then
    echo "==> installing the Python package requests for $(command -v python3)"
    python3 -m pip install --quiet requests
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo was not found: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
fi
