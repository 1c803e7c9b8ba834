"""The browser demo: a Gradio 6 chat with TextBind, and the same chat as an API (`python -m textbind demo`).

    textbind demo --config configs/model/llama2_7b.yaml --checkpoint checkpoint/second_stage_model.pt \\
        --sd-base checkpoint/stable-diffusion-xl-base-1.0 --sd-refiner checkpoint/stable-diffusion-xl-refiner-1.0 \\
        [--host 127.0.0.1 | --listen] [--port 7860] [key=value ...]

(`bash scripts/run_demo.sh` runs this with the paths of the README.) The user types text and
attaches images (several per message); the answer streams in, and images the model draws appear
where it drew them. The conversation, generated images included, is kept per browser tab in
`gr.State` and fed back to the model with every message. Controls: greedy or top-p decoding,
temperature, top-p, max new tokens, image generation on/off, seed; Stop, Retry and Clear;
examples from `data/examples.json` (`--examples`). The page says which model it serves (from the
`config.yaml` / `textbind.json` exported beside the checkpoint) and what the examples file says the
model knows (the toy world's examples describe it in one line).

The server publishes no file but the example images themselves and what the demo writes
(generated images, upload thumbnails): Gradio's `allowed_paths` lists exactly those, never a
folder of data. A temporary output directory is removed when the server stops (also on SIGTERM).

The server binds 127.0.0.1 unless told otherwise (`--listen` or `--host 0.0.0.0` opens it to
the network; `--share` asks Gradio for a public link). Requests go through Gradio's queue
(`--concurrency-limit` events at once); answers are generated one at a time, since all sessions
share one model (see `textbind.serve.chat.DemoChat`).

Sessions are kept at most `--max-sessions` at once and forgotten `--session-hours` after their last
message; each holds its images at the size the model reads (see `textbind.serve.chat`).

API (for `gradio_client`; state is kept per client session, so a `Client` holds one conversation):
  /chat   (text, images: list of image files, decoding, temperature, top_p, max_new_tokens,
           generate_images, seed) -> (answer, image files, info)
          `answer` is the assistant turn in the stage-2 format (one `<image>` marker per returned
          image file, in order) or the demo's refusal; `info` is a dict with `captions`,
          `finish_reason` ("stop", "length", or "image_limit" when the model began an image the
          image budget had no room for), `refused` ("" when the model answered; "too_long",
          "limit", "upload", "empty", "settings", "error"), `notice` (what the demo told the user
          beside the answer), `decoding`, `seconds`, `conversation_words`, `conversation_images`,
          `conversation_turns`. All arguments but `text` have defaults (the controls' values).
  /clear  () -> info: forgets the client's conversation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textbind.generation import InterleavedGenerator
from textbind.serve.chat import (
    DECODING_CHOICES,
    DECODING_GREEDY,
    DECODING_TOP_P,
    ChatSession,
    ChatUpdate,
    DemoChat,
    DemoSettings,
    Example,
    ExampleSet,
    check_seed,
    load_examples,
    path_free,
)

if TYPE_CHECKING:  # Gradio takes seconds to import: `--help` and the argument helpers do without it
    import gradio as gr

    from textbind.runtime import GeneratorSetup

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLES = "data/examples.json"

DESCRIPTION = """\
Chat with **TextBind** in text and images. Attach images with the clip button (several per message);
the model answers in text and, to show an image, writes a caption that the image decoder draws.
A conversation may hold up to {words} words and {images} images. Generated images are fed back to the model.
"""


def build_app(generator: InterleavedGenerator, settings: DemoSettings, example_set: ExampleSet | None = None
              ) -> gr.Blocks:
    """The demo's Blocks around `generator` (an `InterleavedGenerator` in eval mode); serve it with `launch`.

    `example_set` defaults to the examples of `settings.examples_path` (DataError if it is broken).
    The returned Blocks carries the `DemoChat` as `demo.textbind_chat` (its output directory and lock)
    and the examples as `demo.textbind_examples`.
    """
    import gradio as gr

    if example_set is None:
        example_set = load_examples(settings.examples_path) if settings.examples_path else ExampleSet()
    examples = example_set.examples
    chat = DemoChat(generator, settings)
    defaults = settings.generation
    private: dict[str, Any] = {"api_visibility": "private"}  # UI events; the API is /chat and /clear

    with gr.Blocks(title=settings.title, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        header = f"# {settings.title}\n" + DESCRIPTION.format(
            words=settings.safe_word_num, images=settings.safe_image_num)
        if settings.model_description:
            header += f"\n**Model:** {settings.model_description}\n"
        if example_set.description:
            header += f"\n**What it knows:** {example_set.description}\n"
        gr.Markdown(header, elem_id="about")
        # Every session's state expires session_seconds after its last change (Gradio checks each second);
        # a closed tab's state goes after an hour at most.
        session_state = gr.State(None, time_to_live=settings.session_seconds)
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=520, buttons=["copy"],
                             allow_tags=False, feedback_options=None)
        textbox = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", show_label=False, elem_id="message", autofocus=True,
            placeholder="Type a message; attach images with the clip button. Enter sends.",
        )
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop", size="sm", variant="stop")
            retry_button = gr.Button("Retry", elem_id="retry", size="sm")
            clear_button = gr.Button("Clear", elem_id="clear", size="sm")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                decoding = gr.Radio(list(DECODING_CHOICES), label="Decoding",
                                    value=DECODING_TOP_P if defaults.do_sample else DECODING_GREEDY)
                generate_images = gr.Checkbox(value=defaults.max_images > 0, label="Generate images")
                seed = gr.Number(value=-1 if defaults.seed is None else defaults.seed, precision=0,
                                 label="Seed (-1: random)")
            with gr.Row():
                temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, max(settings.max_new_tokens_limit, defaults.max_new_tokens),
                                           value=defaults.max_new_tokens, step=1, label="Max new tokens")
        example_list = None
        if examples:
            example_list = gr.Dataset(
                label="Examples", components=[textbox], type="index", samples_per_page=20,
                samples=[[{"text": example.text, "files": example.files}] for example in examples],
            )
        # The API's own inputs and outputs; the controls above are its settings arguments.
        with gr.Column(visible=False):
            api_text = gr.Textbox(label="text")
            api_images = gr.File(label="images", file_count="multiple")
            api_answer = gr.Textbox(label="answer")
            api_answer_images = gr.File(label="image files", file_count="multiple")
            api_info = gr.JSON(label="info")
            api_chat_button = gr.Button("chat")
            api_clear_button = gr.Button("clear")

        controls = [decoding, temperature, top_p, max_new_tokens, generate_images, seed]

        def options_of(values: tuple[Any, ...]) -> dict[str, Any]:
            names = ("decoding", "temperature", "top_p", "max_new_tokens", "generate_images", "seed")
            return dict(zip(names, values, strict=True))

        def stream_to_chatbot(updates: Iterator[ChatUpdate]) -> Iterator[tuple]:
            # The textbox is emptied and locked while the answer streams; a `.then` unlocks it even after an error.
            locked = gr.MultimodalTextbox(value=None, interactive=False)
            try:
                for update in updates:
                    yield for_chatbot(update.messages), update.session or gr.skip(), locked
                    locked = gr.skip()
            except Exception as error:  # DemoChat answers its own failures; anything else gets a path-free toast
                raise user_error(error) from error
            finally:
                updates.close()  # on Stop: ends the generation now and frees the model for other sessions

        def ui_submit(message: dict[str, Any] | None, session: ChatSession | None, *values: Any) -> Iterator[tuple]:
            message = message or {}
            updates = chat.submit(session, message.get("text", ""), message.get("files", []), options_of(values))
            yield from stream_to_chatbot(updates)

        def ui_retry(session: ChatSession | None, *values: Any) -> Iterator[tuple]:
            yield from stream_to_chatbot(chat.retry(session, options_of(values)))

        def user_error(error: Exception) -> gr.Error:
            logger.exception("demo event failed")
            return gr.Error(f"Something went wrong ({type(error).__name__}: {path_free(str(error))}). "
                            "Press Clear to start again.")

        def for_chatbot(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # An image with a caption as a gr.Image: Gradio's chatbot shows a file message's `alt_text` nowhere,
            # but an image component's alt_text becomes the <img> element's alt attribute.
            return [
                {**message, "content": gr.Image(message["content"]["path"], alt_text=message["content"]["alt_text"],
                                                show_label=False, buttons=["download", "fullscreen"])}
                if isinstance(message["content"], dict) and message["content"].get("alt_text") else message
                for message in messages
            ]

        def ui_unlock() -> Any:
            return gr.MultimodalTextbox(interactive=True)

        def ui_clear() -> tuple:
            return [], chat.clear(), gr.MultimodalTextbox(value=None, interactive=True)

        def ui_load_example(index: int) -> tuple:
            # An example with earlier turns replaces the conversation; a one-message example only fills the textbox.
            example: Example = examples[index]
            message = gr.MultimodalTextbox(value={"text": example.text, "files": example.files}, interactive=True)
            if not example.history:
                return gr.skip(), gr.skip(), message
            session = ChatSession(turns=list(example.history), messages=list(example.history_messages),
                                  exchanges=_exchanges_of(example.history_messages))
            return for_chatbot(session.messages), session, message

        # The API functions' parameter names and defaults are what gradio_client shows and accepts.
        def chat_endpoint(
            text: str,
            images: list[str] | None = None,
            decoding: str = decoding.value,
            temperature: float = temperature.value,
            top_p: float = top_p.value,
            max_new_tokens: int = max_new_tokens.value,
            generate_images: bool = generate_images.value,
            seed: int = seed.value,
            session: ChatSession | None = None,
        ) -> tuple:
            options = {"decoding": decoding, "temperature": temperature, "top_p": top_p,
                       "max_new_tokens": max_new_tokens, "generate_images": generate_images, "seed": seed}
            try:
                final = list(chat.submit(session, text, images or [], options))[-1]
            except Exception as error:  # DemoChat answers its own failures; anything else: a path-free message
                raise user_error(error) from error
            assert final.result is not None and final.session is not None  # the last update carries both
            result = final.result
            return result.text, result.image_paths or None, result.info(final.session), final.session

        def clear_endpoint() -> tuple:
            session = chat.clear()
            return {"conversation_turns": 0, "conversation_words": 0, "conversation_images": 0}, session

        chat_outputs = [chatbot, session_state, textbox]
        # "multiple": after Stop, the stopped event stays pending until the model's current step (an SDXL image)
        # ends; a message sent meanwhile must queue (and wait for the model), not be dropped. The textbox is
        # locked while an answer streams, so nothing else can send twice.
        submitted = textbox.submit(ui_submit, [textbox, session_state, *controls], chat_outputs,
                                   trigger_mode="multiple", **private)
        submitted.then(ui_unlock, None, textbox, **private)
        retried = retry_button.click(ui_retry, [session_state, *controls], chat_outputs, **private)
        retried.then(ui_unlock, None, textbox, **private)
        # Stop keeps what was shown so far on the screen; the session keeps only finished answers.
        stop_button.click(ui_unlock, None, textbox, cancels=[submitted, retried], **private)
        clear_button.click(ui_clear, None, chat_outputs, cancels=[submitted, retried], **private)
        if example_list is not None:
            example_list.click(ui_load_example, example_list, chat_outputs, **private)
        api_chat_button.click(
            chat_endpoint, [api_text, api_images, *controls, session_state],
            [api_answer, api_answer_images, api_info, session_state], api_name="chat",
            api_description="Send a message (text and image files) in this client's conversation; "
                            "returns the answer (stage-2 content), its image files and an info dict.",
        )
        api_clear_button.click(clear_endpoint, None, [api_info, session_state], api_name="clear",
                               api_description="Forget this client's conversation.")
    demo.textbind_chat = chat  # type: ignore[attr-defined]
    demo.textbind_examples = example_set  # type: ignore[attr-defined]
    return demo


def _exchanges_of(messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(user start, answer start) of each user -> assistant exchange in a list of chatbot messages."""
    exchanges, user_start = [], None
    for index, message in enumerate(messages):
        previous = messages[index - 1]["role"] if index else None
        if message["role"] == "user" and previous != "user":
            user_start = index
        elif message["role"] == "assistant" and previous == "user" and user_start is not None:
            exchanges.append((user_start, index))
    return exchanges


