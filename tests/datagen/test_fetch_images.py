"""Tests for fetch-images against a real HTTP server on 127.0.0.1: dead URLs, retries, a timeout, resuming."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from textbind.data.conversation import load_conversations
from textbind.datagen.fetch_images import FetchConfig, fetch_images

REPOSITORY = Path(__file__).resolve().parents[2]


def image_bytes(colour: str, size: tuple[int, int], format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=format)
    return buffer.getvalue()


class ImageServer(BaseHTTPRequestHandler):
    """/a.png, /b.jpg: images; /slow.png: an image after 3 s; /page.png: HTML; /flaky.png: 500, then an image."""

    hits: Counter = Counter()
    bodies = {"/a.png": image_bytes("red", (40, 20), "PNG"), "/b.jpg": image_bytes("blue", (10, 10), "JPEG")}

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.hits[self.path] += 1
        if self.path == "/slow.png":
            time.sleep(3)
            self._send(200, self.bodies["/a.png"])
        elif self.path == "/page.png":
            self._send(200, b"<html>moved</html>", "text/html")
        elif self.path == "/flaky.png":
            self._send(500, b"busy") if self.hits[self.path] == 1 else self._send(200, self.bodies["/b.jpg"])
        elif self.path in self.bodies:
            self._send(200, self.bodies[self.path])
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str = "image/png") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout case)

    def log_message(self, *arguments) -> None:
        pass


@contextmanager
def image_server() -> Iterator[str]:
    ImageServer.hits = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def record(identifier: str, user: tuple[str, str], assistant: tuple[str, str] | None = None) -> dict:
    turns = [{"role": "user", "content": "Look: <image>", "image_list": [user[0]], "caption_list": ["x"],
              "url_list": [user[1]]}]
    if assistant:
        turns.append({"role": "assistant", "content": "Here: <image>", "image_list": [assistant[0]],
                      "caption_list": ["a blue square"], "url_list": [assistant[1]]})
    else:
        turns.append({"role": "assistant", "content": "Nice."})
    return {"id": identifier, "conversation": turns}


def write_input(folder: Path, base: str) -> Path:
    records = [
        record("both", ("a.png", f"{base}/a.png"), ("b.png", f"{base}/b.jpg")),
        record("missing", ("gone.png", f"{base}/gone.png")),
        record("slow", ("slow.png", f"{base}/slow.png")),
        record("page", ("page.png", f"{base}/page.png")),
        record("flaky", ("flaky.png", f"{base}/flaky.png")),
        record("shares-a", ("a.png", f"{base}/a.png")),
        record("escapes", ("../evil.png", f"{base}/a.png")),
    ]
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_fetch_reports_dead_urls_and_resumes(tmp_path):
    config = FetchConfig(concurrency=4, retries=1, timeout=0.5, backoff=0.05, image_size=32)
    out = tmp_path / "images"
    with image_server() as base:
        train = write_input(tmp_path, base)
        report = fetch_images(train, out, config, usable_out=tmp_path / "usable.json")
        hits_after_first = dict(ImageServer.hits)

        assert (report.images, report.downloaded, report.existing) == (6, 3, 0)
        assert {entry["name"]: entry["reason"] for entry in report.dead} == {
            "gone.png": "HTTP 404", "page.png": "not an image (UnidentifiedImageError)",
            "slow.png": "timeout after 0.5 s (2 attempts)"}
        assert hits_after_first["/gone.png"] == 1  # a 404 is not retried
        assert hits_after_first["/slow.png"] == 2 and hits_after_first["/flaky.png"] == 2  # retried once
        assert hits_after_first["/a.png"] == 1  # one download for two records
        assert [(entry["id"], entry["images"]) for entry in report.unusable_records] == [
            ("missing", ["gone.png"]), ("slow", ["slow.png"]), ("page", ["page.png"]), ("escapes", [])]
        assert "unusable file name '../evil.png'" in " ".join(report.problems)
        assert not (tmp_path / "evil.png").exists()

        with Image.open(out / "a.png") as image:  # 40x20 red -> 32x32, white above and below
            assert image.size == (32, 32) and image.getpixel((16, 0)) == (255, 255, 255)
            assert image.getpixel((16, 16))[0] > 200
        usable = json.loads((tmp_path / "usable.json").read_text())
        assert [item["id"] for item in usable] == ["both", "flaky", "shares-a"]
        loaded = load_conversations(tmp_path / "usable.json", image_dir=str(out), check_images=True)
        assert loaded.errors == [] and len(loaded.conversations) == 3
        saved = json.loads((out / "fetch_report.json").read_text())
        assert saved["downloaded"] == 3 and len(saved["dead"]) == 3

        # Resuming: the images already there are not asked for again; the dead ones are tried again.
        completed = subprocess.run(
            [sys.executable, "-m", "textbind", "datagen", "fetch-images", "--input", str(train), "--out", str(out),
             "--timeout", "0.5", "--retries", "0", "--image-size", "32"],
            cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        assert "6 images: 0 downloaded, 3 already there, 3 dead; 4 record(s) unusable" in completed.stdout
        assert "dead: gone.png" in completed.stderr
        for path in ("/a.png", "/b.jpg", "/flaky.png"):
            assert ImageServer.hits[path] == hits_after_first[path], path
        assert ImageServer.hits["/gone.png"] == 2
