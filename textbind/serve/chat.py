"""The demo's conversation logic, without Gradio: sessions, limits, uploads, control-text escaping, examples.

One `DemoChat` serves every browser tab and API client. A `ChatSession` (kept per client in
`gr.State`) holds the conversation twice: as textbind `Turn`s that the model reads (uploaded and
generated images as PIL images, so history never re-reads files) and as the messages the chatbot
shows. Sessions are never changed in place: a finished exchange yields a new session, so an answer
abandoned half-way (closed tab, Stop, error) leaves the old one intact.

User text is plain text, never structure:
  - the demo places `<image>` markers itself, one per uploaded image, before the text (as
    `python -m textbind` does, and as most of the toy world's data has them);
  - an `<image>`, `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>` the user typed is broken by an
    ordinary space after its first character (`<image>` -> `< image>`, `[/INST]` -> `[ /INST]`).
    The tokenizer already reads all of them as text (`split_special_tokens=True`), but a verbatim
    `<image>` would count as a marker, and the chat markup would read as a turn boundary to a
    Llama-2 chat model. An ordinary space rather than a zero-width one: some tokenizer normalisers
    drop zero-width characters, and the change stays plain to see in logs. `<start>`, `<end>`,
    `<s>` and `</s>` need nothing: as text they are split into ordinary pieces. The chat shows the
    user's text as typed.

Limits follow the original demo (`--safe_word_num 650 --safe_image_num 4`): a message that would
take the conversation past either is answered with an apology instead of the model, and images the
model draws count too (an answer may draw only as many as the image budget has left; when the model
begins one more, the answer ends there and says why). A message longer than `max_message_characters`
or `max_message_tokens` is refused first, before anything else reads it and before the model is
waited for. Uploads that are not readable images, or exceed the file-size or pixel limits, are
refused with a message.

Memory: a session keeps its images (uploaded and generated) at the size the model reads
(`model_image`: the image processor's input size, which gives the model the same pixel values as
the full image), so a conversation holds at most `safe_image_num` small images however large the
files were; the chat shows a thumbnail written to the output directory. Idle sessions are
forgotten after `session_seconds` (see `textbind.serve.app`).

Messages shown to users never hold server paths (`path_free`); the log keeps the details.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.data.conversation import Conversation, DataError, Turn, load_image
from textbind.generation import (
    FINISH_IMAGE_LIMIT,
    DecodingConfig,
    DoneEvent,
    ImageEvent,
    InterleavedGenerator,
    TextEvent,
)

logger = logging.getLogger(__name__)

DECODING_GREEDY = "greedy"
DECODING_TOP_P = "top-p sampling"
DECODING_CHOICES = (DECODING_GREEDY, DECODING_TOP_P)

# Text that must not reach the model verbatim from a user (see the module docstring).
CONTROL_STRINGS = (IMAGE_TOKEN, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
_CONTROL_PATTERN = re.compile("|".join(re.escape(text) for text in sorted(CONTROL_STRINGS, key=len, reverse=True)))

# Why an exchange was answered by the demo instead of the model (`AnswerResult.refused`).
REFUSED_EMPTY = "empty"
REFUSED_TOO_LONG = "too_long"
REFUSED_UPLOAD = "upload"
REFUSED_LIMIT = "limit"
REFUSED_SETTINGS = "settings"
REFUSED_ERROR = "error"
REFUSED_NOTHING_TO_RETRY = "nothing_to_retry"

# Seeds reach torch.Generator.manual_seed and the image decoders (which add the image's index):
# every random number generator in that chain accepts 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
THUMBNAIL_SIDE = 256  # pixels: the longer side of the picture the chat shows for an upload
SHOWN_CHARACTERS = 300  # of a message refused as too long, the chat shows this many characters


@dataclass
class DemoSettings:
    """What the demo allows and offers; the decoding fields are the controls' initial values."""

    safe_word_num: int = 650  # words per conversation (user and assistant text), as the original demo
    safe_image_num: int = 4  # images per conversation, uploaded and generated
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_message_characters: int = 10_000  # one message's text; checked before anything else reads it
    max_message_tokens: int = 2_000  # one message's text in tokens; checked before the model is waited for
    examples_path: str = ""  # example conversations (see `load_examples`; "": none)
    output_dir: str = ""  # where generated images and upload thumbnails are written ("" -> a temporary directory)
    system_prompt: str = ""
    title: str = "TextBind"
    model_description: str = ""  # Markdown: which model the demo serves, shown on the page
    concurrency_limit: int = 4  # events of the Gradio queue that may run at once (generation itself is serialised)
    session_seconds: float = 3600  # a session (its images) is forgotten this long after its last message
    max_sessions: int = 1000  # sessions kept at once; past it the least recently used one is forgotten
    max_queue_size: int = 64
    generation: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=256))
    max_new_tokens_limit: int = 1024  # the slider's maximum

    def validate(self) -> DemoSettings:
        for name in ("safe_word_num", "safe_image_num", "max_upload_bytes", "max_upload_pixels",
                     "max_message_characters", "max_message_tokens", "concurrency_limit", "max_new_tokens_limit",
                     "session_seconds", "max_sessions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_seed(self.generation.seed)
        self.generation.validate()
        return self


def escape_control_text(text: str) -> str:
    """User text -> the same text with every control string broken by a space after its first character.

    The result holds none of `CONTROL_STRINGS` (the space cannot be part of one, and no control
    string ends with the first character of another), so escaping twice changes nothing more.
    """
    return _CONTROL_PATTERN.sub(lambda match: f"{match.group(0)[0]} {match.group(0)[1:]}", text)


def user_content(text: str, num_images: int) -> str:
    """The stage-2 content of a user message: one real marker per image, before the escaped text."""
    return " ".join([IMAGE_TOKEN] * num_images + ([escape_control_text(text.strip())] if text.strip() else []))


def count_words(turns: list[Turn]) -> int:
    """Whitespace-separated words of the turns' text, image markers not counted."""
    return sum(len(turn.content.replace(IMAGE_TOKEN, " ").split()) for turn in turns)


def count_images(turns: list[Turn]) -> int:
    return sum(len(turn.image_list) for turn in turns)


def display_text(text: str) -> str:
    """Text for the chatbot, which renders Markdown and HTML: escape `<`, `>` and `&` so that `<image>`
    or `<start>` show as typed instead of vanishing as unknown tags."""
    return html.escape(text, quote=False)


# An absolute path (POSIX, or Windows with a drive letter) of two parts or more.
_PATH_PATTERN = re.compile(r"(?<![\w.~:/\\])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"`]+[/\\])+([^\s/\\'\"`]*)")


