#!/usr/bin/env bash
# Stage 2 (multimodal instruction following): `textbind train` under DeepSpeed's launcher (scripts/launch.sh).
# CHECKPOINT is the stage-1 export (a directory or file), QFORMER the BLIP-2 Q-Former file.
# Every variable can be set from the environment; extra section.key=value overrides are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_DATA_PATH=${TRAIN_DATA_PATH:-./data/textbind/train.json}
IMAGE_DIR=${IMAGE_DIR:-./data/textbind/images}
# An empty CHECKPOINT starts from the pretrained parts alone.
CHECKPOINT=${CHECKPOINT-./runs/first_stage/first_stage_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
OUTPUT_DIR=${OUTPUT_DIR:-./runs/second_stage}
CONFIG=${CONFIG:-configs/train/second_stage.yaml}
bash scripts/launch.sh textbind train --config "$CONFIG" \
  data.train_path="$TRAIN_DATA_PATH" data.image_dir="$IMAGE_DIR" model.checkpoint="$CHECKPOINT" \
  model.qformer="$QFORMER" model.vision_model="$VISION_MODEL" model.language_model="$LANGUAGE_MODEL" \
  model.processor="$PROCESSOR" train.output_dir="$OUTPUT_DIR" "$@"
