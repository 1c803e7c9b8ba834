"""The toy world really learns: a shortened `scripts/quickstart.sh --no-demo`, end to end.

Same scripts and code paths as the full quickstart (toy data, the small random model, the vision and
language pretraining, the stage-2 conversations made by the data engine with the toy LLM behind a real
HTTP server, stage 1 on webdataset shards and stage 2 on JSON conversations with two CPU ranks, held-out
evaluation with the toy renderer), with fewer samples, steps and evaluation items. Chance is near 0 for
both headline metrics (one fully right description among 36 single-object and 2 x 36 x 36 two-object scenes;
a drawing is right when its caption parses to exactly the asked scene). Measured on 40 + 40 items: caption
accuracy 0.775-0.8 and drawing accuracy 0.525 (plain requests 1.0, edits 0.095) in two runs, and 0.725 / 0.5
once a quarter of the conversations came from the pairs' own families (GROUPED); the thresholds below leave
room.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# On a 2-core CPU the run takes about 4 minutes (measured 227-253 s).
SETTINGS = {
    "PRETRAIN_STEPS": "600",
    "LANGUAGE_STEPS": "130",  # about as long as 600 vision steps
    "STAGE1_SAMPLES": "4800",
    "STAGE2_CONVERSATIONS": "1600",
    "EVAL_ITEMS": "40",
    "STAGE2_STEPS": "200",
}
MIN_CAPTION_ACCURACY = 0.6
MIN_DRAWING_ACCURACY = 0.4  # 16 of 40


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
    keys = ("caption_attribute_accuracy", "describe_colour_accuracy", "drawing_accuracy", "drawing_by_kind",
            "edits_by_kind")
    summary = {key: result[key] for key in keys}
    print(json.dumps(summary), file=sys.stderr)
    assert result["caption_attribute_accuracy"] >= MIN_CAPTION_ACCURACY, summary
    assert result["drawing_accuracy"] >= MIN_DRAWING_ACCURACY, summary
    assert result["pretrain_seconds"] > 0 and result["total_train_seconds"] > result["train_seconds"]


@pytest.mark.parametrize(("caption_clustered", "grouped"), [("-1", "0"), ("60", "50"), ("0", "-5")])
def test_quickstart_refuses_shares_beyond_the_conversations(tmp_path, caption_clustered, grouped):
    env = dict(os.environ, STAGE2_CONVERSATIONS="100", CAPTION_CLUSTERED=caption_clustered, GROUPED=grouped,
               OUT=str(tmp_path / "runs"), DATA=str(tmp_path / "data"), MODEL_DIR=str(tmp_path / "model"))
    completed = subprocess.run(["bash", "scripts/quickstart.sh", "--no-demo"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "must be between 0 and" in completed.stderr
    assert not (tmp_path / "data").exists()  # refused before making anything
