"""The training recipe end to end with real DeepSpeed on the CPU: scripts, two ranks, exact resume, bad data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from textbind.config import ModelConfig, load_config
from textbind.model.builder import build_model
from textbind.toy.datagen import write_stage1_shards, write_stage2_json
from textbind.train import drop_steps_after, engine_config, make_plan

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.precision=fp32", "model.dtype=float32", "train.tensorboard=false", "data.num_workers=1"]


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run(command: list[str], env: dict[str, str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MASTER_PORT": free_port(), "PYTHONUNBUFFERED": "1", **env}
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if expect_ok and result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def run_until_checkpoint(command: list[str], env: dict[str, str], output_dir: Path, step: int) -> int:
    """Start `command`, SIGKILL its whole process group (launcher and ranks) as soon as a resumable checkpoint
    of step `step` or later is complete (`latest` points at it); return the step `latest` points at."""
    full_env = {**os.environ, "MASTER_PORT": free_port(), "PYTHONUNBUFFERED": "1", **env}
    latest = output_dir / "checkpoints" / "latest"
    process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if latest.is_file() and int(latest.read_text().removeprefix("step")) >= step:
                os.killpg(process.pid, signal.SIGKILL)
                break
            if process.poll() is not None:
                raise AssertionError(f"{command} ended before a checkpoint of step {step}:\n{process.stderr.read()}")
            time.sleep(0.02)
        else:
            raise AssertionError(f"no checkpoint of step {step} within the time limit")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return int(latest.read_text().removeprefix("step"))


def metrics(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    pattern = write_stage1_shards(root / "stage1", num_samples=32, samples_per_shard=8, seed=0)
    write_stage2_json(root / "stage2/train.json", root / "stage2/images", num_conversations=16, seed=0)
    # a tiny "repeated batch" data set: 4 pairs, 4 conversations
    small = write_stage1_shards(root / "small1", num_samples=4, samples_per_shard=4, seed=1)
    write_stage2_json(root / "small2/train.json", root / "small2/images", num_conversations=4, seed=1)
    return {"stage1": pattern, "stage2": str(root / "stage2/train.json"), "images": str(root / "stage2/images"),
            "small1": small, "small2": str(root / "small2/train.json"), "small_images": str(root / "small2/images")}


def model_env(tiny_paths):
    return {"VISION_MODEL": tiny_paths["vision_model"], "LANGUAGE_MODEL": tiny_paths["language_model"],
            "PROCESSOR": tiny_paths["processor"], "NUM_GPUS": "1"}


def train_module(config: str, overrides: list[str], env: dict | None = None, expect_ok: bool = True):
    return run([sys.executable, "-m", "textbind", "train", "--config", config, *overrides], env or {}, expect_ok)


def tiny_overrides(tiny_paths):
    return [f"model.{key}={value}" for key, value in tiny_paths.items()]


def test_both_stages_through_the_scripts(tiny_paths, data, tmp_path):
    """Stage 1 then stage 2 from stage 1's export, via the scripts; the loss falls on a repeated batch."""
    env = model_env(tiny_paths)
    stage1 = tmp_path / "stage1"
    run(["bash", "scripts/run_first_stage.sh", *FAST, "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.max_steps=12", "optim.lr=2e-3", "optim.warmup_steps=1", "train.save_every=6"],
        {**env, "TRAIN_DATA_PATH": data["small1"], "CHECKPOINT": tiny_paths["qformer"], "OUTPUT_DIR": str(stage1)})
    losses = [metrics(stage1)[step]["loss"] for step in range(1, 13)]
    # only the Q-Former side trains over a frozen random LLM: a clear, steady fall is what to expect
    assert losses[-1] < losses[0] - 0.1 and losses[-1] < min(losses[:6]), losses
    export = stage1 / "first_stage_model"
    assert (export / "model.safetensors").is_file()
    assert load_config(export / "config.yaml").data.stage == 1

    stage2 = tmp_path / "stage2"
    run(["bash", "scripts/run_second_stage.sh", *FAST, "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.max_steps=10", "optim.lr=2e-3", "optim.warmup_steps=1", "train.save_every=0",
         "model.gradient_checkpointing=false"],
        {**env, "TRAIN_DATA_PATH": data["small2"], "IMAGE_DIR": data["small_images"], "CHECKPOINT": str(export),
         "QFORMER": tiny_paths["qformer"], "OUTPUT_DIR": str(stage2)})
    losses = [metrics(stage2)[step]["loss"] for step in range(1, 11)]
    assert losses[-1] < losses[0] - 0.5, losses
    # save_every=0: one resumable checkpoint, at the end
    assert [path.name for path in (stage2 / "checkpoints").iterdir() if path.is_dir()] == ["step00000010"]
    # the stage-2 export loads for inference and holds the language model too
    final = build_model(ModelConfig(**tiny_paths, checkpoint=str(stage2 / "second_stage_model")))
    assert sorted(json.loads((stage2 / "second_stage_model/textbind.json").read_text())["modules"]) == [
        "language_model", "qformer", "qformer_projection", "query_tokens"]
    # the run's saved config rebuilds the same model: parts, query-token count, weights
    saved = load_config(stage2 / "second_stage_model/config.yaml").model
    assert saved.num_query_tokens == final.model.num_query_tokens
    rebuilt = build_model(replace(saved, checkpoint=str(stage2 / "second_stage_model")))
    rebuilt_state, final_state = rebuilt.model.state_dict(), final.model.state_dict()
    assert rebuilt_state.keys() == final_state.keys()
    assert all(torch.equal(rebuilt_state[key], final_state[key]) for key in final_state)
    # validation loss through the script: the trained model fits its repeated data better than the start
    result = run(["bash", "scripts/run_second_stage_val.sh", "model.dtype=float32", "train.micro_batch_size=2"],
                 {**env, "VAL_DATA_PATH": data["small2"], "IMAGE_DIR": data["small_images"],
                  "CHECKPOINT": str(stage2 / "second_stage_model"), "QFORMER": tiny_paths["qformer"]})
    validation = json.loads(result.stdout.strip().splitlines()[-1])
    assert validation["samples"] == 4 and validation["skipped"] == 0
    assert validation["val_loss"] < losses[0] - 0.5, (validation, losses)


