#!/usr/bin/env bash
# Runs fleetq's Redis broker benchmark and the BullMQ baseline interleaved against one local Redis,
# ROUNDS times, printing every JSON line (fleetq lines have "system":"fleetq").
# Needs: a Redis on REDIS_PORT (default 6390) that may be FLUSHDB'ed; node; `npm install` done in
# BULLMQ_DIR (default bench/bullmq, the baseline in this repository); a release build
# (cargo build --release -p fleetq).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} N=${N:-7000} CONCS=${CONCS:-1,16,64}
REDIS_PORT=${REDIS_PORT:-6390}
BULLMQ_DIR=${BULLMQ_DIR:-bench/bullmq}
for r in $(seq 1 "$ROUNDS"); do
  ./target/release/fleetq bench broker --backend redis --redis "redis://127.0.0.1:$REDIS_PORT/" --flushdb \
    --modes throughput,paced --jobs "$N" --concurrency "$CONCS" | sed "s/^{/{\"run\":$r,/"
  redis-cli -p "$REDIS_PORT" flushdb >/dev/null
  (cd "$BULLMQ_DIR" && RUNS=1 CONCS="$CONCS" N="$N" REDIS_PORT="$REDIS_PORT" ./run.sh 2>/dev/null) | sed "s/\"run\":1,/\"run\":$r,/"
  redis-cli -p "$REDIS_PORT" flushdb >/dev/null
done
