"""Training-step throughput of the MIM model: mask paths, padded vs packed batches, and real-shape MFU.

    python benchmarks/train_step.py [--device cuda] [--dtype bfloat16] [--batch 8] [--steps 5] [--size toy|tiny]
    python benchmarks/train_step.py --real-shapes [--dry-run]

Default run, three parts:
1. On one batch: the plain causal (B, L) mask path (no caption branches) vs the dense (B, 1, L, L) branch
   mask, and logits for every position vs. only the supervised ones.
2. Padded vs packed (`data.pack_length`) on the toy world's own data read by the training stream: stage 1
   (webdataset image-caption pairs, micro-batch 16, max_input_length 96) and stage 2 (toy conversations
   with caption branches, micro-batch 8, max_input_length 320), training what the toy recipe trains
   (all but the vision encoder), forward + backward.
   Both layouts hold the very same samples per micro-batch, timed interleaved in one run; tokens/s counts
   non-padding tokens. Ends with one JSON line
   {"stage1_packed_vs_padded": R1, "stage2_packed_vs_padded": R2}  (ratios of non-padding tokens/s).
3. --real-shapes: see `real_shapes` below (ViT-g/14 + Q-Former + Llama-2-7B, bf16, MFU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from textbind.config import MODULE_NAMES, ModelConfig
from textbind.data.collate import Batch, collate
from textbind.data.conversation import Conversation, Turn, load_conversations
from textbind.data.packing import collate_packed
from textbind.data.samples import prepare_sample
from textbind.data.sequence import MAIN_SEGMENT, ConversationEncoder, EncodedConversation
from textbind.data.streams import Stage1Source, Stage2Source, StreamLoader, TrainStream
from textbind.loss import compute_loss
from textbind.model.builder import build_model
from textbind.model.mim import IGNORE_INDEX, MIMModel
from textbind.tiny import TinySizes, build_tiny_pretrained
from textbind.toy.build import TOY_SIZES
from textbind.toy.datagen import write_stage1_shards, write_stage2_json
from textbind.toy.renderer import ToyRenderer

# What the toy recipe trains in both stages (configs/toy/model.yaml): all but the vision encoder.
TOY_TRAINABLE = ["query_tokens", "qformer", "qformer_projection", "language_model"]


def conversations(with_branches: bool, count: int) -> list[Conversation]:
    renderer = ToyRenderer()
    result = []
    for index in range(count):
        image = renderer("a small red circle on the left and a large blue square on the right", seed=index)
        answer = "It shows two shapes, a red circle and a blue square, side by side on white. "
        if with_branches:
            turns = [Turn("user", "Describe <image> and draw it bigger.", [image]),
                     Turn("assistant", answer + "Here it is bigger: <image> and once more: <image>", [image, image],
                          ["a large red circle on the left and a large blue square on the right"] * 2)]
        else:
            turns = [Turn("user", "Describe <image> and say what it shows.", [image]), Turn("assistant", answer * 3)]
        result.append(Conversation(turns, source=f"bench {index}"))
    return result


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def one_step(model, batch: Batch, return_logits: bool = False, backward: bool = True) -> None:
    with torch.set_grad_enabled(backward):
        output = compute_loss(model, batch, return_logits=return_logits)
    if backward:
        output.loss.backward()


def time_steps(model, batch, steps: int, return_logits: bool, device: str) -> float:
    timings = []
    for _ in range(steps + 2):
        synchronize(device)
        start = time.perf_counter()
        one_step(model, batch, return_logits)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[2:])


def mask_paths(bundle, model, args) -> None:
    encoder = ConversationEncoder(bundle.tokenizer, model.num_query_tokens, 1024)
    for with_branches in (False, True):
        samples = [prepare_sample(c, encoder, bundle.image_processor)
                   for c in conversations(with_branches, args.batch)]
        batch = collate(samples, bundle.tokenizer.pad_token_id)
        for return_logits in (True, False):
            seconds = time_steps(model, batch, args.steps, return_logits, args.device)
            mask = "dense 4-D branch mask" if batch.has_branches else "plain causal mask"
            logits = "all logits" if return_logits else "supervised logits only"
            print(f"{mask:24s} {logits:24s} L={batch.input_ids.shape[1]:4d}  {seconds * 1000:8.1f} ms/step  "
                  f"{args.batch / seconds:8.1f} samples/s  {batch.num_tokens / seconds:9.0f} tokens/s")


@dataclass
class Timing:
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # non-padding
    slots: int = 0  # rows x length: what the model computes on

    def add(self, seconds: float, batch: Batch) -> None:
        self.seconds += seconds
        self.samples += batch.num_samples
        self.tokens += batch.num_tokens
        self.slots += batch.input_ids.numel()

    def describe(self) -> str:
        return (f"{self.tokens / self.seconds:9.0f} tokens/s {self.samples / self.seconds:7.1f} samples/s "
                f"(padding {1 - self.tokens / self.slots:5.1%})")


def padded_vs_packed(model, device: str, padded: list[Batch], packed: list[Batch], steps: int) -> tuple[Timing, Timing]:
    """Times both layouts of the same micro-batches, interleaved so that machine noise hits both alike."""
    timings = (Timing(), Timing())
    for index in range(steps + 1):
        for timing, batches in zip(timings, (padded, packed)):
            batch = batches[index % len(batches)]
            synchronize(device)
            start = time.perf_counter()
            one_step(model, batch)
            synchronize(device)
            if index > 0:  # the first round warms up
                timing.add(time.perf_counter() - start, batch)
        model.zero_grad(set_to_none=True)
    return timings


def toy_stream_batches(bundle, source, max_length: int, micro_batch: int, pack_length: int, count: int) -> list[Batch]:
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length)
    stream = TrainStream(source, encoder, bundle.image_processor, micro_batch_size=micro_batch, seed=0,
                         pack_length=pack_length)
    loader = StreamLoader(stream, num_workers=0)
    return [next(loader) for _ in range(count)]


def packing_comparison(bundle, model, args, directory: Path) -> dict[str, float]:
    model.set_trainable(TOY_TRAINABLE)
    stage1 = Stage1Source(write_stage1_shards(directory / "stage1", num_samples=16 * (args.packing_steps + 1),
                                              samples_per_shard=64, seed=0))
    write_stage2_json(directory / "stage2.json", directory / "images", num_conversations=8 * (args.packing_steps + 1),
                      seed=0)
    stage2 = Stage2Source([load_conversations(directory / "stage2.json").conversations])
    ratios = {}
    for stage, source, max_length, micro_batch, pack_length in (
        (1, stage1, 96, 16, args.stage1_pack_length),
        (2, stage2, 320, 8, args.stage2_pack_length),
    ):
        count = args.packing_steps + 1
        padded = toy_stream_batches(bundle, source, max_length, micro_batch, 0, count)
        packed = toy_stream_batches(bundle, source, max_length, micro_batch, pack_length, count)
        assert [b.sources for b in padded] == [b.sources for b in packed]
        padded_timing, packed_timing = padded_vs_packed(model, args.device, padded, packed, args.packing_steps)
        ratio = packed_timing.tokens / packed_timing.seconds / (padded_timing.tokens / padded_timing.seconds)
        ratios[f"stage{stage}_packed_vs_padded"] = round(ratio, 3)
        rows = statistics.mean(b.input_ids.shape[0] for b in packed)
        print(f"stage {stage} ({micro_batch} samples/micro-batch, max_input_length {max_length}, toy trainables): "
              f"padded {padded_timing.describe()} | packed into {rows:.1f} row(s) of <= {pack_length} "
              f"{packed_timing.describe()} | packed/padded {ratio:.2f}x")
    return ratios


# ---------------------------------------------------------------------------------------------------------
# Real shapes: ViT-g/14 + Q-Former + Llama-2-7B, random weights built from configs, bf16.
#
# FLOP accounting (model FLOPs: only the work the recipe needs; padding and masked attention pairs are not
# counted, so a layout that computes on padding shows a lower MFU). A matmul of (m, k) x (k, n) is 2mkn.
#   vision encoder (frozen, no graph: forward only, x1), per image, T = 257 tokens (256 patches + class),
#     d = 1408, f = 6144, 39 layers:  patch embedding 2 * 256 * (3*14*14) * d
#     + per layer 2T(4d^2 + 2df) (qkv, projection, fc1, fc2) + 4T^2 d (scores and weighted sum).
#   Q-Former (trained: forward + backward = x3), per image, Tq = 32 queries, d = 768, f = 3072, 12 layers,
#     cross-attention on every 2nd layer to Ti = 257 image tokens of width dv = 1408:
#     per layer 2Tq(4d^2 + 2df) + 4Tq^2 d;  cross layers + 2Tq(2d^2) + 2Ti(2 dv d) + 4 Tq Ti d.
#   projector (trained, x3): 2 Tq * 768 * 4096 per image.
#   language model, d = 4096, f = 11008, 32 layers, vocabulary V = 32003:
#     per non-padding token and layer 2(4d^2 + 3df) (q, k, v, o; gate, up, down);
#     attention 4d per allowed (query, key) pair and layer (main: causal inside its sample; a branch of
#     n tokens at prefix p: n*p + n(n+1)/2);  LM head 2dV per supervised token (only those are projected).
#     Multipliers: stage 2 (full fine-tune) x3 for everything. Stage 1 (frozen LLM, back-propagated to
#     reach the Q-Former): weight matmuls x2 (forward + input gradients, no weight gradients), attention
#     x3 (its backward needs dQ, dK and dV, all activations).
# ---------------------------------------------------------------------------------------------------------

BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GH200": 989.4}


@dataclass
class Shapes:
    """Model widths and depths; `dry_run` shrinks them so the script can be checked on a CPU."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1408
    vision_intermediate: int = 6144
    vision_layers: int = 39
    vision_heads: int = 16
    qformer_hidden: int = 768
    qformer_intermediate: int = 3072
    qformer_layers: int = 12
    qformer_heads: int = 12
    num_query_tokens: int = 32
    llm_hidden: int = 4096
    llm_intermediate: int = 11008
    llm_layers: int = 32
    llm_heads: int = 32
    vocab_size: int = 32003  # Llama-2's 32000 + <image>, <start>, <end>

    @classmethod
    def dry_run(cls) -> Shapes:
        return cls(image_size=28, vision_hidden=64, vision_intermediate=128, vision_layers=1, vision_heads=2,
                   qformer_hidden=64, qformer_intermediate=128, qformer_layers=2, qformer_heads=2,
                   llm_hidden=128, llm_intermediate=256, llm_layers=1, llm_heads=4, vocab_size=1003)