# --- Command line ---------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    from textbind.runtime import add_generation_arguments, add_setup_arguments

    parser = argparse.ArgumentParser(
        prog="textbind demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    server.add_argument("--listen", action="store_true", help="open the demo to the network (same as --host 0.0.0.0)")
    server.add_argument("--share", action="store_true", help="also ask Gradio for a public *.gradio.live link")
    server.add_argument("--port", type=int, default=7860)
    server.add_argument("--concurrency-limit", type=int, default=4,
                        help="queue events that run at once (answers are still generated one at a time)")
    server.add_argument("--max-queue-size", type=int, default=64, help="requests that may wait in the queue")
    server.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); small models gain nothing from more")
    demo = parser.add_argument_group("demo")
    demo.add_argument("--examples", default=DEFAULT_EXAMPLES,
                      help="example conversations (stage-2 style JSON; a relative path is also looked for in "
                           "the checkout and the installed package; every image it names must exist; "
                           "\"\": no examples)")
    demo.add_argument("--safe-word-num", type=int, default=650, help="words per conversation")
    demo.add_argument("--safe-image-num", type=int, default=4, help="images per conversation, uploaded and generated")
    demo.add_argument("--max-message-characters", type=int, default=10_000,
                      help="longest message in characters (refused before anything reads it)")
    demo.add_argument("--max-message-tokens", type=int, default=2_000, help="longest message in tokens")
    demo.add_argument("--max-upload-megabytes", type=float, default=10.0, help="largest accepted image file")
    demo.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                      help="largest accepted image (width x height)")
    demo.add_argument("--session-hours", type=float, default=1.0,
                      help="forget a conversation (and its images) this long after its last message")
    demo.add_argument("--max-sessions", type=int, default=1000,
                      help="conversations kept at once; past it the least recently used is forgotten")
    demo.add_argument("--output-dir", default="",
                      help="keep generated images (and upload thumbnails) here (default: a temporary directory, "
                           "removed when the server stops)")
    demo.add_argument("--system", default="", help="a system prompt for every conversation")
    demo.add_argument("--title", default="TextBind")
    demo.add_argument("--verbose", action="store_true", help="log debug messages")
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    # 256: the original demo's --max_output_length. Seed -1: a fresh seed per answer, so that sampling
    # gives another answer each time (and SDXL another picture); set one in the UI to reproduce an answer.
    parser.set_defaults(max_new_tokens=256, seed=-1)
    args = parser.parse_intermixed_args(argv)
    if args.listen:
        args.host = "0.0.0.0"
    return args


