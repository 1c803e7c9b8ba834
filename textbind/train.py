"""One training recipe for both stages: set up a run, then the loop; the stages differ only in configuration.

    deepspeed --num_gpus 8 --module textbind train --config configs/train/first_stage.yaml [key=value ...]
    (scripts/run_first_stage.sh and scripts/run_second_stage.sh run this with the README's paths)

`setup_run` derives the plan (batch arithmetic, schedule length), builds the model and the DeepSpeed
engine, resumes from the latest checkpoint when there is one and opens the data stream and the
metrics; `train_loop` runs the optimizer steps, saving resumable checkpoints (`textbind.checkpoint`)
on the way and exporting the trained modules at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from textbind.checkpoint import export_trained, load_resumable, resolve_resume, save_resumable
from textbind.config import RunConfig, config_help, config_to_dict, load_config, save_config
from textbind.data.sequence import ConversationEncoder
from textbind.data.streams import StreamLoader, StreamPosition, TrainStream, build_train_source
from textbind.loss import compute_loss, scale_for_backward, step_target_tokens
from textbind.model.builder import build_model
from textbind.model.mim import MIMModel
from textbind.optim import cosine_schedule, lr_groups

logger = logging.getLogger("textbind.train")

WANDB_RUN_FILE = "wandb_run_id"


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
    if config.train.zero_stage is not None:
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



# ------------------------------------------------------------------------------------------- logging


def drop_steps_after(path: Path, step: int) -> None:
    """Remove the records of steps after `step` from the JSON-lines log `path` (if it exists), and a last line
    that a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """metrics.jsonl (+ TensorBoard, + Weights & Biases when configured) on rank 0.

    A resumed run drops what a killed run logged past the checkpoint it resumes from, and continues
    the same W&B run (its id is kept in the output directory).
    """

    def __init__(self, config: RunConfig, output_dir: Path, resumed_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        drop_steps_after(self.path, resumed_step)
        if config.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resumed_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events")
        if config.train.wandb_project and os.environ.get("WANDB_API_KEY"):
            import wandb

            id_file = output_dir / WANDB_RUN_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=config.train.wandb_project, dir=str(output_dir), id=run_id,
                                    resume="allow", config=config_to_dict(config))

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


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class RunState:
    """What the loop needs, made once by `setup_run`."""

    config: RunConfig
    plan: Plan
    rank: int
    world_size: int
    model: MIMModel
    engine: Any  # the DeepSpeed engine around `model`
    scheduler: Any
    loader: StreamLoader
    metrics: MetricsLog
    output_dir: Path
    start_step: int


def setup_run(config: RunConfig, rank: int, world_size: int, device: torch.device) -> RunState:
    import deepspeed

    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source, samples_per_epoch = build_train_source(config.data, config.train.seed,
                                                   logger.warning if rank == 0 else None)
    plan = make_plan(config, world_size, samples_per_epoch)

    torch.manual_seed(config.train.seed)  # the same fresh weights (projector) on every rank
    bundle = build_model(config.model, lora=config.train.lora, quantize=config.train.quantize)
    model = bundle.model
    model.train()
    config.model.num_query_tokens = model.num_query_tokens  # the saved config records what was built
    if rank == 0:
        save_config(config, output_dir / "config.yaml")
        logger.info(
            "stage %d: %d samples/epoch, %d epoch(s), global batch %d = %d micro x %d accumulation x %d rank(s), "
            "%d optimizer steps", config.data.stage, samples_per_epoch, config.train.epochs,
            plan.global_batch_size, plan.micro_batch_size, plan.gradient_accumulation, world_size, plan.total_steps,
        )
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        logger.info("training %s: %.2fM parameters", model.trainable_module_names(),
                    sum(p.numel() for p in trainable) / 1e6)
    schedule = cosine_schedule(config.optim.warmup_steps, plan.total_steps, config.optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=lr_groups(model, config.optim.lr, config.optim.lr_multipliers),
        config=engine_config(config, plan, device.type == "cuda"),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )

    start_step, position = 0, None
    resume_from = resolve_resume(config.train.resume, output_dir)
    if resume_from is not None:
        state = load_resumable(engine, resume_from)  # restores the RNG state too
        start_step, position = int(state["step"]), StreamPosition.from_dict(state["data_position"])
        if rank == 0:
            logger.info("resumed from %s at step %d", resume_from, start_step)
    else:
        random.seed(config.train.seed + rank)
        torch.manual_seed(config.train.seed + rank)

    encoder = ConversationEncoder(bundle.tokenizer, model.num_query_tokens, config.data.max_input_length)
    stream = TrainStream(
        source, encoder, bundle.image_processor, micro_batch_size=plan.micro_batch_size, seed=config.train.seed,
        rank=rank, world_size=world_size, num_workers=config.data.num_workers, position=position,
        pack_length=config.data.pack_length,
    )
    return RunState(
        config=config, plan=plan, rank=rank, world_size=world_size, model=model, engine=engine,
        scheduler=scheduler, loader=StreamLoader(stream, config.data.num_workers),
        metrics=MetricsLog(config, output_dir, start_step, enabled=rank == 0), output_dir=output_dir,
        start_step=start_step,
    )


