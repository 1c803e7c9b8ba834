"""Tests of the toy LLM: the scripted conversation writer, its OpenAI-compatible server (a real process driven
by the official `openai` client), its faults against the data engine's filters, and the toy image-caption pairs."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from toy.test_toy_datagen import assert_image_shows

from textbind.datagen.filters import filter_records
from textbind.toy import dialogue
from textbind.toy.datagen import STAGE1_STREAM, stage2_exchange_kinds, stream_rng, write_pairs
from textbind.toy.llm_server import ServerSettings, count_tokens, http_fault, parse_faults
from textbind.toy.world import caption, parse_caption, random_scene
from textbind.toy.writer import (
    DUPLICATE_TRANSCRIPT,
    FAULT_KINDS,
    PromptError,
    answer_request,
    images_prompt,
    read_captions,
    request_hash,
    write_transcript,
)

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-toy-test-key"
SPAN = re.compile(r"<img(\d+)>(.*?)</img\1>")
# The filter rule of the data engine that each fault exists for (an unclosed tag is cleaned, not rejected).
RULE_OF_FAULT = {
    "repeated_tag": "repeated_image_tag",
    "tag_beyond_images": "image_index_out_of_range",
    "no_image": "no_image",
    "duplicate": "duplicate_response",
    "no_human": "no_human_turn",
    "roles_not_alternating": "roles_not_alternating",
    "too_short": "too_few_utterances",
    "unclosed_tag": None,
    "misquoted_caption": "caption_mismatch",
    "refusal": "refusal",
}
GENERIC_CAPTIONS = [
    "A Dog, running on the beach!",
    "Ünïcödé café at night",
    "two <b>bold</b> cats & a 'quoted' mouse",
    "x",
    "a photo of a small red circle drawn by a child",
]


@contextmanager
def toy_server(tmp_path: Path, *arguments: str) -> Iterator[str]:
    """`textbind toy llm-server --port 0` in its own process; yields its base URL (read from what it prints)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "textbind", "toy", "llm-server", "--port", "0", "--port-file", str(port_file),
         *arguments],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match is not None, (line, process.stderr.read() if process.poll() is not None else "")  # type: ignore
        assert port_file.read_text().strip() == match.group(2) != "0"
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=20)


def client(base_url: str, api_key: str = API_KEY, timeout: float = 20.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)


def messages_for(captions: list[str], note: str = "") -> list[dict]:
    """A prompt as the data engine writes it: an in-context example with other images first."""
    example = "Human: Look <img0>a large blue square</img0>\nAssistant: A square.\nImages:\n<img0>an example</img0>"
    return [
        {"role": "system", "content": "You write conversations."},
        {"role": "user", "content": f"Example:\n{example}\n\nNow write one {note}.\n{images_prompt(captions)}"},
    ]


def families(count: int, seed: int) -> list[list[str]]:
    """Caption groups like the engine samples from one cluster of toy pairs: 2-5 scenes of one family of edits."""
    rng = random.Random(seed)
    groups = []
    for _ in range(count):
        scenes = [random_scene(rng)]
        for _ in range(rng.choice([1, 2, 3, 4])):
            scenes.append(dialogue.random_edit(rng, scenes[-1])[1])
        if rng.random() < 0.5:  # and a stranger from the same cluster
            scenes.append(random_scene(rng))
        rng.shuffle(scenes)
        groups.append([caption(scene) for scene in scenes[:5]])
    return groups


def utterances(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in text.split("\n")]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The server over HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("toy-llm")
    log = directory / "requests.jsonl"
    with toy_server(directory, "--api-key", API_KEY, "--request-log", str(log), "--seed", "3") as base_url:
        yield base_url, log


def test_chat_completions_over_http_are_the_writers_answers(server) -> None:
    base_url, log = server
    toy = client(base_url)
    assert [model.id for model in toy.models.list().data] == ["toy-writer"]
    captions = ["a small red circle", "a small green circle", "a large green circle"]
    messages = messages_for(captions)
    first = toy.chat.completions.create(model="toy-writer", messages=messages, seed=11, temperature=0.8)
    again = toy.chat.completions.create(model="toy-writer", messages=messages, seed=11, temperature=0.8)
    other_seed = toy.chat.completions.create(model="toy-writer", messages=messages, seed=12)

    content = first.choices[0].message.content
    assert first.object == "chat.completion" and first.model == "toy-writer"
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "stop"
    # The answer is a pure function of the request (model, messages, seed) and the server's seed.
    assert content == again.choices[0].message.content
    assert content == answer_request("toy-writer", messages, 11, writer_seed=3).text
    assert other_seed.choices[0].message.content == answer_request("toy-writer", messages, 12, writer_seed=3).text
    assert first.usage.completion_tokens == count_tokens(content) > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens == sum(count_tokens(message["content"]) for message in messages)

    # One log line per request: the same request twice shows as attempts 1 and 2; the key is never logged.
    key = request_hash("toy-writer", messages, 11)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(entry["attempt"], entry["status"]) for entry in entries if entry["request"] == key] == [(1, 200), (2, 200)]
    assert API_KEY not in log.read_text()


