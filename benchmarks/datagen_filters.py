"""Post-processing speed: raw transcripts filtered per second, and conversations exported per second.

    python benchmarks/datagen_filters.py [--records 20000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from textbind.datagen.export import ExportConfig, export_records
from textbind.datagen.filters import filter_file

WORDS = "the a red blue green small large circle square triangle on left right top bottom of and with".split()


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))


def transcript(rng: random.Random, captions: list[str], number: int) -> str:
    lines = []
    for turn in range(rng.randint(4, 8)):
        speaker = "Human" if turn % 2 == 0 else "Assistant"
        text = f"{caption(rng)} {number}"
        if turn < len(captions):
            text += f" <img{turn}>{captions[turn]}</img{turn}>"
        lines.append(f"{speaker}: {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--images", type=int, default=200, help="distinct image files the records share")
    arguments = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for index in range(arguments.images):
            Image.new("RGB", (64, 48), (index % 256, 0, 0)).save(root / f"{index}.png")
        with (root / "raw.jsonl").open("w") as file:
            for number in range(arguments.records):
                captions = [caption(rng) for _ in range(rng.randint(2, 5))]
                images = [{"key": str(index), "caption": text, "image": f"{index}.png"}
                          for text, index in zip(captions, rng.sample(range(arguments.images), len(captions)))]
                file.write(json.dumps({"id": str(number), "images": images,
                                       "response": transcript(rng, captions, number)}) + "\n")
        start = time.perf_counter()
        result = filter_file(root / "raw.jsonl", root / "out")
        filter_seconds = time.perf_counter() - start
        start = time.perf_counter()
        stats = export_records(result.kept, root / "export", ExportConfig(), image_root=root)
        export_seconds = time.perf_counter() - start
        start = time.perf_counter()
        export_records(result.kept, root / "export_padded", ExportConfig(resize=True), image_root=root)
        padded_seconds = time.perf_counter() - start
    print(f"filter: {arguments.records} records in {filter_seconds:.2f} s = {arguments.records / filter_seconds:.0f}/s "
          f"({len(result.kept)} kept)")
    print(f"export (copy):   {stats['conversations']} conversations in {export_seconds:.2f} s = "
          f"{stats['conversations'] / export_seconds:.0f}/s (incl. stats.json)")
    print(f"export (512x512 padding of {arguments.images} images): {padded_seconds:.2f} s")


if __name__ == "__main__":
    main()
