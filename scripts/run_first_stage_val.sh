#!/usr/bin/env bash
# Validation loss of a stage-1 model on held-out shards. Variables overridable; overrides pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
VAL_DATA_PATH=${VAL_DATA_PATH:-"./data/cc_sbu/cc_sbu_dataset/{01250..01254}.tar"}
CHECKPOINT=${CHECKPOINT:-./runs/first_stage/first_stage_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
CONFIG=${CONFIG:-configs/train/first_stage.yaml}
python3 -m textbind validate --config "$CONFIG" \
  data.val_path="$VAL_DATA_PATH" model.checkpoint="$CHECKPOINT" model.qformer="$QFORMER" \
  model.vision_model="$VISION_MODEL" model.language_model="$LANGUAGE_MODEL" model.processor="$PROCESSOR" "$@"
