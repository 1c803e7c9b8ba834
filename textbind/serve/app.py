"""The browser demo: a Gradio 6 chat with TextBind, and the same chat as an API (`python -m textbind.serve`).

    textbind demo --config configs/model/llama2_7b.yaml --checkpoint checkpoint/second_stage_model.pt \\
        --sd-base checkpoint/stable-diffusion-xl-base-1.0 --sd-refiner checkpoint/stable-diffusion-xl-refiner-1.0 \\
        [--host 127.0.0.1 | --listen] [--port 7860] [key=value ...]

(`bash scripts/run_demo.sh` runs this with the paths of the README.) The user types text and
attaches images (several per message); the answer streams in, and images the model draws appear
where it drew them. The conversation, generated images included, is kept per browser tab in
`gr.State` and fed back to the model with every message. Controls: greedy or top-p decoding,
temperature, top-p, max new tokens, image generation on/off, seed; Retry and Clear; examples
from `data/examples.json`.

The server binds 127.0.0.1 unless told otherwise (`--listen` or `--host 0.0.0.0` opens it to
the network; `--share` asks Gradio for a public link). Requests go through Gradio's queue
(`--concurrency-limit` events at once); answers are generated one at a time, since all sessions
share one model (see `textbind.serve.chat.DemoChat`).

API (for `gradio_client`; state is kept per client session, so a `Client` holds one conversation):
  /chat   (text, images: list of image files, decoding, temperature, top_p, max_new_tokens,
           generate_images, seed) -> (answer, image files, info)
          `answer` is the assistant turn in the stage-2 format (one `<image>` marker per returned
          image file, in order) or the demo's refusal; `info` is a dict with `captions`,
          `finish_reason`, `refused` ("" when the model answered; "limit", "upload", "empty",
          "settings", "error"), `seconds`, `conversation_words`, `conversation_images`,
          `conversation_turns`. All arguments but `text` have defaults (the controls' values).
  /clear  () -> info: forgets the client's conversation.
"""

from __future__ import annotations

import argparse
import logging
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
    load_examples,
)

if TYPE_CHECKING:  # Gradio takes seconds to import: `--help` and the argument helpers do without it
    import gradio as gr

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLES = "data/examples.json"

DESCRIPTION = """\
Chat with **TextBind** in text and images. Attach images with the clip button (several per message);
the model answers in text and, to show an image, writes a caption that the image decoder draws.
A conversation may hold up to {words} words and {images} images. Generated images are fed back to the model.
"""


