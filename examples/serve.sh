#!/usr/bin/env bash
# Serve a model with UniPrefill on the OpenAI-compatible API (stock vLLM command line).
#   examples/serve.sh [MODEL_DIR] [PORT]
# Without MODEL_DIR, serves the embedded Qwen2.5-Coder-0.5B-Instruct (prepared on first use).
set -euo pipefail
MODEL=${1:-$(uniprefill models prepare qwen2.5-coder-0.5b-instruct)}
PORT=${2:-8000}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
exec vllm serve "$MODEL" --plugin uniprefill --port "$PORT" --dtype float32 \
  --served-model-name qwen2.5-coder-0.5b-instruct \
  --additional-config '{"uniprefill": {"p": 0.99, "last_q": 16}}'
