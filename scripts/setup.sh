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
    # curl, python3-requests: the README's examples are run as written;
    # apparmor: apparmor_parser checks the rules this script adds;
    # golang-go: builds the README's Go example.
    packages+=(clamdscan clamav-testfiles zip docker-compose pebble openssl prometheus clamav
        curl python3-requests apparmor golang-go)
fi

# Rust links with cc, and ring and the bundled SQLite compile C code:
# rustup installs no C compiler.
command -v cc >/dev/null 2>&1 || packages+=(gcc libc6-dev)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
as_root() {
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; then
        echo "setup: this needs root ($*): run it as root, or install sudo" >&2
        exit 1
    fi
    $sudo "$@"
}

if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # avgate runs a clamd of its own; Debian's service would be a second
    # one, with a second copy of the database in memory once freshclam
    # has fetched it. Only when this script installed it just now.
    if [[ " ${missing[*]} " == *" clamav-daemon "* ]] && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now clamav-daemon.service >/dev/null 2>&1 || true
        echo "==> disabled Debian's clamav-daemon service (avgate starts its own clamd;"
        echo "    'systemctl enable --now clamav-daemon' to run it for other programs)"
    fi
fi

# AppArmor (on by default in Ubuntu and Debian) confines /usr/sbin/clamd
# and freshclam to the package's own paths whoever starts them, and
# avgate's clamd keeps its configuration, socket, database links and
# temporary files in avgate's data directory. Allowed here through the
# profiles' local overrides, as the package's README.Debian describes.
# (/tmp, where the tests put theirs, is allowed already.)
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then
    for profile in usr.sbin.clamd usr.bin.freshclam; do
        [ -f "/etc/apparmor.d/$profile" ] || continue
        local_rules="/etc/apparmor.d/local/$profile"
        grep -qs "avgate" "$local_rules" && continue
        echo "==> AppArmor: letting $profile use avgate's data directories ($local_rules)"
        as_root tee -a "$local_rules" >/dev/null <<'RULES'
# avgate's managed clamd and freshclam (written by avgate's scripts/setup.sh):
# the default data directories of the service and of a user.
/var/lib/avgate/clamd/ rw,
/var/lib/avgate/clamd/** rwk,
owner @{HOME}/.local/share/avgate/clamd/ rw,
owner @{HOME}/.local/share/avgate/clamd/** rwk,
RULES
        if command -v apparmor_parser >/dev/null 2>&1; then
            as_root apparmor_parser -r -T -W "/etc/apparmor.d/$profile"
        fi
    done
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
