"""`textbind serve`: an OpenAI-compatible HTTP API whose chat answers hold text and generated images.

Endpoints: `POST /v1/chat/completions` (streaming or not), `POST /v1/images/generations` (a caption
through the image decoder alone), `GET /v1/models`, `GET /health`; with `--with-demo` the Gradio
demo is mounted at `/demo` as one more client of the same engine.

An answer's text marks each image's place with the placeholder `<image>` (IMAGE_PLACEHOLDER);
`message.images` lists the images in order as `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}, "caption": ...}` and `message.captions` their captions. Assistant
messages sent back as history may carry their images the same way (an `images` list matching the
placeholders of their content) or as `image_url` content parts; they are fed back as the model's
own images. User images come as `image_url` parts holding `data:image/...;base64,` URLs (local
files only under `--local-image-dir`; nothing is ever fetched from the network).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from textbind import IMAGE_TOKEN
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.generation import DecodingConfig, DoneEvent, ImageEvent, TextEvent

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = IMAGE_TOKEN  # marks an image's place in `message.content`
API_KEY_ENVIRONMENT = "TEXTBIND_API_KEY"


@dataclass
class ServerSettings:
    """What the API accepts; every limit is checked before the request reaches the model."""

    model_name: str = "textbind"
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 8  # images in the messages (answers may add max_images more)
    max_image_pixels: int = 4096 * 4096
    max_new_tokens_limit: int = 2048
    local_image_dir: str | None = None  # image_url may name files under this directory; None: data URLs only
    generation: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=512))


class APIError(Exception):
    """A request the server refuses, as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# --- Requests -> conversations --------------------------------------------------------------------------------


