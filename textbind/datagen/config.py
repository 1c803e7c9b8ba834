"""The data engine's typed configuration: one section per step, loaded like the training configs.

    config = load_datagen_config("configs/datagen/default.yaml", ["llm.concurrency=32"])
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from textbind.config import DTYPE_NAMES, ConfigError, config_help, load_config
from textbind.datagen.export import ExportConfig
from textbind.datagen.filters import FilterConfig

CLUSTER_METHODS = ("kmeans", "group")
ENCODERS = ("blip2", "clip", "siglip", "hashing")
MODALITIES = ("image", "caption")
PAIR_FORMATS = ("auto", "webdataset", "json", "jsonl", "csv", "tsv")


@dataclass
class RunSection:
    """Where the engine writes and the seed every random choice derives from."""

    output_dir: str = "data/generated"  # every step reads and writes here (see the README for the layout)
    seed: int = 0  # clustering, sampling, example choice and request seeds derive from it (the split: export.seed)
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("run.output_dir must be set")


@dataclass
class PairsConfig:
    """The input image-caption pairs."""

    path: str = ""  # webdataset shards (brace pattern) or a JSON / JSONL / CSV / TSV file of records
    image_dir: str = ""  # where relative `image` paths of a record file live ("": next to the file)
    format: str = "auto"  # auto | webdataset | json | jsonl | csv | tsv

    def validate(self) -> None:
        if self.format not in PAIR_FORMATS:
            raise ConfigError(f"pairs.format must be one of {list(PAIR_FORMATS)}, got {self.format!r}")


@dataclass
class EmbedConfig:
    """The local encoder that places images (or captions) in a space for clustering."""

    encoder: str = "blip2"  # blip2 (pooled vision encoder) | clip | siglip | hashing (captions, no model)
    model_path: str = ""  # Blip2VisionModel, CLIP or SigLIP directory
    processor_path: str = ""  # image processor directory ("": model_path)
    modality: str = "image"  # image | caption (caption needs clip, siglip or hashing)
    batch_size: int = 64
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16
    hashing_features: int = 1024  # width of the hashing encoder's caption vectors

    def validate(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"embed.encoder must be one of {list(ENCODERS)}, got {self.encoder!r}")
        if self.modality not in MODALITIES:
            raise ConfigError(f"embed.modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if self.modality == "caption" and self.encoder == "blip2":
            raise ConfigError("embed.modality=caption needs a text encoder: embed.encoder=clip, siglip or hashing")
        if self.encoder == "hashing" and self.modality != "caption":
            raise ConfigError("embed.encoder=hashing embeds captions: set embed.modality=caption")
        if self.batch_size < 1:
            raise ConfigError("embed.batch_size must be at least 1")
        if self.dtype != "auto" and self.dtype.lower() not in DTYPE_NAMES:
            raise ConfigError(f"embed.dtype must be auto or one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")


@dataclass
class ClusterConfig:
    """Topic clusters (k-means, or the pairs' own groups) and near-duplicate removal."""

    method: str = "kmeans"  # kmeans (topics of the embeddings) | group (one cluster per `group` of the pairs)
    num_clusters: int = 100  # k of k-means (at most the number of distinct images); unused by method=group
    center: bool = True  # subtract the mean embedding first (encoders often put every image in a narrow cone)
    dedup: bool = True  # drop near-duplicate images inside each cluster
    dedup_threshold: float = 0.95  # cosine similarity above which two images are near-duplicates
    examples_per_cluster: int = 5  # captions shown per cluster in clusters.json
    minibatch_above: int = 20000  # use MiniBatchKMeans above this many images (exact k-means below)

    def validate(self) -> None:
        if self.method not in CLUSTER_METHODS:
            raise ConfigError(f"cluster.method must be one of {list(CLUSTER_METHODS)}, got {self.method!r}")
        if self.num_clusters < 1:
            raise ConfigError("cluster.num_clusters must be at least 1")
        if not -1.0 <= self.dedup_threshold <= 1.0:
            raise ConfigError("cluster.dedup_threshold is a cosine similarity in [-1, 1]")


@dataclass
class SampleConfig:
    """Which images each conversation gets."""

    num_conversations: int = 1000
    image_counts: list[int] = field(default_factory=lambda: [2, 3, 4, 5])  # images per conversation
    image_count_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # one per image count
    max_image_reuse: int = 2  # an image appears in at most this many conversations

    def validate(self) -> None:
        if self.num_conversations < 0:
            raise ConfigError("sample.num_conversations must be 0 or more")
        if not self.image_counts or min(self.image_counts) < 1:
            raise ConfigError("sample.image_counts must list positive image counts")
        if len(self.image_count_weights) != len(self.image_counts):
            raise ConfigError(f"sample.image_count_weights has {len(self.image_count_weights)} weight(s) for "
                              f"{len(self.image_counts)} image count(s)")
        if min(self.image_count_weights) < 0 or sum(self.image_count_weights) <= 0:
            raise ConfigError("sample.image_count_weights must be non-negative with a positive sum")
        if self.max_image_reuse < 1:
            raise ConfigError("sample.max_image_reuse must be at least 1")


@dataclass
class PromptConfig:
    """The prompt: an editable template and a pool of in-context example conversations."""

    template: str = ""  # template file ("": the packaged textbind/datagen/data/prompt_template.txt)
    seed_examples: str = ""  # JSONL pool ("": the packaged textbind/datagen/data/seed_examples.jsonl)
    num_examples: int = 2  # in-context examples per request, drawn from the pool

    def validate(self) -> None:
        if self.num_examples < 0:
            raise ConfigError("prompt.num_examples must be 0 or more")


@dataclass
class LLMConfig:
    """The OpenAI-compatible chat-completions server and how it is called."""

    base_url: str = "http://127.0.0.1:8000/v1"  # vLLM, SGLang, llama.cpp or a hosted API
    model: str = ""  # the served model name
    concurrency: int = 16  # requests in flight at once
    timeout: float = 300.0  # seconds per request
    max_retries: int = 5  # retries after the first try (429, 5xx, timeouts, connection errors, bad answers)
    backoff_initial: float = 1.0  # seconds before the first retry; doubles each retry
    backoff_max: float = 60.0  # longest wait between tries
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 1024
    request_seed: bool = True  # send a per-conversation `seed` (servers that honour it answer reproducibly)

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("llm.concurrency must be at least 1")
        if self.timeout <= 0:
            raise ConfigError("llm.timeout must be positive")
        if self.max_retries < 0:
            raise ConfigError("llm.max_retries must be 0 or more")
        if self.max_tokens < 1:
            raise ConfigError("llm.max_tokens must be at least 1")


@dataclass
class DatagenConfig:
    run: RunSection = field(default_factory=RunSection)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> DatagenConfig:
        for section in (self.run, self.pairs, self.embed, self.cluster, self.sample, self.prompt, self.llm,
                        self.filter, self.export):
            validate = getattr(section, "validate", None)
            if validate is not None:
                validate()
        return self


def load_datagen_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DatagenConfig:
    """A DatagenConfig from a YAML file (may be None: the defaults) and `section.key=value` overrides."""
    return load_config(path, overrides, config_type=DatagenConfig)


def api_key_from_environment() -> str:
    """The LLM API key: LLM_API_KEY, else OPENAI_API_KEY, else a placeholder local servers accept."""
    return os.environ.get("LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"



DEFAULT_CONFIG = "configs/datagen/default.yaml"


def step_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command-line parser every step shares: --config and `section.key=value` overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with section.key=value):\n" + config_help(DatagenConfig))
    parser.add_argument("--config", default="", help=f"YAML config (default: {DEFAULT_CONFIG} when it exists)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. llm.concurrency=32")
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> DatagenConfig:
    path = arguments.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    return load_datagen_config(path, list(arguments.overrides))
