"""Image-caption pairs, the data engine's input: webdataset shards (as in stage 1) or a file of records.

Two kinds of input, each cut into *sources* (the unit the embedding cache works in):

- webdataset tars in the img2dataset layout (`KEY.jpg|png`, `KEY.txt`, `KEY.json`), given as a brace
  pattern like stage 1's `data.train_path`; each shard is one source;
- one JSON (a list of records), JSONL, CSV or TSV file of records with `image` (a path, relative to
  the file or to `pairs.image_dir`), `caption`, and optionally `url`, `key` and `group`; the file is one source.

A pair's `group` (a record field, or in a shard the `group` of `KEY.json`) names a set of images that belong
together -- an album, a web page, a product's photos -- for `cluster.method=group`.

Bad items (no or unreadable image, empty caption, unreadable shard or line) are skipped with a message
naming the item, and counted; nothing else is lost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from textbind.data.conversation import DataError
from textbind.datagen.config import PairsConfig

logger = logging.getLogger(__name__)

RECORD_FORMATS = ("json", "jsonl", "csv", "tsv")
# An image inside a tar is referred to as "<shard path>::<member name>" until it is extracted.
TAR_MEMBER_SEPARATOR = "::"


@dataclass
class Pair:
    """One usable image-caption pair."""

    id: str  # unique over the whole input: "<source name>/<key>"
    key: str
    caption: str
    image: str  # a file path, or "<shard>::<member>" for an image inside a tar
    url: str = ""
    group: str = ""  # the images that belong together (an album, a web page); "" when the input names none


@dataclass
class PairItem:
    """A pair as read, before its image is decoded; `image_bytes` is set when the bytes came with it (tars)."""

    pair: Pair
    image_bytes: bytes | None = None


@dataclass
class Source:
    """One input shard or record file: the unit of reading and of the embedding cache."""

    path: str
    kind: str  # webdataset | json | jsonl | csv | tsv
    image_dir: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def fingerprint(self) -> str:
        """Changes whenever the file (or where its images are looked up) changes."""
        stat = os.stat(self.path)
        text = f"{os.path.abspath(self.path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.kind}|{self.image_dir}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ReadReport:
    """What reading (and decoding) the pairs of some sources did."""

    read: int = 0  # items seen
    usable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first messages, naming the items

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 50:
            self.examples.append(message)
        logger.warning("skipped: %s", message)

    def merge(self, other: ReadReport) -> None:
        self.read += other.read
        self.usable += other.usable
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.examples += other.examples[: max(0, 50 - len(self.examples))]

    def to_dict(self) -> dict:
        return {"read": self.read, "usable": self.usable, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "skipped_examples": list(self.examples)}

    @classmethod
    def from_dict(cls, values: dict) -> ReadReport:
        return cls(int(values["read"]), int(values["usable"]), dict(values["skipped"]),
                   list(values.get("skipped_examples", [])))


def detect_format(path: str, requested: str = "auto") -> str:
    """The input kind of `path`: webdataset for tar patterns, else the record file's extension."""
    if requested != "auto":
        return requested
    lowered = path.lower()
    if ".tar" in lowered and (lowered.endswith(".tar") or lowered.endswith("}") or "," in lowered):
        return "webdataset"
    suffix = Path(lowered).suffix.lstrip(".")
    if suffix in RECORD_FORMATS:
        return suffix
    raise DataError(f"pairs.path {path!r}: cannot tell the format from the name; set pairs.format "
                    f"(webdataset, json, jsonl, csv or tsv)")


def list_sources(config: PairsConfig) -> list[Source]:
    """The sources of `pairs.path`, in input order."""
    if not config.path:
        raise DataError("pairs.path is not set: give webdataset shards or a JSON/JSONL/CSV/TSV file of pairs")
    kind = detect_format(config.path, config.format)
    if kind == "webdataset":
        from textbind.data.streams import expand_shards  # imported here: the record-file path stays light

        return [Source(shard, "webdataset") for shard in expand_shards(config.path)]
    if not Path(config.path).is_file():
        raise DataError(f"pairs.path: file not found: {config.path}")
    image_dir = config.image_dir or str(Path(config.path).parent)
    return [Source(config.path, kind, image_dir)]


def read_source(source: Source, report: ReadReport) -> Iterator[PairItem]:
    """The pairs of one source with a non-empty caption; problems found on the way go to `report`."""
    if source.kind == "webdataset":
        yield from _read_shard(source, report)
    else:
        yield from _read_record_file(source, report)