def resolve_examples_path(path: str) -> str:
    """The examples file to read ("" for none). FileNotFoundError when a file asked for is missing;
    the default file, absent from an installed package, only leaves the demo without examples."""
    if not path:
        return ""
    from textbind.resources import find_resource

    candidate = find_resource(path)  # relative paths are also tried in the checkout and the installed package
    if candidate is not None:
        return str(candidate)
    if path == DEFAULT_EXAMPLES:
        logger.warning("examples file %s not found: the demo shows no examples", path)
        return ""
    raise FileNotFoundError(f"examples file {path} not found (--examples \"\" runs the demo without examples)")


def settings_from_arguments(args: argparse.Namespace) -> DemoSettings:
    from textbind.runtime import generation_config_from_arguments

    check_seed(args.seed)
    generation = generation_config_from_arguments(args)
    if generation.seed is not None and generation.seed < 0:
        generation.seed = None
    return DemoSettings(
        safe_word_num=args.safe_word_num,
        safe_image_num=args.safe_image_num,
        max_upload_bytes=int(args.max_upload_megabytes * 1024 * 1024),
        max_upload_pixels=args.max_upload_pixels,
        max_message_characters=args.max_message_characters,
        max_message_tokens=args.max_message_tokens,
        examples_path=resolve_examples_path(args.examples),
        output_dir=args.output_dir,
        system_prompt=args.system,
        title=args.title,
        concurrency_limit=args.concurrency_limit,
        session_seconds=args.session_hours * 3600,
        max_sessions=args.max_sessions,
        max_queue_size=args.max_queue_size,
        generation=generation,
    ).validate()


