"""Tests for the rating page (a real Gradio server from scripts/rate_data.sh, Chromium, gradio_client) and promote."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from textbind.datagen.export import ExportConfig, export_records
from textbind.datagen.filters import filter_records
from textbind.datagen.rate import RatingSession, RatingStore, load_conversations_for_rating

from demo_helpers import free_port, script_server

REPOSITORY = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def write_filtered(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for number, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (16, 16), colour).save(folder / f"{colour}.png")
        images = [{"key": colour, "caption": f"a {colour} square", "image": f"{colour}.png"}]
        response = (f"Human: Show me <img0>a {colour} square</img0> please.\nAssistant: It is {colour}.\n"
                    f"Human: Thanks {number}.\nAssistant: Welcome.")
        records.append({"id": f"c{number}", "images": images, "response": response})
    kept = filter_records(records).kept
    assert len(kept) == 3
    path = folder / "filtered.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return path


@contextmanager
def rating_server(env: dict[str, str], log_path: Path, timeout: float = 90.0) -> Iterator[str]:
    url = f"http://127.0.0.1:{env['PORT']}/"
    with script_server(["bash", "scripts/rate_data.sh"], env, log_path, url, "rating page", timeout):
        yield url


def rate_in_browser(url: str) -> None:
    """In headless Chromium: the page opens on the first unrated conversation (c0) with its image loaded; rate it."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/install_test_deps.sh installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("text=It is red.", timeout=60_000)
            widths = page.locator("img[src*='red.png']").evaluate_all("images => images.map(i => i.naturalWidth)")
            assert widths == [16]  # the conversation's image, served and decoded
            page.get_by_label("Excellent").check()
            page.get_by_label("Tags").fill("vivid,  correct")
            page.get_by_role("button", name="Save rating and next").click()
            page.wait_for_selector("text=It is green.", timeout=30_000)  # the next unrated conversation
        finally:
            browser.close()


def test_rating_page_records_ratings_and_resumes(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    filtered = write_filtered(tmp_path / "run")
    ratings = tmp_path / "run" / "ratings.csv"
    env = {"INPUT": str(filtered), "RATINGS": str(ratings), "PORT": str(free_port())}
    with rating_server(env, tmp_path / "server.log") as url:
        client = Client(url, verbose=False)
        identifier, messages, rating, tags, status = client.predict("c1", api_name="/show")
        assert identifier == "c1" and rating is None and "0 of 3 rated" in status
        parts = [(message["role"], part) for message in messages for part in message["content"]]
        texts = [part["text"] for _, part in parts if part["type"] == "text"]
        files = [part["file"] for _, part in parts if part["type"] == "file"]
        assert texts == ["Show me", "*[image: a green square]*", "please.", "It is green.", "Thanks 1.", "Welcome."]
        assert len(files) == 1 and files[0].endswith("green.png")  # the image, inline, where the tag was
        assert [message["role"] for message in messages[:3]] == ["user"] * 3

        rate_in_browser(url)  # c0: Excellent, "vivid,  correct"
        shown = client.predict("c1", api_name="/show")
        assert shown[0] == "c1" and "1 of 3 rated" in shown[4]
        with pytest.raises(AppError, match="choose a rating"):
            client.predict("c1", None, "no rating chosen", False, api_name="/rate")
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict("c1", "Great", "", False, api_name="/rate")
        shown = client.predict("c1", "Poor", "wrong image", False, api_name="/rate")
        assert shown[0] == "c2"
        assert client.predict("c2", False, api_name="/next")[0] == "c2"  # only c2 is unrated: stay there
        assert client.predict("c2", True, api_name="/next")[0] == "c0"  # with rated ones shown: wrap around
        _, _, rating, tags, _ = client.predict("c0", api_name="/show")
        assert (rating, tags) == ("Excellent", "vivid, correct")

    with ratings.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["id"], row["rating"], row["tags"]) for row in rows] == [
        ("c0", "Excellent", "vivid, correct"), ("c1", "Poor", "wrong image")]

    # Restarted on the same CSV (what the page does at start), rated conversations are skipped; re-rating appends.
    session = RatingSession(load_conversations_for_rating(filtered), RatingStore(ratings))
    assert session.first() == "c2" and session.first(show_rated=True) == "c0"
    session.store.add("c0", "Satisfactory", "")
    assert RatingStore(ratings).ratings["c0"]["rating"] == "Satisfactory"  # the last row wins
    assert len(ratings.read_text().splitlines()) == 4  # header + 3 rows


