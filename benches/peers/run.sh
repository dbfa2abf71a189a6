#!/usr/bin/env bash
# Conclave side by side with its peers, in one run, with one markdown table at the end.
#
# Installs the peers from the registries into a scratch dir (PEERS_DIR, default target/peers,
# which git ignores; no peer's code is ever committed), starts each server on 127.0.0.1, drives it
# with the same `conclave load` scenario as Conclave, stops it, and writes
# $PEERS_DIR/runs/<UTC time>/results.md (also printed) next to every raw JSON report:
#
#   yjs    Conclave /v1/yjs, the y-websocket 1.5.4 server (bin/server.js) and Hocuspocus 4.7
#          (`--framing hocuspocus`), each under `conclave load yjs` with the same parameters, at
#          each rate of YJS_RATES (a light load, and ones that saturate this machine), with each
#          `--typing` of YJS_TYPINGS (clients typing their own runs of text, or all appending
#          at the shared end: one CRDT item per update)
#   idle   resident memory per idle socket: Conclave (/v1/ws and /v1/yjs) and the two Yjs peers
#   tasks  `conclave load tasks` against Conclave, and Celery 5.7 (Redis broker, acks_late)
#          running the same number of no-op tasks with as many submitters and the same window
#          (celery/noop.py)
#
# Needs: a release build (cargo build --release), Node.js 20+, npm, python3 with venv, curl,
# Redis on 127.0.0.1:6379 (tasks only). Knobs (environment):
#
#   SCENARIOS=yjs,idle,tasks   YJS_TARGETS=conclave,y-websocket,hocuspocus
#   YJS_SESSIONS=10 YJS_CLIENTS=10 YJS_RATES=10,50,100 YJS_TYPINGS=runs,interleaved
#   YJS_DURATION=20s
#   IDLE_COUNT=5000 IDLE_ROOMS=100 IDLE_HOLD=10s
#   TASKS_COUNT=20000 TASKS_WORKERS=20 TASKS_CAPACITY=4 TASKS_SUBMITTERS=4 TASKS_WINDOW=64
#   CELERY_DB=11   PORT_BASE=18480   CONCLAVE_BIN=target/release/conclave   PEERS_DIR=...
#
# Every process it starts runs in a process group of its own and is stopped, by that group's id,
# when it is done or when the script exits for any reason.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

SCENARIOS="${SCENARIOS:-yjs,idle,tasks}"
YJS_TARGETS="${YJS_TARGETS:-conclave,y-websocket,hocuspocus}"
YJS_SESSIONS="${YJS_SESSIONS:-10}"
YJS_CLIENTS="${YJS_CLIENTS:-10}"
YJS_RATES="${YJS_RATES:-10,50,100}"
YJS_TYPINGS="${YJS_TYPINGS:-runs,interleaved}"
YJS_DURATION="${YJS_DURATION:-20s}"
IDLE_COUNT="${IDLE_COUNT:-5000}"
IDLE_ROOMS="${IDLE_ROOMS:-100}"
IDLE_HOLD="${IDLE_HOLD:-10s}"
TASKS_COUNT="${TASKS_COUNT:-20000}"
TASKS_WORKERS="${TASKS_WORKERS:-20}"
TASKS_CAPACITY="${TASKS_CAPACITY:-4}"
TASKS_SUBMITTERS="${TASKS_SUBMITTERS:-4}"
TASKS_WINDOW="${TASKS_WINDOW:-64}"
CELERY_DB="${CELERY_DB:-11}"
PORT_BASE="${PORT_BASE:-18480}"
CONCLAVE_BIN="${CONCLAVE_BIN:-$root/target/release/conclave}"
PEERS_DIR="${PEERS_DIR:-$root/target/peers}"

conclave_port=$PORT_BASE
ywebsocket_port=$((PORT_BASE + 1))
hocuspocus_port=$((PORT_BASE + 2))