def path_free(text: str) -> str:
    """`text` with every absolute path replaced by its last part (`/srv/data/x.png` -> `x.png`).

    For messages shown to users: the server's folders are none of their business (and may tell an
    attacker where to look); the file's own name is usually what explains the message.
    """
    return _PATH_PATTERN.sub(lambda match: match.group(1) or "(a folder)", text)


class UploadError(ValueError):
    """An uploaded file the demo will not use; the message is shown to the user."""


def load_upload(path: str | os.PathLike, settings: DemoSettings) -> Image.Image:
    """An uploaded file as an RGB image, or UploadError if it is too large or not a readable image.

    The pixel count is read from the header before anything is decoded, so a small file that
    would decode to a huge image (a decompression bomb) costs nothing. Messages name the file,
    never its folder.
    """
    name = Path(path).name
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise UploadError(f"{name}: the upload could not be read") from error
    if size > settings.max_upload_bytes:
        limit = _megabytes(settings.max_upload_bytes)
        raise UploadError(f"{name} is too large ({_megabytes(size)}); images up to {limit} are accepted")
    pixel_limit = f"{settings.max_upload_pixels:,}"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > settings.max_upload_pixels:
                raise UploadError(f"{name} is too large ({width}x{height} pixels); images up to {pixel_limit} "
                                  "pixels are accepted")
            image.load()  # decode now: a truncated or corrupt file fails here, not inside the model
            return image.convert("RGB")
    except UploadError:
        raise
    except Image.DecompressionBombError as error:  # PIL will not even open an image this far above its own limit
        raise UploadError(f"{name} is too large (far more than {pixel_limit} pixels); images up to "
                          f"{pixel_limit} pixels are accepted") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise UploadError(f"{name} is not an image I can read (PNG, JPEG, WebP, GIF, ...)") from error


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.2f} MB"


