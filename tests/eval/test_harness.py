"""The harness: resumable runs (killed and restarted), bad input, the command end to end, report.html in Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from textbind.data.conversation import DataError, Turn
from textbind.eval.cli import main as eval_main
from textbind.eval.config import EvalConfig
from textbind.eval.harness import PREDICTIONS_FILE, read_predictions, run_benchmark
from textbind.eval.report import write_html_report
from textbind.eval.textbind_eval import TextBindEval
from textbind.generation import DecodingConfig

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
CONFIG = DecodingConfig(max_new_tokens=6)


@pytest.fixture
def conversations(tmp_path, image_dir):
    records = [
        {"conversation": [
            {"role": "user", "content": "What is this? <image>", "image_list": ["0.png"]},
            {"role": "assistant", "content": "A red block. A green one: <image>", "image_list": ["1.png"],
             "caption_list": ["a green block"]},
            {"role": "user", "content": "And a blue one?"},
            {"role": "assistant", "content": "Here: <image>", "image_list": ["2.png"],
             "caption_list": ["a blue block"]},
        ], "image_dir": str(image_dir)},
        {"conversation": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there."}]},
        {"conversation": [{"role": "user", "content": "Look <image>", "image_list": ["missing.png"]},
                          {"role": "assistant", "content": "Nice."}], "image_dir": str(image_dir)},
        {"conversation": "not a list"},
        {"conversation": [{"role": "user", "content": "Describe <image>", "image_list": ["3.png"]},
                          {"role": "assistant", "content": "A yellow block."}], "image_dir": str(image_dir)},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path


class Interrupting:
    """The tiny generator, interrupted (as by Ctrl-C or a kill) before its `stop_at`-th answer."""

    def __init__(self, generator, stop_at: int | None = None):
        self.generator, self.stop_at, self.calls = generator, stop_at, 0

    def generate(self, conversation, config=None):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.generator.generate(conversation, config)


def test_killed_run_resumes_where_it_stopped(tmp_path, conversations, tiny_generator):
    benchmark = TextBindEval(str(conversations), EvalConfig(turns="all"))
    # Items: 0:1, 0:3, 1:1, 2:1 (missing image: failed), 3 (malformed: failed), 4:1.
    fresh = run_benchmark(tiny_generator, benchmark, tmp_path / "fresh", CONFIG, progress=False)
    assert fresh["num_items"] == 6 and fresh["num_failed"] == 2
    failed = {record["id"]: record["error"] for record in read_predictions(
        tmp_path / "fresh" / "textbind" / PREDICTIONS_FILE).values() if record["error"]}
    assert "missing.png" in failed["2:1"] and "record 3" in failed["3"]

    out = tmp_path / "resumed"
    interrupted = Interrupting(tiny_generator, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(interrupted, benchmark, out, CONFIG, progress=False)
    path = out / "textbind" / PREDICTIONS_FILE
    assert list(read_predictions(path)) == ["0:1", "0:3"]  # every finished item is on disk
    with open(path, "a") as file:
        file.write('{"id": "1:1", "refer')  # a write torn by the kill
    resumed = Interrupting(tiny_generator)
    report = run_benchmark(resumed, benchmark, out, CONFIG, progress=False)
    assert resumed.calls == 2  # 1:1 and 4:1; the failed items need no model
    assert report["metrics"] == fresh["metrics"]
    predictions = read_predictions(path)
    assert list(predictions) == ["0:1", "0:3", "1:1", "2:1", "3", "4:1"]
    expected = read_predictions(tmp_path / "fresh" / "textbind" / PREDICTIONS_FILE)
    assert [p.get("prediction", {}).get("content") for p in predictions.values()] == [
        p.get("prediction", {}).get("content") for p in expected.values()]

    # A run with other settings does not mix its answers into these.
    with pytest.raises(DataError, match="other settings"):
        run_benchmark(tiny_generator, benchmark, out, DecodingConfig(max_new_tokens=7), progress=False)
    path.write_text(path.read_text().rstrip("\n"))  # killed between a record and its newline
    run_benchmark(tiny_generator, benchmark, out, CONFIG, progress=False)
    assert list(read_predictions(path)) == ["0:1", "0:3", "1:1", "2:1", "3", "4:1"]
    assert path.read_text().endswith("}\n")  # the next record will start on its own line
    with pytest.raises(DataError, match="line 2"):
        path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
        read_predictions(path)


def test_eval_command_end_to_end(tmp_path, conversations, tiny_paths, tiny_clip, tiny_bert):
    out = tmp_path / "out"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in tiny_paths.items()]
    argv = ["textbind", "--data", str(conversations), "--output-dir", str(out), "--config",
            str(REPO / "configs/model/tiny.yaml"), *flags, "--image-decoder", "toy", "--max-new-tokens", "6",
            "--no-progress", "eval.turns=last", f"eval.clip_model={tiny_clip}", f"eval.bertscore_model={tiny_bert}"]
    assert eval_main(argv) == 0
    report = json.loads((out / "textbind" / "report.json").read_text())
    assert report["num_items"] == 5 and report["num_failed"] == 2
    for name in ("bleu_2", "bleu_4", "rouge_l", "bertscore_f1", "diversity", "image_f1"):
        assert report["metrics"][name]["count"] == 5, name
    assert len(report["metrics"]["bleu_4"]["ci95"]) == 2
    assert report["settings"]["generation"]["max_new_tokens"] == 6 and not report["settings"]["generation"]["do_sample"]
    assert (out / "report.html").is_file()
    with pytest.raises(SystemExit):
        eval_main(["textbind,mme", "--data", str(conversations), "--output-dir", str(out)])  # one path per benchmark


def test_bash_script_passes_its_variables(tmp_path, conversations, tiny_paths):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BENCHMARK": "textbind", "DATA": str(conversations),
           "OUTPUT_DIR": str(tmp_path / "out"), "CONFIG": str(REPO / "configs/model/tiny.yaml"), "CHECKPOINT": "",
           "VISION_MODEL": tiny_paths["vision_model"], "QFORMER": tiny_paths["qformer"],
           "LANGUAGE_MODEL": tiny_paths["language_model"], "PROCESSOR": tiny_paths["processor"],
           "SD_BASE": "", "IMAGE_DECODER": "none", "LIMIT": "2", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(["bash", "scripts/run_eval.sh", "--max-new-tokens", "4", "--no-progress"], cwd=REPO,
                               env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "textbind" / "report.json").read_text())
    assert report["num_items"] == 2 and report["settings"]["limit"] == 2


def test_report_renders_in_chromium(tmp_path, conversations, scripted, image_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    def answer(conversation):  # every answer draws an image, so the page holds generated images too
        image = Image.open(image_dir / "5.png").convert("RGB")
        return Turn("assistant", "Here <b>it</b> is: <image>", [image], ["an orange block"])

    out = tmp_path / "out"
    run_benchmark(scripted(answer), TextBindEval(str(conversations), EvalConfig(turns="all")), out, CONFIG,
                  progress=False)
    page_path = write_html_report(out, ["textbind", "mme"], samples=3)
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("table").first.inner_text().count("bleu_4") == 1
            widths = page.eval_on_selector_all("img", "images => images.map(image => image.naturalWidth)")
            assert widths and all(width > 0 for width in widths)
            assert page.locator(".item").count() == 3 + 3 + 3  # sample, worst, best
            texts = page.locator(".item").all_inner_texts()
            assert any("Here <b>it</b> is" in text for text in texts)  # escaped, not markup
            assert any("missing.png not found" in text for text in texts)  # the worst item: failed
        finally:
            browser.close()
    assert errors == []
    assert "src=\"file:" not in page_path.read_text() and "http" not in page_path.read_text().split("<body>")[1]


def test_malformed_benchmark_file_is_reported_before_the_model_loads(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversation": [')
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["textbind", "--data", str(broken), "--output-dir", str(tmp_path / "out"),
                   "--language-model", str(tmp_path / "no-such-model"), "--image-decoder", "none"])
    assert exit_info.value.code == 2
    assert f"{broken}: cannot read a JSON list" in capsys.readouterr().err