def build_app(generator: InterleavedGenerator, settings: DemoSettings) -> gr.Blocks:
    """The demo's Blocks around `generator` (an `InterleavedGenerator` in eval mode); call `.queue()` and `.launch()`.

    The returned Blocks carries the `DemoChat` as `demo.textbind_chat` (its output directory and lock).
    """
    import gradio as gr

    chat = DemoChat(generator, settings)
    examples = load_examples(settings.examples_path, chat.output_dir) if settings.examples_path else []
    defaults = settings.generation
    private: dict[str, Any] = {"api_visibility": "private"}  # UI events; the API is /chat and /clear

    with gr.Blocks(title=settings.title, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"# {settings.title}\n" + DESCRIPTION.format(
            words=settings.safe_word_num, images=settings.safe_image_num))
        # Gradio drops a tab's state when the tab closes; API clients' sessions expire after session_seconds.
        session_state = gr.State(None, time_to_live=settings.session_seconds)
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=520, buttons=["copy"],
                             allow_tags=False, feedback_options=None)
        textbox = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", show_label=False, elem_id="message", autofocus=True,
            placeholder="Type a message; attach images with the clip button. Enter sends.",
        )
        with gr.Row():
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
        example_set = None
        if examples:
            example_set = gr.Dataset(
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
            for update in updates:
                yield update.messages, update.session or gr.skip(), locked
                locked = gr.skip()

        def ui_submit(message: dict[str, Any] | None, session: ChatSession | None, *values: Any) -> Iterator[tuple]:
            message = message or {}
            updates = chat.submit(session, message.get("text", ""), message.get("files", []), options_of(values))
            yield from stream_to_chatbot(updates)

        def ui_retry(session: ChatSession | None, *values: Any) -> Iterator[tuple]:
            yield from stream_to_chatbot(chat.retry(session, options_of(values)))

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
            return session.messages, session, message

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
            final = list(chat.submit(session, text, images or [], options))[-1]
            assert final.result is not None and final.session is not None  # the last update carries both
            result = final.result
            return result.text, result.image_paths or None, result.info(final.session), final.session

        def clear_endpoint() -> tuple:
            session = chat.clear()
            return {"conversation_turns": 0, "conversation_words": 0, "conversation_images": 0}, session

        chat_outputs = [chatbot, session_state, textbox]
        textbox.submit(ui_submit, [textbox, session_state, *controls], chat_outputs, **private).then(
            ui_unlock, None, textbox, **private)
        retry_button.click(ui_retry, [session_state, *controls], chat_outputs, **private).then(
            ui_unlock, None, textbox, **private)
        clear_button.click(ui_clear, None, chat_outputs, **private)
        if example_set is not None:
            example_set.click(ui_load_example, example_set, chat_outputs, **private)
        api_chat_button.click(
            chat_endpoint, [api_text, api_images, *controls, session_state],
            [api_answer, api_answer_images, api_info, session_state], api_name="chat",
            api_description="Send a message (text and image files) in this client's conversation; "
                            "returns the answer (stage-2 content), its image files and an info dict.",
        )
        api_clear_button.click(clear_endpoint, None, [api_info, session_state], api_name="clear",
                               api_description="Forget this client's conversation.")
    demo.textbind_chat = chat  # type: ignore[attr-defined]
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
                           "the checkout and the installed package)")
    demo.add_argument("--safe-word-num", type=int, default=650, help="words per conversation")
    demo.add_argument("--safe-image-num", type=int, default=4, help="images per conversation, uploaded and generated")
    demo.add_argument("--max-upload-megabytes", type=float, default=10.0, help="largest accepted image file")
    demo.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                      help="largest accepted image (width x height)")
    demo.add_argument("--session-hours", type=float, default=6.0,
                      help="forget a conversation this long after its last message (API clients never close tabs)")
    demo.add_argument("--output-dir", default="", help="keep generated images here (default: a temporary directory)")
    demo.add_argument("--system", default="", help="a system prompt for every conversation")
    demo.add_argument("--title", default="TextBind")
    demo.add_argument("--verbose", action="store_true", help="log debug messages")
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    # 256: the original demo's --max_output_length. Seed -1: a fresh seed per answer, so that Retry with
    # sampling gives another answer (and SDXL another picture); set one in the UI to reproduce an answer.
    parser.set_defaults(max_new_tokens=256, seed=-1)
    args = parser.parse_intermixed_args(argv)
    if args.listen:
        args.host = "0.0.0.0"
    return args


def resolve_examples_path(path: str) -> str:
    if not path:
        return ""
    from textbind.resources import find_resource

    candidate = find_resource(path)  # relative paths are also tried in the checkout and the installed package
    if candidate is None:
        logger.warning("examples file %s not found: the demo shows no examples", path)
        return ""
    return str(candidate)


def settings_from_arguments(args: argparse.Namespace) -> DemoSettings:
    from textbind.runtime import generation_config_from_arguments

    generation = generation_config_from_arguments(args)
    if generation.seed is not None and generation.seed < 0:
        generation.seed = None
    return DemoSettings(
        safe_word_num=args.safe_word_num,
        safe_image_num=args.safe_image_num,
        max_upload_bytes=int(args.max_upload_megabytes * 1024 * 1024),
        max_upload_pixels=args.max_upload_pixels,
        examples_path=resolve_examples_path(args.examples),
        output_dir=args.output_dir,
        system_prompt=args.system,
        title=args.title,
        concurrency_limit=args.concurrency_limit,
        session_seconds=args.session_hours * 3600,
        max_queue_size=args.max_queue_size,
        generation=generation,
    ).validate()


def launch(demo: gr.Blocks, settings: DemoSettings, host: str, port: int, *, share: bool = False,
           prevent_thread_lock: bool = False) -> Any:
    """Queue and serve `demo` (blocks unless `prevent_thread_lock`)."""
    chat: DemoChat = demo.textbind_chat  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue_size)
    allowed = [str(chat.output_dir)]
    if settings.examples_path:
        allowed.append(str(Path(settings.examples_path).resolve().parent))
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=allowed,
        # Gradio's own hard cap on request files; the demo refuses files above max_upload_bytes with a message.
        max_file_size=4 * settings.max_upload_bytes,
        show_error=True,
        ssr_mode=False,
        footer_links=["api"],
        prevent_thread_lock=prevent_thread_lock,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from textbind.runtime import build_generator, setup_from_arguments

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        settings = settings_from_arguments(args)
        setup = setup_from_arguments(args)
        generator = build_generator(setup)
    except (FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo = build_app(generator, settings)
    logger.info("serving on http://%s:%d (image decoder: %s)", args.host, args.port, setup.image_decoder.value)
    try:
        launch(demo, settings, args.host, args.port, share=args.share)
    finally:
        demo.textbind_chat.close()  # type: ignore[attr-defined]
    return 0