die() {
    echo "peers: $*" >&2
    exit 1
}

has() { [[ ",$1," == *",$2,"* ]]; }

# ---- processes -------------------------------------------------------------------------------

# The process groups this script started and has not stopped yet.
declare -a groups=()
server_pid=""

# Runs a command in a process group of its own, so that stopping the group stops everything it
# started. Not `setsid`: a new session is also a new scheduling group of its own where the
# kernel's autogroup scheduling is on (`/proc/sys/kernel/sched_autogroup_enabled`), and the
# kernel would then split the cores evenly between the server and the load generator instead of
# between their threads, as it does for the same commands run from one shell.
in_own_group() {
    exec python3 -c 'import os, sys; os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

stop_group() {
    local pid=$1
    kill -TERM -- "-$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "peers: process group $pid ignored SIGTERM for 5 s; killing it" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${groups[@]}"; do
        stop_group "$pid"
    done
    groups=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a command in a process group of its own, logging to $run/<name>.log; sets server_pid.
start() {
    local name=$1
    shift
    in_own_group "$@" >"$run/$name.log" 2>&1 &
    server_pid=$!
    groups+=("$server_pid")
}

# Stops process group $1 and forgets it.
forget() {
    stop_group "$1"
    local kept=() pid
    for pid in "${groups[@]}"; do
        [[ $pid == "$1" ]] || kept+=("$pid")
    done
    groups=("${kept[@]+"${kept[@]}"}")
}

# Stops the last server started.
stop_server() {
    forget "$server_pid"
    server_pid=""
}

# Runs a measuring command (stdout to $1, stderr to $2) in a process group of its own and waits
# for it; the wait, unlike a foreground command, lets Ctrl-C or SIGTERM end the script at once,
# and the exit trap then stops the command too. Returns the command's exit status.
measure() {
    local out=$1 err=$2 status=0
    shift 2
    in_own_group "$@" >"$out" 2>"$err" &
    local pid=$!
    groups+=("$pid")
    wait "$pid" || status=$?
    forget "$pid"
    return "$status"
}

# Waits until $1 answers HTTP, failing fast if the server died.
wait_http() {
    local url=$1 name=$2
    for _ in $(seq 300); do
        kill -0 "$server_pid" 2>/dev/null || die "$name exited at start; see $run/$name.log"
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$name did not answer $url within 30 s; see $run/$name.log"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ---- the servers -----------------------------------------------------------------------------

# A fresh Conclave node on SQLite (its default store) with the per-connection rate limit out of
# the way: the scenarios measure throughput, not the limiter.
# The rate limits are off, as the peers have none. So is, in effect, the document size limit:
# the peers hold a document of any size, and at R = 1,200 a `yjs` run grows each document past
# Conclave's default of 4 Mi units within its 20 s; past the limit an update is refused.
start_conclave() {
    local name=$1
    rm -rf "$run/$name-data"
    start "$name" "$CONCLAVE_BIN" serve --bind "127.0.0.1:$conclave_port" \
        --data-dir "$run/$name-data" --rate-per-s 1000000 --rate-burst 1000000 \
        --max-doc-units $((256 << 20))
    wait_http "http://127.0.0.1:$conclave_port/healthz" "$name"
}

start_ywebsocket() {
    start "$1" env HOST=127.0.0.1 PORT="$ywebsocket_port" \
        node "$PEERS_DIR/y-websocket/node_modules/y-websocket/bin/server.js"
    wait_http "http://127.0.0.1:$ywebsocket_port/" "$1"
}

start_hocuspocus() {
    start "$1" env HOST=127.0.0.1 PORT="$hocuspocus_port" node "$PEERS_DIR/hocuspocus/server.mjs"
    wait_http "http://127.0.0.1:$hocuspocus_port/" "$1"
}

# ---- measuring -------------------------------------------------------------------------------

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Runs `conclave load ARGS… --json` as run NAME: $run/NAME.json, with the load average before
# and after in $run/NAME.meta. A failing run (say, not converged) is recorded, not fatal.
load() {
    local name=$1
    shift
    echo "peers: $name: conclave load $*" >&2
    local before status=0
    before=$(loadavg)
    measure "$run/$name.json" "$run/$name.err" "$CONCLAVE_BIN" load "$@" --json || status=$?
    printf '{"loadavg_before": "%s", "loadavg_after": "%s", "exit": %d}\n' \
        "$before" "$(loadavg)" "$status" >"$run/$name.meta"
}

# ---- install ---------------------------------------------------------------------------------

install_node_peer() {
    local peer=$1
    mkdir -p "$PEERS_DIR/$peer"
    cp "$here/$peer/package.json" "$here/$peer/package-lock.json" "$PEERS_DIR/$peer/"
    if [[ -f $here/$peer/server.mjs ]]; then
        cp "$here/$peer/server.mjs" "$PEERS_DIR/$peer/"
    fi
    (cd "$PEERS_DIR/$peer" && npm ci --ignore-scripts --no-audit --no-fund \
        --loglevel=error >/dev/null) || die "npm ci failed for $peer"
}

install_celery() {
    local venv="$PEERS_DIR/celery-venv"
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv" || die "python3 -m venv failed"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/celery/requirements.txt" \
        || die "pip install failed for Celery"
    mkdir -p "$PEERS_DIR/celery"
    cp "$here/celery/noop.py" "$PEERS_DIR/celery/"
}

# ---- the run ---------------------------------------------------------------------------------

[[ -x $CONCLAVE_BIN ]] || die "no $CONCLAVE_BIN: build it first with cargo build --release"
for tool in node npm python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
for port in "$conclave_port" "$ywebsocket_port" "$hocuspocus_port"; do
    port_free "$port" || die "port $port is taken: set PORT_BASE to a free range"
done

# 5,000 idle sockets are 5,000 descriptors in the load generator and as many in the server.
needed=$((IDLE_COUNT * 2 + 1024))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $needed ]]; then
    die "the open-file limit is $(ulimit -n) (hard $(ulimit -Hn)); $needed are needed"
fi

mkdir -p "$PEERS_DIR"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
run="$PEERS_DIR/runs/$stamp"
mkdir -p "$run"

if has "$SCENARIOS" yjs || has "$SCENARIOS" idle; then
    install_node_peer y-websocket
    install_node_peer hocuspocus
fi
has "$SCENARIOS" tasks && install_celery

{
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpus=$(nproc)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
    echo "memory=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "kernel=$(uname -r)"
    echo "conclave=$("$CONCLAVE_BIN" --version)"
    echo "node=$(node --version)"
    echo "python=$(python3 --version | cut -d' ' -f2)"
    echo "loadavg_start=$(loadavg)"
} >"$run/machine.txt"

yjs_args=(--sessions "$YJS_SESSIONS" --clients "$YJS_CLIENTS" --duration "$YJS_DURATION"
    --ramp-up 2s)
idle_args=(--count "$IDLE_COUNT" --sessions "$IDLE_ROOMS" --duration "$IDLE_HOLD"
    --ramp-up 10s --timeout 30s)

# Each typing and rate against each server, a fresh server per run: runs
# yjs-<server>-<typing>-r<rate>.
if has "$SCENARIOS" yjs; then
    for typing in ${YJS_TYPINGS//,/ }; do
        for rate in ${YJS_RATES//,/ }; do
            name="$typing-r$rate"
            args=(--rate "$rate" --typing "$typing" "${yjs_args[@]}")
            if has "$YJS_TARGETS" conclave; then
                start_conclave "yjs-conclave-$name"
                load "yjs-conclave-$name" yjs --url "ws://127.0.0.1:$conclave_port/v1/yjs" \
                    --pid "$server_pid" "${args[@]}"
                stop_server
            fi
            if has "$YJS_TARGETS" y-websocket; then
                start_ywebsocket "yjs-y-websocket-$name"
                load "yjs-y-websocket-$name" yjs --url "ws://127.0.0.1:$ywebsocket_port" \
                    --pid "$server_pid" "${args[@]}"
                stop_server
            fi
            if has "$YJS_TARGETS" hocuspocus; then
                start_hocuspocus "yjs-hocuspocus-$name"
                load "yjs-hocuspocus-$name" yjs --url "ws://127.0.0.1:$hocuspocus_port" \
                    --framing hocuspocus --pid "$server_pid" "${args[@]}"
                stop_server
            fi
        done
    done
fi

if has "$SCENARIOS" idle; then
    # Conclave's figure comes from its /metrics (process_resident_memory_bytes); the peers'
    # from /proc/PID/status, the same kernel figure.
    start_conclave idle-conclave-native
    load idle-conclave-native idle --url "ws://127.0.0.1:$conclave_port" "${idle_args[@]}"
    stop_server
    start_conclave idle-conclave-yjs
    load idle-conclave-yjs idle --protocol yjs --url "ws://127.0.0.1:$conclave_port/v1/yjs" \
        "${idle_args[@]}"
    stop_server
    start_ywebsocket idle-y-websocket
    load idle-y-websocket idle --protocol yjs --url "ws://127.0.0.1:$ywebsocket_port" \
        --pid "$server_pid" "${idle_args[@]}"
    stop_server
    start_hocuspocus idle-hocuspocus
    load idle-hocuspocus idle --protocol yjs --framing hocuspocus \
        --url "ws://127.0.0.1:$hocuspocus_port" --pid "$server_pid" "${idle_args[@]}"
    stop_server
fi

if has "$SCENARIOS" tasks; then
    start_conclave tasks-conclave
    load tasks-conclave tasks --url "ws://127.0.0.1:$conclave_port" --pid "$server_pid" \
        --count "$TASKS_COUNT" \
        --workers "$TASKS_WORKERS" --capacity "$TASKS_CAPACITY" \
        --submitters "$TASKS_SUBMITTERS" --window "$TASKS_WINDOW" --timeout 60s
    stop_server

    command -v redis-cli >/dev/null || die "redis-cli is missing"
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || die "Redis does not answer on 127.0.0.1:6379"
    queue="conclave-peers-$stamp"
    export CELERY_REDIS="redis://127.0.0.1:6379/$CELERY_DB" CELERY_QUEUE="$queue"
    start tasks-celery-worker env -C "$PEERS_DIR/celery" \
        "$PEERS_DIR/celery-venv/bin/celery" -A noop worker --loglevel=WARNING
    echo "peers: tasks-celery: $TASKS_COUNT no-op tasks, $TASKS_SUBMITTERS submitters, window $TASKS_WINDOW" >&2
    before=$(loadavg)
    status=0
    measure "$run/tasks-celery.json" "$run/tasks-celery.err" env -C "$PEERS_DIR/celery" \
        "$PEERS_DIR/celery-venv/bin/python" noop.py --count "$TASKS_COUNT" \
        --submitters "$TASKS_SUBMITTERS" --window "$TASKS_WINDOW" || status=$?
    printf '{"loadavg_before": "%s", "loadavg_after": "%s", "exit": %d}\n' \
        "$before" "$(loadavg)" "$status" >"$run/tasks-celery.meta"
    stop_server
    # The queue and kombu's bindings of it; the results expire by themselves (result_expires).
    redis-cli -h 127.0.0.1 -p 6379 -n "$CELERY_DB" del "$queue" "_kombu.binding.$queue" \
        "_kombu.binding_permanent.$queue" >/dev/null || true
fi

echo "loadavg_end=$(loadavg)" >>"$run/machine.txt"
python3 "$here/summarize.py" "$run" >"$run/results.md"
cat "$run/results.md"
echo "peers: raw reports in $run" >&2