# ----------------------------------------------------------------------------------------------- loop


def open_samples_log(output_dir: Path, rank: int, resumed_step: int) -> TextIO:
    """samples/rank{R}.jsonl for appending, without what a killed run recorded past the step it resumes from."""
    path = output_dir / "samples" / f"rank{rank}.jsonl"
    path.parent.mkdir(exist_ok=True)
    drop_steps_after(path, resumed_step)
    return path.open("a")


def train_loop(run: RunState) -> Path:
    """Optimizer steps from `run.start_step` to the end of the plan; checkpoints on the way, export at the end."""
    import torch.distributed as dist
    from tqdm import tqdm

    config, plan, engine, loader = run.config, run.plan, run.engine, run.loader
    progress = tqdm(total=plan.total_steps, initial=run.start_step, disable=run.rank != 0,
                    desc=f"stage {config.data.stage}", dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)
    samples_log = open_samples_log(run.output_dir, run.rank, run.start_step) if config.train.record_samples else None
    save_every = config.train.save_every or plan.total_steps
    step = run.start_step
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    try:
        while step < plan.total_steps:
            # The step's loss is the mean over all its supervised tokens (every micro-batch, every rank), so the
            # token count must be known before the first backward: fetch the step's micro-batches first.
            batches = [next(loader) for _ in range(plan.gradient_accumulation)]
            step_tokens = step_target_tokens(batches)
            loss_sum = 0.0  # summed token losses of this rank
            for batch in batches:
                output = compute_loss(engine, batch, reduction="sum")
                scaled = scale_for_backward(output.loss, step_tokens, run.world_size, plan.gradient_accumulation)
                engine.backward(scaled)
                engine.step()
                loss_sum += float(output.loss.detach())
                window_samples += batch.num_samples
                window_tokens += batch.num_tokens
                if samples_log is not None:
                    samples_log.write(json.dumps({"step": step + 1, "sources": list(batch.sources)}) + "\n")
            step += 1
            if samples_log is not None:  # on disk before the checkpoint that covers the step
                samples_log.flush()
            totals = torch.tensor([loss_sum, window_samples, window_tokens, loader.position.skipped],
                                  dtype=torch.float64)
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - window_start
            values = {
                "step": step,
                "loss": float(totals[0]) / max(step_tokens, 1),
                "lr": run.scheduler.get_last_lr()[0],
                "samples_per_second": float(totals[1]) / elapsed,
                "tokens_per_second": float(totals[2]) / elapsed,
                "skipped_samples": int(totals[3]),
            }
            run.metrics.log(values)
            progress.update(1)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 samples_s=f"{values['samples_per_second']:.1f}",
                                 tokens_s=f"{values['tokens_per_second']:.0f}", refresh=False)
            if step % config.train.log_every == 0 and run.rank == 0:
                logger.info("step %d/%d %s", step, plan.total_steps,
                            " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "step"))
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
            if step % save_every == 0 or step == plan.total_steps:
                save_resumable(engine, run.output_dir, step, {"data_position": loader.position.to_dict()},
                               config.train.keep_last)
    finally:
        progress.close()
        run.metrics.close()
        if samples_log is not None:
            samples_log.close()
    export_dir = run.output_dir / config.train.export_name
    export_trained(engine, run.model, export_dir, config,
                   {"steps": plan.total_steps, "global_batch_size": plan.global_batch_size})
    if run.rank == 0:
        logger.info("exported the trained modules to %s", export_dir)
    return export_dir


def fit(config: RunConfig, rank: int, world_size: int, device: torch.device) -> Path:
    return train_loop(setup_run(config, rank, world_size, device))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="textbind train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key = default  # meaning):\n" + config_help(),
    )
    parser.add_argument("--config", required=True, help="run config YAML (configs/train/*.yaml, configs/toy/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    rank, world_size, device = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    fit(config, rank, world_size, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