def _read_shard(source: Source, report: ReadReport) -> Iterator[PairItem]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from textbind.data.streams import IMAGE_EXTENSIONS

    errors: list[Exception] = []

    def stop(error: Exception) -> bool:
        errors.append(error)
        return False  # stop this shard; what was read before stays

    try:
        stream = open(source.path, "rb")
    except OSError as error:
        report.skip("unreadable_shard", f"{source.path}: unreadable shard ({error})")
        return
    seen: set[str] = set()
    with stream:
        samples = group_by_keys(tar_file_expander([{"url": source.path, "stream": stream}], handler=stop),
                                handler=stop)
        try:
            for sample in samples:
                key = str(sample.get("__key__", "?"))
                report.read += 1
                where = f"{source.path} sample {key}"
                extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
                if extension is None:
                    report.skip("missing_image", f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
                    continue
                caption = _decode_caption(sample.get("txt"))
                if not caption:
                    report.skip("empty_caption", f"{where}: empty or missing caption (.txt)")
                    continue
                if key in seen:
                    report.skip("duplicate_key", f"{where}: a second sample with this key")
                    continue
                seen.add(key)
                metadata = _decode_json(sample.get("json"))
                url = str(metadata.get("url") or "")
                member = f"{key}.{extension}"
                pair = Pair(f"{source.name}/{key}", key, caption,
                            f"{source.path}{TAR_MEMBER_SEPARATOR}{member}", url, _group(metadata.get("group")))
                yield PairItem(pair, sample[extension])
        except (tarfile.TarError, OSError, ValueError) as error:
            errors.append(error)
    if errors:
        report.skip("unreadable_shard", f"{source.path}: unreadable shard content, the rest of it skipped "
                                        f"({errors[0]})")


def _group(value: object) -> str:
    """A record's group as text ("" when it has none); numbers are groups too (an album id)."""
    return "" if value is None else str(value).strip()


def clean_caption(text: str) -> str:
    """One line, single spaces: a caption is quoted on one line of the prompt (and verbatim in transcripts)."""
    return " ".join(text.split())


def _decode_caption(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        return clean_caption(value.decode("utf-8"))
    except UnicodeDecodeError:
        return ""


def _decode_json(value: bytes | None) -> dict:
    if not value:
        return {}
    try:
        decoded = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _record_rows(source: Source, report: ReadReport) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a JSON / JSONL / CSV / TSV file."""
    path = source.path
    if source.kind == "json":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a readable JSON file ({error})") from error
        if isinstance(data, dict):
            data = next((data[name] for name in ("records", "data", "pairs") if isinstance(data.get(name), list)),
                        None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        for index, record in enumerate(data):
            yield f"{path} record {index}", record
    elif source.kind == "jsonl":
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {number}", json.loads(line)
                except ValueError as error:
                    report.read += 1
                    report.skip("bad_record", f"{path} line {number}: not JSON ({error})")
    else:
        with open(path, encoding="utf-8", newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t" if source.kind == "tsv" else ",")
            if not reader.fieldnames or "image" not in reader.fieldnames or "caption" not in reader.fieldnames:
                raise DataError(f"{path}: the header must name the columns 'image' and 'caption' "
                                f"(found {reader.fieldnames})")
            for number, row in enumerate(reader, start=2):
                yield f"{path} line {number}", row


def _read_record_file(source: Source, report: ReadReport) -> Iterator[PairItem]:
    seen: set[str] = set()
    for index, (where, record) in enumerate(_record_rows(source, report)):
        report.read += 1
        if not isinstance(record, dict):
            report.skip("bad_record", f"{where}: expected an object with 'image' and 'caption'")
            continue
        image = str(record.get("image") or "").strip()
        caption = clean_caption(str(record.get("caption") or ""))
        key = str(record.get("key") or "").strip() or str(index)
        where = f"{where} (key {key})"
        if not image:
            report.skip("missing_image", f"{where}: no 'image' field")
            continue
        if not caption:
            report.skip("empty_caption", f"{where}: empty caption")
            continue
        path = image if os.path.isabs(image) else os.path.join(source.image_dir, image)
        if not os.path.isfile(path):
            report.skip("missing_image", f"{where}: image file not found: {path}")
            continue
        if key in seen:
            report.skip("duplicate_key", f"{where}: a second record with this key")
            continue
        seen.add(key)
        yield PairItem(Pair(f"{source.name}/{key}", key, caption, os.path.abspath(path), str(record.get("url") or ""),
                            _group(record.get("group"))))


def load_image(item: PairItem) -> Image.Image:
    """The item's image as RGB; DataError naming the item when it cannot be read or decoded."""
    try:
        if item.image_bytes is not None:
            with Image.open(io.BytesIO(item.image_bytes)) as image:
                return image.convert("RGB")
        with Image.open(item.pair.image) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{item.pair.id} ({item.pair.image}): unreadable image ({error})") from error


def materialize_images(pairs: Iterable[Pair], directory: str | os.PathLike) -> dict[str, str]:
    """Pair id -> an image file path, extracting images that live inside tars into `directory`.

    Images already on disk keep their path. Tar members are written once to `directory/<shard>/<member>`
    (atomically); each needed shard is read once, in order.
    """
    paths: dict[str, str] = {}
    wanted: dict[str, dict[str, list[str]]] = {}  # shard -> member -> pair ids
    for pair in pairs:
        shard, separator, member = pair.image.partition(TAR_MEMBER_SEPARATOR)
        if not separator:
            paths[pair.id] = pair.image
            continue
        target = Path(directory) / Path(shard).stem / member
        paths[pair.id] = str(target)
        if not target.is_file():
            wanted.setdefault(shard, {}).setdefault(member, []).append(pair.id)
    for shard, members in wanted.items():
        found = set()
        with tarfile.open(shard) as archive:
            for info in archive:
                name = info.name
                if info.isfile() and name in members and name not in found:
                    target = Path(directory) / Path(shard).stem / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    extracted = archive.extractfile(info)
                    assert extracted is not None
                    temporary = target.with_name(target.name + ".tmp")
                    temporary.write_bytes(extracted.read())
                    os.replace(temporary, target)
                    found.add(name)
        missing = sorted(set(members) - found)
        if missing:
            raise DataError(f"{shard}: member(s) {missing[:5]} are gone; was the shard changed after embedding?")
    return paths
