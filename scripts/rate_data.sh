#!/usr/bin/env bash
# Rate generated conversations in the browser: http://127.0.0.1:7861 by default.
# INPUT: filtered.jsonl (or a stage-2 JSON file); RATINGS: the CSV the ratings are appended to
# (resumable: rated conversations are skipped on restart). Every variable can be set from the
# environment; extra arguments go to `textbind datagen rate` (e.g. --image-dir DIR, --host 0.0.0.0).
set -euo pipefail
OUTPUT_DIR=${OUTPUT_DIR:-./data/datagen}
INPUT=${INPUT:-$OUTPUT_DIR/filtered.jsonl}
RATINGS=${RATINGS:-$OUTPUT_DIR/ratings.csv}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7861}
exec python3 -m textbind datagen rate --input "$INPUT" --ratings "$RATINGS" --host "$HOST" --port "$PORT" "$@"
