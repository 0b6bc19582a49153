#!/usr/bin/env bash
# Run many Raft simulation seeds in parallel chunks (the issue asks for 100,000 with 0
# violations). Usage: scripts/raft-sim-many.sh [TOTAL_SEEDS] [JOBS] [CHUNK] [-- extra sim args]
#   TOTAL_SEEDS  default 100000
#   JOBS         parallel processes, default: number of CPUs
#   CHUNK        seeds per process invocation, default 1000
#   START=S (environment) runs seeds S .. S+TOTAL-1 instead of 0 .. TOTAL-1
# Prints each failing chunk's report and a final "seeds=N violations=V" line; exits non-zero
# if any seed violated an invariant. Seeds are deterministic: a failure is replayed with
#   python3 -m p2porch.consensus.sim --seeds 1 --start SEED --verbose
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-100000}
JOBS=${2:-$(nproc)}
CHUNK=${3:-1000}
shift $(( $# < 3 ? $# : 3 ))
if [ "${1:-}" = "--" ]; then shift; fi
EXTRA=("$@")
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

FIRST=${START:-0}
starts=()
for (( s = FIRST; s < FIRST + TOTAL; s += CHUNK )); do starts+=("$s"); done

run_chunk() {
    local start=$1 n=$2
    "$PY" -m p2porch.consensus.sim --start "$start" --seeds "$n" "${EXTRA[@]}" \
        > "$OUT/chunk-$start.txt" 2>&1 || true
}
export -f run_chunk 2>/dev/null || true

running=0
for start in "${starts[@]}"; do
    n=$(( FIRST + TOTAL - start < CHUNK ? FIRST + TOTAL - start : CHUNK ))
    run_chunk "$start" "$n" &
    running=$(( running + 1 ))
    if (( running >= JOBS )); then wait -n; running=$(( running - 1 )); fi
done
wait

seeds=0; violations=0
for f in "$OUT"/chunk-*.txt; do
    last=$(tail -n 1 "$f")
    if [[ $last =~ ^seeds=([0-9]+)\ violations=([0-9]+)$ ]]; then
        seeds=$(( seeds + BASH_REMATCH[1] )); violations=$(( violations + BASH_REMATCH[2] ))
        if (( BASH_REMATCH[2] > 0 )); then echo "== $(basename "$f")"; grep -A3 '^FAILED' "$f"; fi
    else
        echo "== $(basename "$f") did not finish:"; tail -n 20 "$f"; violations=$(( violations + 1 ))
    fi
done
echo "seeds=$seeds violations=$violations"
(( violations == 0 ))
