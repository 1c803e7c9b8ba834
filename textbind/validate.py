"""Validation loss of a model on held-out stage-1 shards or stage-2 conversations (one pass, in order).

    textbind validate --config configs/train/second_stage.yaml data.val_path=... model.checkpoint=...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from textbind.config import RunConfig, config_help, load_config
from textbind.data.collate import collate
from textbind.data.conversation import DataError
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.data.streams import Stage1Source, Stage2Source, load_stage2_groups
from textbind.loss import compute_loss
from textbind.model.builder import build_model

logger = logging.getLogger("textbind.validate")


def validation_loss(config: RunConfig, rank: int = 0, world_size: int = 1, max_batches: int = 0) -> dict:
    """Token-weighted mean loss over the validation data (this rank's share: every world_size-th item)."""
    data = config.data
    if not data.val_path:
        raise ValueError("data.val_path is not set: give the validation shards (stage 1) or JSON (stage 2)")
    if data.stage == 1:
        source = Stage1Source(data.val_path)
    else:
        source = Stage2Source(load_stage2_groups(data.val_path, data.image_dir, data.on_bad_record, logger.warning))
    bundle = build_model(config.model)
    model = bundle.model.eval()
    if torch.cuda.is_available():
        model.cuda()
    encoder = ConversationEncoder(bundle.tokenizer, model.num_query_tokens, data.max_input_length)
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, target tokens, samples, skipped
    pending = []

    def flush() -> None:
        batch = collate(pending, bundle.tokenizer.pad_token_id)
        with torch.no_grad():
            output = compute_loss(model, batch)
        totals[0] += float(output.loss) * output.num_target_tokens
        totals[1] += output.num_target_tokens
        totals[2] += len(pending)
        pending.clear()

    batches = 0
    items = source.raw_items(0, rank, world_size, config.train.seed)
    for item, _ in tqdm(items, desc="validation", disable=rank != 0):
        try:
            pending.append(prepare_sample(source.to_conversation(item, config.train.seed), encoder,
                                          bundle.image_processor))
        except DataError as error:
            totals[3] += 1
            logger.warning("skipped: %s", error)
            continue
        if len(pending) == config.train.micro_batch_size:
            flush()
            batches += 1
            if max_batches and batches >= max_batches:
                break
    if pending:
        flush()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
    return {"val_loss": loss, "target_tokens": int(totals[1]), "samples": int(totals[2]), "skipped": int(totals[3])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="textbind validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key = default  # meaning):\n" + config_help(),
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0: all)")
    parser.add_argument("--output", help="also write the result JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(message)s")
    result = validation_loss(config, rank, world_size, args.max_batches)
    if rank == 0:
        print(json.dumps(result))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
