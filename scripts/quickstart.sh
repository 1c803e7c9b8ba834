#!/usr/bin/env bash
# The embedded default, on a laptop CPU: build the toy shapes world (image-caption shards and pairs), build a
# small random model, pretrain its vision encoder and its language model (the toy stand-ins for BLIP-2 and
# Llama-2), make the stage-2 conversations with the data engine (textbind datagen run) from the toy pairs, the
# scripted toy LLM answering over a real OpenAI-compatible HTTP server, train stage 1 and stage 2 through
# scripts/run_first_stage.sh and scripts/run_second_stage.sh, evaluate on held-out data
# (runs/quickstart/eval.json), then chat with the result in the browser demo.
#   bash scripts/quickstart.sh [--no-demo] [extra overrides for both stages, e.g. train.max_steps=50]
# Variables: OUT, DATA, MODEL_DIR, SEED, PRETRAIN_STEPS, LANGUAGE_STEPS, STAGE1_STEPS, STAGE2_STEPS, EVAL_LIMIT,
# STAGE1_SAMPLES, STAGE2_CONVERSATIONS (conversations requested from the data engine; about 9% are then
# filtered out and 200 go to valid/test), STAGE2_PAIRS (toy image-caption pairs the engine draws them from),
# NUM_CLUSTERS (topic clusters of the pairs), CAPTION_CLUSTERED (how many of the conversations come from the
# pairs clustered by their captions' words), GROUPED (how many from the pairs' own groups, their families; the
# rest come from the pairs clustered by their images), FAULTY_SHARE
# (share of faulty transcripts the toy LLM writes for the filters), EVAL_ITEMS, NUM_GPUS (CPU processes;
# default 2 on 2+ cores), HOST, PORT, OMP_NUM_THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# The toy world trains (DeepSpeed, webdataset shards), makes its data with the data engine and is scored by the
# evaluation harness: the train, datagen and eval extras, which `pip install textbind` (inference and the demo)
# leaves out. Installed once, where missing.
python3 -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    deepspeed peft webdataset braceexpand openai fastapi uvicorn rapidfuzz sklearn torchmetrics \
  || python3 -m pip install -q -e ".[train,datagen,eval]"
DEMO=1
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--no-demo" ]]; then DEMO=0; else ARGS+=("$arg"); fi
done
OUT=${OUT:-runs/quickstart}
DATA=${DATA:-data/toy}
MODEL_DIR=${MODEL_DIR:-checkpoint/toy}
SEED=${SEED:-0}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-}  # empty: textbind toy pretrain's default (1500)
LANGUAGE_STEPS=${LANGUAGE_STEPS:-}  # empty: its default for the language model (450)
STAGE1_SAMPLES=${STAGE1_SAMPLES:-7680}
STAGE2_CONVERSATIONS=${STAGE2_CONVERSATIONS:-6400}
STAGE2_PAIRS=${STAGE2_PAIRS:-$STAGE2_CONVERSATIONS}
CAPTION_CLUSTERED=${CAPTION_CLUSTERED:-$(( STAGE2_CONVERSATIONS * 11 / 32 ))}  # about a third: 2200 of 6400
if (( CAPTION_CLUSTERED < 0 || CAPTION_CLUSTERED > STAGE2_CONVERSATIONS )); then
  echo "CAPTION_CLUSTERED=$CAPTION_CLUSTERED: must be between 0 and STAGE2_CONVERSATIONS ($STAGE2_CONVERSATIONS)" >&2
  exit 2
fi
GROUPED=${GROUPED:-$(( STAGE2_CONVERSATIONS / 4 ))}  # a quarter: 1600 of 6400
if (( GROUPED < 0 || CAPTION_CLUSTERED + GROUPED > STAGE2_CONVERSATIONS )); then
  echo "GROUPED=$GROUPED: must be between 0 and STAGE2_CONVERSATIONS - CAPTION_CLUSTERED" \
    "($(( STAGE2_CONVERSATIONS - CAPTION_CLUSTERED )))" >&2
  exit 2
