"""Training streams: disjoint across ranks and workers, exactly resumable, corrupt samples skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from textbind.data.conversation import DataError, load_conversations
from textbind.data.sequence import ConversationEncoder
from textbind.data.streams import (
    Stage1Source,
    Stage2Source,
    StreamLoader,
    StreamPosition,
    TrainStream,
    caption_conversation,
)
from textbind.toy.datagen import write_stage1_shards, write_stage2_json


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return write_stage1_shards(out, num_samples=48, samples_per_shard=6, seed=0)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    write_stage2_json(out / "train.json", out / "images", num_conversations=24, seed=0)
    return load_conversations(out / "train.json").conversations


def make_stream(bundle, source, rank=0, world=1, workers=0, position=None, batch=2):
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, 256)
    return TrainStream(source, encoder, bundle.image_processor, micro_batch_size=batch, seed=5, rank=rank,
                       world_size=world, num_workers=workers, position=position)


def take(loader, count):
    return [next(loader) for _ in range(count)]


@pytest.mark.parametrize("stage", [1, 2])
def test_ranks_and_workers_see_disjoint_data(bundle, shards, conversations, stage):
    source = Stage1Source(shards) if stage == 1 else Stage2Source([conversations])
    total = 48 if stage == 1 else 24
    seen = []
    for rank in range(2):
        loader = StreamLoader(make_stream(bundle, source, rank=rank, world=2, workers=2), num_workers=2)
        # one pass: each of the 4 readers holds total/4 items, i.e. total/8 batches of 2
        seen.append([s for b in take(loader, total // 4) for s in b.sources])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == total


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_exactly(bundle, shards, workers):
    source = Stage1Source(shards)
    loader = StreamLoader(make_stream(bundle, source, workers=workers), num_workers=workers)
    uninterrupted = [b.sources for b in take(loader, 9)]
    first = StreamLoader(make_stream(bundle, source, workers=workers), num_workers=workers)
    take(first, 5)
    saved = StreamPosition.from_dict(json.loads(json.dumps(first.position.to_dict())))
    resumed = StreamLoader(make_stream(bundle, source, workers=workers, position=saved), num_workers=workers)
    assert [b.sources for b in take(resumed, 4)] == uninterrupted[5:]
    # passes continue past the end of the data with a new order
    assert len({s for b in uninterrupted for s in b}) == min(18, 48)


def test_position_with_other_worker_count_is_refused(bundle, shards):
    with pytest.raises(ValueError, match="resume with the same number of workers"):
        make_stream(bundle, Stage1Source(shards), workers=2, position=StreamPosition.start(3))


def test_corrupt_samples_are_skipped_and_counted(bundle, tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(good, format="PNG")
    with wds.TarWriter(str(tmp_path / "00000.tar")) as writer:
        for index in range(6):
            sample = {"__key__": f"{index:05d}", "png": good.getvalue(), "txt": f"caption {index}",
                      "json": json.dumps({"key": f"{index:05d}"})}
            if index == 1:
                sample["png"] = b"\x89PNG broken"
            if index == 3:
                del sample["txt"]
            writer.write(sample)
    source = Stage1Source(str(tmp_path / "00000.tar"))
    rejected = []
    for item, _ in source.raw_items(0, 0, 1, seed=5):  # one whole pass: 6 samples, 2 unusable
        try:
            Stage1Source.to_conversation(item, 5)
        except DataError:
            rejected.append(item["__key__"])
    assert sorted(rejected) == ["00001", "00003"]
    # 8 good samples need all of pass 0 and part of pass 1: both bad samples of pass 0 were skipped
    loader = StreamLoader(make_stream(bundle, source, batch=2), 0)
    batches = take(loader, 4)
    assert all(batch.num_samples == 2 for batch in batches)
    assert loader.position.skipped == sum(batch.num_skipped for batch in batches) >= 2
    assert all("00001" not in s and "00003" not in s for batch in batches for s in batch.sources)


def test_caption_conversation_is_deterministic():
    first = caption_conversation("a cat", "x.png", "00017", seed=3)
    again = caption_conversation("a cat", "x.png", "00017", seed=3)
    assert first.turns[0].content == again.turns[0].content and "<image>" in first.turns[0].content
    contents = {caption_conversation("a cat", "x.png", f"{k:05d}", seed=3).turns[0].content for k in range(60)}
    assert len(contents) > 10  # instructions and image placement vary across samples


def test_mixture_weights(conversations):
    source = Stage2Source([conversations[:10], conversations[10:]], [2.0, 0.5])
    assert source.count() == 2 * 10 + 7
    with pytest.raises(ValueError, match="weight"):
        Stage2Source([conversations], [1.0, 2.0])


def test_resume_seeks_to_the_cursor_without_reading_what_came_before(bundle, tmp_path):
    """Shards a resumed reader already finished are never opened again: damaging them changes nothing."""
    import shutil

    pattern = write_stage1_shards(tmp_path / "shards", num_samples=48, samples_per_shard=6, seed=0)
    source = Stage1Source(pattern)
    first = StreamLoader(make_stream(bundle, source), num_workers=0)
    take(first, 14)  # 28 of the 48 samples: the reader is in its fifth shard
    saved = StreamPosition.from_dict(json.loads(json.dumps(first.position.to_dict())))
    expected = [list(b.sources) for b in take(first, 3)]
    cursor = saved.cursors[0]
    assert cursor["pass"] == 0 and cursor["token"][0] == 4
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "shards", copy)
    copied = Stage1Source(pattern.replace(str(tmp_path / "shards"), str(copy)))
    for finished in copied.shard_order(0, seed=5)[:4]:
        Path(finished).write_bytes(b"overwritten: not a tar any more")
    resumed = StreamLoader(make_stream(bundle, copied, position=saved), num_workers=0)
    assert [[s.replace(str(copy), str(tmp_path / "shards")) for s in b.sources] for b in take(resumed, 3)] == expected


def test_remote_shards_through_webdatasets_opener(bundle, shards, tmp_path):
    """`pipe:` commands and http:// URLs read the same samples in the same order as the local files, and resume."""
    import functools
    import http.server
    import threading

    local = Stage1Source(shards)
    directory = Path(local.shards[0]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        names = ",".join(Path(shard).name for shard in local.shards)
        url = f"http://127.0.0.1:{server.server_address[1]}/{{{names}}}"
        piped = ",".join(f"pipe:cat {shard}" for shard in local.shards)
        expected = [list(b.sources) for b in take(StreamLoader(make_stream(bundle, local), 0), 6)]

        def keys(sources):
            return [[s.split(" sample ")[-1] for s in batch] for batch in sources]

        for pattern in (url, piped):
            remote = Stage1Source(pattern)
            assert len(remote.shards) == len(local.shards)
            loader = StreamLoader(make_stream(bundle, remote), 0)
            got = [list(b.sources) for b in take(loader, 3)]
            saved = StreamPosition.from_dict(json.loads(json.dumps(loader.position.to_dict())))
            resumed = StreamLoader(make_stream(bundle, remote, position=saved), 0)
            got += [list(b.sources) for b in take(resumed, 3)]
            assert keys(got) == keys(expected), pattern
        with pytest.raises(DataError, match="samples_per_epoch"):
            Stage1Source(url).count()
    finally:
        server.shutdown()
