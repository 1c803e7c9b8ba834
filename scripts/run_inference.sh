#!/usr/bin/env bash
# Answer every conversation of a stage-2 JSON file (each ending with a user turn) with TextBind:
# writes OUTPUT (the records with the generated assistant turn appended) and its images beside it.
# Every variable below can be set from the environment; extra arguments go to `textbind infer`,
# e.g. `bash scripts/run_inference.sh --do-sample --top-p 0.9 model.dtype=float16`.
# SD_BASE="" skips rendering (captions are still reported); CHECKPOINT="" runs the base weights.
set -euo pipefail

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
INPUT=${INPUT:-./data/textbind/test.json}
OUTPUT=${OUTPUT:-./outputs/inference/results.json}

python3 -m textbind infer \
    --config "$CONFIG" \
    --checkpoint "$CHECKPOINT" \
    --vision-model "$VISION_MODEL" \
    --qformer "$QFORMER" \
    --language-model "$LANGUAGE_MODEL" \
    --processor "$PROCESSOR" \
    --sd-base "$SD_BASE" \
    --sd-refiner "$SD_REFINER" \
    --input "$INPUT" \
    --output "$OUTPUT" \
    ${PRETRAINED:+"model.pretrained=$PRETRAINED"} \
    "$@"
