#!/usr/bin/env bash
# The latency a relay adds: two Conclave nodes on one PostgreSQL and one Redis (all on
# 127.0.0.1), driven by `conclave load native` twice with the same parameters:
#
#   same-node   both clients of every session on node a (the owner)
#   cross-node  client 0 of every session on node a, client 1 on node b (`--also-url`): b relays,
#               so every broadcast one client receives was sent on the other node
#
# With two clients per session, every broadcast latency sample is between the two clients (a
# client's own events are not counted), so the cross-node run measures only relayed paths, in
# both directions. Prints one markdown table and keeps the JSON reports in $OUT.
#
# Needs a release build (cargo build --release), PostgreSQL on 127.0.0.1:5432 (user postgres,
# trust) and Redis on 127.0.0.1:6379. Knobs: SESSIONS=50 RATE=20 DURATION=20s PORT_BASE=18580
# CONCLAVE_BIN=target/release/conclave OUT=target/cluster-bench/<UTC time>.
# It stops every node it starts (by pid) and drops its scratch database when it exits.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${CONCLAVE_BIN:-$root/target/release/conclave}"
SESSIONS="${SESSIONS:-50}"
RATE="${RATE:-20}"
DURATION="${DURATION:-20s}"
PORT_BASE="${PORT_BASE:-18580}"
OUT="${OUT:-$root/target/cluster-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
DB="conclave_cluster_bench_$$"
DB_URL="postgres://postgres@127.0.0.1:5432/$DB"
PREFIX="bench-$$"

[ -x "$BIN" ] || { echo "error: no $BIN; run cargo build --release" >&2; exit 1; }
mkdir -p "$OUT"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS \"$DB\"" postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE \"$DB\"" postgres
node() { # name port
  "$BIN" serve --bind "127.0.0.1:$2" --node-id "$1" --database-url "$DB_URL" \
    --redis-url redis://127.0.0.1:6379 --bus-prefix "$PREFIX" >"$OUT/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: node $1 did not get ready; see $OUT/$1.log" >&2
  exit 1
}
node a "$PORT_BASE"
node b "$((PORT_BASE + 1))"

run() { # name extra-args...
  local name=$1; shift
  "$BIN" load native --url "ws://127.0.0.1:$PORT_BASE" --sessions "$SESSIONS" --clients 2 \
    --rate "$RATE" --duration "$DURATION" --ramp-up 2s --json --prefix "$name-$$" "$@" \
    >"$OUT/$name.json"
}
run same-node
run cross-node --also-url "ws://127.0.0.1:$((PORT_BASE + 1))"

python3 - "$OUT" "$SESSIONS" "$RATE" "$DURATION" <<'PY'
import json, sys
out, sessions, rate, duration = sys.argv[1:]
print(f"{sessions} sessions x 2 clients, {rate} msgs/s each, {duration}; ms")
print("| run | deliveries/s | ack p50 | ack p99 | broadcast p50 | broadcast p99 | errors | converged |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for name in ("same-node", "cross-node"):
    r = json.load(open(f"{out}/{name}.json"))
    ack, b = r["latency_ms"]["ack"], r["latency_ms"]["broadcast"]
    print(f"| {name} | {r['rates']['delivered_per_s']:,.0f} | {ack['p50_ms']:.1f} | {ack['p99_ms']:.1f} "
          f"| {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {sum(r['errors'].values())} "
          f"| {r['convergence']['passed']} |")
PY
