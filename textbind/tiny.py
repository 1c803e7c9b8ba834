"""Build a complete tiny "pretrained" set on disk, offline and deterministic: for tests and the toy world.

    python -m textbind.tiny --out checkpoint/tiny

writes the same layout the real recipe uses:
    OUT/blip2_vision_model/        Blip2VisionModel directory
    OUT/blip2_qformer.safetensors  query tokens + Q-Former (made by textbind.prepare_blip2)
    OUT/llama/                     LlamaForCausalLM + a locally trained Llama-style tokenizer
    OUT/processor/                 BLIP image processor config

`--style llama3` or `qwen2` makes the language model a Llama-3-style one (byte-level BPE, header tokens,
`<|eot_id|>`) or a Qwen2ForCausalLM with ChatML markup, each with its own chat template (for
`model.template=chat_template`); the folder is then OUT/llama3 or OUT/qwen2.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessorPil,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from textbind.prepare_blip2 import prepare_blip2

# A small built-in corpus so the tokenizer knows chat markup and everyday words as whole pieces.
BASE_CORPUS = """
[INST] <<SYS>> You are a helpful assistant. <</SYS>> [/INST]
Describe this image. What is in the picture? Here is an image of it. Can you draw it for me?
The image shows a small red circle on the left and a large blue square on the right.
a small green triangle on the top and a large yellow circle on the bottom
purple orange white black grey pink brown cyan colour color shape size left right top bottom
Yes. No. Sure, here it is. It is a photo of a dog on a beach. Now make it green. Move it to the left.
The quick brown fox jumps over the lazy dog. A corgi in the snow. Two cats sleeping on a sofa.
What colour is the circle? What shape is it? How big is it? Are these the same? They are different.
"""


@dataclass
class TinySizes:
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    qformer_hidden: int = 32
    qformer_layers: int = 2
    num_query_tokens: int = 32
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    vocab_size: int = 600
    # Weight init of the vision encoder and Q-Former. BLIP-2's 0.02 suits width 768+; at small widths the
    # Q-Former then barely depends on the image at first, and learning to see takes far longer.
    blip2_initializer_range: float = 0.02
    # Q-Former dropout (hidden and attention); BLIP-2's 0.1. Small models learning from scratch do better without.
    qformer_dropout: float = 0.1
    # Scale of fixed 2-D sine-cosine values that initialise the vision encoder's position embeddings
    # (0: keep the random init). Random ones at a small init range are drowned by the patch embeddings,
    # and a from-scratch encoder then takes long to learn where things are (left/right, top/bottom).
    vision_position_sincos: float = 0.0


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position embeddings (as in MAE): half the channels code the row."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(embedding, (0, dim - embedding.shape[1])).float()


def train_tokenizer(corpus: list[str], vocab_size: int) -> LlamaTokenizer:
    """A Llama-style (SentencePiece-like BPE with byte fallback) tokenizer trained on `corpus`."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([])
    # Punctuation stays apart from words (as in Llama's own vocabulary), so no merge ever makes
    # "orange." or "red?" a token of its own: a word then has one token wherever it stands.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex(r"[.,;:!?]"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
        initial_alphabet=[],
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


# Chat-template language models, in the manner of Llama-3 and Qwen2: special tokens, chat template, end of turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_STYLES = {
    # style: (special tokens, bos, eos (= end of turn, as in the instruct releases), pad, chat template)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_CHAT_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
              QWEN2_CHAT_TEMPLATE),
}
STYLES = ("llama2", *CHAT_STYLES)


def train_byte_level_tokenizer(corpus: list[str], vocab_size: int, style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as Llama-3's and Qwen2's) with the style's special tokens and chat template."""
    special_tokens, bos, eos, pad, chat_template = CHAT_STYLES[style]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad)
    wrapped.chat_template = chat_template
    return wrapped


