"""Helpers for the demo tests: a tiny model that draws and tells colours apart, a demo server process."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from textbind.config import MODULE_NAMES, ModelConfig
from textbind.data.conversation import Conversation, Turn
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.toy.renderer import ToyRenderer

from helpers import overfit

REPOSITORY = Path(__file__).resolve().parents[1]

DRAW_PROMPT = "Draw a small red circle."
DRAW_ANSWER = "Here it is: <image>"
DRAW_CAPTION = "a small red circle"
DESCRIBE_PROMPT = "What do you see?"
# caption of an uploaded image -> what the trained model answers about it
DESCRIPTIONS = {
    "a small red circle": "I see a small red circle.",
    "a large blue square": "I see a large blue square.",
}


def toy_image(caption: str):
    return ToyRenderer()(caption, seed=0)


def training_conversations() -> list[Conversation]:
    """Draw on request; name an uploaded image's colour; and both in one conversation (describe, then draw)."""
    drawing = [Turn("user", DRAW_PROMPT), Turn("assistant", DRAW_ANSWER, [toy_image(DRAW_CAPTION)], [DRAW_CAPTION])]
    conversations = [Conversation(drawing)]
    for caption, answer in DESCRIPTIONS.items():
        describing = [Turn("user", f"<image> {DESCRIBE_PROMPT}", [toy_image(caption)]), Turn("assistant", answer)]
        conversations.append(Conversation(describing))
        conversations.append(Conversation(describing + drawing))
    return conversations


def train_demo_checkpoint(model_config: ModelConfig, output_dir: Path, steps: int = 80) -> Path:
    """Overfit the tiny model (every module, Adam) on `training_conversations`; export it to `output_dir`.

    Greedy decoding then draws on DRAW_PROMPT and names the colour of an uploaded image (checked
    here, so that a model that failed to learn fails loudly, not as a confusing browser test).
    """
    from textbind.checkpoint import save_trained_modules

    bundle = overfit(model_config, training_conversations(), steps)
    generator = InterleavedGenerator.from_bundle(bundle, ToyRenderer())
    config = DecodingConfig(max_new_tokens=24)
    answers, drawn = {}, []
    for caption in DESCRIPTIONS:
        described = [Turn("user", f"<image> {DESCRIBE_PROMPT}", [toy_image(caption)])]
        turn = generator.generate_turn(Conversation(described), config)
        answers[caption] = turn.content
        drawn.append(generator.generate_turn(Conversation([*described, turn, Turn("user", DRAW_PROMPT)]), config))
    drawn.append(generator.generate_turn(Conversation([Turn("user", DRAW_PROMPT)]), config))
    learnt = answers == DESCRIPTIONS and all(turn.caption_list == [DRAW_CAPTION] for turn in drawn)
    assert learnt, (answers, drawn)
    return save_trained_modules(bundle.model, output_dir, module_names=list(MODULE_NAMES))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG file that declares `width` x `height` pixels but holds no pixel data: a few dozen bytes
    that stand for a huge upload (nothing reads past the header before the size is checked)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def script_server(command: list[str], env: dict[str, str], log_path: Path, ready_url: str, name: str,
                  timeout: float = 90.0) -> Iterator[None]:
    """Run `command` (a script of scripts/) with `env` added, in its own process group, until `ready_url`
    answers 200; then yield. The server is always torn down (SIGTERM to the group, SIGKILL after 10 s); its
    output goes to `log_path`, quoted in the error if it exits or does not come up within `timeout` seconds."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPOSITORY, env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not up after {timeout} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.25)
            yield
        finally:
            stop_process_group(process)


@contextmanager
def demo_server(env: dict[str, str], arguments: list[str], log_path: Path, timeout: float = 90.0) -> Iterator[str]:
    """`bash scripts/run_demo.sh ARGUMENTS` with `env` added (see `script_server`); yields its URL."""
    url = f"http://127.0.0.1:{env['PORT']}/"
    with script_server(["bash", "scripts/run_demo.sh", *arguments], env, log_path, url, "demo server", timeout):
        yield url


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
