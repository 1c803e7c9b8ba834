"""Export a textbind model as a stock transformers `Blip2ForConditionalGeneration` directory, with a model card.

    textbind export --config configs/model/llama2_7b.yaml --checkpoint runs/second_stage/second_stage_model \\
        --out exports/textbind-llama2-7b [--push-to-hub NAME]

The MIM model is, key for key, transformers' `Blip2ForConditionalGeneration` with a Llama text model:
vision model -> Q-Former with query tokens -> linear projector (`language_projection` there) -> language
model, the embeddings of the `<image>` tokens replaced in place by the projected query outputs. The
directory holds config.json (the Llama `text_config`, `num_query_tokens`, `image_token_id`), every weight
(the vision model included) as safetensors shards, the tokenizer with `<image>`, `<start>`, `<end>` and a
Llama-2 chat template that writes each image as its `num_query_tokens` `<image>` tokens, the image
processor (as a `Blip2Processor`), a generation config that also stops at `<end>`, and README.md.
`textbind` loads such a directory back with `model.pretrained=DIR`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN, __version__
from textbind.config import ConfigError, ModelConfig
from textbind.model.builder import ModelBundle, build_model, is_hub_id
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "config.yaml"  # what a training run writes beside its exported modules
RUN_INFO_NAME = "textbind.json"
# Evaluation results looked for beside a checkpoint (its directory and the two above it), in this order.
EVALUATION_REPORT_NAMES = ("eval.json", "evaluation.json", "report.json", "metrics.json", "eval/report.json")

# The key of each MIMModel module in Blip2ForConditionalGeneration (the projector is the only rename).
BLIP2_MODULE_NAMES = {
    "vision_model": "vision_model",
    "query_tokens": "query_tokens",
    "qformer": "qformer",
    "qformer_projection": "language_projection",
    "language_model": "language_model",
}


def llama2_chat_template(num_query_tokens: int) -> str:
    """A Jinja chat template that writes conversations exactly as `textbind.data.sequence` encodes prompts.

    Llama-2 chat: `<s>[INST] {user} [/INST] {assistant} </s>`, a leading system turn folded into the first
    user turn as `<<SYS>>`. Each `<image>` marker (or `{"type": "image"}` item) becomes `num_query_tokens`
    `<image>` tokens, whose embeddings the model replaces with the image's. Text pieces are stripped and
    each is preceded by one space, special tokens by none: with Llama's tokenizer (spaces become a
    word-initial `▁`) the string then tokenizes to the ids textbind builds piece by piece. A prompt ends
    after `[/INST]`, so `add_generation_prompt` adds nothing. Tokenize the result with
    `add_special_tokens=False`: it holds its own `<s>`.
    """
    image = IMAGE_TOKEN * num_query_tokens
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}"
        f"{{%- for part in content.split('{IMAGE_TOKEN}') -%}}"
        "{%- if part.strip() %} {{ part.strip() }}{% endif -%}"
        f"{{%- if not loop.last %}}{image}{{% endif -%}}"
        "{%- endfor -%}"
        "{%- else -%}"
        "{%- for item in content -%}"
        f"{{%- if item['type'] == 'image' %}}{image}"
        "{%- elif item['type'] == 'text' and item['text'].strip() %} {{ item['text'].strip() }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set dialogue = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set dialogue = messages -%}{%- endif -%}"
        "{%- for message in dialogue -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system turn') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ bos_token }} [INST]"
        "{%- if loop.first and system %} <<SYS>>{{ '\\n' + system + '\\n' }}<</SYS>>{{ '\\n\\n' }}{% endif -%}"
        "{{ render(message['content']) }} [/INST]"
        "{%- else -%}"
        "{{ render(message['content']) }}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def blip2_config(model: MIMModel) -> Blip2Config:
    """The Blip2Config of `model`: its vision, Q-Former and language-model configs, query tokens, image token."""
    configs = [part.config.to_dict() for part in (model.vision_model, model.qformer, model.language_model)]
    for config in configs:
        config.pop("_name_or_path", None)  # where the parts were loaded from: a local path, meaningless elsewhere
    return Blip2Config(
        vision_config=configs[0],
        qformer_config=configs[1],
        text_config=configs[2],
        num_query_tokens=model.num_query_tokens,
        image_token_index=model.image_token_id,
    )


def to_blip2(model: MIMModel) -> Blip2ForConditionalGeneration:
    """A `Blip2ForConditionalGeneration` holding `model`'s own modules (no copy of the weights).

    The shell is built on the meta device (no memory, no random init), then each of its modules is
    replaced by ours; nothing of the shell remains.
    """
    config = blip2_config(model)
    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(config)
    for ours, theirs in BLIP2_MODULE_NAMES.items():
        setattr(blip2, theirs, getattr(model, ours))
    left_on_meta = [name for name, tensor in [*blip2.named_parameters(), *blip2.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"Blip2ForConditionalGeneration has parts textbind does not fill: {left_on_meta[:5]}")
    blip2.config.dtype = model.dtype
    return blip2


def export_processor(bundle: ModelBundle) -> Blip2Processor:
    """The tokenizer (special tokens, chat template, left padding for batched generation) and image processor.

    `num_query_tokens` is left unset: a Blip2Processor that knows it prepends one image's tokens to the text,
    whereas textbind's images stand where their markers are (the Llama-2 chat template expands them). A model
    trained with `model.template=chat_template` keeps its tokenizer's own template."""
    tokenizer = copy.deepcopy(bundle.tokenizer)
    if getattr(tokenizer, "textbind_template", "llama2") == "llama2":
        tokenizer.chat_template = llama2_chat_template(bundle.model.num_query_tokens)
    tokenizer.padding_side = "left"
    return Blip2Processor(image_processor=bundle.image_processor, tokenizer=tokenizer)


