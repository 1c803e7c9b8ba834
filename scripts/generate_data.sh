#!/usr/bin/env bash
# The TextBind data engine: image-caption pairs -> topic clusters -> LLM-written multi-turn interleaved
# conversations -> filtered stage-2 data (train.json, valid.json, test.json, images/, stats.json in OUTPUT_DIR).
#   PAIRS='data/cc_sbu/{00000..01254}.tar' LLM_MODEL=meta-llama/Llama-3.1-70B-Instruct bash scripts/generate_data.sh
# Variables (each unset one keeps the CONFIG file's value): PAIRS, OUTPUT_DIR, LLM_BASE_URL, LLM_MODEL,
# NUM_CONVERSATIONS, NUM_CLUSTERS, CONCURRENCY, SEED; CONFIG (default configs/datagen/default.yaml).
# Extra arguments are section.key=value overrides. The API key comes from LLM_API_KEY (or OPENAI_API_KEY).
# Rerun the same command to resume: cached embeddings and journaled answers are not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/datagen/default.yaml}
OVERRIDES=()
[[ -n "${PAIRS:-}" ]] && OVERRIDES+=("pairs.path=$PAIRS")
[[ -n "${OUTPUT_DIR:-}" ]] && OVERRIDES+=("run.output_dir=$OUTPUT_DIR")
[[ -n "${LLM_BASE_URL:-}" ]] && OVERRIDES+=("llm.base_url=$LLM_BASE_URL")
[[ -n "${LLM_MODEL:-}" ]] && OVERRIDES+=("llm.model=$LLM_MODEL")
[[ -n "${NUM_CONVERSATIONS:-}" ]] && OVERRIDES+=("sample.num_conversations=$NUM_CONVERSATIONS")
[[ -n "${NUM_CLUSTERS:-}" ]] && OVERRIDES+=("cluster.num_clusters=$NUM_CLUSTERS")
[[ -n "${CONCURRENCY:-}" ]] && OVERRIDES+=("llm.concurrency=$CONCURRENCY")
[[ -n "${SEED:-}" ]] && OVERRIDES+=("run.seed=$SEED")
python3 -m textbind datagen run --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