def model_image_size(image_processor: Any) -> tuple[int, int] | None:
    """(width, height) that `image_processor` resizes every image to (BLIP-2's: 224 x 224), or None."""
    size = getattr(image_processor, "size", None)
    if size is None:
        return None
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    return (int(width), int(height)) if height and width else None


def model_image(image: Image.Image, image_processor: Any) -> Image.Image:
    """The image at the size the model reads it, when that is smaller: what a session keeps in memory.

    The image processor resizes to a fixed size with its own resampling filter; doing that resize
    here (the processor then "resizes" to the same size, which PIL does as a copy) gives the model
    the same pixel values as the full image. Images no larger than that, or a processor without a
    fixed size, leave the image as it is.
    """
    size = model_image_size(image_processor)
    if size is None or (image.width <= size[0] and image.height <= size[1]):
        return image
    resample = getattr(image_processor, "resample", None)
    return image.resize(size, Image.Resampling(resample) if resample is not None else Image.Resampling.BICUBIC)


def limit_message(words: int, images: int, settings: DemoSettings) -> str:
    """The original demo's apology, with the numbers of this conversation."""
    return (
        f"I'm sorry, I cannot continue this conversation: with this message it would hold {words} words and "
        f"{images} images, and this demo allows at most {settings.safe_word_num} words and "
        f"{settings.safe_image_num} images per conversation, to bound the memory an answer needs. "
        "Press **Clear** to start a new conversation, or run the model on your own hardware with higher "
        "`--safe-word-num` / `--safe-image-num`."
    )


def image_limit_notice(images_left: int, generate_images: bool, settings: DemoSettings) -> str:
    """Why an answer ended where the model began an image (finish reason "image_limit")."""
    if not generate_images:
        return "*The model began an image here, but image generation is off (see Generation settings).*"
    if images_left <= settings.generation.max_images:  # the conversation's budget, not the answer's, ran out
        return (
            f"*The model began another image here, but this conversation already holds "
            f"{settings.safe_image_num} images, the most this demo allows: every image of a conversation is "
            "kept in memory and read again with each message. Press **Clear** to start a new conversation.*"
        )
    return f"*The model began another image here, but one answer may draw at most {settings.generation.max_images}.*"


def check_seed(seed: int | float | None) -> int | None:
    """A seed from a control or a request -> an int (negative: a random seed), or None; ValueError out of range."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, float)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if not math.isfinite(seed) or seed != int(seed):
        raise ValueError(f"seed must be a whole number, got {seed}")
    if seed > MAX_SEED:
        raise ValueError(f"seed must be at most {MAX_SEED} (-1: a random seed for each answer), got {seed:g}")
    return int(seed)


def generation_config(
    decoding: str,
    temperature: float,
    top_p: float,
    max_new_tokens: int | float,
    generate_images: bool,
    seed: int | float | None,
    *,
    max_images: int,
    max_caption_tokens: int,
) -> DecodingConfig:
    """The controls' values -> a validated DecodingConfig (ValueError names a bad value).

    A seed that is empty or negative means a fresh random seed for each answer.
    """
    if decoding not in DECODING_CHOICES:
        raise ValueError(f"decoding must be one of {DECODING_CHOICES}, got {decoding!r}")
    seed = check_seed(seed)
    return DecodingConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=decoding == DECODING_TOP_P,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed is None or seed < 0 else seed,
        max_images=max_images if generate_images else 0,
        max_caption_tokens=max_caption_tokens,
    ).validate()


@dataclass
class ChatSession:
    """One client's conversation: what the model reads and what the chatbot shows."""

    turns: list[Turn] = field(default_factory=list)  # committed exchanges only: user, assistant, user, ...
    messages: list[dict[str, Any]] = field(default_factory=list)  # chatbot messages (refusals included)
    # Per committed exchange: where its user's messages and its answer's messages begin in `messages`.
    exchanges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def words(self) -> int:
        return count_words(self.turns)

    @property
    def images(self) -> int:
        return count_images(self.turns)

    @property
    def image_bytes(self) -> int:
        """Bytes of pixels the session's images hold: at most safe_image_num images at the model's size."""
        return sum(len(image.getbands()) * image.width * image.height
                   for turn in self.turns for image in turn.image_list if isinstance(image, Image.Image))


