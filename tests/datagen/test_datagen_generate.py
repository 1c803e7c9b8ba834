"""The LLM client against a real local HTTP server: retries, failures, a wrong key, SIGKILL and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textbind.datagen.cluster import run_cluster
from textbind.datagen.config import LLMConfig, load_datagen_config
from textbind.datagen.generate import FatalLLMError, Journal, LLMRequest, run_requests
from textbind.datagen.prompt import build_messages, load_template

ROOT = Path(__file__).resolve().parents[2]


def make_request(index: int, captions: list[str]) -> LLMRequest:
    messages = build_messages(load_template(), [], captions)
    return LLMRequest(f"conv-{index}", {"model": "fault-model", "messages": messages, "max_tokens": 64},
                      {"images": [{"caption": caption} for caption in captions], "cluster": 0})


def fast_config(base_url: str, **changes) -> LLMConfig:
    values = dict(base_url=base_url, model="fault-model", concurrency=4, timeout=0.5, max_retries=2,
                  backoff_initial=0.01, backoff_max=0.05)
    values.update(changes)
    return LLMConfig(**values)


def test_transient_faults_are_retried_and_persistent_ones_recorded(fault_server, tmp_path):
    transient = ["429 times=2", "500 times=1", "malformed times=1", "empty times=2", "hang times=1"]
    persistent = ["429", "500", "malformed", "empty", "hang"]
    requests = [make_request(i, [f"a cat fault={fault}", "a dog"]) for i, fault in enumerate(transient)]
    requests += [make_request(10 + i, [f"a cow fault={fault}"]) for i, fault in enumerate(persistent)]
    requests.append(make_request(99, ["a plain bird"]))
    fault_server.state.hang_seconds = 2.0
    journal = Journal(tmp_path / "journal.jsonl")
    outcome = run_requests(requests, fast_config(fault_server.base_url), journal, api_key="right-key",
                           progress=False)
    journal.close()

    attempts = fault_server.state.attempts
    for request, fault in zip(requests[:5], transient):
        assert request.hash in journal, fault
        assert attempts[request.hash] == int(fault.split("times=")[1]) + 1, fault
    assert requests[-1].hash in journal and attempts[requests[-1].hash] == 1
    failed = {failure["id"]: failure for failure in outcome.failures}
    assert sorted(failed) == sorted(request.id for request in requests[5:10])
    expected_reasons = {"429": "HTTP 429", "500": "HTTP 500", "malformed": "malformed answer",
                        "empty": "empty answer", "hang": "timeout"}
    for request, fault in zip(requests[5:10], persistent):
        assert attempts[request.hash] == 3  # the first try and max_retries=2 retries
        assert failed[request.id]["reason"].startswith(expected_reasons[fault]), failed[request.id]
        assert failed[request.id]["attempts"] == 3 and failed[request.id]["images"]
        assert request.hash not in journal  # a failure is not an answer: the next run asks again
    assert outcome.answered == 6 and outcome.retries == 2 + 1 + 1 + 2 + 1 + 5 * 2

    # The journal holds exactly the answers, durably, and a second pass sends nothing already answered.
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(r.id for r in requests[:5] + requests[-1:])
    before = len(fault_server.state.log)
    journal = Journal(tmp_path / "journal.jsonl")
    run_requests(requests[:5] + requests[-1:], fast_config(fault_server.base_url), journal, "right-key", False)
    journal.close()
    assert len(fault_server.state.log) == before


def test_wrong_key_stops_with_one_clear_error_and_no_retries(fault_server, tmp_path):
    requests = [make_request(i, [f"a horse {i}", "a barn"]) for i in range(30)]
    journal = Journal(tmp_path / "journal.jsonl")
    with pytest.raises(FatalLLMError) as raised:
        run_requests(requests, fast_config(fault_server.base_url, max_retries=5), journal,
                     api_key="sk-wrong-secret-123", progress=False)
    journal.close()
    message = str(raised.value)
    assert "API key" in message and "401" in message and "sk-wrong-secret-123" not in message
    log = fault_server.state.log
    assert 1 <= len(log) <= 4  # only what was in flight (concurrency 4) when the first refusal came back
    assert len(set(entry["hash"] for entry in log)) == len(log)  # none retried
    assert all(entry["authorization"] == "Bearer sk-wrong-secret-123" for entry in log)


def test_journal_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"request_hash": "a", "response": "x"}) + "\n" + '{"request_hash": "b", "resp')
    journal = Journal(path)
    journal.append({"request_hash": "c", "response": "z"})
    journal.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["request_hash"] for line in lines] == ["a", "c"]
    assert "b" not in Journal(path).entries


@pytest.fixture
def clustered(tmp_path, pairs_file, fault_server):
    """An output directory with the pairs embedded and clustered, and the overrides of its generate step."""
    output = tmp_path / "out"
    overrides = [f"run.output_dir={output}", f"pairs.path={pairs_file}", "embed.encoder=hashing",
                 "embed.modality=caption", "cluster.num_clusters=3", "sample.num_conversations=30",
                 "sample.max_image_reuse=10", "run.progress=false", f"llm.base_url={fault_server.base_url}",
                 "llm.model=fault-model", "llm.concurrency=4", "llm.backoff_initial=0.01"]
    run_cluster(load_datagen_config(None, overrides))
    return output, overrides


def generate_command(overrides: list[str], output: Path) -> list[str]:
    replaced = [item for item in overrides if not item.startswith("run.output_dir=")]
    return [sys.executable, "-m", "textbind", "datagen", "generate", f"run.output_dir={output}", *replaced]


def environment(key: str) -> dict:
    return {**os.environ, "LLM_API_KEY": key, "OPENAI_API_KEY": "", "PYTHONPATH": str(ROOT)}


def test_sigkill_then_the_same_command_gives_identical_output_and_asks_nothing_twice(clustered, fault_server):
    output, overrides = clustered
    uninterrupted, killed = output.parent / "uninterrupted", output.parent / "killed"
    shutil.copytree(output, uninterrupted)
    shutil.copytree(output, killed)

    subprocess.run(generate_command(overrides, uninterrupted), env=environment("right-key"), check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    expected = (uninterrupted / "raw.jsonl").read_text()
    assert len(expected.splitlines()) == 30

    fault_server.state.delay = 0.15
    fault_server.state.log.clear()
    process = subprocess.Popen(generate_command(overrides, killed), env=environment("right-key"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal_path = killed / "journal.jsonl"
    deadline = time.time() + 60
    while not (journal_path.is_file() and len(journal_path.read_text().splitlines()) >= 8):
        assert time.time() < deadline and process.poll() is None, "generation ended before the kill"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    answered_at_kill = {json.loads(line)["request_hash"] for line in journal_path.read_text().splitlines()
                        if line.endswith("}")}
    sent_before_kill = set(fault_server.state.hashes())
    assert 8 <= len(answered_at_kill) < 30 and not (killed / "raw.jsonl").exists()

    fault_server.state.delay = 0.0
    log_position = len(fault_server.state.log)
    subprocess.run(generate_command(overrides, killed), env=environment("right-key"), check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    sent_after = fault_server.state.hashes()[log_position:]
    assert not answered_at_kill & set(sent_after)  # nothing answered is asked again
    assert len(sent_after) == len(set(sent_after)) == 30 - len(answered_at_kill)
    resent = sent_before_kill & set(sent_after)  # asked but unanswered when killed: at most one per worker
    assert len(resent) <= 4
    assert (killed / "raw.jsonl").read_text() == expected
    assert (killed / "failed.jsonl").read_text() == ""


def test_wrong_key_from_the_command_line_is_one_clear_error(clustered, fault_server):
    output, overrides = clustered
    result = subprocess.run(generate_command(overrides, output), env=environment("sk-bad-key-777"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "API key" in errors[0]
    assert len(fault_server.state.log) <= 4
    for path in output.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert "sk-bad-key-777" not in path.read_text()
    assert "sk-bad-key-777" not in result.stdout + result.stderr
