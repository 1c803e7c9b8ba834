"""The scripted toy conversation writer: image captions in, a Human/Assistant transcript out.

It stands in for the strong text-only LLM of TextBind's data engine (DESIGN.md section 4) in the
toy world. The request's last user message ends with the images it may use::

    Images:
    <img0>a small red circle</img0>
    <img1>a small green circle</img1>

(read after the *last* ``Images:`` line, so in-context examples before it are ignored). The answer
is a transcript, one utterance per line, each opening with ``Human:`` or ``Assistant:``, that
refers to image K as ``<imgK>caption</imgK>`` with the caption quoted verbatim.

- Captions of the toy grammar (``textbind.toy.world.parse_caption``) get the toy world's
  conversations, in the very phrases of the synthetic stage-2 writer (``textbind.toy.dialogue``):
  descriptions, attribute questions, comparisons of two images, drawing requests answered with an
  image, and edits ("now make it green") from one image to another that differs by that one edit.
  Images one edit apart are chained first (a drawing, then its edits), since edits are the
  hardest thing for the toy model to learn; the others are described, asked about, compared or
  drawn.
- Any other captions get a generic but sensible conversation that quotes them verbatim.
- A seeded share of the answers is faulty, one of ``FAULT_KINDS``, each of the kind one filter rule
  of the data engine exists for (``unclosed_tag`` is cleaned by the filters, not rejected).

Everything is a pure function of the request (model, messages, seed) and the writer's seed, so a
resumed run gets the same answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rapidfuzz.distance import Levenshtein

from textbind import IMAGE_TOKEN
from textbind.toy import dialogue
from textbind.toy.dialogue import Conversation
from textbind.toy.world import COLOURS, SHAPES, Scene, caption, parse_caption, random_scene

FAULT_KINDS = (
    "repeated_tag",  # one image tag used twice
    "tag_beyond_images",  # a tag whose index is not among the images given
    "no_image",  # no image tag at all
    "duplicate",  # the very text of another answer (one canned transcript)
    "no_human",  # only Assistant utterances
    "roles_not_alternating",  # two utterances of one role in a row, or an Assistant first
    "too_short",  # fewer than 3 utterances
    "unclosed_tag",  # an opening <imgK> without its closing tag (cleaned, not rejected)
    "misquoted_caption",  # a quoted caption far (> 0.1 normalised edit distance) from the given one
    "refusal",  # "I'm sorry, but as an AI language model ..."
)
DEFAULT_FAULTY_SHARE = 0.1
# The images a toy conversation uses at most: more would not fit the toy model's context (each
# image takes 32 tokens, an assistant image its caption branch too).
DEFAULT_MAX_IMAGES = 4
# The one answer every "duplicate" fault gives: the first one of a run is kept or rejected by a later
# rule, every other one is the duplicate of an earlier response.
DUPLICATE_TRANSCRIPT = (
    "Human: What is in this picture? <img0>a picture</img0>\n"
    "Assistant: It is a picture.\n"
    "Human: Thank you.\n"
    "Assistant: You are welcome!"
)
REFUSAL = "I'm sorry, but as an AI language model, I cannot help with that request."

_IMAGE_LINE_RE = re.compile(r"<img(\d+)>(.*)</img\1>")
_SPAN_RE = re.compile(r"<img(\d+)>(.*?)</img\1>")

Utterance = tuple[str, str]  # ("Human" | "Assistant", text on one line)


class PromptError(ValueError):
    """A request that does not follow the prompt contract (no ``Images:`` section, bad image lines)."""


@dataclass(frozen=True)
class Transcript:
    """One answer: its text, the exchange kinds it holds (``dialogue.EXCHANGE_KINDS``, or "generic")
    and its fault kind (``None`` for a good transcript)."""

    text: str
    kinds: tuple[str, ...]
    fault: str | None


# ---------------------------------------------------------------------------------------------
# Requests


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def request_hash(model: str, messages: Sequence[Mapping[str, Any]], seed: int | None) -> str:
    """A stable hash (hex SHA-256) of what decides an answer: the model name, the messages and the seed."""
    canonical = json.dumps(
        {"model": model, "messages": [dict(message) for message in messages], "seed": seed},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_captions(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The captions after the last ``Images:`` line of the last user message, image 0 first."""
    user_messages = [message for message in messages if message.get("role") == "user"]
    if not user_messages:
        raise PromptError("the request has no user message")
    lines = message_text(user_messages[-1].get("content")).split("\n")
    starts = [index for index, line in enumerate(lines) if line.strip() == "Images:"]
    if not starts:
        raise PromptError("the last user message has no 'Images:' line")
    captions: list[str] = []
    for line in lines[starts[-1] + 1 :]:
        line = line.rstrip("\r")
        if not line.strip():
            continue
        match = _IMAGE_LINE_RE.fullmatch(line.strip())
        if match is None:
            break
        if int(match.group(1)) != len(captions):
            raise PromptError(f"image line {line!r} should be image {len(captions)}")
        captions.append(match.group(2))
    if not captions:
        raise PromptError("no '<img0>caption</img0>' line follows the last 'Images:' line")
    return captions


