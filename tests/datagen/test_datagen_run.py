"""The whole engine end to end: scripts/generate_data.sh against the real toy LLM server over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from textbind.data.conversation import load_conversations
from textbind.toy.datagen import write_pairs
from textbind.toy.dialogue import edits_between
from textbind.toy.world import parse_caption

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def toy_server(tmp_path):
    """`textbind toy llm-server` in its own process on a free port, with a request log."""
    port_file, log = tmp_path / "port", tmp_path / "requests.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "textbind", "toy", "llm-server", "--port", "0", "--port-file", str(port_file),
         "--request-log", str(log)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not port_file.is_file():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "the toy LLM server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_file.read_text().strip()}/v1", log
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=20)


def logged_requests(log: Path) -> list[str]:
    return [json.loads(line)["request"] for line in log.read_text().splitlines()] if log.is_file() else []


def test_generate_data_script_end_to_end_and_rerun_resumes(tmp_path, toy_server, tiny_paths):
    base_url, log = toy_server
    pairs = write_pairs(tmp_path / "pairs", 300, seed=0)
    output = tmp_path / "generated"
    environment = {
        **os.environ, "PYTHONPATH": str(ROOT), "CONFIG": "configs/datagen/toy.yaml", "PAIRS": str(pairs),
        "OUTPUT_DIR": str(output), "LLM_BASE_URL": base_url, "LLM_MODEL": "toy-writer",
        "NUM_CONVERSATIONS": "150", "NUM_CLUSTERS": "12", "CONCURRENCY": "8", "SEED": "0",
        "LLM_API_KEY": "sk-local-toy-key",
    }
    command = ["bash", "scripts/generate_data.sh", f"embed.model_path={tiny_paths['vision_model']}",
               f"embed.processor_path={tiny_paths['processor']}", "export.valid_size=10", "export.test_size=10",
               "run.progress=false"]
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    seconds = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((output / "report.json").read_text())
    assert set(report) >= {"config", "embed", "cluster", "sample", "generate", "filter", "export", "seconds"}
    assert report["embed"]["usable"] == 300 and report["cluster"]["num_clusters"] == 12
    assert report["sample"]["planned"] == 150 and report["generate"]["raw_records"] == 150
    assert report["generate"]["failed"] == 0 and (output / "failed.jsonl").read_text() == ""
    raw = (output / "raw.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in raw] == [f"conv-{i:07d}" for i in range(150)]
    assert "sk-local-toy-key" not in "".join(path.read_text() for path in output.glob("*.json*"))

    # The toy writer's faulty transcripts are rejected, each with its rule; the rest is kept.
    filter_report = report["filter"]
    assert filter_report["input"] == 150 and 0 < filter_report["rejected"] < 150
    assert filter_report["kept"] + filter_report["rejected"] == 150
    rejected = [json.loads(line) for line in (output / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == filter_report["rejected"] and all(record.get("rejected_by") for record in rejected)

    splits = {}
    for name in ("train", "valid", "test"):
        loaded = load_conversations(str(output / f"{name}.json"), on_bad_record="error")
        assert loaded.errors == [], loaded.errors[:3]
        splits[name] = loaded.conversations
    assert len(splits["valid"]) == 10 and len(splits["test"]) == 10
    assert sum(len(group) for group in splits.values()) == report["export"]["conversations"] == filter_report["kept"]
    roles = Counter(turn.role for conversation in splits["train"] for turn in conversation.turns if turn.image_list)
    assert roles["user"] > 0 and roles["assistant"] > 0  # images go both ways
    stats = json.loads((output / "stats.json").read_text())
    assert stats["conversations"] == filter_report["kept"]

    # The same command again: nothing is asked twice, and every output file comes out the same.
    first_requests = logged_requests(log)
    assert len(first_requests) == len(set(first_requests)) == 150
    before = {name: (output / name).read_bytes() for name in ("raw.jsonl", "filtered.jsonl", "train.json",
                                                              "valid.json", "test.json", "clusters.json")}
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert logged_requests(log) == first_requests
    assert {name: (output / name).read_bytes() for name in before} == before
    rerun = json.loads((output / "report.json").read_text())
    assert rerun["embed"]["sources_embedded"] == 0 and rerun["generate"]["answered_before"] == 150
    print(f"end-to-end run: {seconds:.1f} s")


def test_conversations_from_the_pairs_own_groups(tmp_path, toy_server):
    """`cluster.method=group` on the toy pairs (families: a scene and a walk of edits from it, as one album's
    photos): every conversation's images come from one family, and the toy LLM chains their edits."""
    base_url, _ = toy_server
    pairs = write_pairs(tmp_path / "pairs", 200, seed=0)
    family_of = {record["key"]: record["group"] for record in map(json.loads, pairs.read_text().splitlines())}
    families = set(family_of.values())
    output = tmp_path / "grouped"
    command = [sys.executable, "-m", "textbind", "datagen", "run", "--config", "configs/datagen/toy.yaml",
               f"pairs.path={pairs}", f"run.output_dir={output}", "run.progress=false", f"llm.base_url={base_url}",
               "llm.model=toy-writer", "sample.num_conversations=80", "cluster.method=group",
               "embed.encoder=hashing", "embed.modality=caption", "cluster.dedup=false", "export.valid_size=0",
               "export.test_size=0"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((output / "report.json").read_text())
    assert report["cluster"]["method"] == "group" and report["cluster"]["num_clusters"] == len(families)
    assert report["cluster"]["ungrouped"] == 0
    raw = [json.loads(line) for line in (output / "raw.jsonl").read_text().splitlines()]
    assert len(raw) == 80
    for record in raw:
        groups = {family_of[image["key"]] for image in record["images"]}
        assert len(groups) == 1, record["id"]
    # Edits between consecutive drawn images: one family's images are one edit apart, so most conversations
    # hold one or more (measured on this seed: 1.95 per kept conversation).
    edits = kept = 0
    for conversation in json.loads((output / "train.json").read_text()):
        kept += 1
        scenes = [parse_caption(caption) for turn in conversation["conversation"]
                  for caption in turn.get("caption_list") or []]
        edits += sum(bool(edits_between(before, after)) for before, after in zip(scenes, scenes[1:]))
    print(f"grouped run: {edits / kept:.2f} edits per kept conversation ({kept} kept)")
    assert kept > 60 and edits / kept > 1.2, (edits, kept)
