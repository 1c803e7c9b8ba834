#!/usr/bin/env bash
# Install textbind with its test extras (and Debian's Chromium for the browser tests, where apt exists).
# requirements.txt first: on a CPU machine its torch pin takes the CPU build (unpinned, pip picks a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -e ".[test]"
# lmms-eval's own requirements pull torchvision and another torch: without them it still serves its model API,
# which the plugin test drives (tests/eval/test_lmms.py).
python3 -m pip install -q --no-deps "lmms-eval==0.7.3" loguru
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"
fi