# ---------------------------------------------------------------------------------------------
# Good transcripts


def _tag(index: int, text: str) -> str:
    return f"<img{index}>{text}</img{index}>"


def _render(utterances: Iterable[Utterance]) -> str:
    return "\n".join(f"{role}: {text}" for role, text in utterances)


def _chains(scenes: Sequence[Scene], rng: random.Random, max_length: int) -> list[list[int]]:
    """Disjoint chains of image indices, each image one edit away from the one before; longest first.

    Chains are at most ``max_length`` images long (which also bounds the search).
    """
    results = [{result for _, result in dialogue.possible_edits(scene)} for scene in scenes]
    follows = {
        index: [other for other in range(len(scenes)) if other != index and scenes[other] in results[index]]
        for index in range(len(scenes))
    }
    chains: list[list[int]] = []
    remaining = set(range(len(scenes)))
    while True:
        paths: list[list[int]] = []
        stack = [[start] for start in sorted(remaining)]
        while stack:  # every simple path through the remaining images, depth first
            path = stack.pop()
            paths.append(path)
            if len(path) < max_length:
                stack += [[*path, other] for other in follows[path[-1]] if other in remaining and other not in path]
        longest = max((len(path) for path in paths), default=0)
        if longest < 2:
            return chains
        chain = rng.choice(sorted(path for path in paths if len(path) == longest))
        chains.append(chain)
        remaining -= set(chain)


