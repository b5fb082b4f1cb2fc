# Redis for the test suite: `source .ci/redis.sh start` / `source .ci/redis.sh stop`.
#
# start: installs redis-server (apt-get) if missing, starts one on a free 127.0.0.1 port with
#        persistence off, and exports BATCHER_TEST_REDIS_URL=redis://127.0.0.1:PORT/0.
#        Calling it again while that server answers does nothing.
# stop:  shuts down the server started here and unsets the variables.
# Sourced, so it never calls `exit` or changes the caller's shell options; returns non-zero on
# failure for the caller to check.

_batcher_redis_port_free() {
    # A free loopback port, asked of the kernel (port 0) rather than guessed.
    local py
    for py in /tmp/venv/bin/python python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
            return $?
        fi
    done
    echo 6390 # no python at all: a fixed port off Redis's default
}

_batcher_redis_start() {
    if [ -n "${BATCHER_CI_REDIS_PORT:-}" ] &&
        redis-cli -h 127.0.0.1 -p "$BATCHER_CI_REDIS_PORT" ping >/dev/null 2>&1; then
        echo "redis.sh: already running on 127.0.0.1:$BATCHER_CI_REDIS_PORT"
        export BATCHER_TEST_REDIS_URL="redis://127.0.0.1:$BATCHER_CI_REDIS_PORT/0"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "redis.sh: installing redis-server"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1; then
            apt-get update -q >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null ||
                { echo "redis.sh: apt-get install redis-server failed" >&2; return 1; }
        fi
        # The package may start its system service on 6379; the tests use their own instance.
        if redis-cli -p 6379 ping >/dev/null 2>&1; then
            service redis-server stop >/dev/null 2>&1 || redis-cli -p 6379 shutdown nosave >/dev/null 2>&1 || true
        fi
    fi
    local port dir tries=0
    dir=$(mktemp -d /tmp/batcher-ci-redis.XXXXXX) || return 1
    while [ $tries -lt 5 ]; do
        tries=$((tries + 1))
        port=$(_batcher_redis_port_free) || return 1
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
            --logfile "$dir/redis.log" --loglevel warning || continue
        local i=0
        while [ $i -lt 100 ]; do
            if redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
                export BATCHER_CI_REDIS_PORT="$port"
                export BATCHER_CI_REDIS_DIR="$dir"
                export BATCHER_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
                echo "redis.sh: redis-server on 127.0.0.1:$port"
                return 0
            fi
            sleep 0.1
            i=$((i + 1))
        done
    done
    echo "redis.sh: redis-server did not start; log:" >&2
    tail -n 20 "$dir/redis.log" >&2 2>/dev/null
    return 1
}

_batcher_redis_stop() {
    if [ -n "${BATCHER_CI_REDIS_PORT:-}" ]; then
        redis-cli -h 127.0.0.1 -p "$BATCHER_CI_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        # A server that did not answer SHUTDOWN: end it by its own pid, nothing broader.
        if [ -f "${BATCHER_CI_REDIS_DIR:-}/redis.pid" ]; then
            kill "$(cat "$BATCHER_CI_REDIS_DIR/redis.pid")" >/dev/null 2>&1 || true
        fi
        echo "redis.sh: stopped redis-server on 127.0.0.1:$BATCHER_CI_REDIS_PORT"
    fi
    if [ -n "${BATCHER_CI_REDIS_DIR:-}" ]; then
        rm -rf "$BATCHER_CI_REDIS_DIR"
    fi
    unset BATCHER_CI_REDIS_PORT BATCHER_CI_REDIS_DIR BATCHER_TEST_REDIS_URL
    return 0
}

case "${1:-}" in
start) _batcher_redis_start ;;
stop) _batcher_redis_stop ;;
*)
    echo "usage: source .ci/redis.sh start|stop" >&2
    false
    ;;
esac
