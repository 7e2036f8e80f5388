#!/usr/bin/env bash
# avgate's speed and memory benchmark. Run from the repository root:
#
#   bench/run.sh
#
# Builds avgate and the load generator (bench/, crate avgate-bench) in
# release mode, starts ONE clamd (DisableCache yes, limits large enough for
# 150 MiB files, AlertExceedsMax yes) with the test signatures in
# signatures/, puts avgate in front of it, and compares avgate (multipart
# POST /v1/scan) with a raw zINSTREAM client on the same clamd socket:
#   1. small files (1 KiB fresh random data, EICAR) at concurrency 8 and 32,
#   2. 100 MiB uploads of fresh random data, one at a time,
#   3. avgate's peak RSS during 8 concurrent 150 MiB uploads (a freshly
#      started avgate, so VmHWM covers that phase only).
# It prints figures and ratios next to the targets; it fails only when
# something does not work, never because a target is missed.
#
# Knobs (environment): SMALL_SECS (4), SMALL_ROUNDS (5), LARGE_MIB (100),
# LARGE_REPS (5), MEM_MIB (150), MEM_UPLOADS (8), CLAMD (/usr/sbin/clamd),
# CLAMD_THREADS (8: avgate's default max_concurrent_per_backend),
# AVGATE_LOG (info, as deployed; avgate's log goes to a file),
# IDLE_WAIT_SECS (60: how long to wait for other processes to leave the
# CPUs alone before measuring; it goes on with a warning after that),
# CLAMD_TEMP_DIR (a directory in the run's own /tmp directory: clamd's
# TemporaryDirectory; e.g. /dev/shm/avgate-bench for a tmpfs, see
# docs/performance.md).
# RESULTS_FILE (none): append this run's results to FILE, which is kept;
# the summary then covers every run in it and adds figures pooled over
# them (the median of every round), steadier than one run's on a shared
# machine. Example: for i in 1 2 3; do RESULTS_FILE=/tmp/r.tsv bench/run.sh; done
# Takes 4-6 minutes on 2 cores once built (see docs/performance.md).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

SMALL_SECS=${SMALL_SECS:-4}
SMALL_ROUNDS=${SMALL_ROUNDS:-5}
LARGE_MIB=${LARGE_MIB:-100}
LARGE_REPS=${LARGE_REPS:-5}
MEM_MIB=${MEM_MIB:-150}
MEM_UPLOADS=${MEM_UPLOADS:-8}
CLAMD=${CLAMD:-/usr/sbin/clamd}
CLAMD_THREADS=${CLAMD_THREADS:-8}
IDLE_WAIT_SECS=${IDLE_WAIT_SECS:-60}
CLAMD_TEMP_DIR=${CLAMD_TEMP_DIR:-}
export AVGATE_LOG=${AVGATE_LOG:-info}
# Errors from the load generator are explained in its message; no backtrace.
export RUST_LIB_BACKTRACE=0

# On a fresh machine, install clamd the way the README's commands do.
if [ ! -x "$CLAMD" ] && [ "$CLAMD" = /usr/sbin/clamd ]; then
    scripts/setup.sh run
fi
[ -x "$CLAMD" ] || { echo "bench: $CLAMD not found (apt-get install clamav-daemon)" >&2; exit 1; }

echo "== building (release)"
cargo build --release --quiet -p avgate -p avgate-bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
AVGATE=$TARGET_DIR/release/avgate
BENCH=$TARGET_DIR/release/avgate-bench

# Short path: a Unix socket path must fit in 108 bytes.
WORK=$(mktemp -d /tmp/avgate-bench.XXXXXX)
CLAMD_PID=
AVGATE_PID=

stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_pid "$AVGATE_PID"
    stop_pid "$CLAMD_PID"
    if [ "$rc" -ne 0 ]; then
        echo "bench: failed (exit $rc); last lines of the logs:" >&2
        tail -n 20 "$WORK/clamd.log" "$WORK/clamd.out" "$WORK/avgate.log" >&2 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- clamd -----------------------------------------------------------------
