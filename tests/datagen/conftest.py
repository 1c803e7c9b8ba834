"""Fixtures of the data-engine tests: a real OpenAI-compatible HTTP server with scripted faults, and pair files."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from textbind.datagen.generate import request_hash

FAULT = re.compile(r"fault=(\w+)(?: times=(\d+))?")


@dataclass
class FaultServerState:
    """What the server saw and how it behaves; the tests read `log` and `attempts`."""

    api_key: str = "right-key"
    delay: float = 0.0  # seconds before every answer
    hang_seconds: float = 3.0
    log: list[dict] = field(default_factory=list)  # {"hash", "authorization"} per chat request, in arrival order
    attempts: Counter = field(default_factory=Counter)  # request hash -> chat requests received

    def hashes(self) -> list[str]:
        return [entry["hash"] for entry in self.log]


def image_captions(body: dict) -> list[str]:
    """The captions after the last `Images:` line of the final user message (the prompt contract)."""
    text = body["messages"][-1]["content"]
    lines = text.split("\nImages:\n")[-1].splitlines()
    return [re.sub(r"^<img\d+>|</img\d+>$", "", line) for line in lines]


def transcript(captions: list[str]) -> str:
    lines = []
    for index, caption in enumerate(captions):
        lines.append(f"Human: What do you think of this one? <img{index}>{caption}</img{index}>")
        lines.append(f"Assistant: It shows {caption}, picture number {index}.")
    lines.append("Human: Thanks!")
    return "\n".join(lines)


def build_app(state: FaultServerState) -> FastAPI:
    app = FastAPI()

    def refused(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return refused(request) or {"object": "list", "data": [{"id": "fault-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        digest = request_hash(body)
        state.log.append({"hash": digest, "authorization": request.headers.get("authorization", "")})
        state.attempts[digest] += 1
        denied = refused(request)
        if denied is not None:
            return denied
        captions = image_captions(body)
        match = next((FAULT.search(caption) for caption in captions if FAULT.search(caption)), None)
        if match and (match.group(2) is None or state.attempts[digest] <= int(match.group(2))):
            kind = match.group(1)
            if kind == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
            if kind == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if kind == "malformed":
                return Response('{"id": "x", "choices": [', media_type="application/json")
            if kind == "empty":
                return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": []}
            if kind == "hang":
                await asyncio.sleep(state.hang_seconds)
        if state.delay:
            await asyncio.sleep(state.delay)
        text = transcript(captions)
        return {
            "id": f"chatcmpl-{digest[:12]}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(body["messages"][-1]["content"].split()),
                      "completion_tokens": len(text.split()),
                      "total_tokens": len(body["messages"][-1]["content"].split()) + len(text.split())},
        }

    return app


@dataclass
class RunningServer:
    base_url: str
    state: FaultServerState


@pytest.fixture
def fault_server():
    state = FaultServerState()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the fault server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield RunningServer(f"http://127.0.0.1:{port}/v1", state)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def pairs_file(tmp_path):
    """A JSONL file of 24 pairs in three visual groups (red, green, blue), images next to it."""
    directory = tmp_path / "pairs"
    directory.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
    lines = []
    for index in range(24):
        name = list(colours)[index % 3]
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        image.paste(colours[name], (4 + index % 5, 4, 24, 28))
        image.save(directory / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "caption": f"a {name} box number {index}",
                                 "key": f"k{index}", "url": f"https://example.com/{index}.png"}))
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
