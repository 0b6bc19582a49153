#!/usr/bin/env bash
# Build the registry-free images every test and example runs:
#   p2porch/busybox:latest  FROM scratch + Debian's static busybox (one symlink per applet)
#   p2porch/demo:latest     examples/demo: busybox httpd + a CGI page ($MESSAGE, replica name)
# Idempotent: an image whose content label matches its inputs is not rebuilt.
# Usage: bash scripts/build-images.sh [-q]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "build-images: installing busybox-static"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq busybox-static >/dev/null
fi

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" -m p2porch.node.images "$@"