def generation_config(bundle: ModelBundle) -> GenerationConfig:
    """Greedy by default; stops at `</s>` and at `<end>` (a caption to render as an image before going on)."""
    tokenizer = bundle.tokenizer
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
    )


# --- Model card ------------------------------------------------------------------------------------------


def run_directory(checkpoint: str) -> Path | None:
    """The directory that holds a checkpoint's `config.yaml` / `textbind.json`, if any."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def find_evaluation_report(checkpoint: str) -> Path | None:
    """An evaluation JSON beside the checkpoint (its directory or the two above it)."""
    directory = run_directory(checkpoint)
    if directory is None:
        return None
    for folder in [directory, *list(directory.resolve().parents)[:2]]:
        for name in EVALUATION_REPORT_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _numbers(value: Any, prefix: str = "") -> list[tuple[str, float]]:
    """The numeric leaves of a JSON value as (dotted key, number), in document order."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in _numbers(inner, f"{prefix}.{key}" if prefix else key)]
    return []


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("model card: cannot read %s (%s)", path, error)
        return None


def _parameters(module: torch.nn.Module | torch.Tensor) -> int:
    if isinstance(module, torch.Tensor):
        return module.numel()
    return sum(parameter.numel() for parameter in module.parameters())


def model_card(
    bundle: ModelBundle,
    model_config: ModelConfig,
    *,
    repository_name: str,
    run_config: dict | None = None,
    run_info: dict | None = None,
    evaluation: Any = None,
    evaluation_source: str = "",
    license_name: str = "",
) -> str:
    """README.md for the export: what the model is, how to load it, how it was trained and scored."""
    model = bundle.model
    language_config = model.language_model.config
    base_models = [path for path in (model_config.language_model, model_config.pretrained) if path and is_hub_id(path)]
    front_matter: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["textbind", "blip-2", "multimodal", "interleaved"],
    }
    if license_name:
        front_matter["license"] = license_name
    if base_models:
        front_matter["base_model"] = base_models[0]
    sections = [f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n", f"# {repository_name}\n"]
    sections.append(
        "A multi-turn interleaved multimodal model in the manner of TextBind (Li et al., *TextBind: Multi-turn "
        "Interleaved Multimodal Instruction-following in the Wild*, Findings of ACL 2024), exported by "
        f"textbind {__version__} as a stock `Blip2ForConditionalGeneration`. Images go in as "
        f"{model.num_query_tokens} `<image>` tokens each; to show an image the model writes "
        f"`{START_TOKEN} caption {END_TOKEN}`, which a text-to-image model (TextBind: SDXL) renders.\n"
    )
    rows = [
        ("vision encoder", f"Blip2VisionModel, hidden {model.vision_model.config.hidden_size}, "
                           f"{model.vision_model.config.num_hidden_layers} layers", _parameters(model.vision_model)),
        ("Q-Former", f"Blip2QFormerModel, hidden {model.qformer.config.hidden_size}, "
                     f"{model.qformer.config.num_hidden_layers} layers, {model.num_query_tokens} query tokens",
         _parameters(model.qformer) + _parameters(model.query_tokens)),
        ("projector", f"Linear({model.qformer_projection.in_features}, {model.qformer_projection.out_features})",
         _parameters(model.qformer_projection)),
        ("language model", f"{type(model.language_model).__name__}, hidden {language_config.hidden_size}, "
                           f"{language_config.num_hidden_layers} layers, vocabulary {language_config.vocab_size}",
         _parameters(model.language_model)),
    ]
    table = ["| part | configuration | parameters |", "|---|---|---|"]
    table += [f"| {part} | {description} | {count:,} |" for part, description, count in rows]
    sections.append("## Model\n\n" + "\n".join(table) + f"\n\nWeights are stored in {str(model.dtype)[6:]}.\n")
    sections.append(USAGE.format(num_query_tokens=model.num_query_tokens, name=repository_name))
    if getattr(bundle.tokenizer, "textbind_template", "llama2") != "llama2":
        sections.append(
            "This model was trained with its language model's own chat template (`model.template=chat_template`): "
            f"the saved template writes messages as they are, so write each image as {model.num_query_tokens} "
            "`<image>` tokens yourself, and load it in textbind with `model.template=chat_template`.\n"
        )
    training = []
    if run_config:
        data, optim, train = (run_config.get(key) or {} for key in ("data", "optim", "train"))
        model_section = run_config.get("model") or {}
        facts = [
            ("stage", data.get("stage")),
            ("training data", data.get("train_path")),
            ("max input length", data.get("max_input_length")),
            ("trained modules", ", ".join(model_section.get("trainable") or [])),
            ("epochs", train.get("epochs")),
            ("global batch size", train.get("global_batch_size")),
            ("learning rate", optim.get("lr")),
            ("warmup steps", optim.get("warmup_steps")),
            ("weight decay", optim.get("weight_decay")),
        ]
        training += [f"- {name}: {value}" for name, value in facts if value not in (None, "", [])]
    if run_info:
        training += [f"- {key.replace('_', ' ')}: {value}" for key, value in run_info.items()
                     if key not in ("modules", "num_tensors") and isinstance(value, (int, float, str))]
        if run_info.get("modules"):
            training.append(f"- modules in the checkpoint: {', '.join(run_info['modules'])}")
    if model_config.checkpoint:
        training.append(f"- checkpoint: `{Path(model_config.checkpoint).name}`")
    if training:
        sections.append("## Training\n\n" + "\n".join(training) + "\n")
    numbers = _numbers(evaluation) if evaluation is not None else []
    if numbers:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in numbers[:60]]
        source = f" (from `{evaluation_source}`)" if evaluation_source else ""
        sections.append(f"## Evaluation{source}\n\n" + "\n".join(lines) + "\n")
    sections.append(LICENSE_NOTE)
    return "\n".join(sections)


