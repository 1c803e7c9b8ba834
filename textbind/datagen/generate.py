"""Step 5: ask an OpenAI-compatible LLM for each planned conversation; resumable at any moment.

    LLM_API_KEY=... textbind datagen generate --config ... llm.base_url=http://127.0.0.1:8000/v1 llm.model=...

Requests go through the official `openai` client (AsyncOpenAI, any base_url), at most
`llm.concurrency` at once. 429, 5xx, timeouts, connection errors and malformed or empty answers are
retried with exponential backoff (`llm.backoff_initial` doubling up to `llm.backoff_max`, or the
server's Retry-After); a request that still fails is recorded in failed.jsonl with its reason. A
rejected API key (401/403) or an unknown model (404) stops the run at once with one clear message.

Every answer is appended to OUTPUT_DIR/journal.jsonl (flushed and fsynced) under the hash of its
request (model, messages, sampling parameters). A run killed at any moment and started again with the
same command sends no request whose answer is in the journal; a line torn by the kill is cut off.
raw.jsonl is rewritten from the journal in plan order at the end, so a resumed run writes exactly what
an uninterrupted one would. Failed requests are not journaled: the next run tries them again.

The API key comes from LLM_API_KEY or OPENAI_API_KEY and is never logged or written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from textbind.data.conversation import DataError
from textbind.datagen.cluster import read_clusters
from textbind.datagen.config import (
    DatagenConfig,
    LLMConfig,
    api_key_from_environment,
    config_from_arguments,
    step_parser,
)
from textbind.datagen.pairs import materialize_images
from textbind.datagen.prompt import PromptBuilder
from textbind.datagen.report import update_report
from textbind.datagen.sample import PlannedConversation, SamplePlan, plan_conversations
from textbind.io import atomic_write_jsonl
from textbind.seeding import stable_seed

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
RAW_NAME = "raw.jsonl"
FAILED_NAME = "failed.jsonl"
PAIR_IMAGES_DIR = "pair_images"


class FatalLLMError(RuntimeError):
    """The server refuses every request (bad key, unknown model): retrying cannot help."""


class RetryableAnswerError(RuntimeError):
    """The server answered, but with nothing usable (no choice, empty text)."""


def request_hash(body: dict) -> str:
    """The journal key of a request: a hash of its canonical JSON (model, messages, sampling parameters)."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class LLMRequest:
    id: str
    body: dict  # the chat-completions arguments, exactly as sent
    metadata: dict = field(default_factory=dict)  # carried into raw.jsonl / failed.jsonl
    hash: str = ""

    def __post_init__(self) -> None:
        self.hash = self.hash or request_hash(self.body)