@dataclass
class AnswerResult:
    """The outcome of one exchange, as the API returns it."""

    text: str  # the answer as a stage-2 content: one `<image>` marker per entry of image_paths; or the refusal
    image_paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    finish_reason: str = ""  # "stop" | "length" | "image_limit" for a model answer, "" for a refusal
    refused: str = ""  # one of the REFUSED_* reasons, "" when the model answered
    seconds: float = 0.0
    notice: str = ""  # what the demo said beside the answer (image budget spent, retry sampled); "" if nothing
    decoding: str = ""  # how the answer was decoded (one of DECODING_CHOICES); "" for a refusal

    def info(self, session: ChatSession) -> dict[str, Any]:
        return {
            "captions": self.captions,
            "finish_reason": self.finish_reason,
            "refused": self.refused,
            "notice": self.notice,
            "decoding": self.decoding,
            "seconds": round(self.seconds, 3),
            "conversation_words": session.words,
            "conversation_images": session.images,
            "conversation_turns": len(session.turns),
        }


@dataclass
class ChatUpdate:
    """One step of an exchange: the chatbot's messages now; `result` and `session` are set on the last one."""

    messages: list[dict[str, Any]]
    result: AnswerResult | None = None
    session: ChatSession | None = None


def _message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def _refusal(session: ChatSession, user_messages: list[dict[str, Any]], reason: str, text: str) -> ChatUpdate:
    """Show the user's message and the demo's answer; the model's conversation stays as it was."""
    messages = [*session.messages, *user_messages, _message("assistant", text)]
    return ChatUpdate(messages, AnswerResult(text=text, refused=reason), replace(session, messages=messages))


