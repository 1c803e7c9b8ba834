"""Time to the first batch when a stage-1 stream resumes late in its data: seeking vs replaying.

    python benchmarks/resume_seek.py [--shards 40 --samples-per-shard 500 --consumed 0.9]

Writes toy webdataset shards, puts a reader's cursor at `--consumed` of a pass, and measures the
time until the resumed reader yields its next raw item: by seeking (what `TrainStream` does: the
cursor names the shard and the sample position) and by replaying every raw item since the start of
the pass (what a cursor that only counts items needs; the cost grows with the step resumed at).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from textbind.data.streams import Stage1Source
from textbind.toy.datagen import write_stage1_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--consumed", type=float, default=0.9, help="share of the pass read before the resume")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        total = args.shards * args.samples_per_shard
        pattern = write_stage1_shards(Path(directory), total, args.samples_per_shard, seed=0)
        source = Stage1Source(pattern)
        consumed = int(total * args.consumed)
        started = time.perf_counter()
        items = source.raw_items(0, 0, 1, seed=0)
        for _ in range(consumed - 1):
            next(items)
        _, token = next(items)
        replay_seconds = time.perf_counter() - started  # what a count-only cursor costs at this point
        started = time.perf_counter()
        next(source.raw_items(0, 0, 1, seed=0, start=token))
        seek_seconds = time.perf_counter() - started
        result = {"samples": total, "resumed_after": consumed, "replay_seconds": round(replay_seconds, 3),
                  "seek_seconds": round(seek_seconds, 4), "speedup": round(replay_seconds / seek_seconds, 1)}
        print(f"resume after {consumed} of {total} samples: replay {replay_seconds:.2f} s, seek {seek_seconds:.4f} s")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
