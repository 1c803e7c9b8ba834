"""The OpenAI-compatible API: the official `openai` client against a real `scripts/run_server.sh` process."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from demo_helpers import (
    DESCRIBE_PROMPT,
    DESCRIPTIONS,
    DRAW_CAPTION,
    DRAW_PROMPT,
    REPOSITORY,
    free_port,
    script_server,
    toy_image,
    train_demo_checkpoint,
)

API_KEY = "test-key-123"
MAX_IMAGES = 3
MAX_PIXELS = 100_000
MAX_BODY_MEGABYTES = 1


@contextmanager
def api_server(env: dict[str, str], arguments: list[str], log_path: Path, timeout: float = 120.0) -> Iterator[str]:
    """`bash scripts/run_server.sh ARGUMENTS` in its own process group; yields its base URL; always stopped."""
    url = f"http://127.0.0.1:{env['PORT']}"
    with script_server(["bash", "scripts/run_server.sh", *arguments], env, log_path, f"{url}/health", "server",
                       timeout):
        yield url


@pytest.fixture(scope="module")
def server(tiny_paths, model_config, tmp_path_factory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("api")
    checkpoint = train_demo_checkpoint(model_config, directory / "second_stage_model")
    env = {
        "VISION_MODEL": tiny_paths["vision_model"], "QFORMER": tiny_paths["qformer"],
        "LANGUAGE_MODEL": tiny_paths["language_model"], "PROCESSOR": tiny_paths["processor"],
        "CHECKPOINT": str(checkpoint), "IMAGE_DECODER": "toy", "PORT": str(free_port()), "API_KEY": API_KEY,
        "MAX_BATCH_SIZE": "8", "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(directory / "gradio"),
    }
    arguments = ["--num-threads", "1", "--max-new-tokens", "24", "--max-images-per-request", str(MAX_IMAGES),
                 "--max-image-pixels", str(MAX_PIXELS), "--max-body-megabytes", str(MAX_BODY_MEGABYTES),
                 "--with-demo"]
    log_path = directory / "server.log"
    with api_server(env, arguments, log_path) as url:
        yield url
    assert API_KEY not in log_path.read_text()  # the key never reaches the logs


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def data_url(image: Image.Image, kind: str = "png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper())
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_of(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def describe(caption: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(toy_image(caption))}},
                                        {"type": "text", "text": DESCRIBE_PROMPT}]}


def test_plain_answer_reports_the_caption_without_rendering(client) -> None:
    answer = client.chat.completions.create(model="textbind", messages=[{"role": "user", "content": DRAW_PROMPT}],
                                            modalities=["text"])
    message = answer.choices[0].message
    assert message.content.startswith("Here it is: <image>")  # the caption stays in the context, as text
    assert message.model_extra["captions"] == [DRAW_CAPTION] and "images" not in message.model_extra
    usage = answer.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["images"] == 1 and usage.model_extra["generated_images"] == 0


@pytest.mark.parametrize("caption", list(DESCRIPTIONS))
def test_an_image_in(client, caption) -> None:
    answer = client.chat.completions.create(model="textbind", messages=[describe(caption)])
    assert answer.choices[0].message.content == DESCRIPTIONS[caption]
    assert answer.choices[0].finish_reason == "stop"


def test_an_image_out(client) -> None:
    answer = client.chat.completions.create(model="textbind", messages=[{"role": "user", "content": DRAW_PROMPT}])
    message = answer.choices[0].message
    assert message.content == "Here it is: <image>"
    [image] = message.model_extra["images"]
    assert image["type"] == "image_url" and image["caption"] == DRAW_CAPTION
    assert image_of(image["image_url"]["url"]).tobytes() == toy_image(DRAW_CAPTION).tobytes()
    assert answer.usage.model_extra["generated_images"] == 1


def test_streaming_with_an_image_delta(client) -> None:
    stream = client.chat.completions.create(
        model="textbind", messages=[{"role": "user", "content": DRAW_PROMPT}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    image_deltas = [delta for delta in deltas if (delta.model_extra or {}).get("images")]
    assert len(image_deltas) == 1
    [image] = image_deltas[0].model_extra["images"]
    assert image["caption"] == DRAW_CAPTION
    assert image_of(image["image_url"]["url"]).tobytes() == toy_image(DRAW_CAPTION).tobytes()
    text = "".join(delta.content or "" for delta in deltas)
    assert " ".join(text.split()) == "Here it is: <image>"
    text_before_image = "".join(delta.content or "" for delta in deltas[: deltas.index(image_deltas[0])])
    assert text_before_image.strip() == "Here it is:"  # text arrives before the image, as it is decoded
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_extra["generated_images"] == 1


def test_twenty_concurrent_multi_turn_conversations(server, client) -> None:
    """Each client describes its own image, asks for a drawing, then sends the drawing back as history."""
    captions = list(DESCRIPTIONS)

    def converse(index: int) -> tuple[int, list[str]]:
        caption = captions[index % 2]
        messages = [describe(caption)]
        first = client.chat.completions.create(model="textbind", messages=messages).choices[0].message
        messages += [{"role": "assistant", "content": first.content},
                     {"role": "user", "content": DRAW_PROMPT}]
        second = client.chat.completions.create(model="textbind", messages=messages).choices[0].message
        images = second.model_extra.get("images", [])
        messages += [{"role": "assistant", "content": second.content, "images": images},
                     {"role": "user", "content": DESCRIBE_PROMPT}]
        third = client.chat.completions.create(model="textbind", messages=messages, max_tokens=8)
        return index, [first.content, second.content, [image["caption"] for image in images],
                       third.choices[0].finish_reason]

    with ThreadPoolExecutor(20) as pool:
        results = dict(pool.map(converse, range(20)))
    assert len(results) == 20
    deadline = time.monotonic() + 10
    while (statistics := httpx.get(f"{server}/health").json()["engine"])["active"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine releases finished rows at its next step
    assert statistics["peak_batch_size"] > 1 and statistics["active"] == 0  # they did share the batch
    for index, (first, second, drawn, finish_reason) in results.items():
        assert first == DESCRIPTIONS[captions[index % 2]], index  # the answer about this client's own image
        assert second == "Here it is: <image>" and drawn == [DRAW_CAPTION], index
        assert finish_reason in ("stop", "length")


def test_models_health_and_image_generation(server, client) -> None:
    assert [model.id for model in client.models.list().data] == ["textbind"]
    with urllib.request.urlopen(f"{server}/health") as response:
        assert response.status == 200
    result = client.images.generate(prompt="a large blue square", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    assert image.tobytes() == toy_image("a large blue square").tobytes()


def test_the_demo_answers_through_the_same_engine(server, client) -> None:
    """--with-demo: the Gradio demo at /demo is one more client of the batched engine, beside the API."""
    from gradio_client import Client

    demo = Client(f"{server}/demo/", verbose=False, download_files=False)
    job = demo.submit(text=DRAW_PROMPT, images=None, api_name="/chat")
    answer = client.chat.completions.create(model="textbind", messages=[describe(DRAW_CAPTION)])
    demo_answer, image_files, info = job.result(timeout=120)
    assert answer.choices[0].message.content == DESCRIPTIONS[DRAW_CAPTION]
    assert demo_answer == "Here it is: <image>" and info["captions"] == [DRAW_CAPTION] and len(image_files) == 1


def post(server: str, body: bytes | dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60)
    return httpx.post(f"{server}/v1/chat/completions", content=body, headers={**headers,
                      "Content-Type": "application/json"}, timeout=60)


def user_with(*urls: str, text: str = "What is it?") -> dict:
    return {"model": "textbind", "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": url}} for url in urls), {"type": "text", "text": text}]}]}


def malformed_requests() -> dict[str, tuple[bytes | dict, int, str]]:
    """name -> (body, status, a word the error message must hold)."""
    red = data_url(toy_image(DRAW_CAPTION))
    big = Image.new("RGB", (400, 400), (10, 20, 30))
    return {
        "bad json": (b'{"model": "textbind", "messages": [', 400, "JSON"),
        "not an object": (b"[1, 2]", 400, "object"),
        "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
        "roles out of order": ({"model": "textbind", "messages": [{"role": "assistant", "content": "hi"},
                                                                   {"role": "user", "content": "hi"}]}, 400, "role"),
        "ends with assistant": ({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}, 400, "last message"),
        "unknown role": ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "role"),
        "no messages": ({"model": "textbind"}, 400, "messages"),
        "n=2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
        "bad temperature": ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
                            "temperature"),
        "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
                            "finite"),
        "seed out of range": ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed"),
        "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
        "undecodable data url": (user_with("data:image/png;base64,@@not base64@@"), 400, "base64"),
        "non-image data url": (user_with("data:text/plain;base64,aGVsbG8="), 400, "data:image"),
        "not an image inside": (user_with("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400,
                                "not a readable image"),
        "remote url": (user_with("https://example.com/cat.png"), 400, "network"),
        "local path without flag": (user_with("/etc/passwd"), 400, "local file"),
        "too many images": (user_with(*[red] * (MAX_IMAGES + 1)), 400, "images"),
        "too many pixels": (user_with(data_url(big)), 400, "pixels"),
        "placeholder without image": ({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "see <image>"},
                                                    {"role": "user", "content": "and?"}]}, 400, "placeholder"),
        "prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400,
                                           "max_length"),
        "body over the limit": (b'{"messages": "' + b"x" * (MAX_BODY_MEGABYTES * 2**20 + 10) + b'"}', 413, "limit"),
    }


def test_malformed_requests_get_actionable_errors_and_the_server_goes_on(server, client) -> None:
    for name, (body, status, word) in malformed_requests().items():
        response = post(server, body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert word.lower() in error["message"].lower(), (name, error["message"])
    for key in (None, "wrong-key"):
        response = post(server, {"messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    # Still serving, and control strings sent as text stay text.
    answer = client.chat.completions.create(
        model="textbind", messages=[{"role": "user", "content": "<start> <image> <end>"}], modalities=["text"])
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_top_k_one_samples_the_greedy_answer_and_sampling_fields_are_parsed(client) -> None:
    """top_k, min_p and repetition_penalty are extra body fields (as vLLM names them): top_k=1 leaves one token
    to draw, so a hot sampled answer is the greedy one."""
    from textbind.serve.api import ServerSettings, chat_request

    caption = next(iter(DESCRIPTIONS))
    answer = client.chat.completions.create(model="textbind", messages=[describe(caption)], temperature=1.9,
                                            seed=7, extra_body={"top_k": 1})
    assert answer.choices[0].message.content == DESCRIPTIONS[caption]
    request = chat_request({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.8, "top_k": 5,
                            "min_p": 0.1, "repetition_penalty": 1.2}, ServerSettings())
    config = request.config
    assert config.do_sample and (config.top_k, config.min_p, config.repetition_penalty) == (5, 0.1, 1.2)
    defaults = chat_request({"messages": [{"role": "user", "content": "hi"}]}, ServerSettings()).config
    assert (defaults.top_k, defaults.min_p, defaults.repetition_penalty) == (0, 0.0, 1.0)


def test_stop_strings_cut_the_answer(client) -> None:
    answer = client.chat.completions.create(model="textbind", messages=[describe(DRAW_CAPTION)], stop=["red"])
    assert answer.choices[0].message.content == "I see a small"
    assert answer.choices[0].finish_reason == "stop"


def test_run_server_script_passes_variables_and_keeps_the_key_off_the_command_line(tmp_path) -> None:
    """run_server.sh with a stand-in python3 that prints its arguments and the key it was given."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\necho "key=${TEXTBIND_API_KEY:-}"\n')
    fake.chmod(0o755)
    variables = {"CONFIG", "CHECKPOINT", "VISION_MODEL", "QFORMER", "LANGUAGE_MODEL", "PROCESSOR", "SD_BASE",
                 "SD_REFINER", "IMAGE_DECODER", "DTYPE", "HOST", "PORT", "API_KEY", "MAX_BATCH_SIZE",
                 "TEXTBIND_API_KEY"}
    clean = {key: value for key, value in os.environ.items() if key not in variables}
    clean["PATH"] = f"{fake.parent}:{clean['PATH']}"

    def run(**extra: str) -> list[str]:
        result = subprocess.run(["bash", "scripts/run_server.sh", "--with-demo"], cwd=REPOSITORY,
                                env={**clean, **extra}, capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.splitlines()

    def value(arguments: list[str], flag: str) -> str:
        return arguments[arguments.index(flag) + 1]

    arguments = run()
    assert arguments[:3] == ["-m", "textbind", "serve"] and arguments[-2:] == ["--with-demo", "key="]
    assert value(arguments, "--host") == "127.0.0.1" and value(arguments, "--port") == "8000"
    assert value(arguments, "--max-batch-size") == "8"
    arguments = run(API_KEY="s3cret", MAX_BATCH_SIZE="16", PORT="9001", IMAGE_DECODER="toy")
    assert arguments[-1] == "key=s3cret" and not any("s3cret" in argument for argument in arguments[:-1])
    assert value(arguments, "--max-batch-size") == "16" and value(arguments, "--port") == "9001"
    assert value(arguments, "--config").endswith("configs/toy/model.yaml")


def test_any_json_body_is_refused_with_an_api_error_or_parsed() -> None:
    """Odd shapes anywhere in a body give an APIError (a 4xx answer), never another exception."""
    from textbind.serve.api import APIError, ServerSettings, chat_request

    settings = ServerSettings(max_images_per_request=2, max_image_pixels=10_000)
    red = data_url(toy_image(DRAW_CAPTION))
    odd_values = [None, 0, -1, 1.5, float("inf"), "", "x", [], {}, [None], [{}], {"url": 3}, True]
    templates = [
        lambda v: {"messages": v},
        lambda v: {"messages": [v]},
        lambda v: {"messages": [{"role": "user", "content": v}]},
        lambda v: {"messages": [{"role": "user", "content": [v]}]},
        lambda v: {"messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]},
        lambda v: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": v}]}]},
        lambda v: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>",
                                                                    "images": v}, {"role": "user", "content": "x"}]},
        lambda v: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>",
                                                                    "images": [v]}, {"role": "user", "content": "x"}]},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "top_p": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "top_k": v, "min_p": v, "repetition_penalty": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "stop": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "modalities": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "stream": v, "stream_options": v},
        lambda v: {"messages": [{"role": "user", "content": "hi"}], "model": v},
    ]
    parsed = 0
    for template in templates:
        for value in odd_values:
            try:
                chat_request(template(value), settings)
                parsed += 1
            except APIError as error:
                assert 400 <= error.status < 500 and error.message
    assert parsed > 0  # the harmless ones (e.g. max_tokens=None) pass
    request = chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": red}},
        {"type": "text", "text": "with <image> [INST]"}]}]}, settings)
    turn = request.conversation.turns[0]
    assert turn.content.count("<image>") == len(turn.image_list) == 1  # typed markers stay text
    assert turn.content.startswith("Compare <image> with")


def test_local_image_paths_only_under_the_configured_directory(tmp_path) -> None:
    from textbind.serve.api import APIError, ServerSettings, decode_image_url

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    toy_image(DRAW_CAPTION).save(allowed / "red.png")
    toy_image(DRAW_CAPTION).save(tmp_path / "outside.png")
    settings = ServerSettings(local_image_dir=str(allowed))
    for url in ("red.png", f"file://{allowed / 'red.png'}"):
        assert decode_image_url(url, "image", settings).tobytes() == toy_image(DRAW_CAPTION).tobytes()
    for url in ("../outside.png", str(tmp_path / "outside.png"), "missing.png", "http://127.0.0.1/red.png"):
        with pytest.raises(APIError, match="image directory|network"):
            decode_image_url(url, "image", settings)
    with pytest.raises(APIError, match="local file paths are not accepted"):
        decode_image_url("red.png", "image", ServerSettings())
