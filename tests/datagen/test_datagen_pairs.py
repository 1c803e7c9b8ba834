"""Pair readers (webdataset shards, JSON, JSONL, CSV, TSV), bad input skipped and counted, the embedding cache."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from textbind.data.conversation import DataError
from textbind.datagen.config import PairsConfig, load_datagen_config
from textbind.datagen.embed import run_embed
from textbind.datagen.pairs import ReadReport, list_sources, materialize_images, read_source


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with webdataset.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def read_all(config: PairsConfig) -> tuple[list, ReadReport]:
    report = ReadReport()
    items = [item for source in list_sources(config) for item in read_source(source, report)]
    return items, report


@pytest.fixture
def shards(tmp_path):
    """Two good shards (one with a sample lacking its image, one with an empty caption) and a corrupt one."""
    good = [{"__key__": f"{i:05d}", "png": png((10 * i, 0, 0)), "txt": f"red square {i}".encode(),
             "json": json.dumps({"key": f"{i:05d}", "url": f"http://x/{i}", "group": i // 2}).encode()}
            for i in range(4)]
    write_shard(tmp_path / "00000.tar", good + [{"__key__": "00004", "txt": b"no image here"}])
    write_shard(tmp_path / "00001.tar", [{"__key__": "00005", "png": png((0, 0, 200)), "txt": b"  blue\n square "},
                                         {"__key__": "00006", "png": png((0, 200, 0)), "txt": b"   "}])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    return f"{tmp_path}/{{00000..00002}}.tar"


def test_webdataset_shards_with_bad_samples_and_a_corrupt_shard(shards, tmp_path):
    items, report = read_all(PairsConfig(path=shards))
    assert [item.pair.key for item in items] == ["00000", "00001", "00002", "00003", "00005"]
    assert items[-1].pair.caption == "blue square"  # one line, single spaces
    assert items[0].pair.url == "http://x/0" and items[0].pair.id == "00000/00000"
    assert [item.pair.group for item in items] == ["0", "0", "1", "1", ""]  # from KEY.json; none without it
    assert report.skipped == {"missing_image": 1, "empty_caption": 1, "unreadable_shard": 1}
    assert any("00000.tar sample 00004" in message for message in report.examples)
    assert any("00002.tar" in message and "unreadable shard" in message for message in report.examples)

    paths = materialize_images([item.pair for item in items], tmp_path / "extracted")
    for item in items:
        assert Path(paths[item.pair.id]).read_bytes() == item.image_bytes


def test_record_files_in_every_format_with_bad_records(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png((200, 0, 0)))
    (images / "b.png").write_bytes(png((0, 200, 0)))
    (images / "broken.png").write_bytes(b"not an image")
    records = [
        {"image": "a.png", "caption": "a red thing", "url": "http://x/a", "key": "ka", "group": " album 7 "},
        {"image": "b.png", "caption": "a green thing"},
        {"image": "missing.png", "caption": "gone"},
        {"image": "a.png", "caption": ""},
        {"image": "broken.png", "caption": "a broken file"},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    for name, delimiter in (("pairs.csv", ","), ("pairs.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as stream:
            writer = csv.DictWriter(stream, ["image", "caption", "url", "key", "group"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(records)
    for name in ("pairs.json", "pairs.jsonl", "pairs.csv", "pairs.tsv"):
        items, report = read_all(PairsConfig(path=str(tmp_path / name), image_dir=str(images)))
        assert [item.pair.caption for item in items] == ["a red thing", "a green thing", "a broken file"], name
        assert items[0].pair.key == "ka" and items[0].pair.url == "http://x/a"
        assert [item.pair.group for item in items] == ["album 7", "", ""], name
        assert items[1].pair.image == str(images / "b.png")
        expected = {"missing_image": 1, "empty_caption": 1}
        if name == "pairs.jsonl":
            expected["bad_record"] = 1
        assert report.skipped == expected, name
        assert any("missing.png" in message for message in report.examples)

    with pytest.raises(DataError, match="pairs.txt"):
        list_sources(PairsConfig(path=str(tmp_path / "pairs.txt")))
    (tmp_path / "bad.csv").write_text("picture,text\nx.png,hello\n")
    with pytest.raises(DataError, match="'image' and 'caption'"):
        read_all(PairsConfig(path=str(tmp_path / "bad.csv")))


def test_blip2_embedding_is_cached_per_source_and_skips_unreadable_images(shards, tmp_path, tiny_paths):
    # A fourth shard holds an image member that does not decode.
    write_shard(tmp_path / "00003.tar", [{"__key__": "00007", "png": b"garbage", "txt": b"broken"},
                                         {"__key__": "00008", "png": png((90, 90, 0)), "txt": b"olive square"}])
    overrides = [f"run.output_dir={tmp_path / 'out'}", f"pairs.path={tmp_path}/{{00000..00003}}.tar",
                 f"embed.model_path={tiny_paths['vision_model']}", f"embed.processor_path={tiny_paths['processor']}",
                 "embed.batch_size=2", "run.progress=false"]
    config = load_datagen_config(None, overrides)
    first = run_embed(config)
    assert [len(result.pairs) for result in first] == [4, 1, 0, 1]
    vectors = np.concatenate([result.vectors for result in first if len(result.pairs)])
    assert vectors.shape[0] == 6 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())["embed"]
    assert report["usable"] == 6 and report["sources_embedded"] == 4
    assert report["skipped"] == {"missing_image": 1, "empty_caption": 1, "unreadable_shard": 1,
                                 "unreadable_image": 1}

    cache_files = sorted((tmp_path / "out" / "embeddings").iterdir())
    stamps = {path: path.stat().st_mtime_ns for path in cache_files}
    again = run_embed(config)
    assert all(result.cached for result in again)
    assert {path: path.stat().st_mtime_ns for path in cache_files} == stamps  # nothing embedded twice
    assert all(np.array_equal(a.vectors, b.vectors) for a, b in zip(first, again))
    report = json.loads((tmp_path / "out" / "report.json").read_text())["embed"]
    assert report["sources_embedded"] == 0 and report["skipped_total"] == 4  # the counts survive the cache

    # Changing one shard re-embeds that shard only.
    write_shard(tmp_path / "00001.tar", [{"__key__": "00005", "png": png((0, 0, 90)), "txt": b"navy square"}])
    os.utime(tmp_path / "00001.tar", ns=(1, 1))
    third = run_embed(config)
    assert [result.cached for result in third] == [True, False, True, True]
    assert third[1].pairs[0].caption == "navy square"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP directory (model, image processor, byte-level BPE tokenizer), built offline."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from textbind.testing.tiny_sdxl import write_clip_tokenizer_files

    directory = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(directory / "tokenizer"),
                                              model_max_length=32, local_files_only=True)
    tokenizer.save_pretrained(directory)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("modality", ["image", "caption"])
def test_clip_embeds_images_or_captions(tmp_path, pairs_file, tiny_clip, modality):
    config = load_datagen_config(None, [f"run.output_dir={tmp_path / 'out'}", f"pairs.path={pairs_file}",
                                        "embed.encoder=clip", f"embed.model_path={tiny_clip}",
                                        f"embed.modality={modality}", "run.progress=false"])
    (result,) = run_embed(config)
    assert result.vectors.shape == (24, 16)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    # Distinct inputs get distinct vectors (the encoder is not blind), identical inputs identical ones.
    inputs = [Path(pair.image).read_bytes() if modality == "image" else pair.caption for pair in result.pairs]
    vectors = {tuple(np.round(vector, 4)) for vector in result.vectors}
    assert len(vectors) == len(set(inputs)) == (15 if modality == "image" else 24)
    (again,) = run_embed(config)
    assert again.cached and np.array_equal(again.vectors, result.vectors)


def test_the_shipped_configs_load():
    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/datagen/*.yaml")):
        config = load_datagen_config(path)
        assert config.embed.encoder == "blip2" and config.pairs.path and config.llm.base_url, path
    with pytest.raises(Exception, match="embed.modality=caption"):
        load_datagen_config(None, ["embed.modality=caption"])