def describe_model(setup: GeneratorSetup) -> str:
    """One line of Markdown saying which model is served, read from what the export wrote beside it.

    A checkpoint directory exported by `textbind train` holds `config.yaml` (the run's resolved
    config: its stage) and `textbind.json` (its steps); the language model's `config.json` gives its
    class and size. Whatever is missing is left out.
    """
    model = setup.model
    parts = []
    if model.checkpoint:
        checkpoint = Path(model.checkpoint)
        export = checkpoint if checkpoint.is_dir() else checkpoint.parent
        details = []
        run = _read_yaml(export / "config.yaml")
        stage = (run.get("data") or {}).get("stage") if isinstance(run, dict) else None
        if stage:
            details.append(f"stage {stage}")
        steps = _read_json(export / "textbind.json").get("steps")
        if isinstance(steps, int):
            details.append(f"{steps:,} training steps")
        parts.append(f"`{checkpoint.name}`" + (f" ({', '.join(details)})" if details else ""))
    else:
        parts.append("the base weights (no trained checkpoint)")
    language = _read_json(Path(model.language_model) / "config.json") if model.language_model else {}
    if language:
        architecture = (language.get("architectures") or [language.get("model_type", "")])[0]
        size = [f"{language[key]} {label}" for key, label in (("num_hidden_layers", "layers"),
                                                              ("hidden_size", "hidden")) if key in language]
        parts.append(f"language model `{Path(model.language_model).name}` ({', '.join([architecture, *size])})")
    parts.append(f"images drawn by: {setup.image_decoder.value}")
    return "; ".join(parts)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def allowed_files(demo: gr.Blocks) -> list[str]:
    """What the server may publish besides Gradio's own uploads: the demo's output directory and
    exactly the example images (the files, not their folder: it may hold training data)."""
    chat: DemoChat = demo.textbind_chat  # type: ignore[attr-defined]
    examples: ExampleSet = demo.textbind_examples  # type: ignore[attr-defined]
    return [str(chat.output_dir), *examples.image_files]