def test_wrong_or_missing_api_key_is_a_401(server) -> None:
    base_url, log = server
    with pytest.raises(openai.AuthenticationError):
        client(base_url, api_key="sk-wrong").chat.completions.create(
            model="toy-writer", messages=messages_for(["a small red circle"]))
    with pytest.raises(openai.AuthenticationError):
        client(base_url, api_key="sk-wrong").models.list()
    response = httpx.post(f"{base_url}/chat/completions", json={"model": "toy-writer", "messages": []})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in log.read_text()


def test_a_prompt_without_images_is_a_400(server) -> None:
    base_url, _ = server
    with pytest.raises(openai.BadRequestError, match="Images:"):
        client(base_url).chat.completions.create(
            model="toy-writer", messages=[{"role": "user", "content": "Write a poem."}])


def test_injected_http_faults(tmp_path: Path) -> None:
    """--fail-first N fails every request's first N attempts; --faults fails chosen requests on every attempt."""
    shares = "429=0.15,500=0.15,malformed=0.15,empty=0.15,hang=0.15"
    settings = ServerSettings(seed=0, fail_first=2, faults=parse_faults(shares))
    by_fault: dict[str | None, list[dict]] = {}
    for index in range(200):  # one request of each kind, found by the server's own (deterministic) rule
        messages = messages_for(["a small red circle", "a large red circle"], note=f"#{index}")
        by_fault.setdefault(http_fault(request_hash("toy-writer", messages, None), 3, settings), messages)
    assert set(by_fault) == {None, "429", "500", "malformed", "empty", "hang"}

    log = tmp_path / "requests.jsonl"
    arguments = ["--fail-first", "2", "--faults", shares, "--hang-seconds", "30", "--request-log", str(log)]
    with toy_server(tmp_path, *arguments) as base_url:
        toy = client(base_url, api_key="anything")  # no --api-key: any key goes

        def ask(messages: list[dict], timeout: float = 20.0):
            return client(base_url, "anything", timeout).chat.completions.create(model="toy-writer", messages=messages)

        # A request without a fault of its own: two failures (500 or 429), then the answer.
        for _ in range(2):
            with pytest.raises((openai.InternalServerError, openai.RateLimitError)):
                ask(by_fault[None])
        assert ask(by_fault[None]).choices[0].message.content
        for _ in range(3):  # faults of the request itself come back on every attempt
            with pytest.raises(openai.RateLimitError):
                ask(by_fault["429"])
            with pytest.raises(openai.InternalServerError):
                ask(by_fault["500"])
            with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
                ask(by_fault["malformed"])
            assert ask(by_fault["empty"]).choices == []
        with pytest.raises(openai.APITimeoutError):
            ask(by_fault["hang"], timeout=1.0)
        assert toy.models.list().data
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    statuses = collections.defaultdict(list)
    for entry in entries:
        statuses[entry["request"]].append((entry["attempt"], entry["status"]))
    key = request_hash("toy-writer", by_fault[None], None)
    assert [status for _, status in statuses[key]][2:] == [200] and all(
        status in (429, 500) for _, status in statuses[key][:2])
    assert statuses[request_hash("toy-writer", by_fault["429"], None)] == [(1, 429), (2, 429), (3, 429)]


def test_fault_syntax_errors_are_clear() -> None:
    assert parse_faults("429=0.1, hang=0.05") == {"429": 0.1, "hang": 0.05}
    for bad in ("timeout=0.1", "429", "429=lots", "500=1.5", "429=0.6,500=0.6"):
        with pytest.raises(ValueError, match="--faults"):
            parse_faults(bad)


# ---------------------------------------------------------------------------------------------
# The prompt contract and the writer