def toy_utterances(
    captions: Sequence[str], scenes: Sequence[Scene], rng: random.Random, max_images: int = DEFAULT_MAX_IMAGES
) -> tuple[list[Utterance], tuple[str, ...]]:
    """A toy-world conversation about (at most ``max_images`` of) ``scenes``; its utterances and exchange kinds.

    ``captions[k]`` is quoted verbatim for image k, ``scenes[k]`` is what it shows.
    """
    utterances: list[Utterance] = []
    # Scenes are matched to image indices by identity: two images may show the same scene.
    index_of = {id(scene): index for index, scene in enumerate(scenes)}

    def write(role: str, content: str, turn_scenes: Sequence[Scene]) -> None:
        pieces = content.replace("\n", " ").split(IMAGE_TOKEN)
        text = pieces[0]
        for scene, piece in zip(turn_scenes, pieces[1:], strict=True):
            index = index_of[id(scene)]
            text += _tag(index, captions[index]) + piece
        utterances.append(("Human" if role == "user" else "Assistant", text))

    conversation = Conversation(rng, write)
    segments: list[tuple[str, list[int]]] = [("chain", chain) for chain in _chains(scenes, rng, max(2, max_images))]
    singles = [index for index in range(len(scenes)) if not any(index in chain for _, chain in segments)]
    rng.shuffle(singles)
    while singles:
        kinds, weights = ["describe", "question", "draw"], [2.0, 2.0, 3.0]
        if len(singles) >= 2:
            kinds.append("compare")
            weights.append(1.5)
        kind = rng.choices(kinds, weights=weights)[0]
        taken = 2 if kind == "compare" else 1
        segments.append((kind, singles[:taken]))
        singles = singles[taken:]
    # Keep chains first (longest first: edits are what the toy model needs most), then whole other segments
    # while they fit; a chain too long for what is left is cut short. Then the kept ones come in any order.
    kept, budget = [], max_images
    for kind, indices in segments:
        if budget <= 0:
            break
        if len(indices) > budget and kind != "chain":
            continue
        kept.append((kind, indices[:budget]))
        budget -= len(indices[:budget])
    rng.shuffle(kept)

    for kind, indices in kept:
        first = scenes[indices[0]]
        if kind == "describe":
            dialogue.describe_turns(conversation, first)
        elif kind == "question":
            dialogue.question_turns(conversation, first)
        elif kind == "compare":
            second = scenes[indices[1]]
            both_single = first.layout == "single" and second.layout == "single"
            first_kind = rng.choice(dialogue.COMPARISON_KINDS) if both_single else "describe_both"
            dialogue.comparison_turns(conversation, first_kind, first, second)
        elif kind == "draw" or (kind == "chain" and len(indices) > 1 and rng.random() < 0.75):
            dialogue.draw_turns(conversation, first)
        elif rng.random() < 0.5:  # a chain that starts from the user's image: "draw this again, but ..."
            dialogue.describe_turns(conversation, first)
        else:
            dialogue.question_turns(conversation, first)
        for index in indices[1:] if kind == "chain" else ():
            assert conversation.latest_scene is not None
            instruction = dialogue.edit_towards(rng, conversation.latest_scene, scenes[index])
            assert instruction is not None
            dialogue.edit_turns(conversation, instruction, scenes[index])
        if kind in ("draw", "chain") and rng.random() < 0.2:  # ask about what was just drawn
            dialogue.followup_question_turns(conversation)
    if len(utterances) < 3:  # one exchange is too short a conversation: ask about the latest image
        dialogue.followup_question_turns(conversation)
    return utterances, tuple(conversation.kinds)


def _plain(text: str) -> str:
    """A caption as a phrase inside a sentence: no trailing full stop, no capital on a plain first word."""
    phrase = text.strip().rstrip(".!?").strip() or "this"
    first_word = phrase.split()[0]
    if first_word[:1].isupper() and first_word[1:].islower() or first_word == "A":
        phrase = phrase[0].lower() + phrase[1:]
    return phrase


def generic_utterances(captions: Sequence[str], rng: random.Random) -> list[Utterance]:
    """A conversation about images of any captions, quoting each one verbatim; the user shows some,
    the assistant shows the others on request."""
    utterances: list[Utterance] = []
    order = list(range(len(captions)))
    while order:
        if len(order) >= 2 and rng.random() < 0.25:
            first, second = order[:2]
            order = order[2:]
            question = rng.choice(["How do these two pictures differ?", "Compare these two images.",
                                   "What do these pictures show?"])
            utterances.append(("Human", f"{question} {_tag(first, captions[first])} {_tag(second, captions[second])}"))
            utterances.append(("Assistant", f"The first one shows {_plain(captions[first])}, while the second one "
                                            f"shows {_plain(captions[second])}."))
            continue
        index = order.pop(0)
        quoted, phrase = _tag(index, captions[index]), _plain(captions[index])
        if rng.random() < 0.5:
            prompt = rng.choice(["What is in this picture?", "Can you describe this image?", "Look at this photo."])
            utterances.append(("Human", rng.choice([f"{prompt} {quoted}", f"{quoted} {prompt}"])))
            utterances.append(("Assistant", rng.choice([f"It shows {phrase}.", f"This picture shows {phrase}.",
                                                        f"I can see {phrase}."])))
        else:
            request = rng.choice(["Can you show me a picture of {phrase}?", "Please show me {phrase}.",
                                  "I would like to see {phrase}."])
            utterances.append(("Human", request.format(phrase=phrase)))
            utterances.append(("Assistant", rng.choice([f"Here it is: {quoted}", f"Sure! {quoted}",
                                                        f"Of course, here is one: {quoted}"])))
    if len(utterances) < 3:
        utterances.append(("Human", rng.choice(["Thank you!", "Thanks, that is helpful.", "Great, thanks."])))
        utterances.append(("Assistant", rng.choice(["You are welcome!", "Glad I could help.", "Any time!"])))
    return utterances