USAGE = """## Use with transformers

```python
from transformers import AutoProcessor, Blip2ForConditionalGeneration
processor = AutoProcessor.from_pretrained("{name}")
model = Blip2ForConditionalGeneration.from_pretrained("{name}")
```

The chat template writes each `<image>` marker of a message as the {num_query_tokens} image tokens the model
expects (images in the order of their markers, user and assistant images alike):

```python
from PIL import Image
messages = [{{"role": "user", "content": "<image> What is in this picture?"}}]
prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False)
inputs = processor(images=[Image.open("picture.png")], text=prompt, add_special_tokens=False, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=128)
print(processor.tokenizer.decode(output[0], skip_special_tokens=False))
```

Generation stops at `</s>` and at `<end>`: text between `<start>` and `<end>` is a caption for an image to
draw. To go on after it, render the caption, replace `<start> caption <end>` in the conversation by `<image>`
with the rendered picture, and ask again. `textbind` does all this (KV-cache rollback, SDXL rendering):

```bash
pip install textbind
textbind chat model.pretrained={name} --prompt "Describe <image>" --image picture.png
textbind demo model.pretrained={name}
```
"""

LICENSE_NOTE = """## License

The textbind code is Apache-2.0. The original TextBind data and weights are released under CC BY-NC 4.0
(non-commercial); a model trained on them, or on Llama-2, is also bound by those terms.
"""


