#!/usr/bin/env bash
# Score a model: TextBindEval, MME, MMBench or the toy world (report.json per benchmark, report.html over all).
#   BENCHMARK=textbind DATA=data/textbind/test.json bash scripts/run_eval.sh
#   BENCHMARK=mme,mmbench DATA=data/MME_Benchmark_release_version,data/MMBench_DEV_EN.tsv bash scripts/run_eval.sh
#   BENCHMARK=toy DATA=data/toy/eval IMAGE_DECODER=toy CHECKPOINT=runs/quickstart/second_stage/second_stage_model \
#     VISION_MODEL=checkpoint/toy/blip2_vision_model QFORMER=checkpoint/toy/blip2_qformer.safetensors \
#     LANGUAGE_MODEL=checkpoint/toy/llama PROCESSOR=checkpoint/toy/processor bash scripts/run_eval.sh
# Variables: BENCHMARK (textbind, mme, mmbench, toy; comma-separated), DATA (one path per benchmark, comma-
# separated), OUTPUT_DIR, LIMIT (first N items; 0: all), the model variables of scripts/run_demo.sh (CONFIG,
# CHECKPOINT, VISION_MODEL, QFORMER, LANGUAGE_MODEL, PROCESSOR, DTYPE), SD_BASE / SD_REFINER / IMAGE_DECODER as
# in the demo, CLIP_MODEL and BERTSCORE_MODEL (local model directories; empty: those metrics are skipped).
# Extra arguments go to `textbind eval`, e.g. `--restart`, `--max-new-tokens 256`, `eval.turns=all`.
set -euo pipefail

BENCHMARK=${BENCHMARK:-textbind}
DATA=${DATA:-data/textbind/test.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/eval}
LIMIT=${LIMIT:-0}
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
CLIP_MODEL=${CLIP_MODEL:-}
BERTSCORE_MODEL=${BERTSCORE_MODEL:-}
PYTHON=${PYTHON:-python3}

exec "$PYTHON" -m textbind eval "$BENCHMARK" \
    --data "$DATA" \
    --output-dir "$OUTPUT_DIR" \
    --limit "$LIMIT" \
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
    ${CLIP_MODEL:+eval.clip_model="$CLIP_MODEL"} \
    ${BERTSCORE_MODEL:+eval.bertscore_model="$BERTSCORE_MODEL"} \
    "$@"