fi
NUM_CLUSTERS=${NUM_CLUSTERS:-$(( STAGE2_PAIRS / 8 > 1 ? STAGE2_PAIRS / 8 : 1 ))}
FAULTY_SHARE=${FAULTY_SHARE:-0.1}
EVAL_ITEMS=${EVAL_ITEMS:-200}
EVAL_LIMIT=${EVAL_LIMIT:-0}
STAGE1_STEPS=${STAGE1_STEPS:-}  # empty: as the epochs say
STAGE2_STEPS=${STAGE2_STEPS:-}
# Two data-parallel CPU processes (DeepSpeed on gloo) when the machine has two cores or more (counted
# without OMP_NUM_THREADS, which nproc would otherwise report instead).
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
export NUM_GPUS=${NUM_GPUS:-$(( CORES >= 2 ? 2 : 1 ))} MASTER_PORT=${MASTER_PORT:-29517}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# One thread per process: the small models gain little from a second thread, and threads spinning
# against the data-loader worker (or anything else on the machine) slow training down many times over.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

seconds_since() { python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$1"; }

echo "== toy data: image-caption shards (stage 1), image-caption pairs (the data engine's input), eval sets"
python3 -m textbind toy datagen --out "$DATA" --seed "$SEED" --stage1-samples "$STAGE1_SAMPLES" \
  --samples-per-shard 1000 --pairs "$STAGE2_PAIRS" --stage2-conversations 0 \
  --eval-describe "$EVAL_ITEMS" --eval-draw "$EVAL_ITEMS"

echo "== a small random model (its tokenizer learns the toy world's texts)"
python3 -m textbind toy build --out "$MODEL_DIR" --seed "$SEED"

echo "== pretraining the vision encoder and, in a second process, the language model"
pretrain_started=$(date +%s.%N)
python3 -m textbind toy pretrain --model-dir "$MODEL_DIR" ${PRETRAIN_STEPS:+--steps "$PRETRAIN_STEPS"} \
  ${LANGUAGE_STEPS:+--language-steps "$LANGUAGE_STEPS"} --seed "$SEED"
pretrain_seconds=$(seconds_since "$pretrain_started")

echo "== stage-2 conversations: the data engine on the toy pairs, the toy LLM behind a real HTTP server"
LLM_DIR="$DATA/llm"
mkdir -p "$LLM_DIR"
rm -f "$LLM_DIR/port"
python3 -m textbind toy llm-server --port 0 --port-file "$LLM_DIR/port" --seed "$SEED" \
  --faulty-share "$FAULTY_SHARE" --request-log "$LLM_DIR/requests.jsonl" > "$LLM_DIR/server.log" 2>&1 &
LLM_PID=$!
stop_llm() { kill "$LLM_PID" 2>/dev/null && wait "$LLM_PID" 2>/dev/null || true; }
trap stop_llm EXIT
for _ in $(seq 600); do
  [[ -s "$LLM_DIR/port" ]] && break
  kill -0 "$LLM_PID" 2>/dev/null || { cat "$LLM_DIR/server.log" >&2; echo "the toy LLM server stopped" >&2; exit 1; }
  sleep 0.1
done
[[ -s "$LLM_DIR/port" ]] || { echo "the toy LLM server did not start within 60 s" >&2; exit 1; }
# As in TextBind, the pairs are clustered by their images, embedded by the (just pretrained) vision encoder,
# in many small clusters: images one edit apart then often meet in one conversation, which the toy LLM
# turns into drawing-and-editing dialogues. Mini-batch k-means keeps that to seconds. Images that differ in
# the order or the colour of their shapes look unalike to the encoder and seldom meet that way, so a second
# run clusters the same pairs by their captions' words (CAPTION_CLUSTERED of the STAGE2_CONVERSATIONS), and a
# third takes the pairs' own groups (GROUPED of them).
run_engine() {  # output directory, conversations, extra overrides
  local out=$1 conversations=$2
  shift 2
  python3 -m textbind datagen run --config configs/datagen/toy.yaml pairs.path="$DATA/pairs/pairs.jsonl" \
    run.output_dir="$out" run.seed="$SEED" llm.base_url="http://127.0.0.1:$(cat "$LLM_DIR/port")/v1" \
    llm.model=toy-writer sample.num_conversations="$conversations" cluster.num_clusters="$NUM_CLUSTERS" \
    cluster.minibatch_above=0 "$@"
}
run_engine "$DATA/stage2" $(( STAGE2_CONVERSATIONS - CAPTION_CLUSTERED - GROUPED )) \
  embed.model_path="$MODEL_DIR/blip2_vision_model" embed.processor_path="$MODEL_DIR/processor"
STAGE2_TRAIN="$DATA/stage2/train.json"
if (( CAPTION_CLUSTERED > 0 )); then
  # Swapped shapes give the very same words: no near-duplicate removal here.
  run_engine "$DATA/stage2_by_caption" "$CAPTION_CLUSTERED" embed.encoder=hashing embed.modality=caption \
    cluster.dedup=false
  STAGE2_TRAIN="$STAGE2_TRAIN,$DATA/stage2_by_caption/train.json"
fi
if (( GROUPED > 0 )); then
  # The pairs' own groups (cluster.method=group): the toy pairs come in families, a scene and a walk of edits
  # from it, as the photos of one album do; every kind of edit then meets in one conversation. Captions are
  # embedded by their words (no model needed), and no near-duplicate removal, as in the run above.
  run_engine "$DATA/stage2_grouped" "$GROUPED" cluster.method=group embed.encoder=hashing embed.modality=caption \
    cluster.dedup=false
  STAGE2_TRAIN="$STAGE2_TRAIN,$DATA/stage2_grouped/train.json"
fi
stop_llm
trap - EXIT

SHARDS="$DATA/stage1/{00000..$(printf %05d $(( (STAGE1_SAMPLES + 999) / 1000 - 1 )))}.tar"
MODEL_ENV=(VISION_MODEL="$MODEL_DIR/blip2_vision_model" LANGUAGE_MODEL="$MODEL_DIR/llama" PROCESSOR="$MODEL_DIR/processor")
started=$(date +%s.%N)

echo "== stage 1: alignment on image-caption shards"
env "${MODEL_ENV[@]}" CONFIG=configs/toy/first_stage.yaml TRAIN_DATA_PATH="$SHARDS" \
  CHECKPOINT="$MODEL_DIR/blip2_qformer.safetensors" OUTPUT_DIR="$OUT/first_stage" \
  bash scripts/run_first_stage.sh train.resume=never train.max_steps="$STAGE1_STEPS" train.seed="$SEED" \
  data.samples_per_epoch="$STAGE1_SAMPLES" ${ARGS[@]+"${ARGS[@]}"}

echo "== stage 2: instruction following on conversations"
env "${MODEL_ENV[@]}" CONFIG=configs/toy/second_stage.yaml TRAIN_DATA_PATH="$STAGE2_TRAIN" \
  IMAGE_DIR="$DATA/stage2/images" CHECKPOINT="$OUT/first_stage/first_stage_model" \
  QFORMER="$MODEL_DIR/blip2_qformer.safetensors" OUTPUT_DIR="$OUT/second_stage" \
  bash scripts/run_second_stage.sh train.resume=never train.max_steps="$STAGE2_STEPS" train.seed="$SEED" \
  ${ARGS[@]+"${ARGS[@]}"}
train_seconds=$(seconds_since "$started")

echo "== held-out evaluation"
python3 -m textbind toy evaluate --config configs/toy/model.yaml --checkpoint "$OUT/second_stage/second_stage_model" \
  --eval-dir "$DATA/eval" --out "$OUT/eval.json" --limit "$EVAL_LIMIT" --train-seconds "$train_seconds" \
  --pretrain-seconds "$pretrain_seconds" \
  model.vision_model="$MODEL_DIR/blip2_vision_model" model.qformer="$MODEL_DIR/blip2_qformer.safetensors" \
  model.language_model="$MODEL_DIR/llama" model.processor="$MODEL_DIR/processor"
echo "wrote $OUT/eval.json"

if [[ $DEMO == 1 ]]; then
  echo "== demo (Ctrl-C to stop)"
  python3 -m textbind toy examples --out "$DATA/examples"  # the toy examples and their images, for the demo
  env "${MODEL_ENV[@]}" CHECKPOINT="$OUT/second_stage/second_stage_model" QFORMER="$MODEL_DIR/blip2_qformer.safetensors" \
    IMAGE_DECODER=toy bash scripts/run_demo.sh --examples "$DATA/examples/examples.json"
fi