# --- The export ------------------------------------------------------------------------------------------


def export(
    bundle: ModelBundle,
    model_config: ModelConfig,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: str | int = "5GB",
    evaluation_report: str | None = None,
    license_name: str = "",
    repository_name: str | None = None,
) -> Path:
    """Write the transformers directory of `bundle` (model, processor, generation config, README.md), atomically."""
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    run_dir = run_directory(model_config.checkpoint)
    run_config = run_info = None
    if run_dir is not None and (run_dir / RUN_CONFIG_NAME).is_file():
        run_config = yaml.safe_load((run_dir / RUN_CONFIG_NAME).read_text()) or None
    if run_dir is not None and (run_dir / RUN_INFO_NAME).is_file():
        run_info = _read_json(run_dir / RUN_INFO_NAME)
    report = Path(evaluation_report) if evaluation_report else find_evaluation_report(model_config.checkpoint)
    if evaluation_report and not report.is_file():
        raise FileNotFoundError(f"--eval-report {evaluation_report} does not exist")
    evaluation = _read_json(report) if report else None

    blip2 = to_blip2(bundle.model)
    blip2.generation_config = generation_config(bundle)
    processor = export_processor(bundle)
    card = model_card(
        bundle, model_config, repository_name=repository_name or output.name, run_config=run_config,
        run_info=run_info, evaluation=evaluation, evaluation_source=report.name if report else "",
        license_name=license_name,
    )
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        blip2.save_pretrained(str(temporary), max_shard_size=max_shard_size)
        processor.save_pretrained(str(temporary))
        (temporary / "README.md").write_text(card, encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("wrote %s", output)
    return output


def push_to_hub(directory: Path, repository_id: str, private: bool = False) -> str:
    """Upload the exported directory as it is on disk to the hub repository `repository_id` (huggingface_hub)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repository_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repository_id, folder_path=str(directory), repo_type="model",
                               commit_message=f"textbind {__version__} export")
    return str(getattr(commit, "commit_url", commit))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from textbind.runtime import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="textbind export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--eval-report", default=None,
                        help="evaluation JSON for the model card (default: " + ", ".join(EVALUATION_REPORT_NAMES)
                             + " found beside the checkpoint)")
    parser.add_argument("--license", default="", help="license id for the model card, e.g. cc-by-nc-4.0")
    parser.add_argument("--push-to-hub", metavar="NAME", default=None,
                        help="also upload the directory to this hub repository (needs a login or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    add_model_arguments(parser)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from textbind.runtime import model_config_from_arguments, resolve_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    try:
        model_config = model_config_from_arguments(args)
        device = resolve_device(args.device)
        bundle = build_model(replace(model_config, trainable=[], gradient_checkpointing=False))
        bundle.model.to(device).eval()
        output = export(
            bundle, model_config, args.out, max_shard_size=args.max_shard_size,
            evaluation_report=args.eval_report, license_name=args.license,
            repository_name=args.push_to_hub,
        )
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"textbind export: {error}", file=sys.stderr)
        return 2
    print(output)
    if args.push_to_hub:
        try:
            print(push_to_hub(output, args.push_to_hub, private=args.private))
        except OSError as error:  # the hub library's HTTP, connection and offline errors are OSErrors
            print(f"textbind export: pushing {output} to {args.push_to_hub} failed: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