@pytest.mark.parametrize("pack_length", [0, 600])
def test_resume_is_exact(tiny_paths, data, tmp_path, pack_length):
    """SIGKILLed from outside after a checkpoint, resumed: every step matches an uninterrupted run (padded rows,
    and packed rows: two samples of up to 256 tokens + branches share one 600-token row)."""
    common = ["--config", "configs/train/first_stage.yaml", *tiny_overrides(tiny_paths), *FAST,
              f"data.train_path={data['stage1']}", "data.num_workers=2", "train.micro_batch_size=2",
              "train.global_batch_size=4", "train.max_steps=6", "train.save_every=2", "optim.warmup_steps=2",
              f"data.pack_length={pack_length}"]
    train = [sys.executable, "-m", "textbind", "train"]
    run([*train, *common, f"train.output_dir={tmp_path / 'straight'}"], {})
    killed_at = run_until_checkpoint([*train, *common, f"train.output_dir={tmp_path / 'resumed'}"], {},
                                     tmp_path / "resumed", step=2)
    assert killed_at in (2, 4)
    assert not (tmp_path / "resumed/first_stage_model").exists()
    run([*train, *common, f"train.output_dir={tmp_path / 'resumed'}"], {})
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9)
    kept = sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step00000004", "step00000006"]  # keep_last=2
    a = (tmp_path / "straight/first_stage_model/model.safetensors").read_bytes()
    b = (tmp_path / "resumed/first_stage_model/model.safetensors").read_bytes()
    assert a == b