class DemoChat:
    """Answers sessions with one InterleavedGenerator; one answer is generated at a time.

    The model is shared by every session. Concurrent answers would each hold a KV cache (and, with
    SDXL, a diffusion pipeline's activations) on the same device, so `generation_lock` serialises
    them; sessions that wait show a note in their chat. Everything else (uploads, limits, history)
    runs concurrently in the queue's workers.
    """

    def __init__(self, generator: InterleavedGenerator, settings: DemoSettings) -> None:
        self.generator = generator
        self.settings = settings.validate()
        self._temporary_dir = None
        if settings.output_dir:
            self.output_dir = Path(settings.output_dir).resolve()
            self.output_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._temporary_dir = tempfile.TemporaryDirectory(prefix="textbind-demo-")
            self.output_dir = Path(self._temporary_dir.name).resolve()
        self.generation_lock = threading.Lock()

    # --- Exchanges --------------------------------------------------------------------------------------

    def submit(
        self, session: ChatSession | None, text: str, files: list[str], options: dict[str, Any]
    ) -> Iterator[ChatUpdate]:
        """Answer a new user message (text and uploaded image files); `options` are the decoding controls."""
        session = session or ChatSession()
        text = text or ""
        files = [str(path) for path in files or []]
        # Length first, before anything else reads the text (a 10 MB message must cost nothing).
        too_long = self._too_long(text)
        if too_long:
            shown = display_text(text[:SHOWN_CHARACTERS]) + " ..."
            logger.info("message refused: %s", too_long)
            yield _refusal(session, [_message("user", shown)], REFUSED_TOO_LONG, too_long)
            return
        user_messages = [_message("user", {"path": path}) for path in files]
        if text.strip():
            user_messages.append(_message("user", display_text(text)))
        if not text.strip() and not files:
            yield _refusal(session, [], REFUSED_EMPTY, "Please type a message or attach an image.")
            return
        # Limits next: they need no decoding, and a refused message should not cost its uploads' decoding.
        content = user_content(text, len(files))
        words = session.words + count_words([Turn("user", content)])
        image_count = session.images + len(files)
        if words > self.settings.safe_word_num or image_count > self.settings.safe_image_num:
            logger.info("conversation limit: %d words, %d images", words, image_count)
            yield _refusal(session, user_messages, REFUSED_LIMIT, limit_message(words, image_count, self.settings))
            return
        images, thumbnails = [], []
        for path in files:
            try:
                image = load_upload(path, self.settings)
            except UploadError as error:
                logger.info("upload refused: %s", error)
                yield _refusal(session, user_messages, REFUSED_UPLOAD, f"I could not use this upload: {error}.")
                return
            thumbnails.append(self._thumbnail(image))
            images.append(model_image(image, self.generator.image_processor))
            del image  # the full-size pixels are not kept past this point
        user_messages = [_message("user", {"path": str(path)}) for path in thumbnails] + user_messages[len(files):]
        user_turn = Turn("user", content, images)
        yield from self._answer(session, user_turn, user_messages, options)

    def _too_long(self, text: str) -> str:
        """Why `text` is too long for one message, or "": characters first, then (only then) tokens."""
        limit = self.settings.max_message_characters
        if len(text) > limit:
            return (f"This message is too long: {len(text):,} characters, and this demo reads at most {limit:,} "
                    "per message. Please send a shorter one.")
        tokens = len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > self.settings.max_message_tokens:
            return (f"This message is too long: {tokens:,} tokens, and this demo reads at most "
                    f"{self.settings.max_message_tokens:,} per message. Please send a shorter one.")
        return ""

    def _thumbnail(self, image: Image.Image) -> Path:
        """A small copy of an upload for the chat to show (the model reads `model_image`)."""
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        path = self.output_dir / "uploads" / f"{uuid.uuid4().hex}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        thumbnail.save(path)
        return path

    def retry(self, session: ChatSession | None, options: dict[str, Any]) -> Iterator[ChatUpdate]:
        """Generate the last answer again; messages after it are dropped.

        Greedy decoding, or sampling with a set seed, would give the very same answer again: a retry
        then samples (top-p, with the current temperature and top-p) with a fresh seed, and says so.
        """
        session = session or ChatSession()
        if not session.exchanges:
            text = "There is no answer to retry yet."
            messages = [*session.messages, _message("assistant", text)]
            yield ChatUpdate(messages, AnswerResult(text=text, refused=REFUSED_NOTHING_TO_RETRY),
                             replace(session, messages=messages))
            return
        notice = ""
        if options.get("decoding") == DECODING_GREEDY:
            notice = ("*Greedy decoding would give the same answer again, so this retry samples (top-p) "
                      "with a fresh seed.*")
        elif options.get("seed") is not None and check_seed(options["seed"]) >= 0:
            notice = "*The set seed would give the same answer again, so this retry uses a fresh seed.*"
        if notice:
            options = {**options, "decoding": DECODING_TOP_P, "seed": -1}
        user_start, answer_start = session.exchanges[-1]
        earlier = ChatSession(session.turns[:-2], session.messages[:user_start], session.exchanges[:-1])
        yield from self._answer(earlier, session.turns[-2], session.messages[user_start:answer_start], options,
                                notice=notice)

    def _answer(
        self, session: ChatSession, user_turn: Turn, user_messages: list[dict[str, Any]], options: dict[str, Any],
        *, notice: str = "",
    ) -> Iterator[ChatUpdate]:
        shown = [*session.messages, *user_messages]
        images_left = self.settings.safe_image_num - session.images - len(user_turn.image_list)
        try:
            config = generation_config(
                **options,
                max_images=min(self.settings.generation.max_images, images_left),
                max_caption_tokens=self.settings.generation.max_caption_tokens,
            )
        except (TypeError, ValueError) as error:
            text = f"These generation settings are not valid: {path_free(str(error))}"
            yield _refusal(session, user_messages, REFUSED_SETTINGS, text)
            return
        system = [Turn("system", self.settings.system_prompt)] if self.settings.system_prompt else []
        conversation = Conversation([*system, *session.turns, user_turn], source="demo conversation")

        answer: list[dict[str, Any]] = []  # this answer's messages: text and images in order
        if notice:
            answer.append(_message("assistant", notice))
        segment = ""  # text of the answer since its last image
        done: DoneEvent | None = None
        failure = ""
        if not self.generation_lock.acquire(blocking=False):
            note = "*Waiting for the model: another answer is being generated...*"
            yield ChatUpdate([*shown, _message("assistant", note)])
            self.generation_lock.acquire()
        started = time.perf_counter()
        try:  # released when the stream ends, fails, or is closed (Stop, or a client that went away)
            for event in self.generator.stream(conversation, config):
                if isinstance(event, TextEvent):
                    segment += event.text
                    yield ChatUpdate([*shown, *answer, *_text_messages(segment)])
                elif isinstance(event, ImageEvent):
                    answer += _text_messages(segment)
                    segment = ""
                    answer.append(self._image_message(event))
                    yield ChatUpdate([*shown, *answer])
                elif isinstance(event, DoneEvent):
                    done = event
        except DataError as error:  # e.g. the prompt is longer than the model's context
            logger.info("generation refused: %s", error)
            failure = f"I cannot answer this: {path_free(str(error))}"
        except Exception as error:  # shown in the chat; the session stays usable
            logger.exception("generation failed")
            failure = (f"Generation failed ({type(error).__name__}: {path_free(str(error))}). "
                       "Press **Retry** or **Clear**.")
        finally:
            self.generation_lock.release()
        if failure or done is None:
            yield _refusal(session, user_messages, REFUSED_ERROR, failure or "Generation ended without an answer.")
            return
        answer += _text_messages(segment)
        assistant_turn, image_paths = self._history_turn(done.turn, answer, self.generator.image_processor)
        if done.finish_reason == FINISH_IMAGE_LIMIT:
            limit_notice = image_limit_notice(images_left, bool(options.get("generate_images")), self.settings)
            answer.append(_message("assistant", limit_notice))
            notice = f"{notice}\n{limit_notice}" if notice else limit_notice
        if not answer:
            answer.append(_message("assistant", "*(the model gave an empty answer)*"))
        seconds = time.perf_counter() - started
        logger.info("answered in %.2f s (%d tokens, %s, %d image(s))", seconds, len(done.token_ids),
                    done.finish_reason, len(image_paths))
        new_session = ChatSession(
            turns=[*session.turns, user_turn, assistant_turn],
            messages=[*shown, *answer],
            exchanges=[*session.exchanges, (len(session.messages), len(shown))],
        )
        result = AnswerResult(
            text=assistant_turn.content,
            image_paths=image_paths,
            captions=list(assistant_turn.caption_list),
            finish_reason=done.finish_reason,
            seconds=seconds,
            notice=notice.replace("*", ""),
            decoding=DECODING_TOP_P if config.do_sample else DECODING_GREEDY,
        )
        yield ChatUpdate(new_session.messages, result, new_session)

    def _image_message(self, event: ImageEvent) -> dict[str, Any]:
        if event.image is None:  # no image decoder: show what would have been drawn
            return _message("assistant", f"*[image not rendered: {display_text(event.caption)}]*")
        path = self.output_dir / f"{uuid.uuid4().hex}.png"
        event.image.save(path)
        return _message("assistant", {"path": str(path), "alt_text": event.caption})

    @staticmethod
    def _history_turn(turn: Turn, answer: list[dict[str, Any]], image_processor: Any) -> tuple[Turn, list[str]]:
        """The generated turn as history (its images at the model's size), and its image files.

        Images never rendered lose their marker and caption.
        """
        paths = iter(message["content"]["path"] for message in answer if isinstance(message["content"], dict))
        pieces = turn.content.split(IMAGE_TOKEN)
        content, images, captions, image_paths = pieces[0], [], [], []
        for piece, image, caption in zip(pieces[1:], turn.image_list, turn.caption_list):
            if image is not None:
                content += IMAGE_TOKEN
                images.append(model_image(image, image_processor))
                captions.append(caption)
                image_paths.append(next(paths))
            content += piece
        if len(images) == len(turn.image_list):
            content = turn.content
        return Turn("assistant", re.sub(r" {2,}", " ", content).strip(), images, captions), image_paths

    def clear(self) -> ChatSession:
        return ChatSession()

    def close(self) -> None:
        """Remove the temporary output directory (a set `output_dir` is kept)."""
        if self._temporary_dir is not None:
            self._temporary_dir.cleanup()
            self._temporary_dir = None