def build_real_model(shapes: Shapes, device: str, dtype: torch.dtype, attn_implementation: str) -> MIMModel:
    from transformers import (
        AutoModelForCausalLM,
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        LlamaConfig,
    )

    from textbind.model.attention import language_model_attention

    vision_config = Blip2VisionConfig(
        hidden_size=shapes.vision_hidden, intermediate_size=shapes.vision_intermediate,
        num_hidden_layers=shapes.vision_layers, num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size, patch_size=shapes.patch_size, initializer_range=0.02)
    qformer_config = Blip2QFormerConfig(
        hidden_size=shapes.qformer_hidden, intermediate_size=shapes.qformer_intermediate,
        num_hidden_layers=shapes.qformer_layers, num_attention_heads=shapes.qformer_heads,
        encoder_hidden_size=shapes.vision_hidden, cross_attention_frequency=2)
    llm_config = LlamaConfig(
        hidden_size=shapes.llm_hidden, intermediate_size=shapes.llm_intermediate,
        num_hidden_layers=shapes.llm_layers, num_attention_heads=shapes.llm_heads,
        num_key_value_heads=shapes.llm_heads, vocab_size=shapes.vocab_size, max_position_embeddings=4096)
    with torch.device(device):  # initialise in place: a 7B model initialised on a CPU takes minutes
        language_model = AutoModelForCausalLM.from_config(
            llm_config, dtype=dtype, attn_implementation=language_model_attention(attn_implementation))
        vision_model = Blip2VisionModel(vision_config).to(dtype)
        qformer = Blip2QFormerModel(qformer_config).to(dtype)
        query_tokens = torch.randn(1, shapes.num_query_tokens, shapes.qformer_hidden, dtype=dtype) * 0.02
        model = MIMModel(vision_model, qformer, query_tokens, language_model, image_token_id=shapes.vocab_size - 3)
    return model.to(device=device, dtype=dtype)