def test_stage2_files_show_their_images(tmp_path):
    filtered = write_filtered(tmp_path / "run")
    records = [json.loads(line) for line in filtered.read_text().splitlines()]
    export_records(records, tmp_path / "export", ExportConfig(valid_size=0, test_size=0),
                   image_root=filtered.parent)
    views = load_conversations_for_rating(tmp_path / "export" / "train.json")
    assert sorted(view.id for view in views) == ["c0", "c1", "c2"]
    for view in views:
        (path,) = view.image_paths
        assert Path(path).is_file() and Path(path).parent == (tmp_path / "export" / "images").resolve()
    session = RatingSession(views, RatingStore(tmp_path / "ratings.csv"))
    messages, rating, _, _ = session.show(views[0].id)
    assert rating is None and any(isinstance(message["content"], dict) for message in messages)


def test_promote_adds_the_best_rated_once_with_original_captions(tmp_path):
    from textbind.datagen.promote import promote

    filtered = write_filtered(tmp_path / "run")
    lines = filtered.read_text().splitlines()
    first = json.loads(lines[0])  # the assistant quotes image 0 with a typo the filter tolerates
    first["turns"][1]["content"] = "It is <img0>a rde square</img0>."
    first["turns"][0]["content"] = "Show me a square please."
    filtered.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    store = RatingStore(tmp_path / "ratings.csv")
    for identifier, rating in (("c0", "Poor"), ("c0", "Excellent"), ("c1", "Poor"), ("c2", "Satisfactory"),
                               ("ghost", "Excellent")):
        store.add(identifier, rating, "")
    default_pool = tmp_path / "seed_examples.jsonl"
    shipped = {"id": "seed-1", "images": [{"caption": "a cat"}],
               "response": "Human: <img0>a cat</img0>?\nAssistant: A cat."}
    default_pool.write_text(json.dumps(shipped) + "\n")
    pool = tmp_path / "next" / "pool.jsonl"

    summary = promote(store.path, filtered, pool, default_pool=default_pool)
    assert summary["distribution"] == {"Excellent": 1, "Satisfactory": 1, "Poor": 1} and summary["unrated"] == 0
    assert (summary["added"], summary["pool_size"], summary["started_from"]) == (1, 2, str(default_pool))
    assert summary["problems"] == ["rated id ghost is not in " + str(filtered)]
    entries = [json.loads(line) for line in pool.read_text().splitlines()]
    assert entries[0] == shipped
    assert entries[1] == {"id": "c0", "images": [{"caption": "a red square"}], "response":
                          "Human: Show me a square please.\nAssistant: It is <img0>a red square</img0>.\n"
                          "Human: Thanks 0.\nAssistant: Welcome."}
    # A promoted example is itself a transcript the filters keep.
    assert filter_records([entries[1]]).kept

    again = promote(store.path, filtered, pool, default_pool=default_pool)
    assert (again["added"], again["duplicates"], again["pool_size"]) == (0, 1, 2)

    completed = subprocess.run(
        [sys.executable, "-m", "textbind", "datagen", "promote", "--ratings", str(store.path), "--input",
         str(filtered), "--pool", str(pool), "--min-rating", "Satisfactory"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "Excellent" in completed.stdout and "33.3%" in completed.stdout
    assert "added 1 conversation(s) rated Satisfactory or better" in completed.stdout
    assert [json.loads(line)["id"] for line in pool.read_text().splitlines()] == ["seed-1", "c0", "c2"]
