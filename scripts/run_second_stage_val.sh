#!/usr/bin/env bash
# Validation loss of a stage-2 model on held-out conversations. Variables overridable; overrides pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
VAL_DATA_PATH=${VAL_DATA_PATH:-./data/textbind/val.json}
IMAGE_DIR=${IMAGE_DIR:-./data/textbind/images}
CHECKPOINT=${CHECKPOINT:-./runs/second_stage/second_stage_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
CONFIG=${CONFIG:-configs/train/second_stage.yaml}
python3 -m textbind validate --config "$CONFIG" \
  data.val_path="$VAL_DATA_PATH" data.image_dir="$IMAGE_DIR" model.checkpoint="$CHECKPOINT" \
  model.qformer="$QFORMER" model.vision_model="$VISION_MODEL" model.language_model="$LANGUAGE_MODEL" \
  model.processor="$PROCESSOR" "$@"
