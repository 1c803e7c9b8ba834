#!/usr/bin/env bash
# Chat with TextBind in the browser (Gradio): http://127.0.0.1:7860 by default.
# Every variable below can be set from the environment; extra arguments go to `textbind demo`, e.g.
# `bash scripts/run_demo.sh --listen` (open to the network), `--share`, `--do-sample --top-p 0.9`,
# `--safe-word-num 650 --safe-image-num 4`, `--examples my_examples.json`, `model.dtype=float16`.
# IMAGE_DECODER: sdxl (SD_BASE + SD_REFINER), toy (the toy world's renderer) or none;
# empty: sdxl when SD_BASE is set. SD_BASE="" renders nothing; CHECKPOINT="" runs the base weights.
# DTYPE (float32 | bfloat16 | float16) overrides the config's model.dtype.
set -euo pipefail

IMAGE_DECODER=${IMAGE_DECODER:-}
if [[ -z ${CONFIG:-} && $IMAGE_DECODER == toy ]]; then
  CONFIG=$(dirname "$0")/../configs/toy/model.yaml  # the toy world's small model (float32)
fi
CONFIG=${CONFIG:-$(dirname "$0")/../configs/model/llama2_7b.yaml}
# PRETRAINED: a `textbind export` directory or hub id; the model parts (and, unless CHECKPOINT is set, the
# weights) come from it.
PRETRAINED=${PRETRAINED:-}
if [[ -n $PRETRAINED ]]; then CHECKPOINT=${CHECKPOINT-}; fi
CHECKPOINT=${CHECKPOINT-./checkpoint/second_stage_model.pt}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
SD_BASE=${SD_BASE-./checkpoint/stable-diffusion-xl-base-1.0}
SD_REFINER=${SD_REFINER-./checkpoint/stable-diffusion-xl-refiner-1.0}
DTYPE=${DTYPE:-}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7860}

exec python3 -m textbind demo \
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
    ${PRETRAINED:+"model.pretrained=$PRETRAINED"} \
    "$@"
