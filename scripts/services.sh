#!/usr/bin/env bash
# Makes a PostgreSQL and a Redis available for the test suites, and exports where they are:
#   WXAUTH_TEST_PG_URL     a superuser URL (tests create a database of their own in it)
#   WXAUTH_TEST_REDIS_URL  a Redis URL (tests use a key prefix of their own)
# Given URLs are used as they are. Otherwise private instances are started on loopback,
# on ports of their own (PostgreSQL 55432, Redis 56379), with their data under
# ${WXAUTH_SERVICES_DIR:-/tmp/wxauth-test-services}; they are installed first with apt-get
# when missing (as root). Running it again reuses what is running. Run it with --print and
# eval what it prints (check its exit status first; scripts/test does).
set -euo pipefail

services_dir=${WXAUTH_SERVICES_DIR:-/tmp/wxauth-test-services}
pg_port=55432
redis_port=56379

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else die "need root to run: $* (or set WXAUTH_TEST_PG_URL and WXAUTH_TEST_REDIS_URL)"; fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* yourself"
  if [ -z "${apt_updated:-}" ]; then
    as_root apt-get update -qq >&2
    apt_updated=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >&2
}

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

# Runs a PostgreSQL binary as an unprivileged user: the server refuses to run as root.
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bin data
  bin=$(pg_bin) || true
  if [ -z "$bin" ]; then
    apt_install postgresql
    bin=$(pg_bin) || die "postgresql installed, but no initdb found under /usr/lib/postgresql"
  fi
  data="$services_dir/pg"
  mkdir -p "$services_dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user after installing postgresql"
    chown postgres "$services_dir" 2>/dev/null || true
    mkdir -p "$data" && chown postgres "$data"
  fi
  if ! as_pg_user "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; then
    if [ ! -f "$data/PG_VERSION" ]; then
      log "creating a PostgreSQL cluster in $data"
      as_pg_user "$bin/initdb" -D "$data" -U wxauth -A trust --no-instructions >/dev/null
    fi
    log "starting PostgreSQL on 127.0.0.1:$pg_port"
    as_pg_user "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
      -o "-p $pg_port -k $data -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
      start >&2 || { cat "$data/server.log" >&2; die "PostgreSQL did not start"; }
  fi
  export WXAUTH_TEST_PG_URL="postgres://wxauth@127.0.0.1:$pg_port/postgres"
}

start_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
  mkdir -p "$services_dir/redis"
  if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
    log "starting Redis on 127.0.0.1:$redis_port"
    redis-server --bind 127.0.0.1 --port "$redis_port" --daemonize yes --save '' --appendonly no \
      --dir "$services_dir/redis" --logfile "$services_dir/redis/server.log" >&2
    for _ in $(seq 1 50); do
      redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 || die "Redis did not start"
  fi
  export WXAUTH_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
}

[ -n "${WXAUTH_TEST_PG_URL:-}" ] || start_postgres
[ -n "${WXAUTH_TEST_REDIS_URL:-}" ] || start_redis
log "PostgreSQL: $WXAUTH_TEST_PG_URL"
log "Redis: $WXAUTH_TEST_REDIS_URL"
if [ "${1:-}" = --print ]; then
  printf 'export WXAUTH_TEST_PG_URL=%q\nexport WXAUTH_TEST_REDIS_URL=%q\n' "$WXAUTH_TEST_PG_URL" "$WXAUTH_TEST_REDIS_URL"
fi