def build_tiny_pretrained(
    output_dir: str | Path,
    seed: int = 0,
    sizes: TinySizes | None = None,
    corpus: list[str] | None = None,
    style: str = "llama2",
) -> dict[str, str]:
    """Write the tiny pretrained set; return the four paths as model-config keys.

    `style`: llama2 (a Llama-2-style tokenizer and LlamaForCausalLM), llama3 or qwen2 (see CHAT_STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {list(STYLES)}")
    sizes = sizes or TinySizes()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    blip2_config = Blip2Config(
        vision_config=dict(
            hidden_size=sizes.vision_hidden,
            intermediate_size=sizes.vision_hidden * 2,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=4,
            image_size=sizes.image_size,
            patch_size=sizes.patch_size,
            initializer_range=sizes.blip2_initializer_range,  # the default (1e-10) gives a blind encoder
        ),
        qformer_config=dict(
            hidden_size=sizes.qformer_hidden,
            num_hidden_layers=sizes.qformer_layers,
            num_attention_heads=4,
            intermediate_size=sizes.qformer_hidden * 2,
            encoder_hidden_size=sizes.vision_hidden,
            cross_attention_frequency=1,
            initializer_range=sizes.blip2_initializer_range,
            hidden_dropout_prob=sizes.qformer_dropout,
            attention_probs_dropout_prob=sizes.qformer_dropout,
        ),
        text_config=OPTConfig(
            hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=64,
            word_embed_proj_dim=16,
        ).to_dict(),
        num_query_tokens=sizes.num_query_tokens,
        initializer_range=sizes.blip2_initializer_range,
    )
    blip2 = Blip2ForConditionalGeneration(blip2_config).eval()
    with torch.no_grad():
        blip2.query_tokens.normal_(0.0, sizes.blip2_initializer_range)
        if sizes.vision_position_sincos:
            position = blip2.vision_model.embeddings.position_embedding  # (1, 1 + patches, hidden): class token first
            grid = sizes.image_size // sizes.patch_size
            position[0, 1:] = sizes.vision_position_sincos * sincos_position_embedding(grid, position.shape[-1])
            position[0, 0] = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        blip2.save_pretrained(scratch)
        vision_dir, qformer_file = prepare_blip2(scratch, output)

    lines = [*BASE_CORPUS.strip().splitlines(), *(corpus or [])]
    if style != "llama2":
        language_model_dir = output / style
        chat_tokenizer = train_byte_level_tokenizer(lines, sizes.vocab_size, style)
        qwen = style == "qwen2"
        config_type, model_type = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
        chat_model = model_type(config_type(
            vocab_size=len(chat_tokenizer), hidden_size=sizes.llm_hidden, intermediate_size=sizes.llm_intermediate,
            num_hidden_layers=sizes.llm_layers, num_attention_heads=sizes.llm_heads,
            num_key_value_heads=sizes.llm_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=chat_tokenizer.bos_token_id, eos_token_id=chat_tokenizer.eos_token_id,
            pad_token_id=chat_tokenizer.pad_token_id,
        )).eval()
        chat_model.save_pretrained(str(language_model_dir))
        chat_tokenizer.save_pretrained(str(language_model_dir))
    tokenizer = train_tokenizer(lines, sizes.vocab_size)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.llm_hidden,
        intermediate_size=sizes.llm_intermediate,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads,
        num_key_value_heads=sizes.llm_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama_dir = output / "llama"
    llama.save_pretrained(str(llama_dir))
    tokenizer.save_pretrained(str(llama_dir))

    processor_dir = output / "processor"
    BlipImageProcessorPil(
        size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    ).save_pretrained(str(processor_dir))
    paths = {
        "vision_model": str(vision_dir),
        "qformer": str(qformer_file),
        "language_model": str(llama_dir if style == "llama2" else output / style),
        "processor": str(processor_dir),
    }
    (output / "tiny.json").write_text(
        json.dumps({"seed": seed, "style": style, "sizes": asdict(sizes), "paths": paths}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoint/tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", help="optional text file whose lines extend the tokenizer's corpus")
    parser.add_argument("--style", choices=STYLES, default="llama2",
                        help="language model and tokenizer: Llama-2 style, or Llama-3 / Qwen2 style (chat template)")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus).read_text().splitlines() if args.corpus else None
    for key, path in build_tiny_pretrained(args.out, seed=args.seed, corpus=corpus, style=args.style).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