def launch(demo: gr.Blocks, settings: DemoSettings, host: str, port: int, *, share: bool = False,
           prevent_thread_lock: bool = False) -> Any:
    """Queue and serve `demo` (blocks unless `prevent_thread_lock`)."""
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue_size)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=allowed_files(demo),
        # Gradio's own hard cap on request files; the demo refuses files above max_upload_bytes with a message.
        max_file_size=4 * settings.max_upload_bytes,
        state_session_capacity=settings.max_sessions,
        show_error=True,  # the demo's own messages only: they are written without server paths
        ssr_mode=False,
        footer_links=["api"],
        prevent_thread_lock=prevent_thread_lock,
    )


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a service manager, `kill`) -> the same orderly shutdown as Ctrl-C, so the temporary
    output directory is removed: by default SIGTERM ends Python without running `finally` blocks."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Before Gradio is imported: no usage statistics or version checks from a demo that may run offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from textbind.runtime import build_generator, setup_from_arguments

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        settings = settings_from_arguments(args)
        # The examples before the model: a broken examples file stops the demo in a second, not after loading.
        example_set = load_examples(settings.examples_path) if settings.examples_path else ExampleSet()
        setup = setup_from_arguments(args)
        settings.model_description = describe_model(setup)
        generator = build_generator(setup)
    except (FileNotFoundError, ValueError) as error:  # ConfigError and DataError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo = build_app(generator, settings, example_set)
    logger.info("serving %s on http://%s:%d", settings.model_description, args.host, args.port)
    logger.info("generated images go to %s", demo.textbind_chat.output_dir)  # type: ignore[attr-defined]
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        launch(demo, settings, args.host, args.port, share=args.share)
    except KeyboardInterrupt:  # SIGTERM while Gradio was still starting
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        demo.close()
        demo.textbind_chat.close()  # type: ignore[attr-defined]
    return 0