def decode_image_url(url: Any, where: str, settings: ServerSettings) -> Image.Image:
    """A `data:image/...;base64,` URL (or a file under `local_image_dir`) -> an RGB image within the limits."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: image_url.url must be a non-empty string", param=where)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise APIError(400, f"{where}: expected a data URL of the form data:image/<type>;base64,<data>",
                           param=where, code="invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's base64 payload does not decode", param=where,
                           code="invalid_image_url") from None
        source: Any = io.BytesIO(data)
    elif "://" in url and not url.startswith("file://"):
        raise APIError(400, f"{where}: this server fetches nothing from the network; send the image as a "
                       "data:image/...;base64, URL", param=where, code="invalid_image_url")
    else:
        source = _local_image_path(url.removeprefix("file://"), where, settings)
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise APIError(400, f"{where}: the image has {width}x{height} pixels, more than the limit of "
                               f"{settings.max_image_pixels}", param=where, code="image_too_large")
            image.load()
            return image.convert("RGB")
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise APIError(400, f"{where}: not a readable image ({type(error).__name__})", param=where,
                       code="invalid_image") from None


def _local_image_path(path: str, where: str, settings: ServerSettings) -> Path:
    if settings.local_image_dir is None:
        raise APIError(400, f"{where}: local file paths are not accepted (the server runs without "
                       "--local-image-dir); send a data:image/...;base64, URL", param=where, code="invalid_image_url")
    root = Path(settings.local_image_dir).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise APIError(400, f"{where}: {path!r} is not a file under the server's image directory", param=where,
                       code="invalid_image_url")
    return resolved


def _escape(text: str) -> str:
    from textbind.serve.chat import escape_control_text

    return escape_control_text(text)


def message_turn(message: Any, index: int, settings: ServerSettings) -> Turn:
    """One OpenAI message -> a stage-2 turn (text escaped so that no control token can be smuggled in)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role")
    content = message.get("content")
    pieces: list[str] = []
    images: list[Image.Image] = []
    if content is None:
        content = ""
    if isinstance(content, str):
        if role == "assistant":
            # The placeholders of an assistant answer mark where its `images` go.
            parts = content.split(IMAGE_PLACEHOLDER)
            pieces = [_escape(part) for part in parts]
            listed = message.get("images") or []
            if not isinstance(listed, list) or len(listed) != len(parts) - 1:
                raise APIError(400, f"{where}: {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) in the content "
                               f"but {len(listed) if isinstance(listed, list) else 0} image(s) in `images`",
                               param=f"{where}.images")
            for number, entry in enumerate(listed):
                image_url = entry.get("image_url") if isinstance(entry, dict) else None
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                images.append(decode_image_url(url, f"{where}.images[{number}]", settings))
            content_text = IMAGE_TOKEN.join(pieces)
            return Turn(role, content_text, images, _captions(message, len(images)))
        content_text = _escape(content)
        return Turn(role, content_text)
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    text_so_far: list[str] = []
    for number, part in enumerate(content):
        part_where = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{part_where}.text must be a string", param=part_where)
            text_so_far.append(_escape(text))
        elif kind == "image_url":
            if role == "system":
                raise APIError(400, f"{part_where}: a system message cannot hold images", param=part_where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(decode_image_url(url, part_where, settings))
            pieces.append(" ".join(text_so_far))
            text_so_far = []
        else:
            raise APIError(400, f"{part_where}.type must be text or image_url, got {kind!r}", param=part_where)
    pieces.append(" ".join(text_so_far))
    content_text = f" {IMAGE_TOKEN} ".join(pieces).strip()
    captions = _captions(message, len(images)) if role == "assistant" else []
    return Turn(role, content_text, images, captions)


def _captions(message: dict[str, Any], count: int) -> list[str]:
    """An assistant message's image captions (from `images[k].caption` or `captions`), "" where unknown."""
    captions = [""] * count
    listed = message.get("images")
    if isinstance(listed, list):
        for index, entry in enumerate(listed[:count]):
            if isinstance(entry, dict) and isinstance(entry.get("caption"), str):
                captions[index] = entry["caption"]
    elif isinstance(message.get("captions"), list):
        for index, caption in enumerate(message["captions"][:count]):
            captions[index] = caption if isinstance(caption, str) else ""
    return captions


def conversation_of(messages: Any, settings: ServerSettings) -> Conversation:
    """OpenAI messages -> a conversation ending with a user turn; roles: [system] user (assistant user)*."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    turns = [message_turn(message, index, settings) for index, message in enumerate(messages)]
    body = turns[1:] if turns[0].role == "system" else turns
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            position = index + (len(turns) - len(body))
            raise APIError(400, f"messages[{position}] has role {turn.role}, expected {expected}: after an optional "
                           "system message, roles must alternate user/assistant, starting and ending with user",
                           param=f"messages[{position}].role", code="invalid_role_order")
    if not body or body[-1].role != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    count = sum(len(turn.image_list) for turn in turns)
    if count > settings.max_images_per_request:
        raise APIError(400, f"the messages hold {count} images, more than the limit of "
                       f"{settings.max_images_per_request}", param="messages", code="too_many_images")
    return Conversation(turns, source="request")


def _number(body: dict[str, Any], name: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
    if not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {value}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must lie in [{low}, {high}], got {value}", param=name)
    return kind(value)


@dataclass
class ChatRequest:
    conversation: Conversation
    config: DecodingConfig
    render_images: bool
    stream: bool
    include_usage: bool
    stop: list[str]


def chat_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """A parsed chat-completions body -> what to generate; APIError names the field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r} "
                       "(see GET /v1/models)", param="model", code="model_not_found")
    n = _number(body, "n", int)
    if n not in (None, 1):
        raise APIError(400, f"n must be 1 (one answer per request), got {n}", param="n")
    max_tokens = _number(body, "max_completion_tokens", int, 1, settings.max_new_tokens_limit)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1, settings.max_new_tokens_limit)
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0)
    seed = _number(body, "seed", int, 0, 2**32 - 1)
    # Not in OpenAI's schema; the names and meanings other OpenAI-compatible servers (vLLM) accept as extra fields.
    top_k = _number(body, "top_k", int, 0)
    min_p = _number(body, "min_p", float, 0.0, 1.0)
    repetition_penalty = _number(body, "repetition_penalty", float, 0.01, 10.0)
    config = settings.generation
    do_sample = config.do_sample if temperature is None else temperature > 0
    config = replace(
        config,
        max_new_tokens=max_tokens or config.max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if temperature else config.temperature,
        top_p=top_p if top_p else config.top_p,
        seed=seed if seed is not None else (config.seed if not do_sample else None),
        top_k=config.top_k if top_k is None else top_k,
        min_p=config.min_p if min_p is None else min_p,
        repetition_penalty=config.repetition_penalty if repetition_penalty is None else repetition_penalty,
    )
    try:
        config.validate()
    except ValueError as error:
        raise APIError(400, str(error)) from None
    modalities = body.get("modalities") or ["text", "image"]
    if (not isinstance(modalities, list) or not all(isinstance(kind, str) for kind in modalities)
            or not set(modalities) <= {"text", "image"} or "text" not in modalities):
        raise APIError(400, 'modalities must be ["text", "image"] or ["text"]', param="modalities")
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop_list, list) or len(stop_list) > 4 or not all(isinstance(s, str) and s for s in stop_list):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    conversation = conversation_of(body.get("messages"), settings)
    return ChatRequest(conversation, config, "image" in modalities, stream, include_usage, stop_list)


