"""Training streams for both stages: deterministic, sharded over ranks and workers, resumable exactly.

Every (rank, worker) pair reads its own slice of the data in an order fixed by the seed and the
pass number, and tags each micro-batch with its cursor: the pass and the source's resume token of
the last raw item it consumed. A resumed run has each source seek straight to its cursor (a shard
and a sample position in stage 1, an offset in stage 2) and continues with the worker whose turn it
was, so it sees exactly the batches an uninterrupted run would have seen, without re-reading the
data before the cursor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen

from textbind import IMAGE_TOKEN
from textbind.data.collate import Batch, collate
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.data.packing import collate_packed, prepare_packable_sample
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder, EncodedConversation
from textbind.seeding import stable_seed

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's member naming: everything up to the first dot of the file name is the sample's key.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")

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


def is_remote(shard: str) -> bool:
    """A shard that webdataset's opener fetches (`pipe:CMD`, `http(s)://`, `hf://`, ...), not a local file."""
    return shard.startswith("pipe:") or "://" in shard


def _split_patterns(text: str) -> list[str]:
    """Top-level commas separate patterns (commas inside `{a,b}` belong to the brace); so does whitespace,
    except inside a `pipe:` command, which runs as written."""
    parts, depth, current = [], 0, ""
    for character in text:
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    patterns = []
    for part in (part.strip() for part in parts):
        patterns += [part] if part.startswith("pipe:") else part.split()
    return [pattern for pattern in patterns if pattern]


