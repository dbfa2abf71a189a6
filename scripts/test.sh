#!/usr/bin/env bash
# The one test command: makes sure PostgreSQL and Redis are up, runs the whole suite, then runs
# the fuzz targets for a bounded time (scripts/fuzz.sh; FUZZ_SECONDS each, default 20).
#
#   scripts/test.sh            # everything
#   scripts/test.sh -E 'test(replay)'   # extra arguments go to cargo nextest (or cargo test);
#                                       # such a filtered run leaves the fuzz targets out
#
# Tests use real services: PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth) and Redis on
# 127.0.0.1:6379. Nothing is mocked, so nothing is skipped: if a service cannot be reached or
# started, this script stops with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_HOST=127.0.0.1 REDIS_PORT=6379

say() { printf '==> %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_ready() {
  port_open "$PG_HOST" "$PG_PORT" || return 1
  if command -v psql >/dev/null; then
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1
  fi
}

redis_ready() {
  port_open "$REDIS_HOST" "$REDIS_PORT" || return 1
  if command -v redis-cli >/dev/null; then
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  fi
}

docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

start_pg() {
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    say "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  elif docker_engine; then
    say "starting PostgreSQL with docker compose"
    docker compose up -d postgres
  fi
}

start_redis() {
  if command -v redis-server >/dev/null; then
    say "starting a local Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --logfile /tmp/conclave-test-redis.log || true
  elif docker_engine; then
    say "starting Redis with docker compose"
    docker compose up -d redis
  fi
}

wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 30); do
    if $check; then return 0; fi
    sleep 1
  done
  return 1
}

if ! pg_ready; then
  start_pg
  wait_for PostgreSQL pg_ready || {
    cat >&2 <<MSG
error: PostgreSQL is not reachable on $PG_HOST:$PG_PORT (user postgres, trust auth), and could not
be started. Fix: install and start it (Debian: apt-get install postgresql && pg_ctlcluster 15 main
start, with 'host all all 127.0.0.1/32 trust' in pg_hba.conf), or run 'docker compose up -d postgres'.
MSG
    exit 1
  }
fi
say "PostgreSQL is up on $PG_HOST:$PG_PORT"

if ! redis_ready; then
  start_redis
  wait_for Redis redis_ready || {
    cat >&2 <<MSG
error: Redis is not reachable on $REDIS_HOST:$REDIS_PORT and could not be started.
Fix: install it (Debian: apt-get install redis-server) or run 'docker compose up -d redis'.
MSG
    exit 1
  }
fi
say "Redis is up on $REDIS_HOST:$REDIS_PORT"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "error: Node.js and npm are needed for the Yjs interop and browser tests (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
say "installing the interop test's pinned npm packages (yjs, y-websocket)"
(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

# The browser tests drive Debian's Chromium through playwright-core, which never downloads one.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else return 1
  fi
}
if [ ! -x /usr/bin/chromium ]; then
  say "installing Chromium for the browser tests (Debian's chromium package)"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/tmp/conclave-chromium-install.log 2>&1; then
    cat >&2 <<MSG
error: /usr/bin/chromium is missing and could not be installed (log: /tmp/conclave-chromium-install.log).
Fix: as root, run 'apt-get update && apt-get install -y chromium'. The browser tests drive Debian's
Chromium with playwright-core and never download a browser of their own.
MSG
    exit 1
  fi
fi
say "Chromium is at /usr/bin/chromium ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
say "installing the browser tests' pinned npm packages (playwright-core)"
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)

say "checking format and lints"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
  say "running the suite with cargo nextest"
  cargo nextest run --locked --no-fail-fast "$@"
else
  say "running the suite with cargo test (install cargo-nextest for parallel runs)"
  cargo test --locked --no-fail-fast "$@"
fi

if [ $# -eq 0 ]; then
  say "fuzzing every target (scripts/fuzz.sh)"
  scripts/fuzz.sh
else
  say "a filtered run: the fuzz targets are left out (scripts/fuzz.sh runs them)"
fi
