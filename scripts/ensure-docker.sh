#!/usr/bin/env bash
# Make sure a Docker engine answers; start dockerd if it is installed but not running.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
echo "ensure-docker: engine not answering, starting it"
SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v systemctl >/dev/null 2>&1 && systemctl list-unit-files docker.service >/dev/null 2>&1 \
   && $SUDO systemctl start docker 2>/dev/null; then :
elif command -v service >/dev/null 2>&1 && $SUDO service docker start >/dev/null 2>&1; then :
elif command -v dockerd >/dev/null 2>&1; then
  $SUDO sh -c 'nohup dockerd >/var/log/p2porch-dockerd.log 2>&1 &'
else
  echo "ensure-docker: no Docker engine installed (apt-get install docker.io)" >&2
  exit 1
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "ensure-docker: the Docker engine did not come up within 60 s" >&2
exit 1
