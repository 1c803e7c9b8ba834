"""The toy world really learns: a shortened `scripts/quickstart.sh --no-demo`, end to end.

Same scripts and code paths as the full quickstart (toy data generation, the small random model,
stage 1 on webdataset shards, stage 2 on JSON conversations, held-out evaluation with the toy
renderer), with fewer samples, steps and evaluation items. Chance is near 0 for both metrics (one
fully right description among 36 single-object and 2 x 36 x 36 two-object scenes), so the
thresholds below, set well under the accuracies measured for this configuration, show that the
model learned to see and to draw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Measured with these settings on a 2-core CPU (see the thresholds' comments); the run takes
# about 2 minutes there.
SETTINGS = {
    "STAGE1_SAMPLES": "6000",
    "STAGE2_CONVERSATIONS": "1500",
    "EVAL_ITEMS": "40",
    "STAGE1_STEPS": "180",
    "STAGE2_STEPS": "60",
}
MIN_CAPTION_ACCURACY = 0.15
MIN_DRAWING_ACCURACY = 0.30


@pytest.mark.slow
def test_shortened_quickstart_learns(tmp_path):
    env = dict(os.environ, **SETTINGS)
    env.update(
        OUT=str(tmp_path / "runs"),
        DATA=str(tmp_path / "data"),
        MODEL_DIR=str(tmp_path / "model"),
        MASTER_PORT=str(29600 + os.getpid() % 300),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    completed = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--no-demo"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-5000:]
    result = json.loads((tmp_path / "runs" / "eval.json").read_text())

    # Held out: the evaluation sets are written from their own seed stream, and every item was evaluated.
    assert result["num_eval_examples"] == {"describe": 40, "draw": 40}
    assert result["train_seconds"] > 0
    summary = {key: result[key] for key in ("caption_attribute_accuracy", "drawing_accuracy", "drawing_by_kind")}
    print(json.dumps(summary), file=sys.stderr)
    assert result["caption_attribute_accuracy"] >= MIN_CAPTION_ACCURACY, summary
    assert result["drawing_accuracy"] >= MIN_DRAWING_ACCURACY, summary