def test_lora_resume_is_exact(tiny_paths, data, tmp_path):
    """Stage 2 with LoRA adapters, killed after a checkpoint and resumed: the same losses and merged export."""
    common = ["--config", "configs/train/second_stage_lora.yaml", *tiny_overrides(tiny_paths), *FAST,
              f"data.train_path={data['stage2']}", f"data.image_dir={data['images']}", "model.checkpoint=",
              "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=4", "train.save_every=2",
              "optim.warmup_steps=1", "model.gradient_checkpointing=false", "train.lora.rank=4",
              "train.deepspeed_config=configs/deepspeed/cpu_fp32.json"]
    train = [sys.executable, "-m", "textbind", "train"]
    run([*train, *common, f"train.output_dir={tmp_path / 'straight'}"], {})
    killed_at = run_until_checkpoint([*train, *common, f"train.output_dir={tmp_path / 'resumed'}"], {},
                                     tmp_path / "resumed", step=2)
    assert killed_at == 2 and not (tmp_path / "resumed/second_stage_model").exists()
    run([*train, *common, f"train.output_dir={tmp_path / 'resumed'}"], {})
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    for step in range(1, 5):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-7), step
    # The merged exports agree tensor by tensor. (Byte identity held in isolation, but in full-suite runs single
    # elements have come out up to 5.6e-7 apart; the losses above still agree to 1e-6.)
    a = load_file(tmp_path / "straight/second_stage_model/model.safetensors")
    b = load_file(tmp_path / "resumed/second_stage_model/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    assert (tmp_path / "resumed/second_stage_model/adapter/adapter_model.safetensors").is_file()
    assert straight[4]["loss"] < straight[1]["loss"]


def test_two_ranks_disjoint_data_and_resume(tiny_paths, data, tmp_path):
    env = {**model_env(tiny_paths), "NUM_GPUS": "2", "TRAIN_DATA_PATH": data["stage2"], "IMAGE_DIR": data["images"],
           "CHECKPOINT": "", "QFORMER": tiny_paths["qformer"], "OUTPUT_DIR": str(tmp_path / "run")}
    overrides = [*FAST, "train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=4",
                 "train.save_every=2", "train.record_samples=true", "model.gradient_checkpointing=false"]
    killed_at = run_until_checkpoint(["bash", "scripts/run_second_stage.sh", *overrides], env, tmp_path / "run", 2)
    assert killed_at == 2 and not (tmp_path / "run/second_stage_model").exists()
    run(["bash", "scripts/run_second_stage.sh", *overrides], env)
    per_rank = [[json.loads(line) for line in (tmp_path / f"run/samples/rank{r}.jsonl").read_text().splitlines()]
                for r in range(2)]
    for records in per_rank:  # each step once: the resumed run dropped what the killed one recorded past step 2
        assert [record["step"] for record in records] == [1, 1, 2, 2, 3, 3, 4, 4]
    for step in range(1, 5):
        seen = [{s for record in records if record["step"] == step for s in record["sources"]}
                for records in per_rank]
        assert len(seen[0]) == 2 and len(seen[1]) == 2 and not seen[0] & seen[1], (step, seen)
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3, 4]
    assert (tmp_path / "run/second_stage_model/model.safetensors").is_file()
    assert {p.name for p in (tmp_path / "run/checkpoints/step00000004").iterdir()} >= {
        "trainer_state_rank0.pt", "trainer_state_rank1.pt"}


def test_bad_records_stop_or_are_skipped(tiny_paths, data, tmp_path):
    records = json.loads(Path(data["stage2"]).read_text())
    records[3]["conversation"][0]["content"] = "no image marker here"
    records[3]["conversation"][0]["image_list"] = ["a.png"]
    records[5] = {"conversation": []}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    common = ["--config", "configs/train/second_stage.yaml", *tiny_overrides(tiny_paths), *FAST,
              f"data.train_path={bad}", f"data.image_dir={data['images']}", "model.checkpoint=",
              "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=2",
              "model.gradient_checkpointing=false"]
    failed = train_module(common[1], common[2:] + ["data.on_bad_record=error", f"train.output_dir={tmp_path / 'a'}"],
                          expect_ok=False)
    assert failed.returncode != 0 and "bad.json record 3" in failed.stderr
    assert not (tmp_path / "a/metrics.jsonl").exists()  # stopped before training
    ok = train_module(common[1], common[2:] + [f"train.output_dir={tmp_path / 'b'}"])
    assert "skipped 2 bad record(s)" in ok.stderr and "record 3" in ok.stderr and "record 5" in ok.stderr
    assert sorted(metrics(tmp_path / "b")) == [1, 2]