def synthetic_sample(rng: random.Random, stage: int, shapes: Shapes, max_length: int) -> EncodedConversation:
    """A token-level sample with the structure of the real data (random text ids, image runs, branches).

    Stage 1 (CC3M/CC12M/SBU pairs): [INST] + image + a caption request (8-16 tokens) + [/INST] + the
    caption (8-48 tokens, most near 20) + </s>: 60-110 tokens. Stage 2 (TextBind conversations): 2-4
    exchanges of 20-160 tokens a turn, 1-3 user images, 0-2 assistant images each with a caption branch
    of 12-40 tokens, cut at max_input_length 768.
    """
    image_id, text_high, query = shapes.vocab_size - 3, shapes.vocab_size - 4, shapes.num_query_tokens
    ids: list[int] = []
    supervised: list[bool] = []
    images: list[tuple[int, bool]] = []  # (start, is an assistant image)

    def text(count: int, is_supervised: bool) -> None:
        ids.extend(rng.randrange(3, text_high) for _ in range(count))
        supervised.extend([is_supervised] * count)

    def image(is_assistant: bool) -> None:
        images.append((len(ids), is_assistant))
        ids.extend([image_id] * query)
        supervised.extend([False] * query)

    if stage == 1:
        text(5, False)
        image(False)
        text(rng.randint(8, 16) + 4, False)
        text(max(8, min(48, int(rng.lognormvariate(math.log(20), 0.4)))) + 1, True)
    else:
        for _ in range(rng.randint(2, 4)):
            text(5, False)
            for _ in range(rng.choice((0, 0, 1, 1, 2))):
                image(False)
            text(rng.randint(20, 120), False)
            text(rng.randint(20, 160), True)
            for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
                image(True)
                text(rng.randint(5, 30), True)
    main_length = len(ids)
    if main_length > max_length:  # the encoder's rule: never cut inside an image
        main_length = max_length
        for start, _ in images:
            if start < main_length < start + query:
                main_length = start
    ids = ids[:main_length]
    kept = [(start, assistant) for start, assistant in images if start + query <= main_length]
    targets = [ids[i + 1] if supervised[i + 1] else IGNORE_INDEX for i in range(main_length - 1)] + [IGNORE_INDEX]
    encoded = EncodedConversation(ids, targets, list(range(main_length)), [MAIN_SEGMENT] * main_length,
                                  [0] * main_length, images=[None] * len(kept), image_positions=[s for s, _ in kept],
                                  main_length=main_length, source=f"synthetic stage {stage}")
    branch = 0
    for start, assistant in kept:
        if not assistant:
            continue
        branch += 1
        encoded.targets[start - 1] = text_high  # <start> stands in as any id
        length = rng.randint(12, 40)
        branch_ids = [rng.randrange(3, text_high) for _ in range(length)]
        encoded.input_ids += branch_ids
        encoded.targets += branch_ids[1:] + [IGNORE_INDEX]
        encoded.position_ids += list(range(start, start + length))
        encoded.segment_ids += [branch] * length
        encoded.branch_prefix += [start] * length
    return encoded