def _text_messages(text: str) -> list[dict[str, Any]]:
    return [_message("assistant", display_text(text.strip()))] if text.strip() else []


# --- Examples -----------------------------------------------------------------------------------------


@dataclass
class Example:
    """An example conversation: earlier turns (loaded as history) and the user message to send."""

    label: str
    history: list[Turn]  # may be empty
    history_messages: list[dict[str, Any]]
    text: str  # the final user message's text, markers removed
    files: list[str]  # its image files
    image_files: list[str] = field(default_factory=list)  # every image file of the example (history too)


@dataclass
class ExampleSet:
    """The examples the demo offers, and what the file says about the model they were written for."""

    examples: list[Example] = field(default_factory=list)
    description: str = ""  # one line shown with the examples (e.g. what a toy model knows); "" if none

    @property
    def image_files(self) -> list[str]:
        """Every image file of the examples, resolved: the only files of theirs the server may publish."""
        return sorted({path for example in self.examples for path in example.image_files})


def load_examples(path: str | os.PathLike) -> ExampleSet:
    """Example conversations from a stage-2 style JSON file (the original's `data/examples.json`).

    The file holds a list of records, or an object `{"description": "...", "conversations": [...]}`
    whose description (one line, e.g. what a toy model knows) is shown with the examples. Each
    record's `conversation` ends with a user turn: that message goes into the textbox (its images as
    attachments, since the demo places markers before the text), and the turns before it become the
    chat's history. `image_dir` is relative to the JSON file. Every image must exist: a missing or
    unreadable image, or any bad record, raises DataError naming the file and record, so that a
    broken examples file stops the demo at start-up instead of showing broken examples.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"examples file {file}: cannot read it ({error})") from error
    description = ""
    if isinstance(data, dict):
        description = data.get("description", "")
        data = data.get("conversations")
        if not isinstance(description, str) or "\n" in description.strip():
            raise DataError(f"examples file {file}: `description` must be one line of text")
    if not isinstance(data, list):
        raise DataError(f"examples file {file}: expected a JSON list of records, or an object with a "
                        "`conversations` list")
    examples = [_example(record, f"{file} record {index}", file.parent) for index, record in enumerate(data)]
    return ExampleSet(examples, description.strip())


def _example(record: Any, source: str, base_dir: Path) -> Example:
    from textbind.data.conversation import parse_record, validate_conversation

    conversation = parse_record(record, source)
    image_dir = base_dir / conversation.image_dir if conversation.image_dir else base_dir
    turns = []
    for turn_index, turn in enumerate(conversation.turns):
        paths = []
        for name in turn.image_list:
            path = image_dir / str(name)
            if not path.is_file():
                raise DataError(f"{source} turn {turn_index}: example image {path} not found")
            paths.append(path.resolve())
        turns.append(Turn(turn.role, turn.content, paths, list(turn.caption_list)))
    checked = Conversation(turns, source=source)
    validate_conversation(checked, for_inference=True)
    *history, last = turns
    if any(turn.role == "system" for turn in history):
        raise DataError(f"{source}: examples cannot hold a system turn (the demo has --system)")
    history_turns, messages = [], []
    for turn in history:
        images = [load_image(path, source) for path in turn.image_list]
        if turn.role == "user":
            messages += [_message("user", {"path": str(path)}) for path in turn.image_list]
            text = turn.content.replace(IMAGE_TOKEN, " ").strip()
            if text:
                messages.append(_message("user", display_text(" ".join(text.split()))))
            history_turns.append(Turn("user", user_content(text, len(images)), images))
        else:
            pieces = turn.content.split(IMAGE_TOKEN)
            for piece_index, piece in enumerate(pieces):
                messages += _text_messages(piece)
                if piece_index < len(turn.image_list):
                    image_file = {"path": str(turn.image_list[piece_index]), "alt_text": turn.caption_list[piece_index]}
                    messages.append(_message("assistant", image_file))
            history_turns.append(Turn("assistant", turn.content, images, list(turn.caption_list[: len(images)])))
    text = " ".join(last.content.replace(IMAGE_TOKEN, " ").split())
    label = text if not last.image_list else f"[{len(last.image_list)} image(s)] {text}"
    if history:
        label = f"{label} (after {len(history)} turns)"
    image_files = [str(path) for turn in turns for path in turn.image_list]
    return Example(label, history_turns, messages, text, [str(path) for path in last.image_list], image_files)
