#!/usr/bin/env bash
# TTFT with and without prefix caching, side by side in one run: the same checkpoint and load, every
# prompt starting with the same SHARED tokens. Prints both `gptoss bench serve` reports and the ratio.
#
#   cluster/bench/scripts/bench-prefix-cache.sh [CHECKPOINT_DIR]     (default: a small random checkpoint, made once)
#   ENGINE=cluster SHARED=1024 INPUT=64 OUTPUT=16 PROMPTS=16 CONCURRENCY=1,4 VOCAB_DIR=dir cluster/bench/scripts/bench-prefix-cache.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
GPTOSS=${GPTOSS:-.venv/bin/gptoss}
ENGINE=${ENGINE:-local}
SHARED=${SHARED:-1024}
INPUT=${INPUT:-64}
OUTPUT=${OUTPUT:-16}
PROMPTS=${PROMPTS:-16}
CONCURRENCY=${CONCURRENCY:-1,4}
PORT=${PORT:-8123}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
vocab=(); [ -n "${VOCAB_DIR:-}" ] && vocab=(--vocab-dir "$VOCAB_DIR")
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=${HOME}/.cache/gptoss/small-bf16-no-mxfp4
  [ -f "$MODEL/config.json" ] || "$GPTOSS" make-tiny "$MODEL" --preset small --no-mxfp4 "${vocab[@]}" >/dev/null
fi

run() {  # $1: label, then extra serve flags
  local label=$1; shift
  "$GPTOSS" "${vocab[@]}" serve --model "$MODEL" --engine "$ENGINE" --port "$PORT" --max-model-len 2048 "$@" \
    >"$WORK/$label.out" 2>"$WORK/$label.err" &
  local pid=$!
  for _ in $(seq 600); do grep -q "ready on" "$WORK/$label.out" 2>/dev/null && break; sleep 0.5; done
  grep -q "ready on" "$WORK/$label.out" || { cat "$WORK/$label.err" >&2; exit 1; }
  echo "== $label: gptoss serve --engine $ENGINE $*"
  "$GPTOSS" bench serve --url "http://127.0.0.1:$PORT/v1" --concurrency "$CONCURRENCY" --num-prompts "$PROMPTS" \
    --input-len "$INPUT" --output-len "$OUTPUT" --shared-prefix "$SHARED" | tee "$WORK/$label.json"
  kill -TERM "$pid"; wait "$pid" || true
}

run caching
run no-caching --no-prefix-caching
python3 - "$WORK/caching.json" "$WORK/no-caching.json" <<'PY'
import json, sys
on, off = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
print("concurrency  TTFT p50 caching / without")
for a, b in zip(on["levels"], off["levels"]):
    print(f"{a['concurrency']:>11}  {a['ttft_ms']['p50']:.1f} / {b['ttft_ms']['p50']:.1f} ms = "
          f"{a['ttft_ms']['p50'] / b['ttft_ms']['p50']:.2f}x")
PY
