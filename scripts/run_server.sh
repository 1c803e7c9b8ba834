#!/usr/bin/env bash
# Serve TextBind over an OpenAI-compatible API (chat completions with text and images): http://127.0.0.1:8000/v1.
# The model variables are those of scripts/run_demo.sh; extra arguments go to `textbind serve`, e.g.
# `--with-demo` (the Gradio demo at /demo), `--local-image-dir DIR`, `--do-sample --top-p 0.9`.
# API_KEY: when set, clients must send `Authorization: Bearer $API_KEY` (passed through the environment,
# never on the command line). MAX_BATCH_SIZE: conversations decoded together. HOST=0.0.0.0 opens it to the network.
set -euo pipefail

IMAGE_DECODER=${IMAGE_DECODER:-}
if [[ -z ${CONFIG:-} && $IMAGE_DECODER == toy ]]; then
  CONFIG=$(dirname "$0")/../configs/toy/model.yaml  # the toy world's small model (float32)
fi
CONFIG=${CONFIG:-$(dirname "$0")/../configs/model/llama2_7b.yaml}
CHECKPOINT=${CHECKPOINT-./checkpoint/second_stage_model.pt}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
SD_BASE=${SD_BASE-./checkpoint/stable-diffusion-xl-base-1.0}
SD_REFINER=${SD_REFINER-./checkpoint/stable-diffusion-xl-refiner-1.0}
DTYPE=${DTYPE:-}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-8}
if [[ -n ${API_KEY:-} ]]; then
  export TEXTBIND_API_KEY=$API_KEY
fi

exec python3 -m textbind serve \
    --config "$CONFIG" \
    --checkpoint "$CHECKPOINT" \
    --vision-model "$VISION_MODEL" \
    --qformer "$QFORMER" \
    --language-model "$LANGUAGE_MODEL" \
    --processor "$PROCESSOR" \
    --sd-base "$SD_BASE" \
    --sd-refiner "$SD_REFINER" \
    --image-decoder "${IMAGE_DECODER:-auto}" \
    ${DTYPE:+--dtype "$DTYPE"} \
    --host "$HOST" \
    --port "$PORT" \
    --max-batch-size "$MAX_BATCH_SIZE" \
    "$@"