class Journal:
    """Answers keyed by request hash, one JSON line each, appended durably."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._load()
        self._stream = open(self.path, "ab")

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a line torn by a kill: it never counted as answered
            logger.warning("%s: dropping an incomplete last line (%d bytes)", self.path, len(data) - complete)
            with open(self.path, "r+b") as stream:
                stream.truncate(complete)
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries[entry["request_hash"]] = entry
            except (ValueError, KeyError, TypeError):
                logger.warning("%s line %d: unreadable journal entry ignored", self.path, number)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def append(self, entry: dict) -> None:
        self._stream.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self.entries[entry["request_hash"]] = entry

    def close(self) -> None:
        self._stream.close()


@dataclass
class GenerateOutcome:
    """What one pass over the pending requests did."""

    answered: int = 0
    failures: list[dict] = field(default_factory=list)  # {"id", "request_hash", "reason", "attempts", ...}
    sent: int = 0  # HTTP requests, retries included
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # wall time with at least one request in flight


def _reason(error: BaseException) -> tuple[str, bool]:
    """(short reason, retry?) for an error of one try."""
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return f"HTTP {error.status_code}", False
    if isinstance(error, (TimeoutError, openai.APITimeoutError)):
        return "timeout", True
    if isinstance(error, openai.APIConnectionError):
        return "connection error", True
    if isinstance(error, openai.RateLimitError):
        return "HTTP 429", True
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}", error.status_code >= 500 or error.status_code == 408
    if isinstance(error, RetryableAnswerError):
        return str(error), True
    # Anything else the client raised while reading the answer: a body that is not the expected JSON.
    return f"malformed answer ({type(error).__name__})", True


def _fatal_message(error: openai.APIStatusError, config: LLMConfig, model: str) -> str:
    if error.status_code in (401, 403):
        return (f"the LLM server at {config.base_url} rejected the API key (HTTP {error.status_code}); "
                f"set LLM_API_KEY (or OPENAI_API_KEY) to a key it accepts")
    return (f"the LLM server at {config.base_url} answered HTTP 404: no model {model!r} there "
            f"(set llm.model to a served model) or no chat-completions endpoint at that base_url")


def _retry_after(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Generator:
    """Sends requests with bounded concurrency, retries and a journal; see the module docstring."""

    def __init__(self, config: LLMConfig, journal: Journal, api_key: str, progress: bool = True) -> None:
        self.config = config
        self.journal = journal
        self.api_key = api_key
        self.progress = progress
        self.outcome = GenerateOutcome()
        self._in_flight = 0
        self._busy_since = 0.0
        self._fatal: FatalLLMError | None = None

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self.api_key, timeout=self.config.timeout,
                                  max_retries=0)

    async def _try(self, client: openai.AsyncOpenAI, request: LLMRequest) -> dict:
        self._in_flight += 1
        if self._in_flight == 1:
            self._busy_since = time.perf_counter()
        self.outcome.sent += 1
        try:
            # The client's timeout bounds each read; wait_for bounds the whole request.
            completion = await asyncio.wait_for(client.chat.completions.create(**request.body),
                                                timeout=self.config.timeout)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.outcome.busy_seconds += time.perf_counter() - self._busy_since
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise RetryableAnswerError("empty answer (no choice)")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str) or not content.strip():
            raise RetryableAnswerError("empty answer (no text)")
        usage = completion.usage.model_dump(exclude_none=True) if getattr(completion, "usage", None) else {}
        usage = {key: value for key, value in usage.items() if isinstance(value, int)}
        return {"request_hash": request.hash, "id": request.id, "response": content,
                "finish_reason": choices[0].finish_reason, "model": completion.model, "usage": usage}

    async def _ask(self, client: openai.AsyncOpenAI, request: LLMRequest, on_answer: Callable[[dict], None],
                   on_failure: Callable[[], None]) -> None:
        reasons = []
        for attempt in range(self.config.max_retries + 1):
            if self._fatal is not None:
                return
            try:
                entry = await self._try(client, request)
            except Exception as error:  # noqa: BLE001 - every failure of a try is classified below
                reason, retry = _reason(error)
                if not retry and isinstance(error, openai.APIStatusError) and error.status_code in (401, 403, 404):
                    self._fatal = FatalLLMError(_fatal_message(error, self.config, request.body.get("model", "")))
                    return
                reasons.append(reason)
                if not retry or attempt == self.config.max_retries:
                    break
                self.outcome.retries += 1
                self.outcome.retry_reasons[reason] = self.outcome.retry_reasons.get(reason, 0) + 1
                delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** attempt)
                delay = _retry_after(error) or delay * (0.5 + random.random() / 2)  # jitter spreads retries
                await asyncio.sleep(min(delay, self.config.backoff_max))
                continue
            self.journal.append(entry)
            on_answer(entry)
            return
        self.outcome.failures.append({"id": request.id, "request_hash": request.hash, "reason": reasons[-1],
                                      "attempts": len(reasons), "reasons": reasons, **request.metadata})
        on_failure()

    async def run(self, requests: list[LLMRequest]) -> GenerateOutcome:
        started = time.perf_counter()
        bar = tqdm(total=len(requests), desc="generating", unit="conv", disable=not self.progress)

        def on_answer(entry: dict) -> None:
            self.outcome.answered += 1
            self.outcome.prompt_tokens += entry["usage"].get("prompt_tokens", 0)
            self.outcome.completion_tokens += entry["usage"].get("completion_tokens", 0)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({"tok/s": f"{self.outcome.completion_tokens / elapsed:.0f}",
                             "tokens": self.outcome.prompt_tokens + self.outcome.completion_tokens}, refresh=False)
            bar.update(1)

        queue = iter(requests)
        client = self._client()

        async def worker() -> None:
            for request in queue:  # a shared iterator: each request goes to exactly one worker
                if self._fatal is not None:
                    return
                await self._ask(client, request, on_answer, on_failure=lambda: bar.update(1))

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, max(1, len(requests))))))
        finally:
            bar.close()
            await client.close()
        self.outcome.seconds = time.perf_counter() - started
        if self._fatal is not None:
            raise self._fatal
        return self.outcome


def run_requests(requests: list[LLMRequest], config: LLMConfig, journal: Journal, api_key: str | None = None,
                 progress: bool = True) -> GenerateOutcome:
    """Ask for every request not in the journal yet; FatalLLMError when the server refuses the key or model."""
    pending = [request for request in requests if request.hash not in journal]
    generator = Generator(config, journal, api_key_from_environment() if api_key is None else api_key, progress)
    return asyncio.run(generator.run(pending))


async def _first_model(config: LLMConfig, api_key: str) -> str:
    client = openai.AsyncOpenAI(base_url=config.base_url, api_key=api_key, timeout=config.timeout, max_retries=2)
    try:
        models = await client.models.list()
    except openai.APIStatusError as error:
        if error.status_code in (401, 403):
            raise FatalLLMError(_fatal_message(error, config, "")) from None
        raise FatalLLMError(f"llm.model is not set and {config.base_url}/models answered HTTP "
                            f"{error.status_code}: set llm.model") from None
    except openai.APIError as error:
        raise FatalLLMError(f"llm.model is not set and {config.base_url}/models failed ({type(error).__name__}): "
                            f"is the server running? Set llm.model") from None
    finally:
        await client.close()
    if not models.data:
        raise FatalLLMError(f"llm.model is not set and {config.base_url}/models lists no model")
    return models.data[0].id


def build_requests(plan: SamplePlan, image_paths: dict[str, str], builder: PromptBuilder, config: LLMConfig,
                   model: str, seed: int) -> list[LLMRequest]:
    """One chat-completions request per planned conversation; the same plan and config give the same bodies."""
    requests = []
    for conversation in plan.conversations:
        body: dict[str, Any] = {
            "model": model,
            "messages": builder.messages(conversation.index, [pair.caption for pair in conversation.images]),
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
        }
        if config.request_seed:
            body["seed"] = stable_seed(seed, "request", conversation.index) % 2**31
        requests.append(LLMRequest(conversation.id, body, _metadata(conversation, image_paths)))
    return requests


def _metadata(conversation: PlannedConversation, image_paths: dict[str, str]) -> dict:
    images = []
    for pair in conversation.images:
        image = {"key": pair.key, "caption": pair.caption, "image": os.path.abspath(image_paths[pair.id])}
        if pair.url:
            image["url"] = pair.url
        images.append(image)
    return {"images": images, "cluster": conversation.cluster}


def raw_records(requests: list[LLMRequest], journal: Journal) -> list[dict]:
    """raw.jsonl's records: the answered requests, in plan order."""
    records = []
    for request in requests:
        entry = journal.entries.get(request.hash)
        if entry is not None:
            records.append({"id": request.id, "images": request.metadata["images"], "response": entry["response"],
                            "usage": entry.get("usage", {}), "cluster": request.metadata["cluster"],
                            "request_hash": request.hash})
    return records