# --- Answers ------------------------------------------------------------------------------------------------


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_entry(image: Image.Image | None, caption: str) -> dict[str, Any]:
    if image is None:  # modalities ["text"] or no decoder: the caption only
        return {"type": "caption", "caption": caption}
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}, "caption": caption}


class StopScanner:
    """Text pieces in, text safe to emit out; reports when a stop string appears (the text is cut before it)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.held += text
        cut = min((self.held.find(stop) for stop in self.stops if stop in self.held), default=-1)
        if cut >= 0:
            self.stopped = True
            emitted, self.held = self.held[:cut], ""
            return emitted
        keep = max(len(stop) - 1 for stop in self.stops)  # the longest tail that could start a stop string
        emitted = self.held[: max(0, len(self.held) - keep)]
        self.held = self.held[len(emitted):]
        return emitted

    def flush(self) -> str:
        emitted, self.held = self.held, ""
        return emitted


# --- The app --------------------------------------------------------------------------------------------------


def create_app(engine: Any, settings: ServerSettings) -> Any:
    """The FastAPI app over `engine` (a `textbind.serve.engine.Engine`)."""
    app = FastAPI(title="textbind", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {error.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error")
        body = APIError(500, "internal server error", error_type="server_error").body()
        return JSONResponse(body, status_code=500)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", error_type="authentication_error")

    async def json_body(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise APIError(413, f"the request body has {declared} bytes, more than the limit of "
                           f"{settings.max_body_bytes}", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise APIError(413, f"the request body is larger than the limit of {settings.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine": engine.statistics()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "textbind"}]}

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> dict[str, Any]:
        check_key(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise APIError(400, "prompt must be a non-empty string (the caption to render)", param="prompt")
        if len(prompt) > 4000:
            raise APIError(400, f"prompt has {len(prompt)} characters, more than 4000", param="prompt")
        if body.get("n", 1) != 1:
            raise APIError(400, "n must be 1", param="n")
        if body.get("response_format", "b64_json") != "b64_json":
            raise APIError(400, "response_format must be b64_json (this server keeps no image files)",
                           param="response_format")
        seed = _number(body, "seed", int, 0, 2**32 - 1)
        generator = engine.generator
        if generator.image_decoder is None:
            raise APIError(400, "this server has no image decoder (start it with --image-decoder)",
                           code="no_image_decoder")
        future = engine.run_job(lambda: generator.render(prompt.strip(), seed if seed is not None else 0))
        image = await asyncio.wrap_future(future)
        return {"created": int(time.time()), "data": [
            {"b64_json": base64.b64encode(_png_bytes(image)).decode(), "revised_prompt": prompt.strip()}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        parsed = chat_request(await json_body(request), settings)
        try:
            prepared = await asyncio.to_thread(
                engine.prepare, parsed.conversation, parsed.config, render_images=parsed.render_images)
        except DataError as error:
            code = "context_length_exceeded" if "max_length" in str(error) else "invalid_request"
            message = str(error).replace("request: ", "", 1)
            if code == "context_length_exceeded":
                message += "; shorten the conversation or the images in it"
            raise APIError(400, message, param="messages", code=code) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        answer = Answer(parsed, handle, events, handle.prompt_tokens)
        if parsed.stream:
            return StreamingResponse(
                stream_chunks(answer, completion_id, created, settings.model_name),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )

        async def cancel_when_gone() -> None:  # a client that hangs up frees its row at the next step
            while not await request.is_disconnected():
                await asyncio.sleep(0.5)
            handle.cancel()

        watcher = asyncio.create_task(cancel_when_gone())
        try:
            async for _ in answer.pieces():
                pass
        finally:
            watcher.cancel()
            handle.cancel()
        message = {"role": "assistant", "content": answer.content(), "captions": answer.captions}
        if answer.images:
            message["images"] = answer.images
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": answer.usage(),
        }

    return app


class Answer:
    """Reads one request's engine events: text pieces (stop strings applied), images, finish reason, usage."""

    def __init__(self, parsed: ChatRequest, handle: Any, events: asyncio.Queue, prompt_tokens: int) -> None:
        self.parsed, self.handle, self.events, self.prompt_tokens = parsed, handle, events, prompt_tokens
        self.scanner = StopScanner(parsed.stop)
        self.segments: list[str] = [""]
        self.images: list[dict[str, Any]] = []
        self.captions: list[str] = []
        self.finish_reason = "length"
        self.completion_tokens = 0

    async def pieces(self) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """(text, None) and ("", image entry) in answer order."""
        from textbind.serve.engine import RequestEnd

        while True:
            event = await self.events.get()
            if isinstance(event, RequestEnd):
                if event.error is not None:
                    raise APIError(500, "generation failed on the server", error_type="server_error")
                self.completion_tokens = event.completion_tokens
                break
            if self.scanner.stopped:
                continue
            if isinstance(event, TextEvent):
                text = self.scanner.push(event.text)
                if self.scanner.stopped:
                    self.finish_reason = "stop"
                    self.handle.cancel()
                if text:
                    self.segments[-1] += text
                    yield text, None
            elif isinstance(event, ImageEvent):
                text = self.scanner.flush()
                if text:
                    self.segments[-1] += text
                    yield text, None
                entry = image_entry(event.image if self.parsed.render_images else None, event.caption)
                self.captions.append(event.caption)
                if entry["type"] == "image_url":
                    self.images.append(entry)
                self.segments.append("")
                yield "", entry
            elif isinstance(event, DoneEvent):
                text = self.scanner.flush()
                if text:
                    self.segments[-1] += text
                    yield text, None
                self.finish_reason = event.finish_reason

    def content(self) -> str:
        from textbind.generation import join_segments

        return join_segments(self.segments)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "images": len(self.captions),
                "generated_images": len(self.images)}


