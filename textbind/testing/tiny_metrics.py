"""Tiny random CLIP and BERT models for the evaluation metrics, built from configs and saved like real ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from textbind.testing.tiny_sdxl import MAX_TOKENS, write_clip_tokenizer_files

BERT_WORDS = """the a an of and to in on is it this that with for as at by from he she they we you i
cat dog sat mat park runs running happily hello there my good friend red green blue small large circle
square triangle left right top bottom image picture shows here draw yes no"""


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """A CLIPModel + CLIPProcessor directory (byte-level BPE tokenizer, 32x32 images)."""
    directory = Path(out_dir)
    write_clip_tokenizer_files(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_TOKENS, local_files_only=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(str(directory))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    return str(directory)


def build_tiny_bert(out_dir: str | Path, seed: int = 0) -> str:
    """A BertModel + WordPiece tokenizer directory (a few dozen words, 2 layers)."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'", *BERT_WORDS.split()]
    vocab += [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)