def run_generate(config: DatagenConfig, api_key: str | None = None) -> dict:
    """Plan, prompt, ask (resuming from the journal), write raw.jsonl and failed.jsonl; return the report."""
    output_dir = Path(config.run.output_dir)
    api_key = api_key_from_environment() if api_key is None else api_key
    clusters = read_clusters(str(output_dir))
    plan = plan_conversations(clusters, config.sample, config.run.seed)
    if plan.summary["short_of_images"]:
        logger.warning("the clusters hold images for only %d of %d conversations (sample.max_image_reuse=%d)",
                       len(plan.conversations), config.sample.num_conversations, config.sample.max_image_reuse)
    update_report(output_dir, "sample", plan.summary)
    image_paths = materialize_images([pair for c in plan.conversations for pair in c.images],
                                     output_dir / PAIR_IMAGES_DIR)
    model = config.llm.model or asyncio.run(_first_model(config.llm, api_key))
    builder = PromptBuilder(config.prompt, config.run.seed)
    requests = build_requests(plan, image_paths, builder, config.llm, model, config.run.seed)
    journal = Journal(output_dir / JOURNAL_NAME)
    try:
        already = sum(1 for request in requests if request.hash in journal)
        if already:
            logger.info("resuming: %d of %d conversation(s) already answered in %s", already, len(requests),
                        journal.path)
        outcome = run_requests(requests, config.llm, journal, api_key, config.run.progress)
        records = raw_records(requests, journal)
        truncated = sum(1 for request in requests
                        if journal.entries.get(request.hash, {}).get("finish_reason") == "length")
    finally:
        journal.close()
    atomic_write_jsonl(output_dir / RAW_NAME, records)
    order = {request.id: index for index, request in enumerate(requests)}
    atomic_write_jsonl(output_dir / FAILED_NAME, sorted(outcome.failures, key=lambda failure: order[failure["id"]]))
    failure_reasons: dict[str, int] = {}
    for failure in outcome.failures:
        failure_reasons[failure["reason"]] = failure_reasons.get(failure["reason"], 0) + 1
    usage_totals = {name: sum(record["usage"].get(name, 0) for record in records)
                    for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    report = {
        "model": model,
        "planned": len(requests),
        "answered_before": already,
        "answered_now": outcome.answered,
        "raw_records": len(records),
        "truncated": truncated,  # answers cut at llm.max_tokens (finish_reason "length")
        "failed": len(outcome.failures),
        "failure_reasons": failure_reasons,
        "http_requests": outcome.sent,
        "retries": outcome.retries,
        "retry_reasons": outcome.retry_reasons,
        "tokens": usage_totals,
        "seconds": round(outcome.seconds, 3),
        "busy_seconds": round(outcome.busy_seconds, 3),
        "conversations_per_second": round(outcome.answered / outcome.seconds, 3) if outcome.seconds else None,
        "completion_tokens_per_second": (round(outcome.completion_tokens / outcome.seconds, 1)
                                         if outcome.seconds else None),
    }
    update_report(output_dir, "generate", report)
    logger.info("raw.jsonl: %d conversation(s) (%d answered now, %d before); %d failed (failed.jsonl)",
                len(records), outcome.answered, already, len(outcome.failures))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = step_parser("textbind datagen generate",
                         "Sample images per conversation and ask the LLM (resumable: rerun the same command).")
    config = config_from_arguments(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress bar
    try:
        report = run_generate(config)
    except (FatalLLMError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: report[key] for key in ("planned", "raw_records", "failed", "http_requests")}))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
