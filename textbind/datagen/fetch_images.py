"""Download of a stage-2 file's images from its `url_list` (the released TextBind data), resumable, with a report.

    textbind datagen fetch-images --input data/textbind/train.json --out data/textbind/images

Each image is saved under its `image_list` name in OUT, resized and padded to 512x512 on white (as the
release's images are); files already there are skipped, so a rerun fetches only what is missing. Dead
URLs (HTTP errors, timeouts after the retries, bodies that are not images) and the records they make
unusable go to OUT/fetch_report.json; `--usable-out` writes the input without those records.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from PIL import Image
from tqdm import tqdm

from textbind.datagen.images import pad_to_square, save_image_atomically
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

USER_AGENT = "textbind-fetch-images/1.0"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class FetchConfig:
    """How images are downloaded."""

    concurrency: int = 16  # simultaneous downloads
    retries: int = 3  # further attempts after a failed one (timeouts, connection errors, 429, 5xx)
    timeout: float = 30.0  # seconds per attempt
    backoff: float = 1.0  # first retry waits this long, then twice as long each time
    resize: bool = True  # pad to image_size x image_size on white, as the released images are
    image_size: int = 512
    max_bytes: int = 50_000_000  # larger bodies are refused (not an image we want)


@dataclass
class FetchReport:
    images: int = 0  # distinct images the input names
    downloaded: int = 0
    existing: int = 0  # already in OUT: skipped
    dead: list[dict] = field(default_factory=list)  # {"name", "url", "reason"}
    unusable_records: list[dict] = field(default_factory=list)  # {"record", "id", "images": [names]}
    problems: list[str] = field(default_factory=list)  # records whose image entries are unusable as given

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "downloaded": self.downloaded, "existing": self.existing,
                "dead": self.dead, "unusable_records": self.unusable_records, "problems": self.problems}


class DeadUrl(Exception):
    """A URL that will not give an image (after the retries, where retrying makes sense)."""


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def collect_images(records: list[Any]) -> tuple[dict[str, str], dict[int, list[str]], list[str], set[int]]:
    """(name -> url, record index -> its image names, problems, records with a problem) from image_list/url_list."""
    urls: dict[str, str] = {}
    names_by_record: dict[int, list[str]] = {}
    problems: list[str] = []
    bad_records: set[int] = set()
    for index, record in enumerate(records):
        turns = record.get("conversation") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            problems.append(f"record {index}: no 'conversation' list")
            bad_records.add(index)
            continue
        for turn_index, turn in enumerate(turns):
            if not isinstance(turn, dict):
                continue
            image_list, url_list = turn.get("image_list") or [], turn.get("url_list") or []
            for position, name in enumerate(image_list):
                where = f"record {index} turn {turn_index} image {position}"
                url = url_list[position] if position < len(url_list) else None
                if not isinstance(name, str) or not _safe_name(name):
                    problems.append(f"{where}: unusable file name {name!r}")
                    bad_records.add(index)
                    continue
                names_by_record.setdefault(index, []).append(name)
                if not url:
                    urls.setdefault(name, "")
                    continue
                if urls.get(name) and urls[name] != url:
                    problems.append(f"{where}: {name} also has URL {urls[name]}; keeping that one")
                    continue
                urls[name] = url
    return urls, names_by_record, problems, bad_records


async def _download(client: httpx.AsyncClient, url: str, config: FetchConfig) -> bytes:
    last_reason = ""
    for attempt in range(config.retries + 1):
        if attempt:
            await asyncio.sleep(config.backoff * 2 ** (attempt - 1))
        try:
            response = await client.get(url)
        except httpx.TimeoutException:
            last_reason = f"timeout after {config.timeout:g} s"
            continue
        except httpx.TransportError as error:
            last_reason = f"connection error ({type(error).__name__})"
            continue
        if response.status_code in RETRY_STATUS:
            last_reason = f"HTTP {response.status_code}"
            continue
        if response.status_code != 200:
            raise DeadUrl(f"HTTP {response.status_code}")  # 404, 403, 410: asking again will not help
        if len(response.content) > config.max_bytes:
            raise DeadUrl(f"body larger than {config.max_bytes} bytes")
        return response.content
    raise DeadUrl(f"{last_reason} ({config.retries + 1} attempts)")


def _save(content: bytes, target: Path, config: FetchConfig) -> None:
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            prepared = pad_to_square(image, config.image_size) if config.resize else image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DeadUrl(f"not an image ({type(error).__name__})") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomically(prepared, target)


async def fetch_all(urls: dict[str, str], out_dir: Path, config: FetchConfig, report: FetchReport) -> None:
    """Download every named image that is not in out_dir yet, `config.concurrency` at a time."""
    missing = {name: url for name, url in urls.items() if not (out_dir / name).is_file()}
    report.existing = len(urls) - len(missing)
    semaphore = asyncio.Semaphore(config.concurrency)
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    progress = tqdm(total=len(missing), desc="images", unit="img", disable=not missing)

    async def one(client: httpx.AsyncClient, name: str, url: str) -> None:
        async with semaphore:
            try:
                if not url:
                    raise DeadUrl("no URL in url_list")
                content = await _download(client, url, config)
                # Decoding and resizing are CPU work: off the event loop, so downloads keep flowing.
                await asyncio.to_thread(_save, content, out_dir / name, config)
                report.downloaded += 1
            except DeadUrl as error:
                report.dead.append({"name": name, "url": url, "reason": str(error)})
            finally:
                progress.update(1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout), follow_redirects=True, limits=limits,
                                 headers={"User-Agent": USER_AGENT}) as client:
        await asyncio.gather(*(one(client, name, url) for name, url in missing.items()))
    progress.close()
    report.dead.sort(key=lambda entry: entry["name"])


def fetch_images(input_path: str | Path, out_dir: str | Path, config: FetchConfig | None = None,
                 usable_out: str | Path | None = None) -> FetchReport:
    """Fetch the images of a stage-2 JSON file into out_dir; write out_dir/fetch_report.json; return the report."""
    config = config or FetchConfig()
    path, out = Path(input_path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of stage-2 records")
    urls, names_by_record, problems, bad_records = collect_images(records)
    report = FetchReport(images=len(urls), problems=problems)
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(fetch_all(urls, out, config, report))
    dead = {entry["name"] for entry in report.dead}
    unusable = {index for index, names in names_by_record.items() if dead.intersection(names)} | bad_records
    for index in sorted(unusable):
        record = records[index]
        names = sorted(dead.intersection(names_by_record.get(index, [])))
        report.unusable_records.append({"record": index, "id": record.get("id") if isinstance(record, dict) else None,
                                        "images": names})
    atomic_write_json(out / "fetch_report.json", {"input": str(path), **report.to_dict()})
    if usable_out is not None:
        atomic_write_json(Path(usable_out), [record for index, record in enumerate(records) if index not in unusable])
    return report


def main(argv: list[str] | None = None) -> int:
    defaults = FetchConfig()
    parser = argparse.ArgumentParser(
        prog="textbind datagen fetch-images",
        description="Download the images of a stage-2 JSON file (the released TextBind data) from url_list, "
                    "named per image_list, padded to 512x512 on white; resumable (existing files are skipped).",
    )
    parser.add_argument("--input", required=True, help="stage-2 JSON with url_list (e.g. the release's train.json)")
    parser.add_argument("--out", required=True, help="image folder to fill (then IMAGE_DIR for training)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per attempt")
    parser.add_argument("--backoff", type=float, default=defaults.backoff, help="first retry delay in seconds")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--no-resize", action="store_true", help="keep the downloaded size (still RGB)")
    parser.add_argument("--usable-out", default=None, help="write the input without the unusable records here")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if arguments.concurrency < 1 or arguments.retries < 0 or arguments.timeout <= 0:
        parser.error("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")
    config = FetchConfig(concurrency=arguments.concurrency, retries=arguments.retries, timeout=arguments.timeout,
                         backoff=arguments.backoff, resize=not arguments.no_resize, image_size=arguments.image_size)
    try:
        report = fetch_images(arguments.input, arguments.out, config, arguments.usable_out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in report.problems[:20]:
        logger.warning("%s", problem)
    for entry in report.dead[:20]:
        logger.warning("dead: %s %s (%s)", entry["name"], entry["url"], entry["reason"])
    print(f"{report.images} images: {report.downloaded} downloaded, {report.existing} already there, "
          f"{len(report.dead)} dead; {len(report.unusable_records)} record(s) unusable; "
          f"report in {Path(arguments.out) / 'fetch_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