def test_captions_come_from_the_last_images_section() -> None:
    messages = messages_for(["a small red circle", "two dogs"])
    assert read_captions(messages) == ["a small red circle", "two dogs"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Write.\nImages:\n<img0>a cat</img0>\n"}]}]
    assert read_captions(parts) == ["a cat"]
    for content in ("Write a poem.", "Images:\nno tags here", "Images:\n<img1>starts at one</img1>"):
        with pytest.raises(PromptError):
            read_captions([{"role": "user", "content": content}])


def check_well_formed(text: str, captions: list[str]) -> None:
    """What every good transcript is: alternating one-line utterances from Human, every caption verbatim, once."""
    lines = utterances(text)
    assert len(lines) >= 3 and [role for role, _ in lines] == ["Human", "Assistant"] * (len(lines) // 2)
    spans = SPAN.findall(text)
    assert spans and len({index for index, _ in spans}) == len(spans)
    assert all(quoted == captions[int(index)] for index, quoted in spans)
    assert text.count("<img") == len(spans) and not re.search(r"sorry|as an ai", text, re.IGNORECASE)


def test_toy_transcripts_are_true_to_their_images() -> None:
    """Draw requests get the requested image, edits give an image one edit from the latest, answers are true."""
    edits = draws = 0
    for index, captions in enumerate(families(300, seed=1)):
        transcript = write_transcript(captions, random.Random(index))
        check_well_formed(transcript.text, captions)
        latest = None
        lines = utterances(transcript.text)
        for position, (role, text) in enumerate(lines):
            shown = [parse_caption(quoted) for _, quoted in SPAN.findall(text)]
            if role == "Assistant" and shown:
                request = lines[position - 1][1]
                (scene,) = shown
                draw_openings = ("Draw a ", "Can you draw a ", "Please draw a ", "Show me a ", "Generate an image",
                                 "I would like a picture", "Make a picture", "Paint a ")
                if request.startswith(draw_openings):
                    assert caption(scene) in request, (request, text)
                    draws += 1
                else:  # an edit of the latest image, drawn or shown
                    assert latest is not None and dialogue.edits_between(latest, scene), (transcript.text, request)
                    edits += 1
            if shown:
                latest = shown[-1]
            if role == "Assistant" and text.startswith(("The image shows", "I see a", "There is a ")):
                assert dialogue.describe_answer  # descriptions quote the scene shown just before
                assert caption(latest) in text  # type: ignore[arg-type]
    assert draws > 100 and edits > 100


def test_other_captions_are_quoted_verbatim(server) -> None:
    for index in range(100):
        captions = random.Random(index).sample(GENERIC_CAPTIONS, k=1 + index % len(GENERIC_CAPTIONS))
        transcript = write_transcript(captions, random.Random(index))
        check_well_formed(transcript.text, captions)
        assert transcript.kinds == ("generic",)
    base_url, _ = server
    answer = client(base_url).chat.completions.create(model="toy-writer", messages=messages_for(GENERIC_CAPTIONS),
                                                      seed=0)
    check_well_formed(answer.choices[0].message.content, GENERIC_CAPTIONS)


@pytest.mark.parametrize("faulty_share", [0.1, 0.5])
def test_faults_come_at_their_rate_and_each_meets_its_filter_rule(faulty_share: float) -> None:
    """Every fault class at faulty_share / 10 of the answers; the engine's filters reject each by its own rule."""
    groups = families(600, seed=2) + [random.Random(index).sample(GENERIC_CAPTIONS, k=3) for index in range(150)]
    records, faults = [], []
    for index, captions in enumerate(groups):
        messages = messages_for(captions, note=f"#{index}")
        transcript = answer_request("toy-writer", messages, request_seed=index, faulty_share=faulty_share)
        faults.append(transcript.fault)
        images = [{"key": f"{index}-{k}", "caption": text, "image": f"{index}-{k}.png"}
                  for k, text in enumerate(captions)]
        records.append({"id": f"conv-{index}", "images": images, "response": transcript.text})

    counts = collections.Counter(faults)
    expected = len(groups) * faulty_share / len(FAULT_KINDS)
    for kind in FAULT_KINDS:  # binomial: within 4.5 standard deviations
        assert abs(counts[kind] - expected) <= 4.5 * math.sqrt(expected) + 1, (kind, counts)
    assert abs(sum(counts[kind] for kind in FAULT_KINDS) - len(groups) * faulty_share) <= 4.5 * math.sqrt(
        len(groups) * faulty_share * (1 - faulty_share))

    result = filter_records(records)
    verdicts = {record["id"]: record.get("rejected_by") for record in result.rejected}
    kept = {record["id"]: record for record in result.kept}
    seen, first_duplicate = set(), True
    for record, fault in zip(records, faults):
        rule = RULE_OF_FAULT.get(fault) if fault else None
        if fault not in ("repeated_tag", "tag_beyond_images", "no_image"):
            # The filters' duplicate rule runs fourth: any response seen before meets it first.
            if record["response"].strip() in seen:
                rule = "duplicate_response"
            elif fault == "duplicate":
                rule = "caption_mismatch" if first_duplicate else rule  # the first canned answer is not a copy yet
                first_duplicate = False
            seen.add(record["response"].strip())
        assert verdicts.get(record["id"]) == rule, (fault, verdicts.get(record["id"]), record["response"])
        if fault == "unclosed_tag":  # cleaned, not rejected: the cleaned turns hold no stray tag
            contents = " ".join(turn["content"] for turn in kept[record["id"]]["turns"])
            assert len(re.findall(r"</?img\d+>", contents)) == 2 * len(SPAN.findall(contents))
    good = [fault is None for fault in faults]
    assert sum(verdicts.get(record["id"]) is None for record, ok in zip(records, good) if ok) >= 0.98 * sum(good)
    assert result.report["counts"]["unclosed_image_tag"] == counts["unclosed_tag"]


def test_duplicates_repeat_an_answer_of_another_request() -> None:
    one = write_transcript(["a small red circle", "a large red circle"], random.Random(0), fault="duplicate")
    other = write_transcript(["two dogs", "a cat"], random.Random(1), fault="duplicate")
    assert one.text == other.text == DUPLICATE_TRANSCRIPT


def test_conversation_kinds_match_or_beat_the_synthetic_stage2_mix(capsys) -> None:
    """Per conversation, the writer (on family-like image groups) draws and edits at least as often as the
    synthetic stage-2 writer."""
    def per_conversation(kinds: list[tuple[str, ...]]) -> dict[str, float]:
        counts = collections.Counter(kind for conversation in kinds for kind in conversation)
        return {kind: round(counts[kind] / len(kinds), 3) for kind in dialogue.EXCHANGE_KINDS}

    writer = per_conversation([write_transcript(captions, random.Random(index)).kinds
                               for index, captions in enumerate(families(1000, seed=4))])
    synthetic = per_conversation(stage2_exchange_kinds(1000, seed=0))
    with capsys.disabled():
        print(f"\nexchanges per conversation\n  toy writer: {writer}\n  synthetic:  {synthetic}")
    assert writer["draw"] >= synthetic["draw"] and writer["edit"] + writer["redraw"] >= synthetic["edit"]
    # Comparisons need two images outside the chains of edits, rare in a family; the rest all occur.
    assert all(writer[kind] > 0 for kind in dialogue.EXCHANGE_KINDS if kind != "compare")


# ---------------------------------------------------------------------------------------------
# Toy image-caption pairs


def test_pairs_are_families_of_edits_on_their_own_stream(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "a", 60, seed=0)
    again = write_pairs(tmp_path / "b", 60, seed=0)
    assert path.read_text() == again.read_text()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["key"] for record in records] == [f"{index:09d}" for index in range(60)]
    for record in records[:20]:
        with Image.open(path.parent / record["image"]) as image:
            assert_image_shows(image, record["caption"])
    scenes = [parse_caption(record["caption"]) for record in records]
    assert all(scene is not None for scene in scenes)
    one_edit_apart = sum(bool(dialogue.edits_between(before, after)) for before, after in zip(scenes, scenes[1:]))
    assert one_edit_apart >= 0.5 * len(scenes)
    # Each family is one group (numbered in order), 2-5 pairs long, each scene one edit from the one before.
    groups = [record["group"] for record in records]
    assert groups[0] == "family-000001" and groups == sorted(groups)
    for group in dict.fromkeys(groups):
        members = [scene for scene, name in zip(scenes, groups, strict=True) if name == group]
        assert 1 <= len(members) <= 5 and len(set(members)) == len(members)
        assert all(dialogue.edits_between(before, after) for before, after in zip(members, members[1:])), group
    assert sum(groups.count(group) >= 2 for group in set(groups)) >= 0.9 * len(set(groups))
    # Not the stage-1 stream: the same seed draws other scenes.
    stage1 = stream_rng(0, STAGE1_STREAM)
    assert records[0]["caption"] != caption(random_scene(stage1))
