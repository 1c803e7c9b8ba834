"""One training recipe for both stages: setup -> fit -> save; the stages differ only in configuration.

    deepspeed --num_gpus 8 --module textbind.train --config configs/train/first_stage.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textbind.checkpoint import save_trained_modules
from textbind.config import RunConfig, load_config, save_config
from textbind.data.sequence import ConversationEncoder
from textbind.data.streams import (
    Stage1Source,
    Stage2Source,
    StreamLoader,
    StreamPosition,
    TrainStream,
    load_stage2_groups,
)
from textbind.loss import compute_loss
from textbind.model.builder import ModelBundle, build_model
from textbind.model.mim import MIMModel

logger = logging.getLogger("textbind.train")

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Plan:
    """Batch arithmetic and schedule length, derived once from the config and the world size."""

    micro_batch_size: int
    gradient_accumulation: int
    world_size: int
    samples_per_epoch: int
    total_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation * self.world_size


def make_plan(config: RunConfig, world_size: int, samples_per_epoch: int) -> Plan:
    train = config.train
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of micro_batch_size "
            f"({train.micro_batch_size}) x world size ({world_size})"
        )
    accumulation = train.global_batch_size // per_step
    steps = train.max_steps or max(1, math.ceil(train.epochs * samples_per_epoch / train.global_batch_size))
    plan = Plan(train.micro_batch_size, accumulation, world_size, samples_per_epoch, steps)
    assert plan.global_batch_size == train.global_batch_size
    return plan


def engine_config(config: RunConfig, plan: Plan, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config: engine knobs from the JSON file, everything else from the run config."""
    engine: dict[str, Any] = {}
    if config.train.deepspeed_config:
        engine = json.loads(Path(config.train.deepspeed_config).read_text())
    engine.setdefault("zero_optimization", {"stage": 2})
    if config.train.zero_stage >= 0:
        engine["zero_optimization"]["stage"] = config.train.zero_stage
    precision = config.train.precision
    if precision:
        engine["bf16"] = {"enabled": precision == "bf16"}
        engine["fp16"] = {"enabled": precision == "fp16"}
    offload = engine["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    optim = config.optim
    engine.update(
        train_micro_batch_size_per_gpu=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation,
        train_batch_size=plan.global_batch_size,
        gradient_clipping=optim.gradient_clipping,
        steps_per_print=max(1, plan.total_steps * 10),
        optimizer={
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # Without CUDA, DeepSpeed's fused Adam would be JIT-compiled: use torch's Adam instead.
                **({} if on_gpu or offload else {"torch_adam": True}),
            },
        },
    )
    if offload and not on_gpu:
        engine["zero_force_ds_cpu_optimizer"] = False
    return engine


