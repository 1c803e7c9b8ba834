"""Tests for batch inference (scripts/run_inference.sh, textbind.inference) and `python -m textbind`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_generation import TRAINED_CAPTION, overfit_bundle

from textbind.chat import main as chat_main
from textbind.checkpoint import save_trained_modules
from textbind.cli import main as cli_main
from textbind.config import MODULE_NAMES
from textbind.inference import main as inference_main
from textbind.runtime import model_config_from_arguments

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "model" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained_checkpoint(model_config, image_dir, tmp_path_factory) -> str:
    """The tiny model trained on one conversation with an output image, exported like a real run."""
    bundle = overfit_bundle(model_config, str(image_dir))
    return str(save_trained_modules(bundle.model, tmp_path_factory.mktemp("trained") / "export", None,
                                    module_names=list(MODULE_NAMES)))


def model_flags(tiny_paths: dict[str, str], checkpoint: str) -> list[str]:
    return [
        "--config", str(TINY_CONFIG),
        "--checkpoint", checkpoint,
        "--vision-model", tiny_paths["vision_model"],
        "--qformer", tiny_paths["qformer"],
        "--language-model", tiny_paths["language_model"],
        "--processor", tiny_paths["processor"],
        "--device", "cpu",
    ]


def write_records(path: Path, image_dir: Path) -> None:
    records = [
        {"conversation": [{"role": "user", "content": "What is this? <image>", "image_list": ["0.png"]}],
         "image_dir": str(image_dir)},
        {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversation": [{"role": "user", "content": "And this? <image>", "image_list": ["missing.png"]}],
         "image_dir": str(image_dir)},
        {"conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a dog."}]},
    ]
    path.write_text(json.dumps(records))


def test_run_inference_script_writes_results_and_images(tiny_paths, trained_checkpoint, image_dir, tmp_path) -> None:
    from textbind.testing.tiny_sdxl import build_tiny_sdxl

    sd_base, sd_refiner = build_tiny_sdxl(tmp_path / "sdxl", seed=0)
    input_file, output_file = tmp_path / "test.json", tmp_path / "out" / "results.json"
    write_records(input_file, image_dir)
    environment = {
        **os.environ,
        "CONFIG": str(TINY_CONFIG),
        "CHECKPOINT": trained_checkpoint,
        "VISION_MODEL": tiny_paths["vision_model"],
        "LANGUAGE_MODEL": tiny_paths["language_model"],
        "PROCESSOR": tiny_paths["processor"],
        "SD_BASE": sd_base,
        "SD_REFINER": sd_refiner,
        "INPUT": str(input_file),
        "OUTPUT": str(output_file),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = ["bash", str(REPO / "scripts" / "run_inference.sh"), "--qformer", tiny_paths["qformer"],
               "--device", "cpu", "--max-new-tokens", "30", "--sd-steps", "2", "--sd-high-noise-frac", "0.5"]
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    results = json.loads(output_file.read_text())
    assert [result["record_index"] for result in results] == [0, 3]
    assert "record 1" in finished.stderr and "record 2" in finished.stderr and "missing.png" in finished.stderr
    drawn = results[0]["conversation"][-1]
    assert drawn["role"] == "assistant" and drawn["content"].startswith("A red block. Here is a green one: <image>")
    assert drawn["caption_list"][0] == TRAINED_CAPTION
    image_path = Path(drawn["image_list"][0])
    assert image_path.parent == output_file.parent / "results_images" and image_path.is_file()
    with Image.open(image_path) as image:
        assert image.size == (64, 64)
    assert len(drawn["image_list"]) == drawn["content"].count("<image>")
    assert results[1]["conversation"][-1]["role"] == "assistant"
    assert results[1]["conversation"][0] == {"role": "system", "content": "Be brief."}


def test_chat_streams_the_answer_and_saves_images(tiny_paths, trained_checkpoint, image_dir, tmp_path,
                                                  capsys) -> None:
    output_dir = tmp_path / "chat"
    arguments = ["chat", *model_flags(tiny_paths, trained_checkpoint), "--prompt", "What is this? <image>",
                 "--image", str(image_dir / "0.png"), "--max-new-tokens", "30", "--image-decoder", "toy",
                 "--output-dir", str(output_dir)]
    assert cli_main(arguments) == 0  # `textbind chat ...`
    printed = capsys.readouterr().out
    assert printed.startswith("A red block. Here is a green one:\n[image: ")
    assert f"| {TRAINED_CAPTION}]" in printed
    assert (output_dir / "image_0.png").is_file()

    assert chat_main([*arguments[1:-4], "--output-dir", str(output_dir)]) == 0  # no image decoder
    printed = capsys.readouterr().out
    assert f"[image not rendered | {TRAINED_CAPTION}]" in printed
    assert not (output_dir / "image_1.png").exists()


def test_bad_prompts_and_settings_exit_with_a_message(tiny_paths, trained_checkpoint, image_dir, capsys) -> None:
    flags = model_flags(tiny_paths, trained_checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        chat_main([*flags, "--prompt", "Compare <image> and <image>", "--image", str(image_dir / "0.png")])
    assert exit_info.value.code == 2
    assert "marker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat_main([*flags, "--prompt", "Hi", "--top-p", "0"])
    with pytest.raises(SystemExit) as exit_info:
        inference_main([*flags, "--input", str(image_dir / "0.png"), "--output", "unused.json"])
    assert exit_info.value.code == 2 and "JSON" in capsys.readouterr().err


def test_flags_and_overrides_over_the_yaml_config(tiny_paths) -> None:
    import argparse

    from textbind.runtime import add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_intermixed_args(
        ["--config", str(TINY_CONFIG), "model.attn_implementation=eager", "--dtype", "bf16", "--checkpoint", "",
         "--language-model", tiny_paths["language_model"], "model.num_query_tokens=32"]
    )
    config = model_config_from_arguments(args)
    assert config.dtype == "bfloat16" and config.attn_implementation == "eager" and config.checkpoint is None
    assert config.language_model == tiny_paths["language_model"]
    assert config.vision_model == "checkpoint/tiny/blip2_vision_model"  # from the YAML file


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chat_on_cuda_in_bfloat16(tiny_paths, trained_checkpoint, image_dir, tmp_path, capsys) -> None:
    arguments = [*model_flags(tiny_paths, trained_checkpoint)[:-2], "--device", "cuda", "--dtype", "bfloat16",
                 "--prompt", "What is this? <image>", "--image", str(image_dir / "0.png"),
                 "--max-new-tokens", "30", "--image-decoder", "toy", "--output-dir", str(tmp_path)]
    assert chat_main(arguments) == 0
    assert f"| {TRAINED_CAPTION}]" in capsys.readouterr().out

