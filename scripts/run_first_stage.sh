#!/usr/bin/env bash
# Stage 1 (multimodal alignment): `textbind train` under DeepSpeed's launcher (scripts/launch.sh).
# Every variable can be set from the environment; extra section.key=value overrides are passed through,
# e.g. `bash scripts/run_first_stage.sh train.max_steps=100`.
# As in the original release, CHECKPOINT is the BLIP-2 Q-Former file here (model.qformer); the model
# variables VISION_MODEL, LANGUAGE_MODEL and PROCESSOR are those of every other script.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_DATA_PATH=${TRAIN_DATA_PATH:-"./data/cc_sbu/cc_sbu_dataset/{00000..01254}.tar"}
CHECKPOINT=${CHECKPOINT:-./checkpoint/blip2_qformer.safetensors}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
OUTPUT_DIR=${OUTPUT_DIR:-./runs/first_stage}
CONFIG=${CONFIG:-configs/train/first_stage.yaml}
bash scripts/launch.sh textbind train --config "$CONFIG" \
  data.train_path="$TRAIN_DATA_PATH" model.qformer="$CHECKPOINT" model.vision_model="$VISION_MODEL" \
  model.language_model="$LANGUAGE_MODEL" model.processor="$PROCESSOR" train.output_dir="$OUTPUT_DIR" "$@"