def lr_groups(model: MIMModel, lr: float, multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by learning rate (lr x the multiplier of their top-level module)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault(lr * multipliers.get(name.split(".")[0], 1.0), []).append(parameter)
    return [{"params": parameters, "lr": group_lr} for group_lr, parameters in groups.items()]


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_source(config: RunConfig, rank: int) -> tuple[Stage1Source | Stage2Source, int]:
    data = config.data
    if data.stage == 1:
        source = Stage1Source(data.train_path, data.shuffle_buffer)
        return source, data.samples_per_epoch or source.count()
    reporter = logger.warning if rank == 0 else None
    groups = load_stage2_groups(data.train_path, data.image_dir, data.on_bad_record, reporter)
    source = Stage2Source(groups, data.train_weights or None)
    return source, data.samples_per_epoch or source.count(config.train.seed)


# ----------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: Path) -> Path | None:
    latest = output_dir / CHECKPOINTS_DIR / LATEST_FILE
    if not latest.is_file():
        return None
    tag_dir = output_dir / CHECKPOINTS_DIR / latest.read_text().strip()
    return tag_dir if tag_dir.is_dir() else None


def resolve_resume(config: RunConfig) -> Path | None:
    mode = config.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return latest_checkpoint(Path(config.train.output_dir))
    path = Path(mode)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resumable(engine: Any, output_dir: Path, step: int, loader: StreamLoader, keep_last: int) -> None:
    """Model, optimizer, scheduler (DeepSpeed) + step, data position and RNG of every rank.

    `latest` is rewritten atomically only after every rank has written everything, so a run killed
    mid-save resumes from the previous checkpoint; older checkpoints are pruned after that.
    """
    import torch.distributed as dist

    checkpoints = output_dir / CHECKPOINTS_DIR
    tag = f"step{step:08d}"
    tag_dir = checkpoints / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save(
        {"step": step, "data_position": loader.position.to_dict(), "rng": rng_state()},
        tag_dir / f"trainer_state_rank{rank}.pt",
    )
    engine.save_checkpoint(str(checkpoints), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        temporary = checkpoints / f".{LATEST_FILE}.tmp"
        temporary.write_text(tag)
        temporary.replace(checkpoints / LATEST_FILE)
        tags = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_resumable(engine: Any, tag_dir: Path) -> dict[str, Any]:
    import torch.distributed as dist

    load_path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    state_file = tag_dir / f"trainer_state_rank{dist.get_rank()}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: was the run resumed with another world size?")
    return torch.load(state_file, weights_only=True)


def export_trained(engine: Any, module: MIMModel, path: Path, config: RunConfig, plan: Plan) -> None:
    """Write the trained modules (safetensors + resolved config); gathers ZeRO-3 partitions first."""
    import torch.distributed as dist

    names = module.trainable_module_names()
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # on rank 0 only
        if dist.get_rank() == 0:
            state = {k: v for k, v in full.items() if k.split(".")[0] in names}
            module.load_state_dict(state, strict=False)
    if dist.get_rank() == 0:
        save_trained_modules(module, path, config, names,
                             extra_info={"steps": plan.total_steps, "global_batch_size": plan.global_batch_size})
    dist.barrier()


# ------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl (+ TensorBoard, + Weights & Biases when configured) on rank 0."""

    def __init__(self, config: RunConfig, output_dir: Path, resumed_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # drop what a killed run logged past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if config.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resumed_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events")
        if config.train.wandb_project and os.environ.get("WANDB_API_KEY"):
            import wandb

            self.wandb = wandb.init(project=config.train.wandb_project, dir=str(output_dir), resume="allow")

    def log(self, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(values) + "\n")
        step = int(values["step"])
        if self.writer is not None:
            for key, value in values.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--crash-at-step", type=int, default=0, help=argparse.SUPPRESS)  # resume tests
    return parser.parse_args(argv)


def setup_distributed() -> tuple[int, int, torch.device]:
    import deepspeed
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    rank, world_size, device = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    fit(config, rank, world_size, device, crash_at_step=args.crash_at_step)


def fit(config: RunConfig, rank: int, world_size: int, device: torch.device, crash_at_step: int = 0) -> Path:
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source, samples_per_epoch = build_source(config, rank)
    plan = make_plan(config, world_size, samples_per_epoch)
    if rank == 0:
        save_config(config, output_dir / "config.yaml")
        logger.info(
            "stage %d: %d samples/epoch, %d epoch(s), global batch %d = %d micro x %d accumulation x %d rank(s), "
            "%d optimizer steps", config.data.stage, samples_per_epoch, config.train.epochs,
            plan.global_batch_size, plan.micro_batch_size, plan.gradient_accumulation, world_size, plan.total_steps,
        )

    torch.manual_seed(config.train.seed)  # the same fresh weights (projector) on every rank
    bundle: ModelBundle = build_model(config.model)
    model = bundle.model
    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if rank == 0:
        logger.info("training %s: %.2fM parameters", model.trainable_module_names(),
                    sum(p.numel() for p in trainable) / 1e6)
    parameter_groups = lr_groups(model, config.optim.lr, config.optim.lr_multipliers)
    schedule = cosine_schedule(config.optim.warmup_steps, plan.total_steps, config.optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups, config=engine_config(config, plan, device.type == "cuda"),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )

    start_step, position = 0, None
    resume_from = resolve_resume(config)
    if resume_from is not None:
        state = load_resumable(engine, resume_from)
        start_step, position = int(state["step"]), StreamPosition.from_dict(state["data_position"])
        set_rng_state(state["rng"])
        if rank == 0:
            logger.info("resumed from %s at step %d", resume_from, start_step)
    else:
        random.seed(config.train.seed + rank)
        torch.manual_seed(config.train.seed + rank)

    encoder = ConversationEncoder(bundle.tokenizer, model.num_query_tokens, config.data.max_input_length)
    stream = TrainStream(
        source, encoder, bundle.image_processor, micro_batch_size=plan.micro_batch_size, seed=config.train.seed,
        rank=rank, world_size=world_size, num_workers=config.data.num_workers, position=position,
    )
    loader = StreamLoader(stream, config.data.num_workers)
    metrics = MetricsLog(config, output_dir, start_step, enabled=rank == 0)
    progress = tqdm(total=plan.total_steps, initial=start_step, disable=rank != 0, desc=f"stage {config.data.stage}",
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    samples_log = None
    if config.train.record_samples:
        (output_dir / "samples").mkdir(exist_ok=True)
        samples_log = (output_dir / "samples" / f"rank{rank}.jsonl").open("a")
    step = start_step
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    try:
        while step < plan.total_steps:
            loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of micro-batch losses, micro-batches)
            for _ in range(plan.gradient_accumulation):
                batch = next(loader)
                output = compute_loss(engine, batch)
                engine.backward(output.loss)
                engine.step()
                loss_sum += torch.tensor([float(output.loss.detach()), 1.0], dtype=torch.float64)
                window_samples += batch.num_samples
                window_tokens += batch.num_tokens
                if samples_log is not None:
                    samples_log.write(json.dumps({"step": step + 1, "sources": list(batch.sources)}) + "\n")
            step += 1
            totals = torch.tensor([loss_sum[0], loss_sum[1], window_samples, window_tokens,
                                   loader.position.skipped], dtype=torch.float64)
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - window_start
            values = {
                "step": step,
                "loss": float(totals[0] / totals[1]),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_second": float(totals[2]) / elapsed,
                "tokens_per_second": float(totals[3]) / elapsed,
                "skipped_samples": int(totals[4]),
            }
            metrics.log(values)
            progress.update(1)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 samples_s=f"{values['samples_per_second']:.1f}",
                                 tokens_s=f"{values['tokens_per_second']:.0f}", refresh=False)
            if step % config.train.log_every == 0 and rank == 0:
                logger.info("step %d/%d %s", step, plan.total_steps,
                            " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "step"))
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
            save_every = config.train.save_every or plan.total_steps
            if step % save_every == 0 or step == plan.total_steps:
                save_resumable(engine, output_dir, step, loader, config.train.keep_last)
            if samples_log is not None:
                samples_log.flush()
            if crash_at_step and step == crash_at_step:
                os._exit(17)  # a hard kill: no cleanup, no final export (tests of resume)
    finally:
        progress.close()
        metrics.close()
        if samples_log is not None:
            samples_log.close()
    export_dir = output_dir / config.train.export_name
    export_trained(engine, model, export_dir, config, plan)
    if rank == 0:
        logger.info("exported the trained modules to %s", export_dir)
    return export_dir


if __name__ == "__main__":
    main(sys.argv[1:])