def _utterances(
    captions: Sequence[str], rng: random.Random, max_images: int
) -> tuple[list[Utterance], tuple[str, ...]]:
    parsed = [parse_caption(text) for text in captions]
    if all(scene is not None for scene in parsed):
        return toy_utterances(captions, [scene for scene in parsed if scene is not None], rng, max_images)
    return generic_utterances(captions, rng), ("generic",)


# ---------------------------------------------------------------------------------------------
# Faults


def _spans(utterances: Sequence[Utterance]) -> list[tuple[int, re.Match[str]]]:
    return [(position, match) for position, (_, text) in enumerate(utterances) for match in _SPAN_RE.finditer(text)]


def _far_caption(original: str, rng: random.Random) -> str:
    """A caption more than 0.2 normalised edit distance from ``original`` (a confusion of the LLM)."""
    if parse_caption(original) is not None:
        candidates = [caption(random_scene(rng)) for _ in range(8)]
    else:
        words = original.split()
        candidates = [" ".join(reversed(words)), " ".join(words[: max(1, len(words) // 2)]) + " and something else"]
    for candidate in candidates:
        if Levenshtein.distance(candidate, original) > 0.2 * max(1, len(original)):
            return candidate
    return original + " " + "with more" * (1 + len(original) // 20)


def _no_image_utterances(toy: bool, rng: random.Random) -> list[Utterance]:
    if toy:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        return [
            ("Human", "What can you draw?"),
            ("Assistant", "I can draw circles, squares and triangles in six colours."),
            ("Human", f"Which is your favourite, a {colour} {shape}?"),
            ("Assistant", f"I like a {colour} {shape} very much."),
        ]
    return [
        ("Human", "Can you tell me about these pictures?"),
        ("Assistant", "They are a set of photos with captions."),
        ("Human", "Which one do you like best?"),
        ("Assistant", "All of them are nice."),
    ]


def _faulty(
    kind: str, captions: Sequence[str], rng: random.Random, max_images: int
) -> tuple[list[Utterance] | str, tuple[str, ...]]:
    """A transcript with fault ``kind`` (utterances, or the text itself) and its exchange kinds."""
    count = len(captions)
    toy = all(parse_caption(text) is not None for text in captions)
    if kind == "duplicate":
        return DUPLICATE_TRANSCRIPT, ()
    if kind == "no_image":
        return _no_image_utterances(toy, rng), ()
    if kind == "unclosed_tag":
        # The last image is kept out of the conversation and only its opening tag written, so that the
        # filters' cleaning gives back a good conversation and no other rule can see the tag.
        utterances, kinds = _utterances(captions[:-1], rng, max_images)
        position = rng.choice([index for index, (role, _) in enumerate(utterances) if role == "Human"])
        role, text = utterances[position]
        utterances[position] = (role, f"{text} <img{count - 1}>")
        return utterances, kinds
    if kind == "too_short":
        utterances, kinds = _utterances(captions[:1], rng, max_images)
        return utterances[:2], kinds[:1]
    utterances, kinds = _utterances(captions, rng, max_images)
    if kind == "repeated_tag":
        _, match = rng.choice(_spans(utterances))
        utterances += [("Human", f"Let us look at this one again: {match.group(0)}"),
                       ("Assistant", "Sure, it is the same picture as before.")]
    elif kind == "tag_beyond_images":
        other = caption(random_scene(rng)) if toy else "another picture"
        utterances += [("Human", f"And what about this one? {_tag(count, other)}"),
                       ("Assistant", "That is another picture.")]
    elif kind == "no_human":
        utterances = [("Assistant", text) for _, text in utterances]
    elif kind == "roles_not_alternating":
        if rng.random() < 0.5:
            utterances.insert(0, ("Assistant", "Hello! How can I help you today?"))
        else:
            position = rng.randrange(len(utterances))
            role = utterances[position][0]
            utterances.insert(position + 1, (role, "Also, please be brief." if role == "Human" else "Anything else?"))
    elif kind == "misquoted_caption":
        spans = _spans(utterances)
        drawn = [(position, match) for position, match in spans if utterances[position][0] == "Assistant"]
        position, match = rng.choice(drawn or spans)
        role, text = utterances[position]
        wrong = _tag(int(match.group(1)), _far_caption(match.group(2), rng))
        utterances[position] = (role, text[: match.start()] + wrong + text[match.end() :])
    elif kind == "refusal":
        utterances += [("Human", "Can you also tell me who made these pictures?"), ("Assistant", REFUSAL)]
    else:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
    return utterances, kinds


# ---------------------------------------------------------------------------------------------
# The writer


def write_transcript(
    captions: Sequence[str],
    rng: random.Random,
    fault: str | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> Transcript:
    """A transcript about the images of ``captions``, with fault ``fault`` (one of ``FAULT_KINDS``) or none."""
    if not captions:
        raise PromptError("no images given")
    if fault == "unclosed_tag" and len(captions) < 2:
        fault = "misquoted_caption"  # an unclosed tag needs an image left out of the conversation
    if fault is None:
        utterances, kinds = _utterances(captions, rng, max_images)
        return Transcript(_render(utterances), kinds, None)
    result, kinds = _faulty(fault, captions, rng, max_images)
    text = result if isinstance(result, str) else _render(result)
    return Transcript(text, kinds, fault)


def choose_fault(rng: random.Random, faulty_share: float) -> str | None:
    """``None`` with probability 1 - ``faulty_share``, else one of ``FAULT_KINDS``, uniformly."""
    draw = rng.random()
    if draw >= faulty_share:
        return None
    return FAULT_KINDS[min(len(FAULT_KINDS) - 1, int(draw / faulty_share * len(FAULT_KINDS)))]


def answer_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    request_seed: int | None = None,
    writer_seed: int = 0,
    faulty_share: float = DEFAULT_FAULTY_SHARE,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> Transcript:
    """The writer's answer to a chat request: a pure function of the request and the writer's settings."""
    key = request_hash(model, messages, request_seed)
    fault = choose_fault(random.Random(f"textbind.toy.writer/fault/{writer_seed}/{key}"), faulty_share)
    rng = random.Random(f"textbind.toy.writer/text/{writer_seed}/{key}")
    return write_transcript(read_captions(messages), rng, fault, max_images)


def images_prompt(captions: Iterable[str]) -> str:
    """The ``Images:`` section of a prompt for ``captions`` (as the data engine writes it)."""
    return "Images:\n" + "\n".join(_tag(index, text) for index, text in enumerate(captions))


__all__ = [
    "DEFAULT_FAULTY_SHARE",
    "DEFAULT_MAX_IMAGES",
    "FAULT_KINDS",
    "PromptError",
    "Transcript",
    "answer_request",
    "choose_fault",
    "generic_utterances",
    "images_prompt",
    "read_captions",
    "request_hash",
    "toy_utterances",
    "write_transcript",
]
