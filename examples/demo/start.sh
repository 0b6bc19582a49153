#!/bin/sh
# PID 1 of the demo image: busybox httpd in the foreground, stopped promptly on SIGTERM.
# p2porch's runtime starts containers with an init anyway; the trap makes a plain
# `docker run` stop at once too (httpd as PID 1 would ignore SIGTERM).
port="${PORT:-8080}"
echo "demo: replica ${P2PORCH_REPLICA:-$(hostname)} serving on port $port"
httpd -f -v -p "$port" -h /www &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT
wait "$pid"