SOCKET=$WORK/clamd.sock
CLAMD_TMP=${CLAMD_TEMP_DIR:-$WORK/tmp}
mkdir -p "$CLAMD_TMP" "$WORK/db"
cp "$ROOT"/signatures/* "$WORK/db/"
cat >"$WORK/clamd.conf" <<EOF
Foreground yes
LocalSocket $SOCKET
LocalSocketMode 600
DatabaseDirectory $WORK/db
TemporaryDirectory $CLAMD_TMP
LogFile $WORK/clamd.log
LogTime yes
LogClean no
LogVerbose no
# The point of this file: no cache of clean results by hash.
DisableCache yes
MaxThreads $CLAMD_THREADS
MaxQueue 200
MaxConnectionQueueLength 200
# Room for 150 MiB files: nothing may be cut off or skipped.
StreamMaxLength 200M
MaxFileSize 200M
MaxScanSize 400M
MaxScanTime 300000
AlertExceedsMax yes
ReadTimeout 120
CommandReadTimeout 30
IdleTimeout 30
SelfCheck 3600
EOF

echo "== starting clamd ($("$CLAMD" --version))"
# clamd makes and removes a directory there for every scan: its file system
# moves small-file figures by half (docs/performance.md).
# The last line: a directory mounted over twice (as /dev/shm can be) is
# listed once per mount, the one in effect last.
fs_type() { { findmnt -n -o FSTYPE --target "$1" 2>/dev/null || stat -f -c %T "$1"; } | tail -n 1; }
echo "   TemporaryDirectory $CLAMD_TMP ($(fs_type "$CLAMD_TMP"))"
"$CLAMD" --foreground --config-file="$WORK/clamd.conf" >"$WORK/clamd.out" 2>&1 &
CLAMD_PID=$!
"$BENCH" wait --clamd "unix:$SOCKET" --pid "$CLAMD_PID" --timeout-secs 60

# --- avgate ----------------------------------------------------------------
PORT=$("$BENCH" free-port)
URL=http://127.0.0.1:$PORT

# avgate as deployed (authentication on, a token per client, metrics on),
# except that the rate limits, which would turn a load test into a 429
# test, are set out of reach (the limiter itself stays in the request
# path), and the metrics listener takes a free port.
cat >"$WORK/avgate.toml" <<EOF
[metrics]
listen = "127.0.0.1:0"

[rate_limit]
per_ip = "1000000/s"
per_ip_burst = 1000000
per_token = "1000000/s"
per_token_burst = 1000000
EOF
AVGATE_ARGS=(--config "$WORK/avgate.toml" --data-dir "$WORK/data")
"$AVGATE" token create "${AVGATE_ARGS[@]}" --name bench >"$WORK/token" 2>>"$WORK/avgate.log"

start_avgate() {
    "$AVGATE" serve "${AVGATE_ARGS[@]}" --clamd "unix:$SOCKET" --listen "127.0.0.1:$PORT" \
        --log-format json >>"$WORK/avgate.log" 2>&1 &
    AVGATE_PID=$!
    "$BENCH" wait --url "$URL" --pid "$AVGATE_PID" --timeout-secs 30
    echo "== avgate pid $AVGATE_PID listening on $URL (AVGATE_LOG=$AVGATE_LOG)"
}

RESULTS=${RESULTS_FILE:-$WORK/results.tsv}
COMMON=(--url "$URL" --clamd "unix:$SOCKET" --token-file "$WORK/token" --results "$RESULTS")

start_avgate
"$BENCH" idle --timeout-secs "$IDLE_WAIT_SECS"
echo
"$BENCH" small "${COMMON[@]}" --clamd-pid "$CLAMD_PID" --avgate-pid "$AVGATE_PID" --secs "$SMALL_SECS" --rounds "$SMALL_ROUNDS"
echo
"$BENCH" large "${COMMON[@]}" --clamd-pid "$CLAMD_PID" --avgate-pid "$AVGATE_PID" --mib "$LARGE_MIB" --reps "$LARGE_REPS"
echo

# A fresh avgate, so that its VmHWM covers the memory phase only.
stop_pid "$AVGATE_PID"
AVGATE_PID=
start_avgate
"$BENCH" memory "${COMMON[@]}" --clamd-pid "$CLAMD_PID" --pid "$AVGATE_PID" --mib "$MEM_MIB" --uploads "$MEM_UPLOADS"
echo

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, load average $(cut -d" " -f1-3 /proc/loadavg); $(date -u '+%Y-%m-%d %H:%M UTC')"
"$BENCH" report --results "$RESULTS"
TMP_FS=$(fs_type "$CLAMD_TMP")
echo "   clamd's TemporaryDirectory is on $TMP_FS (CLAMD_TEMP_DIR): small-file ratios depend on it, so pool only runs made alike."
if [ "$TMP_FS" != tmpfs ]; then
    echo "   On a disk, clamd's own directory work for each scan hides part of avgate's cost;"
    echo "   CLAMD_TEMP_DIR=/dev/shm/avgate-bench bench/run.sh gives the stricter figures (docs/performance.md)."
fi
