"""The toy LLM server: the scripted toy conversation writer behind an OpenAI-compatible HTTP API.

    python3 -m textbind toy llm-server --port 8000 [--api-key KEY] [--request-log FILE]
        [--faulty-share 0.1] [--fail-first N] [--faults 429=0.02,500=0.02,malformed=0.01,empty=0.01,hang=0.01]

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (no streaming). Each answer is
``textbind.toy.writer.answer_request`` of the request: a Human/Assistant transcript about the
images of the prompt's last ``Images:`` section, a pure function of the request's model,
messages and seed and of ``--seed`` (so a resumed run gets the same answers). ``usage`` counts
tokens as words and punctuation marks. A prompt without an ``Images:`` section gets a 400.

The server binds 127.0.0.1 unless ``--host`` says otherwise. With ``--port 0`` it picks a free port;
either way it prints ``listening on http://HOST:PORT/v1`` (and writes the port to ``--port-file``)
once it accepts connections.

Faults, for testing a client's retries (deterministic, decided per request from its hash):

- ``--fail-first N``: the first N attempts of every distinct request fail, with a 500 or a 429
  (chosen per request), the attempt after them succeeds.
- ``--faults KIND=SHARE,...``: a share of the distinct requests fails on every attempt. Kinds:
  ``429`` (rate limited), ``500`` (server error), ``malformed`` (a 200 whose body is not JSON),
  ``empty`` (a 200 with ``"choices": []``), ``hang`` (no answer for ``--hang-seconds``, default
  3600: longer than any client timeout). Shares add up to at most 1; each request falls into at most
  one kind.
- ``--api-key KEY``: requests without ``Authorization: Bearer KEY`` get a 401.

``--request-log FILE`` appends one JSON line per request: ``{"request": <hash>, "attempt": <n>,
"status": <HTTP status>, "fault": <kind or null>}`` (attempts count from 1 per distinct request, and
keys never reach the log), so a test can prove that no answered request was sent again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from textbind.io import atomic_write_text
from textbind.toy.writer import DEFAULT_FAULTY_SHARE, DEFAULT_MAX_IMAGES, PromptError, answer_request, request_hash

DEFAULT_MODEL = "toy-writer"
HTTP_FAULTS = ("429", "500", "malformed", "empty", "hang")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass
class ServerSettings:
    """What the server answers and which faults it injects."""

    model: str = DEFAULT_MODEL
    seed: int = 0
    faulty_share: float = DEFAULT_FAULTY_SHARE
    max_images: int = DEFAULT_MAX_IMAGES
    api_key: str | None = None
    request_log: Path | None = None
    fail_first: int = 0
    faults: dict[str, float] = field(default_factory=dict)
    hang_seconds: float = 3600.0


def parse_faults(text: str) -> dict[str, float]:
    """``"429=0.02,hang=0.01"`` -> ``{"429": 0.02, "hang": 0.01}``; a clear error for anything else."""
    faults: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, separator, share = item.partition("=")
        kind = kind.strip()
        if not separator or kind not in HTTP_FAULTS:
            raise ValueError(f"--faults item {item!r}: expected KIND=SHARE with KIND one of {list(HTTP_FAULTS)}")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"--faults item {item!r}: {share!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--faults item {item!r}: the share must be in [0, 1]")
        faults[kind] = value
    if sum(faults.values()) > 1.0 + 1e-9:
        raise ValueError(f"--faults shares add up to {sum(faults.values())}, more than 1")
    return faults


def _uniform(key: str, purpose: str) -> float:
    """A number in [0, 1) fixed by ``key`` and ``purpose``."""
    digest = hashlib.sha256(f"{purpose}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def http_fault(key: str, attempt: int, settings: ServerSettings) -> str | None:
    """The fault request ``key`` meets on its ``attempt``-th try (from 1), or ``None``."""
    draw, cumulative = _uniform(key, f"faults/{settings.seed}"), 0.0
    for kind in HTTP_FAULTS:
        cumulative += settings.faults.get(kind, 0.0)
        if draw < cumulative:
            return kind
    if attempt <= settings.fail_first:
        return "500" if _uniform(key, f"fail-first/{settings.seed}") < 0.5 else "429"
    return None


def count_tokens(text: str) -> int:
    """Tokens as the server counts them: words and punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI application of the toy LLM server."""
    app = FastAPI(title="textbind toy LLM", docs_url=None, redoc_url=None)
    attempts: Counter[str] = Counter()
    log_lock = threading.Lock()

    def log(key: str, attempt: int, status: int, fault: str | None) -> None:
        if settings.request_log is None:
            return
        line = json.dumps({"request": key, "attempt": attempt, "status": status, "fault": fault})
        with log_lock, open(settings.request_log, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
            stream.flush()

    def authorised(request: Request) -> bool:
        if settings.api_key is None:
            return True
        return request.headers.get("authorization", "") == f"Bearer {settings.api_key}"

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        listed = {"id": settings.model, "object": "model", "created": 0, "owned_by": "textbind"}
        return JSONResponse({"object": "list", "data": [listed]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "the request needs a 'messages' list", "invalid_request_error")
        model, messages, seed = str(body.get("model", "")), body["messages"], body.get("seed")
        key = request_hash(model, messages, seed)
        if not authorised(request):
            log(key, 0, 401, None)
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        attempts[key] += 1
        attempt = attempts[key]
        if body.get("stream"):
            log(key, attempt, 400, None)
            return _error(400, "streaming is not supported by the toy LLM server", "invalid_request_error")
        fault = http_fault(key, attempt, settings)
        if fault == "429":
            log(key, attempt, 429, fault)
            return _error(429, "Rate limit reached, retry later.", "rate_limit_error", "rate_limit_exceeded")
        if fault == "500":
            log(key, attempt, 500, fault)
            return _error(500, "The server had an error while processing your request.", "server_error")
        if fault == "hang":
            log(key, attempt, 0, fault)  # status 0: no answer was given
            await asyncio.sleep(settings.hang_seconds)
            return _error(504, "the toy server hung on purpose", "server_error")
        try:
            transcript = answer_request(
                model, messages, seed, settings.seed, settings.faulty_share, settings.max_images
            )
        except PromptError as error:
            log(key, attempt, 400, None)
            message = f"the prompt does not follow the toy writer's contract: {error}"
            return _error(400, message, "invalid_request_error")
        log(key, attempt, 200, fault)
        if fault == "malformed":
            return Response('{"id": "chatcmpl-broken", "choices": [{"message": ', media_type="application/json")
        prompt_tokens = sum(count_tokens(str(message.get("content", ""))) for message in messages)
        completion_tokens = count_tokens(transcript.text)
        choices = [] if fault == "empty" else [
            {
                "index": 0,
                "message": {"role": "assistant", "content": transcript.text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ]
        return JSONResponse(
            {
                "id": f"chatcmpl-{key[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": f"toy-writer-{settings.seed}",
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textbind toy llm-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed once bound)")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port to this file")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model name /v1/models lists")
    parser.add_argument("--seed", type=int, default=0, help="the writer's seed (answers depend on it and the request)")
    parser.add_argument(
        "--faulty-share", type=float, default=DEFAULT_FAULTY_SHARE, help="share of faulty transcripts (0 to 1)"
    )
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images a conversation uses at most")
    parser.add_argument(
        "--api-key", default=os.environ.get("TOY_LLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TOY_LLM_API_KEY, else no key)",
    )
    parser.add_argument("--request-log", type=Path, default=None, help="append one JSON line per request here")
    parser.add_argument("--fail-first", type=int, default=0, help="fail the first N attempts of each request")
    parser.add_argument("--faults", default="", help="KIND=SHARE,... with KIND in 429, 500, malformed, empty, hang")
    parser.add_argument("--hang-seconds", type=float, default=3600.0, help="how long a 'hang' fault waits")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve the toy conversation writer until interrupted."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        faults = parse_faults(arguments.faults)
    except ValueError as error:
        parser.error(str(error))
    if not 0.0 <= arguments.faulty_share <= 1.0:
        parser.error("--faulty-share must be in [0, 1]")
    settings = ServerSettings(
        model=arguments.model,
        seed=arguments.seed,
        faulty_share=arguments.faulty_share,
        max_images=arguments.max_images,
        api_key=arguments.api_key or None,
        request_log=arguments.request_log,
        fail_first=arguments.fail_first,
        faults=faults,
        hang_seconds=arguments.hang_seconds,
    )
    # Bind first, so that the port (also a free one picked for --port 0) is known before serving.
    listener = socket.socket(socket.AF_INET6 if ":" in arguments.host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((arguments.host, arguments.port))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            if arguments.port_file is not None:
                atomic_write_text(arguments.port_file, f"{port}\n")
            print(f"listening on http://{arguments.host}:{port}/v1", flush=True)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
