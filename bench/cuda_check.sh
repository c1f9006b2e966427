#!/usr/bin/env bash
# One GPU-machine run of the CUDA checks, for a machine that has torch but not the server's other
# packages and no network: install carried wheels, sample GPU load in the background, run
# bench/cuda_check.py, then the LLM reranker benchmark when the repo has it (time-capped).
#
#   bench/cuda_check.sh WHEELS_DIR TOKENIZER_DIR OUT_DIR
#
# WHEELS_DIR: cp312 manylinux wheels of fastapi, starlette, pydantic(-core, -settings), uvicorn,
# cachetools, python-json-logger, redis, ... (pip download --no-deps, see docs/cuda.md).
# TOKENIZER_DIR: MiniLM's tokenizer files (tokenizer.json, vocab.txt, ...).
set -uo pipefail
wheels=$1 tok=$2 out=$3
cd "$(dirname "$0")/.."
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv | tee "$out/smi.txt"
nvidia-smi dmon -s u -d 1 >> "$out/smi.txt" 2>&1 &
smi=$!
timeout "${CUDA_CHECK_SECONDS:-330}" python3 bench/cuda_check.py --tokenizer "$tok" --out "$out" ${CUDA_CHECK_ARGS:-} \
  2>&1 | grep -v "^Loading weights" | tee "$out/cuda_check.log"
kill "$smi" 2>/dev/null
if [ -f bench/llm_rerank.py ]; then
  for dtype in bf16 fp16; do
    timeout "${LLM_SECONDS:-45}" python3 bench/llm_rerank.py --device cuda --dtype "$dtype" --shape qwen3-0.6b \
      > "$out/llm_$dtype.txt" 2>&1
    echo "llm_rerank $dtype: exit $?"; tail -15 "$out/llm_$dtype.txt"
  done
fi
cat "$out/summary.txt" 2>/dev/null
