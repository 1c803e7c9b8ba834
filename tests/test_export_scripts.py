"""The export end to end: its script, the inference and demo scripts from an export, training from an export."""

from __future__ import annotations

import json

import pytest
import torch

from textbind.config import ModelConfig
from textbind.export_hf import export
from textbind.model.builder import build_model


@pytest.fixture(scope="module")
def exported(bundle, model_config, tmp_path_factory):
    return export(bundle, model_config, tmp_path_factory.mktemp("export") / "textbind-tiny")


def test_export_script(tiny_paths, tmp_path):
    """scripts/export_hf.sh with the model variables of run_demo.sh, DTYPE, OUT and extra arguments."""
    import os
    import subprocess
    from pathlib import Path

    from safetensors import safe_open

    repository = Path(__file__).resolve().parents[1]
    variables = {"VISION_MODEL": tiny_paths["vision_model"], "QFORMER": tiny_paths["qformer"],
                 "LANGUAGE_MODEL": tiny_paths["language_model"], "PROCESSOR": tiny_paths["processor"],
                 "CONFIG": str(repository / "configs/model/tiny.yaml"), "CHECKPOINT": "", "DTYPE": "bf16",
                 "OUT": str(tmp_path / "out")}
    environment = {key: value for key, value in os.environ.items() if key not in variables}
    subprocess.run(["bash", "scripts/export_hf.sh", "--license", "apache-2.0"], cwd=repository, check=True,
                   env={**environment, **variables, "HF_HUB_OFFLINE": "1"}, capture_output=True, timeout=120)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "license: apache-2.0" in (out / "README.md").read_text()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("language_projection.weight").dtype == torch.bfloat16

def test_scripts_run_from_an_exported_directory(exported, image_dir, tmp_path):
    """run_inference.sh with PRETRAINED answers from the export alone (the part paths point nowhere);
    run_demo.sh passes it on and loads no CHECKPOINT unless one is given."""
    import os
    import subprocess
    from pathlib import Path

    repository = Path(__file__).resolve().parents[1]
    records = [{"conversation": [{"role": "user", "content": "What is this? <image>", "image_list": ["0.png"]}],
                "image_dir": str(image_dir)}]
    (tmp_path / "input.json").write_text(json.dumps(records))
    variables = {"PRETRAINED": str(exported), "CONFIG": str(repository / "configs/model/tiny.yaml"), "SD_BASE": "",
                 "INPUT": str(tmp_path / "input.json"), "OUTPUT": str(tmp_path / "out/results.json"),
                 "VISION_MODEL": "/nowhere/vision", "LANGUAGE_MODEL": "/nowhere/llama",
                 "PROCESSOR": "/nowhere/processor"}
    environment = {key: value for key, value in os.environ.items() if key not in {*variables, "CHECKPOINT"}}
    subprocess.run(["bash", "scripts/run_inference.sh", "--max-new-tokens", "3", "--device", "cpu"], cwd=repository,
                   env={**environment, **variables, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True,
                   timeout=300)
    (result,) = json.loads((tmp_path / "out/results.json").read_text())
    assert [turn["role"] for turn in result["conversation"]] == ["user", "assistant"]

    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    path = {"PATH": f"{fake.parent}:{environment['PATH']}"}
    shown = subprocess.run(["bash", "scripts/run_demo.sh"], cwd=repository, env={**environment, **path,
                           "PRETRAINED": "someone/textbind"}, check=True, capture_output=True, text=True).stdout
    arguments = shown.splitlines()
    assert "model.pretrained=someone/textbind" in arguments and arguments[arguments.index("--checkpoint") + 1] == ""
    plain = subprocess.run(["bash", "scripts/run_demo.sh"], cwd=repository, env={**environment, **path},
                           check=True, capture_output=True, text=True).stdout.splitlines()
    assert not any(argument.startswith("model.pretrained=") for argument in plain)

@pytest.mark.slow
def test_training_goes_on_from_an_exported_directory(exported, tmp_path):
    """Stage 2 through the real training recipe (DeepSpeed on the CPU) from `model.pretrained` alone: the loss
    falls on a repeated batch, and the run's export loads over the same directory."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from textbind.toy.datagen import write_stage2_json

    repository = Path(__file__).resolve().parents[1]
    write_stage2_json(tmp_path / "train.json", tmp_path / "images", num_conversations=4, seed=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    output = tmp_path / "run"
    command = [sys.executable, "-m", "textbind", "train", "--config", "configs/train/second_stage.yaml",
               f"model.pretrained={exported}", "model.checkpoint=null", "model.gradient_checkpointing=false",
               "model.dtype=float32", "train.precision=fp32", "train.tensorboard=false", "data.num_workers=1",
               f"data.train_path={tmp_path / 'train.json'}", f"data.image_dir={tmp_path / 'images'}",
               "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=6", "train.save_every=0",
               "optim.lr=2e-3", "optim.warmup_steps=1", f"train.output_dir={output}",
               "train.deepspeed_config=configs/deepspeed/cpu_fp32.json"]
    environment = {**os.environ, "MASTER_PORT": port, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repository, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    trained = build_model(ModelConfig(pretrained=str(exported), checkpoint=str(output / "second_stage_model")))
    start = build_model(ModelConfig(pretrained=str(exported)))
    assert not torch.equal(trained.model.qformer_projection.weight, start.model.qformer_projection.weight)