def expand_shards(pattern: str) -> list[str]:
    """`dir/{00000..01254}.tar`, `pipe:curl -s https://host/{000..099}.tar`, `https://...`; comma-separated.

    Local shards must exist; remote ones are opened through webdataset's `gopen` when they are read.
    """
    shards = [path for part in _split_patterns(pattern) for path in braceexpand(part)]
    if not shards:
        raise DataError(f"data.train_path: no shards in {pattern!r}")
    missing = [shard for shard in shards if not is_remote(shard) and not Path(shard).is_file()]
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
    """Image-caption pairs in webdataset tars (img2dataset layout: KEY.jpg|png, KEY.txt, KEY.json).

    Order of a pass: the shards in a seeded order, split over the readers; inside each shard, its samples
    in a seeded permutation, read by seeking to their members (a tar's index is read once per shard).
    An item's resume token is (shard position, sample position) in this order, so a resumed reader
    seeks straight to where it stopped instead of re-reading everything since step 0.
    """

    def __init__(self, pattern: str) -> None:
        self.shards = expand_shards(pattern)

    def count(self) -> int:
        """Number of samples (distinct keys with a caption), read from the tar indexes only."""
        if any(is_remote(shard) for shard in self.shards):
            raise DataError("data.samples_per_epoch must be set for remote shards (counting would download them all)")
        total = 0
        for shard in self.shards:
            with tarfile.open(shard) as archive:
                total += sum(1 for member in archive.getnames() if member.endswith(".txt"))
        return total

    def shard_order(self, pass_index: int, seed: int) -> list[str]:
        order = list(self.shards)
        random.Random(stable_seed(seed, "shards", pass_index)).shuffle(order)
        return order

    def raw_items(self, pass_index: int, worker: int, num_workers: int, seed: int,
                  start: Any = None) -> Iterator[tuple[Any, Any]]:
        """(sample, resume token) pairs of this reader's share of pass `pass_index`, from `start` on."""
        order = self.shard_order(pass_index, seed)
        if len(order) >= num_workers:
            shards, stride, offset = order[worker::num_workers], 1, 0
        else:  # fewer shards than readers: every reader reads all, keeps every num_workers-th sample
            shards, stride, offset = order, num_workers, worker
        shard_position, sample_position = start or (0, 0)
        for position in range(shard_position, len(shards)):
            shard = shards[position]
            first = sample_position if position == shard_position else 0
            yield from (
                (sample, (position, index + 1))
                for index, sample in self._read_shard(shard, pass_index, seed, stride, offset, first)
            )

    @staticmethod
    def _read_shard(shard: str, pass_index: int, seed: int, stride: int, offset: int,
                    first: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the shard's permuted order, sample) for the positions this reader keeps, from `first`.

        A remote shard is first copied through webdataset's `gopen` into a temporary file, so that its
        samples can be read in any order (and a resume seeks within it) as with a local one.
        """
        with contextlib.ExitStack() as stack:
            try:
                if is_remote(shard):
                    spool = stack.enter_context(tempfile.TemporaryFile(prefix="textbind-shard-"))
                    with gopen(shard, "rb") as stream:
                        shutil.copyfileobj(stream, spool)
                    spool.seek(0)
                    archive = stack.enter_context(tarfile.open(fileobj=spool))
                else:
                    archive = stack.enter_context(tarfile.open(shard))
            except (OSError, tarfile.TarError, ValueError) as error:
                logger.warning("skipping unreadable shard %s: %s", shard, error)
                return
            yield from Stage1Source._read_archive(archive, shard, pass_index, seed, stride, offset, first)

    @staticmethod
    def _read_archive(archive: tarfile.TarFile, shard: str, pass_index: int, seed: int, stride: int, offset: int,
                      first: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the shard's permuted order, sample) of an open shard, as `_read_shard` describes."""
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for member in archive:
                match = _MEMBER_NAME.match(member.name)
                if member.isfile() and match:
                    members.setdefault(match.group(1), {})[match.group(2).lower()] = member
        except (OSError, tarfile.TarError) as error:  # a truncated shard: keep what was indexed
            logger.warning("shard %s is damaged after %d samples: %s", shard, len(members), error)
        keys = list(members)
        random.Random(stable_seed(seed, "samples", pass_index, Path(shard).name)).shuffle(keys)
        for index in range(first, len(keys)):
            if index % stride != offset:
                continue
            sample: dict[str, Any] = {"__key__": keys[index], "__url__": shard}
            for extension, member in members[keys[index]].items():
                try:
                    sample[extension] = archive.extractfile(member).read()
                except (OSError, tarfile.TarError, AttributeError) as error:
                    logger.warning("%s sample %s: member %s unreadable (%s)", shard, keys[index],
                                   member.name, error)
            yield index, sample

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

    def raw_items(self, pass_index: int, worker: int, num_workers: int, seed: int,
                  start: Any = None) -> Iterator[tuple[Any, Any]]:
        """(conversation, resume token) pairs of this reader's share of the pass; the token is an offset."""
        share = self._pass_indices(pass_index, seed)[worker::num_workers]
        for offset in range(start or 0, len(share)):
            yield self.conversations[share[offset]], offset + 1

    @staticmethod
    def to_conversation(item: Conversation, seed: int) -> Conversation:
        return item


def build_train_source(
    data: Any, seed: int, reporter: Callable[[str], None] | None = None
) -> tuple[Stage1Source | Stage2Source, int]:
    """The training source a `DataConfig` describes, and the number of samples in one epoch."""
    if data.stage == 1:
        source = Stage1Source(data.train_path)
        return source, data.samples_per_epoch or source.count()
    groups = load_stage2_groups(data.train_path, data.image_dir, data.on_bad_record, reporter)
    source = Stage2Source(groups, data.train_weights or None)
    return source, data.samples_per_epoch or source.count(seed)


@dataclass
class StreamPosition:
    """Where each logical worker of this rank is in its stream, and whose turn comes next.

    A worker's cursor is `{"pass": P, "token": T}`: it continues pass P after the item whose resume
    token was T (None: from the start of the pass). Tokens come from the source and are JSON-able.
    """

    cursors: list[dict[str, Any]] = field(default_factory=list)
    next_worker: int = 0
    skipped: int = 0  # samples dropped so far (corrupt, unreadable, invalid)

    @classmethod
    def start(cls, num_workers: int) -> StreamPosition:
        return cls([{"pass": 0, "token": None} for _ in range(num_workers)])

    def to_dict(self) -> dict[str, Any]:
        return {"cursors": [dict(cursor) for cursor in self.cursors], "next_worker": self.next_worker,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamPosition:
        cursors = [{"pass": int(c["pass"]), "token": c["token"]} for c in values["cursors"]]
        return cls(cursors, int(values["next_worker"]), int(values.get("skipped", 0)))


@dataclass
class TaggedBatch:
    batch: Batch
    worker: int
    cursor: dict[str, Any]  # this worker's cursor after making this batch


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
        self.position = position or StreamPosition.start(self.logical_workers)
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

    def _raw_stream(self, worker: int, cursor: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(raw item, cursor after it) from `cursor` on, pass after pass; the source seeks to the cursor."""
        global_worker = self.rank * self.logical_workers + worker
        total_workers = self.world_size * self.logical_workers
        pass_index, start = cursor["pass"], cursor["token"]
        while True:
            produced = False
            for item, token in self.source.raw_items(pass_index, global_worker, total_workers, self.seed, start):
                produced = True
                yield item, {"pass": pass_index, "token": token}
            if not produced and start is None:
                raise DataError(f"rank {self.rank} worker {worker} got no data: too few samples for "
                                f"{total_workers} reader(s)")
            pass_index, start = pass_index + 1, None

    def __iter__(self) -> Iterator[TaggedBatch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # The DataLoader always starts with its worker 0: map it to the logical worker whose turn it is.
        worker = (loader_worker + self.position.next_worker) % self.logical_workers
        cursor = self.position.cursors[worker]
        raw = self._raw_stream(worker, cursor)
        while True:
            samples, skipped = [], 0
            while len(samples) < self.micro_batch_size:
                item, cursor = next(raw)
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