async def stream_chunks(answer: Answer, completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    """SSE: a role chunk, text deltas, an image delta per image, the finish chunk, usage if asked, [DONE]."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for text, entry in answer.pieces():
                if entry is None:
                    yield chunk({"content": text})
                else:
                    delta: dict[str, Any] = {"content": f" {IMAGE_PLACEHOLDER} ", "captions": [entry["caption"]]}
                    if entry["type"] == "image_url":
                        delta["images"] = [entry]
                    yield chunk(delta)
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, answer.finish_reason)
        if answer.parsed.include_usage:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": answer.usage()}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        answer.handle.cancel()  # a client that went away stops its row at the next step


# --- Entry point --------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    from textbind.runtime import add_generation_arguments, add_setup_arguments

    parser = argparse.ArgumentParser(prog="textbind serve", description=__doc__.split("\n\n")[0])
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    defaults = ServerSettings()
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--model-name", default=defaults.model_name, help="the model id clients send")
    server.add_argument("--max-batch-size", type=int, default=8, help="conversations decoded together")
    server.add_argument("--max-body-megabytes", type=float, default=defaults.max_body_bytes / 2**20)
    server.add_argument("--max-images-per-request", type=int, default=defaults.max_images_per_request)
    server.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    server.add_argument("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens_limit,
                        help="the largest max_tokens a client may ask for")
    server.add_argument("--local-image-dir", default=None,
                        help="let image_url name files under this directory (default: data URLs only)")
    server.add_argument("--with-demo", action="store_true", help="also serve the Gradio demo at /demo")
    server.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    server.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from textbind.runtime import build_generator, generation_config_from_arguments, setup_from_arguments
    from textbind.serve.engine import Engine

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        settings = ServerSettings(
            model_name=args.model_name,
            api_key=os.environ.get(API_KEY_ENVIRONMENT) or None,  # from the environment: never on a command line
            max_body_bytes=int(args.max_body_megabytes * 2**20),
            max_images_per_request=args.max_images_per_request,
            max_image_pixels=args.max_image_pixels,
            max_new_tokens_limit=args.max_new_tokens_limit,
            local_image_dir=args.local_image_dir,
            generation=generation_config_from_arguments(args),
        )
        if args.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
        setup = setup_from_arguments(args)
        generator = build_generator(setup)
    except (FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    engine = Engine(generator, args.max_batch_size)
    app = create_app(engine, settings)
    if args.with_demo:
        mount_demo(app, engine, settings)
    logger.info("serving %s on http://%s:%d (batch %d, image decoder: %s, API key: %s)", settings.model_name,
                args.host, args.port, args.max_batch_size, setup.image_decoder.value,
                "required" if settings.api_key else "none")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        engine.close()
    return 0


def mount_demo(app: Any, engine: Any, settings: ServerSettings) -> None:
    """The Gradio demo at /demo, answering through the engine (its answers share the batch with the API's)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from textbind.serve.app import build_app
    from textbind.serve.chat import DemoSettings

    demo_settings = DemoSettings(generation=replace(settings.generation, max_new_tokens=256)).validate()
    demo = build_app(engine, demo_settings)  # the demo only calls `.stream(conversation, config)`
    demo.queue(default_concurrency_limit=demo_settings.concurrency_limit, max_size=demo_settings.max_queue_size)
    gr.mount_gradio_app(app, demo, path="/demo", allowed_paths=[str(demo.textbind_chat.output_dir)])
