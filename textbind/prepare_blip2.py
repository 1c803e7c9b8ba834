"""Split a local BLIP-2 checkpoint into the vision model directory and the Q-Former + query-token file.

Does the original README's section 2.2 without loading the (large) BLIP-2 language model:
only the `vision_model.*`, `qformer.*` and `query_tokens` tensors are read.

    python -m textbind.prepare_blip2 --blip2 /models/blip2-flan-t5-xxl --out checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2VisionModel

from textbind.checkpoint import load_torch_state_dict

logger = logging.getLogger(__name__)

KEPT_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


def _weight_files(blip2_dir: Path) -> list[Path]:
    for pattern in ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin"):
        files = sorted(blip2_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{blip2_dir}: no model.safetensors or pytorch_model.bin weights found")


def read_blip2_tensors(blip2_dir: Path) -> dict[str, torch.Tensor]:
    """The vision, Q-Former and query-token tensors of a BLIP-2 checkpoint, shard by shard."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(blip2_dir):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(KEPT_PREFIXES):
                        tensors[key] = handle.get_tensor(key)
        else:
            tensors.update({k: v for k, v in load_torch_state_dict(file).items() if k.startswith(KEPT_PREFIXES)})
    return tensors


def save_qformer_file(path: Path, state_dict: dict[str, torch.Tensor], qformer_config: dict[str, Any]) -> None:
    """Write `query_tokens` + `qformer.*` tensors as safetensors with the Q-Former config in the metadata."""
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    save_file(tensors, str(path), metadata={"qformer_config": json.dumps(qformer_config)})


def prepare_blip2(blip2_dir: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """Write `OUT/blip2_vision_model/` and `OUT/blip2_qformer.safetensors`; return both paths."""
    blip2_dir, output_dir = Path(blip2_dir), Path(output_dir)
    if not (blip2_dir / "config.json").is_file():
        raise FileNotFoundError(f"{blip2_dir}: no config.json; expected a Blip2ForConditionalGeneration directory")
    config = Blip2Config.from_pretrained(str(blip2_dir), local_files_only=True)
    tensors = read_blip2_tensors(blip2_dir)
    if "query_tokens" not in tensors:
        raise ValueError(f"{blip2_dir}: the checkpoint has no query_tokens tensor")

    vision_model = Blip2VisionModel(config.vision_config)
    vision_state = {k[len("vision_model.") :]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    result = vision_model.load_state_dict(vision_state, strict=False)
    if result.missing_keys:
        raise ValueError(f"{blip2_dir}: vision model weights missing {result.missing_keys[:5]}")
    vision_dir = output_dir / "blip2_vision_model"
    vision_model.save_pretrained(str(vision_dir))

    qformer_state = {k: v for k, v in tensors.items() if k.startswith(("qformer.", "query_tokens"))}
    qformer_file = output_dir / "blip2_qformer.safetensors"
    save_qformer_file(qformer_file, qformer_state, config.qformer_config.to_diff_dict())
    logger.info("wrote %s and %s (%d Q-Former tensors)", vision_dir, qformer_file, len(qformer_state))
    return vision_dir, qformer_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blip2", required=True, help="local Blip2ForConditionalGeneration directory")
    parser.add_argument("--out", default="checkpoint", help="output directory (default: checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vision_dir, qformer_file = prepare_blip2(args.blip2, args.out)
    print(f"vision model: {vision_dir}\nQ-Former + query tokens: {qformer_file}")


if __name__ == "__main__":
    main()
