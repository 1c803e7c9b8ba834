"""Training streams for both stages: deterministic, sharded over ranks and workers, resumable exactly.

Every (rank, worker) pair reads its own slice of the data in an order fixed by the seed and the
pass number, counts the raw items it consumed (its cursor) and tags each micro-batch with it. A
resumed run skips each worker's cursor of raw items without decoding them and continues with the
worker whose turn it was, so it sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from textbind import IMAGE_TOKEN
from textbind.data.collate import Batch, collate
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.data.packing import collate_packed, prepare_packable_sample
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder, EncodedConversation

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Stage 1 turns an image-caption pair into a one-turn conversation with one of these requests.
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this image show?",
    "Give a concise description of the picture.",
    "Summarize the visual content of the image.",
    "Provide a brief description of the given image.",
    "Describe what you see.",
    "Caption this image.",
    "What is in the picture?",
    "Share a short description of this photo.",
    "Tell me what the image depicts.",
    "Create a compact narrative representing the image.",
    "Render a clear and concise summary of the photo.",
    "Present a short description of the image's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Write a terse but informative summary of the picture.",
    "Offer a succinct explanation of the picture presented.",
    "Describe the image concisely.",
    "Give a one-sentence description of this image.",
    "What can you see here?",
)


def stable_seed(*parts: Any) -> int:
    """A seed that depends only on the parts (not on Python's per-process hash randomisation)."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def expand_shards(pattern: str) -> list[str]:
    """`dir/{00000..01254}.tar`, comma- or space-separated patterns -> existing tar paths."""
    shards = [path for part in pattern.replace(",", " ").split() for path in braceexpand(part)]
    if not shards:
        raise DataError(f"data.train_path: no shards in {pattern!r}")
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise DataError(f"data.train_path: {len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}")
    return shards


def caption_conversation(caption: str, image: Any, key: str, seed: int) -> Conversation:
    """The stage-1 conversation for one pair: a caption request (image before or after it) -> the caption."""
    choice = random.Random(stable_seed(seed, key))
    instruction = choice.choice(CAPTION_INSTRUCTIONS)
    content = f"{IMAGE_TOKEN} {instruction}" if choice.random() < 0.5 else f"{instruction} {IMAGE_TOKEN}"
    return Conversation(
        [Turn("user", content, [image]), Turn("assistant", caption.strip())], source=f"sample {key}"
    )


class Stage1Source:
    """Image-caption pairs in webdataset tars (img2dataset layout: KEY.jpg|png, KEY.txt, KEY.json)."""

    def __init__(self, pattern: str, shuffle_buffer: int = 1000) -> None:
        self.shards = expand_shards(pattern)
        self.shuffle_buffer = shuffle_buffer

    def count(self) -> int:
        """Number of samples (distinct keys with a caption), read from the tar indexes only."""
        total = 0
        for shard in self.shards:
            with tarfile.open(shard) as archive:
                total += sum(1 for member in archive.getnames() if member.endswith(".txt"))
        return total

    def _read(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        def warn(error: Exception) -> bool:
            logger.warning("skipping unreadable tar content: %s", error)
            return True

        streams = ({"url": shard, "stream": open(shard, "rb")} for shard in shards)
        yield from group_by_keys(tar_file_expander(streams, handler=warn), handler=warn)

    def raw_items(self, pass_index: int, worker: int, num_workers: int, seed: int) -> Iterator[Any]:
        order = list(self.shards)
        random.Random(stable_seed(seed, "shards", pass_index)).shuffle(order)
        if len(order) >= num_workers:
            samples = self._read(order[worker::num_workers])
        else:  # fewer shards than workers: every worker reads all, keeps every num_workers-th sample
            samples = (s for index, s in enumerate(self._read(order)) if index % num_workers == worker)
        buffer_rng = random.Random(stable_seed(seed, "buffer", pass_index, worker))
        buffer: list[Any] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                position = buffer_rng.randrange(len(buffer))
                buffer[position], buffer[-1] = buffer[-1], buffer[position]
                yield buffer.pop()
        buffer_rng.shuffle(buffer)
        yield from buffer

    @staticmethod
    def to_conversation(sample: dict[str, Any], seed: int) -> Conversation:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', 'shard')} sample {key}"
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_bytes is None:
            raise DataError(f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        if "txt" not in sample:
            raise DataError(f"{where}: no caption (.txt) member")
        try:
            caption = sample["txt"].decode("utf-8").strip()
            with Image.open(io.BytesIO(image_bytes)) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, UnicodeDecodeError, Image.DecompressionBombError) as error:
            raise DataError(f"{where}: undecodable sample ({error})") from error
        if not caption:
            raise DataError(f"{where}: empty caption")
        conversation = caption_conversation(caption, image, key, seed)
        conversation.source = where
        return conversation


class Stage2Source:
    """Validated conversations, optionally a weighted mixture of several files."""

    def __init__(self, groups: list[list[Conversation]], weights: list[float] | None = None) -> None:
        weights = weights or [1.0] * len(groups)
        if len(weights) != len(groups):
            raise DataError(f"data.train_weights has {len(weights)} weight(s) for {len(groups)} file(s)")
        self.conversations = [conversation for group in groups for conversation in group]
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + len(group))
        self.groups = [(offsets[i], len(group), weight) for i, (group, weight) in enumerate(zip(groups, weights))]

    def _pass_indices(self, pass_index: int, seed: int) -> list[int]:
        rng = random.Random(stable_seed(seed, "records", pass_index))
        indices: list[int] = []
        for offset, size, weight in self.groups:
            whole, fraction = divmod(weight * size, size) if size else (0, 0)
            for _ in range(int(whole)):
                indices += range(offset, offset + size)
            indices += [offset + i for i in rng.sample(range(size), int(round(fraction)))]
        rng.shuffle(indices)
        return indices

    def count(self, seed: int = 0) -> int:
        return len(self._pass_indices(0, seed))

    def raw_items(self, pass_index: int, worker: int, num_workers: int, seed: int) -> Iterator[Any]:
        yield from (self.conversations[i] for i in self._pass_indices(pass_index, seed)[worker::num_workers])

    @staticmethod
    def to_conversation(item: Conversation, seed: int) -> Conversation:
        return item


@dataclass
class StreamPosition:
    """Where each logical worker of this rank is in its stream, and whose turn comes next."""

    cursors: list[int] = field(default_factory=list)
    next_worker: int = 0
    skipped: int = 0  # samples dropped so far (corrupt, unreadable, invalid)

    def to_dict(self) -> dict[str, Any]:
        return {"cursors": list(self.cursors), "next_worker": self.next_worker, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamPosition:
        return cls(list(values["cursors"]), int(values["next_worker"]), int(values.get("skipped", 0)))


@dataclass
class TaggedBatch:
    batch: Batch
    worker: int
    cursor: int  # raw items this worker had consumed after making this batch


class TrainStream(IterableDataset):
    """Endless micro-batches for one rank; see the module docstring for how it stays resumable."""

    def __init__(
        self,
        source: Stage1Source | Stage2Source,
        encoder: ConversationEncoder,
        image_processor: Any,
        *,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        position: StreamPosition | None = None,
        pack_length: int = 0,
    ) -> None:
        self.source = source
        # > 0: each micro-batch's samples are packed into rows of this many tokens (textbind.data.packing);
        # the samples and the position are those of the unpacked stream, so resuming is unchanged.
        self.pack_length = pack_length
        self.encoder = encoder
        self.image_processor = image_processor
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.logical_workers = max(1, num_workers)
        self.position = position or StreamPosition([0] * self.logical_workers)
        if len(self.position.cursors) != self.logical_workers:
            raise ValueError(
                f"the checkpoint's data position has {len(self.position.cursors)} worker(s) but "
                f"data.num_workers is {num_workers}: resume with the same number of workers"
            )

    def _build(self, item: Any) -> tuple[EncodedConversation, torch.Tensor]:
        conversation = self.source.to_conversation(item, self.seed)
        if self.pack_length:
            return prepare_packable_sample(conversation, self.encoder, self.image_processor, self.pack_length)
        return prepare_sample(conversation, self.encoder, self.image_processor)

    def _raw_stream(self, worker: int) -> Iterator[Any]:
        global_worker = self.rank * self.logical_workers + worker
        total_workers = self.world_size * self.logical_workers
        pass_index = 0
        while True:
            produced = False
            for item in self.source.raw_items(pass_index, global_worker, total_workers, self.seed):
                produced = True
                yield item
            if not produced:
                raise DataError(f"rank {self.rank} worker {worker} got no data: too few samples for "
                                f"{total_workers} reader(s)")
            pass_index += 1

    def __iter__(self) -> Iterator[TaggedBatch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # The DataLoader always starts with its worker 0: map it to the logical worker whose turn it is.
        worker = (loader_worker + self.position.next_worker) % self.logical_workers
        cursor = self.position.cursors[worker]
        raw = self._raw_stream(worker)
        for _ in range(cursor):  # skip what was consumed before, without decoding
            next(raw)
        while True:
            samples, skipped = [], 0
            while len(samples) < self.micro_batch_size:
                item = next(raw)
                cursor += 1
                try:
                    samples.append(self._build(item))
                except DataError as error:
                    skipped += 1
                    logger.warning("skipped: %s", error)
            if self.pack_length:
                batch = collate_packed(samples, self.encoder.tokenizer.pad_token_id, self.pack_length, skipped)
            else:
                batch = collate(samples, self.encoder.tokenizer.pad_token_id, num_skipped=skipped)
            yield TaggedBatch(batch, worker, cursor)


class StreamLoader:
    """Iterates a TrainStream through a DataLoader and keeps its resumable position."""

    def __init__(self, stream: TrainStream, num_workers: int) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.position = StreamPosition.from_dict(stream.position.to_dict())
        self._iterator: Iterator[TaggedBatch] | None = None

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            loader = DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers,
                persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                collate_fn=_identity,
                # its own generator: starting the workers must not draw from the global RNG (dropout)
                generator=torch.Generator().manual_seed(self.stream.seed),
            )
            self._iterator = iter(loader)
        tagged = next(self._iterator)
        self.position.cursors[tagged.worker] = tagged.cursor
        self.position.next_worker = (tagged.worker + 1) % self.stream.logical_workers
        self.position.skipped += tagged.batch.num_skipped
        return tagged.batch


def _identity(item: Any) -> Any:
    return item


def load_stage2_groups(
    paths: str, image_dir: str, on_bad_record: str, reporter: Callable[[str], None] | None = None
) -> list[list[Conversation]]:
    from textbind.data.conversation import load_conversations

    groups = []
    for path in [p for p in paths.split(",") if p.strip()]:
        result = load_conversations(path.strip(), image_dir=image_dir, on_bad_record=on_bad_record)
        if result.errors and reporter is not None:
            reporter(f"{path}: skipped {len(result.errors)} bad record(s):\n  " + "\n  ".join(result.errors[:20]))
        if not result.conversations:
            raise DataError(f"{path}: no usable records")
        groups.append(result.conversations)
    return groups