def test_a_resumed_log_drops_steps_past_the_checkpoint(tmp_path):
    log = tmp_path / "rank0.jsonl"
    drop_steps_after(log, 2)
    assert not log.exists()
    log.write_text('{"step": 1, "a": 1}\n{"step": 2}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # cut by a kill
    drop_steps_after(log, 2)
    assert log.read_text() == '{"step": 1, "a": 1}\n{"step": 2}\n{"step": 2}\n'


def test_batch_arithmetic_and_engine_config():
    config = load_config(ROOT / "configs/train/first_stage.yaml")
    plan = make_plan(config, world_size=8, samples_per_epoch=10_000_000)
    assert (plan.micro_batch_size, plan.gradient_accumulation, plan.global_batch_size) == (16, 2, 256)
    assert plan.total_steps == 78_125  # 2 epochs x 10M samples / 256
    engine = engine_config(config, plan, on_gpu=True)
    assert engine["train_batch_size"] == 256 and engine["gradient_accumulation_steps"] == 2
    assert engine["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.001}
    assert engine["gradient_clipping"] == 1.0 and engine["bf16"]["enabled"]
    assert engine["zero_optimization"]["stage"] == 2
    second = load_config(ROOT / "configs/train/second_stage.yaml")
    plan = make_plan(second, world_size=8, samples_per_epoch=25_000)
    assert (plan.micro_batch_size, plan.gradient_accumulation) == (1, 8)
    engine = engine_config(second, plan, on_gpu=True)
    assert engine["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert second.optim.lr == 1e-5 and second.optim.warmup_steps == 100 and second.train.epochs == 3
    with pytest.raises(ValueError, match="not a multiple"):
        make_plan(config, world_size=3, samples_per_epoch=100)


def test_zero3_matches_zero2(tiny_paths, data, tmp_path):
    """ZeRO-3 (partitioned parameters, gathered for export) trains to the same weights as ZeRO-2."""
    from safetensors.torch import load_file

    common = ["--config", "configs/train/first_stage.yaml", *tiny_overrides(tiny_paths), *FAST,
              f"data.train_path={data['stage1']}", "train.micro_batch_size=2", "train.global_batch_size=2",
              "train.max_steps=3", "optim.warmup_steps=1", "optim.lr=1e-3", "optim.lr_multipliers={qformer: 3}"]
    exports = {}
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        deepspeed_config = "zero3_bf16.json" if stage == 3 else "zero2_bf16.json"
        train_module(common[1], common[2:] + [f"train.output_dir={out}",
                                              f"train.deepspeed_config=configs/deepspeed/{deepspeed_config}"])
        exports[stage] = load_file(out / "first_stage_model/model.safetensors")
    assert exports[2].keys() == exports[3].keys()
    initial = load_file(tiny_paths["qformer"])
    moved = 0
    for key, value in exports[2].items():
        torch.testing.assert_close(exports[3][key], value, rtol=1e-4, atol=1e-5)
        if key in initial:
            moved += int(not torch.equal(initial[key], value))
    assert moved > 10  # training changed the weights, so the comparison means something


def test_lr_multipliers_make_groups(bundle):
    from textbind.optim import lr_groups

    groups = lr_groups(bundle.model, 1e-4, {"qformer": 3.0})
    by_lr = {group["lr"]: sum(p.numel() for p in group["params"]) for group in groups}
    qformer = sum(p.numel() for p in bundle.model.qformer.parameters())
    assert by_lr[1e-4 * 3.0] == qformer
    assert sum(by_lr.values()) == sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)


def test_corrupt_samples_are_skipped_and_counted(tiny_paths, tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(good, format="PNG")
    with wds.TarWriter(str(tmp_path / "00000.tar")) as writer:
        for index in range(12):
            sample = {"__key__": f"{index:05d}", "png": good.getvalue(), "txt": "a blue square",
                      "json": json.dumps({"key": f"{index:05d}"})}
            if index % 4 == 1:
                sample["png"] = b"\x89PNG truncated"
            writer.write(sample)
    with (tmp_path / "00001.tar").open("wb") as handle:
        handle.write(b"this is not a tar file at all" * 40)
    train_module("configs/train/first_stage.yaml", [
        *tiny_overrides(tiny_paths), *FAST, f"data.train_path={tmp_path}/{{00000..00001}}.tar",
        "train.micro_batch_size=3", "train.global_batch_size=3", "train.max_steps=3",
        f"train.output_dir={tmp_path / 'run'}"])
    records = metrics(tmp_path / "run")
    assert sorted(records) == [1, 2, 3]
    assert records[3]["skipped_samples"] >= 2
