#!/usr/bin/env bash
# Export a trained model as a stock transformers Blip2ForConditionalGeneration directory (with a model card).
# The model variables are those of run_demo.sh; OUT is the directory to write. Extra arguments go to
# `textbind export`, e.g. `--push-to-hub NAME`, `--license cc-by-nc-4.0`, `--max-shard-size 2GB`, `model.dtype=float16`.
# CHECKPOINT="" exports the base weights; DTYPE (float32 | bfloat16 | float16) overrides the config's model.dtype.
set -euo pipefail

CONFIG=${CONFIG:-$(dirname "$0")/../configs/model/llama2_7b.yaml}
CHECKPOINT=${CHECKPOINT-./checkpoint/second_stage_model.pt}
VISION_MODEL=${VISION_MODEL:-./checkpoint/blip2_vision_model}
QFORMER=${QFORMER:-./checkpoint/blip2_qformer.safetensors}
LANGUAGE_MODEL=${LANGUAGE_MODEL:-./checkpoint/Llama-2-7b-chat-hf}
PROCESSOR=${PROCESSOR:-./checkpoint/blip2-flan-t5-xxl}
DTYPE=${DTYPE:-}
OUT=${OUT:-./exports/textbind}

exec python3 -m textbind export \
    --config "$CONFIG" \
    --checkpoint "$CHECKPOINT" \
    --vision-model "$VISION_MODEL" \
    --qformer "$QFORMER" \
    --language-model "$LANGUAGE_MODEL" \
    --processor "$PROCESSOR" \
    ${DTYPE:+--dtype "$DTYPE"} \
    --out "$OUT" \
    "$@"
