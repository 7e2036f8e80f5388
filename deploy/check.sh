#!/bin/sh
# Validates the files in deploy/ without a Docker engine:
#   - docker-compose.yml with `docker compose config` (or docker-compose v1);
#   - avgate.service with `systemd-analyze verify`, when available;
#   - clamd.conf with `clamconf`, when available;
#   - prometheus-alerts.yml with `promtool check rules`, when available;
#   - grafana-dashboard.json as JSON.
# Usage: sh deploy/check.sh
set -eu
cd "$(dirname "$0")"

if docker compose version >/dev/null 2>&1; then
    compose="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then
    compose="docker-compose"
else
    echo "check.sh: needs 'docker compose' or 'docker-compose' (Debian: apt-get install docker-compose)" >&2
    exit 1
fi
$compose -f docker-compose.yml config --quiet
echo "ok: docker-compose.yml ($compose config)"

if command -v systemd-analyze >/dev/null 2>&1; then
    # verify also wants ExecStart to exist: check a copy pointing at /bin/true.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sed 's#^ExecStart=/usr/local/bin/avgate#ExecStart=/bin/true#' avgate.service > "$tmp/avgate.service"
    systemd-analyze verify "$tmp/avgate.service"
    echo "ok: avgate.service (systemd-analyze verify)"
fi

if command -v clamconf >/dev/null 2>&1; then
    tmp2=$(mktemp -d)
    cp clamd.conf "$tmp2/clamd.conf"
    out=$(clamconf --config-dir="$tmp2" 2>&1) || { echo "$out" >&2; rm -rf "$tmp2"; exit 1; }
    rm -rf "$tmp2"
    # clamconf exits 0 even on a parse error; it prints "ERROR: Parse error ...".
    if printf '%s\n' "$out" | grep -qE '^(ERROR|WARNING):'; then
        printf '%s\n' "$out" | grep -E '^(ERROR|WARNING):' >&2
        exit 1
    fi
    for want in 'AlertExceedsMax = "yes"' 'AlertEncrypted = "yes"'; do
        printf '%s\n' "$out" | grep -qF "$want" || { echo "clamd.conf: expected $want" >&2; exit 1; }
    done
    echo "ok: clamd.conf (clamconf)"
fi

if command -v promtool >/dev/null 2>&1; then
    promtool check rules prometheus-alerts.yml >/dev/null
    echo "ok: prometheus-alerts.yml (promtool check rules)"
fi
if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' grafana-dashboard.json
    echo "ok: grafana-dashboard.json (valid JSON)"
fi