def attended_pairs(encoded: EncodedConversation) -> int:
    main = encoded.main_length
    pairs = main * (main + 1) // 2
    for branch in range(1, encoded.num_branches + 1):
        rows = [i for i, segment in enumerate(encoded.segment_ids) if segment == branch]
        count, prefix = len(rows), encoded.branch_prefix[rows[0]]
        pairs += count * prefix + count * (count + 1) // 2
    return pairs


def step_flops(samples: list[EncodedConversation], shapes: Shapes, stage: int) -> float:
    """Model FLOPs of one training step (forward + backward) over these samples; see the accounting above."""
    images = sum(len(encoded.images) for encoded in samples)
    tokens = sum(len(encoded) for encoded in samples)
    supervised = sum(sum(t != IGNORE_INDEX for t in encoded.targets) for encoded in samples)
    pairs = sum(attended_pairs(encoded) for encoded in samples)
    d, f = shapes.vision_hidden, shapes.vision_intermediate
    patches = (shapes.image_size // shapes.patch_size) ** 2
    vision_tokens = patches + 1
    vision = (2 * patches * 3 * shapes.patch_size**2 * d
              + shapes.vision_layers * (2 * vision_tokens * (4 * d * d + 2 * d * f) + 4 * vision_tokens**2 * d))
    q, dq, fq = shapes.num_query_tokens, shapes.qformer_hidden, shapes.qformer_intermediate
    cross_layers = math.ceil(shapes.qformer_layers / 2)
    qformer = (shapes.qformer_layers * (2 * q * (4 * dq * dq + 2 * dq * fq) + 4 * q * q * dq)
               + cross_layers * (2 * q * 2 * dq * dq + 2 * vision_tokens * 2 * d * dq + 4 * q * vision_tokens * dq)
               + 2 * q * dq * shapes.llm_hidden)
    dl, fl = shapes.llm_hidden, shapes.llm_intermediate
    llm_weights = tokens * shapes.llm_layers * 2 * (4 * dl * dl + 3 * dl * fl) + supervised * 2 * dl * shapes.vocab_size
    llm_attention = pairs * shapes.llm_layers * 4 * dl
    weight_multiplier = 3 if stage == 2 else 2
    return images * (vision + 3 * qformer) + weight_multiplier * llm_weights + 3 * llm_attention


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in sorted(BF16_PEAK_TFLOPS.items(), key=lambda item: -len(item[0])):
            if key in name:
                return value
    return 0.0  # unknown: MFU not reported


def real_shapes(args) -> None:
    """ViT-g/14 + Q-Former + Llama-2-7B at real sizes (random weights from configs), bf16: stage-1 steps
    (vision frozen, Q-Former + projector trained, the frozen LLM back-propagated through) and stage-2 steps
    (+ the whole LLM), padded vs packed, sdpa vs flex. Forward + backward; the optimizer step is left out
    (ZeRO-2 with CPU offload in stage 2 makes it a property of the cluster, not of these kernels)."""
    shapes = Shapes.dry_run() if args.dry_run else Shapes()
    device = args.device
    dtype = torch.bfloat16
    peak = peak_tflops(args)
    print(f"real shapes{' (dry run: tiny widths and depths)' if args.dry_run else ''}: device={device} "
          f"{torch.cuda.get_device_name() if device == 'cuda' else ''} bf16 peak={peak or 'unknown'} TFLOP/s")
    plans = [  # stage, samples per micro-batch, max_input_length, pack_length
        (1, args.stage1_samples, 256, args.stage1_pack_length_real),
        (2, args.stage2_samples, 768, args.stage2_pack_length_real),
    ]
    if args.dry_run:  # a shape check: few samples, short rows
        plans = [(1, 6, 256, 256), (2, 3, 768, 1024)]
    results = {}
    for attention in args.attention:
        model = build_real_model(shapes, device, dtype, attention)
        for stage, micro_batch, max_length, pack_length in plans:
            trained = ["query_tokens", "qformer", "qformer_projection"] + (["language_model"] if stage == 2 else [])
            model.set_trainable(trained)
            model.train()
            rng = random.Random(stage)
            steps = 1 if args.dry_run else args.steps
            micro_batches = [[synthetic_sample(rng, stage, shapes, max_length) for _ in range(micro_batch)]
                             for _ in range(steps + 1)]
            pixels = [torch.randn(sum(len(e.images) for e in samples), 3, shapes.image_size, shapes.image_size)
                      for samples in micro_batches]
            for layout in ("padded", "packed"):
                batches = []
                for samples, pixel_values in zip(micro_batches, pixels):
                    pairs, offset = [], 0
                    for encoded in samples:
                        pairs.append((encoded, pixel_values[offset: offset + len(encoded.images)]))
                        offset += len(encoded.images)
                    batches.append(collate(pairs, 0) if layout == "padded" else collate_packed(pairs, 0, pack_length))
                timing = Timing()
                # torch has no CPU backward for flex attention: a CPU dry run checks its forward only
                backward = not (torch.device(device).type == "cpu" and attention == "flex_attention")
                for index, batch in enumerate(batches):
                    synchronize(device)
                    start = time.perf_counter()
                    one_step(model, batch, backward=backward)
                    synchronize(device)
                    model.zero_grad(set_to_none=True)
                    if index > 0 or args.dry_run:  # the first step warms up (and compiles flex kernels)
                        timing.add(time.perf_counter() - start, batch)
                timed = micro_batches if args.dry_run else micro_batches[1:]
                flops = sum(step_flops(samples, shapes, stage) for samples in timed)
                achieved = flops / timing.seconds / 1e12
                mfu = f"MFU {achieved / peak:6.1%}" if peak else "MFU n/a"
                shape = "x".join(map(str, batches[-1].input_ids.shape))
                print(f"stage {stage} {layout:6s} {attention:14s} batch {shape:>10s} {timing.describe()} "
                      f"{achieved:7.1f} TFLOP/s {mfu}{'' if backward else ' (forward only)'}")
                results[f"stage{stage}_{layout}_{attention}"] = {
                    "samples_per_second": round(timing.samples / timing.seconds, 2),
                    "tokens_per_second": round(timing.tokens / timing.seconds, 1),
                    "tflops": round(achieved, 2), "mfu": round(achieved / peak, 4) if peak else None}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", choices=["tiny", "toy"], default="toy")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 suits a shared 2-core machine)")
    parser.add_argument("--packing-steps", type=int, default=8, help="micro-batches per layout in the comparison")
    parser.add_argument("--stage1-pack-length", type=int, default=256)
    parser.add_argument("--stage2-pack-length", type=int, default=640)
    parser.add_argument("--real-shapes", action="store_true", help="ViT-g + Q-Former + Llama-2-7B, bf16 (a GPU)")
    parser.add_argument("--dry-run", action="store_true", help="with --real-shapes: tiny widths, one step (CPU)")
    parser.add_argument("--attention", nargs="+", default=["sdpa", "flex_attention"])
    parser.add_argument("--stage1-samples", type=int, default=64)
    parser.add_argument("--stage2-samples", type=int, default=6)
    parser.add_argument("--stage1-pack-length-real", type=int, default=2048)
    parser.add_argument("--stage2-pack-length-real", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (else a table)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the CPU runs flex attention's unfused reference: say so once in the docs, not at every run
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if args.real_shapes:
        real_shapes(args)
        return
    with tempfile.TemporaryDirectory() as directory:
        sizes = TOY_SIZES if args.size == "toy" else TinySizes()
        paths = build_tiny_pretrained(Path(directory) / "model", sizes=sizes)
        bundle = build_model(ModelConfig(**paths, dtype=args.dtype, trainable=list(MODULE_NAMES)))
        model = bundle.model.to(args.device)
        print(f"device={args.device} dtype={args.dtype} batch={args.batch} size={args.size} "
              f"threads={torch.get_num_threads()}")
        mask_paths(bundle, model, args)
        ratios = packing_comparison(bundle, model, args, Path(directory))
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
