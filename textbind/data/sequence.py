"""Conversations to token sequences: Llama-2 chat format, image tokens, targets, caption branches, truncation.

One encoded conversation is a flat sequence: the main sequence first, then one caption branch per
assistant image that survived truncation. For an assistant image whose 32 tokens start at p:
  - the main-sequence token at p-1 predicts `<start>`; the image tokens themselves predict nothing,
    except the last one, which predicts the text after the image;
  - its branch `<start> c1 .. cn <end>` has position ids p .. p+n+1, sees main tokens [0, p) and
    earlier tokens of its own branch only, and `<start>` predicts c1, ..., cn predicts `<end>`.
`targets[i]` is the token position i must predict (already shifted), or IGNORE_INDEX.

Two markups (`model.template`): Llama-2 chat as TextBind trained it, or the tokenizer's own chat template
(Llama-3, Qwen2, Mistral, ...). The latter is rendered with a placeholder per message and split there, so
that message contents are encoded exactly as in the Llama-2 markup (image tokens, stripped text) and only the
markup between them comes from the template; an assistant turn is supervised with the template's
end-of-turn token (the first special token after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from textbind import END_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import Conversation, DataError, split_at_images

MAIN_SEGMENT = 0
LLAMA2 = "llama2"
CHAT_TEMPLATE = "chat_template"
TEMPLATE_ATTRIBUTE = "textbind_template"  # set on the tokenizer by the model builder (model.template)
# A message's content while the chat template renders: private-use characters no template changes or trims.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_PATTERN = re.compile("\ue000(\\d+)\ue001")


@dataclass
class EncodedConversation:
    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # 0: main sequence; k >= 1: caption branch k
    branch_prefix: list[int]  # for a branch token: p, the length of main sequence it sees; 0 in the main
    images: list[Any] = field(default_factory=list)  # image refs in the order of their tokens
    image_positions: list[int] = field(default_factory=list)  # start of each image's tokens
    main_length: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_branches(self) -> int:
        return max(self.segment_ids, default=0)


@dataclass
class _Piece:
    """A run of main-sequence tokens with how they are supervised."""

    ids: list[int]
    supervised: bool  # the tokens are assistant output: each is predicted by the token before it
    is_image: bool = False  # an image's run of Q tokens
    image: Any = None  # the image (path or PIL image) of such a run
    caption: str | None = None  # set for an assistant image: its branch's caption


class ConversationEncoder:
    """Encodes conversations for training and prompts for inference, the same way in both."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_query_tokens: int, max_length: int = 768,
                 template: str | None = None) -> None:
        """`template`: llama2 or chat_template; None: the tokenizer's `textbind_template` (model.template, set by
        the model builder), else llama2."""
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, TEMPLATE_ATTRIBUTE, None) or LLAMA2
        if self.template not in (LLAMA2, CHAT_TEMPLATE):
            raise ValueError(f"unknown conversation template {self.template!r}; choose {LLAMA2} or {CHAT_TEMPLATE}")
        if self.template == CHAT_TEMPLATE and not tokenizer.chat_template:
            raise ValueError("the chat_template markup needs a tokenizer with a chat template")
        # Special tokens of the markup (not ours): the first one after an assistant message ends its turn.
        ours = {tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, START_TOKEN, END_TOKEN)}
        self.markup_special_ids = {
            index for index, token in tokenizer.added_tokens_decoder.items() if token.special and index not in ours
        } | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.num_query_tokens = num_query_tokens
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.start_token_id = tokenizer.convert_tokens_to_ids(START_TOKEN)
        self.end_token_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def text_ids(self, text: str) -> list[int]:
        """Plain text to ids. Control tokens written in the text stay text (`split_special_tokens`)."""
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _content_pieces(self, content: str, images: list[Any], captions: list[str] | None, supervised: bool,
                        where: str) -> list[_Piece]:
        texts = split_at_images(content)
        if len(texts) - 1 != len(images):
            raise DataError(f"{where}: {len(texts) - 1} {IMAGE_TOKEN} marker(s) but {len(images)} image(s)")
        pieces = []
        for index, text in enumerate(texts):
            ids = self.text_ids(text.strip())
            if ids:
                pieces.append(_Piece(ids, supervised))
            if index < len(images):
                caption = captions[index] if captions is not None else None
                if images[index] is None:
                    raise DataError(f"{where}: image {index} is missing (None)")
                image_ids = [self.image_token_id] * self.num_query_tokens
                pieces.append(_Piece(image_ids, False, True, images[index], caption))
        return pieces

    def _turn_pieces(self, conversation: Conversation, index: int) -> list[_Piece]:
        """The content of turn `index` (system turns included): text pieces and image-token runs."""
        turn = conversation.turns[index]
        where = f"{conversation.source} turn {index}"
        images = [conversation.image_path(image) for image in turn.image_list]
        if turn.role != "assistant":
            return self._content_pieces(turn.content, images, None, False, where)
        captions = turn.caption_list if turn.caption_list else [""] * len(images)
        return self._content_pieces(turn.content, images, captions, True, where)

    def _markup_pieces(self, markup: str, ends_assistant_turn: bool, where: str) -> list[_Piece]:
        """Template text between messages; after an assistant message, its end-of-turn token is supervised."""
        ids = self.tokenizer(markup, add_special_tokens=False)["input_ids"] if markup else []
        if not ends_assistant_turn:
            return [_Piece(ids, False)] if ids else []
        end = next((position for position, token in enumerate(ids) if token in self.markup_special_ids), None)
        if end is None:
            raise DataError(f"{where}: the chat template writes no special token to end an assistant turn")
        pieces = [_Piece(ids[: end + 1], True)]
        return pieces + ([_Piece(ids[end + 1 :], False)] if ids[end + 1 :] else [])

    def _chat_template_pieces(self, conversation: Conversation, for_inference: bool) -> list[_Piece]:
        turns = conversation.turns
        messages = [{"role": turn.role, "content": _PLACEHOLDER.format(index)} for index, turn in enumerate(turns)]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=for_inference and bool(turns) and turns[-1].role == "user"
        )
        parts = _PLACEHOLDER_PATTERN.split(rendered)  # markup, index, markup, index, ..., markup
        if [int(index) for index in parts[1::2]] != list(range(len(turns))):
            raise DataError(f"{conversation.source}: the chat template does not write each message once, in order")
        pieces: list[_Piece] = []
        for index in range(len(turns)):
            after_assistant = index > 0 and turns[index - 1].role == "assistant"
            pieces += self._markup_pieces(parts[2 * index], after_assistant, conversation.source)
            pieces += self._turn_pieces(conversation, index)
        last_is_assistant = bool(turns) and turns[-1].role == "assistant"
        pieces += self._markup_pieces(parts[-1], last_is_assistant, conversation.source)
        if for_inference and turns and turns[-1].role != "user":
            raise DataError(f"{conversation.source}: a prompt for inference must end with a user turn")
        return pieces

    def _pieces(self, conversation: Conversation, for_inference: bool) -> list[_Piece]:
        if self.template == CHAT_TEMPLATE:
            return self._chat_template_pieces(conversation, for_inference)
        system = conversation.system
        dialogue = conversation.dialogue
        pieces: list[_Piece] = []
        for index, turn in enumerate(dialogue):
            where = f"{conversation.source} turn {index + (len(conversation.turns) - len(dialogue))}"
            images = [conversation.image_path(image) for image in turn.image_list]
            if turn.role == "user":
                opening = "[INST]"
                if index == 0 and system:
                    opening = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"
                pieces.append(_Piece([self.bos_token_id] + self.text_ids(opening), False))
                pieces += self._content_pieces(turn.content, images, None, False, where)
                pieces.append(_Piece(self.text_ids("[/INST]"), False))
            else:
                captions = turn.caption_list if turn.caption_list else [""] * len(images)
                pieces += self._content_pieces(turn.content, images, captions, True, where)
                pieces.append(_Piece([self.eos_token_id], True))
        if for_inference and dialogue and dialogue[-1].role != "user":
            raise DataError(f"{conversation.source}: a prompt for inference must end with a user turn")
        return pieces

    def encode_as_text(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """A conversation whose `image_list` entries are the images' captions, as plain text for language-model
        pretraining: (input_ids, targets), each image written `<start> caption <end>` where its tokens would
        stand (for an assistant image, what inference writes before the image replaces it). Only assistant
        tokens are supervised, images included; no truncation."""
        input_ids: list[int] = []
        supervised: list[bool] = []
        for piece in self._pieces(conversation, for_inference=False):
            ids, is_supervised = piece.ids, piece.supervised
            if piece.is_image:
                if not isinstance(piece.image, str):
                    raise DataError(f"{conversation.source}: an image must be given as its caption here")
                ids = [self.start_token_id] + self.text_ids(piece.image.strip()) + [self.end_token_id]
                is_supervised = piece.caption is not None  # an assistant image
            input_ids += ids
            supervised += [is_supervised] * len(ids)
        targets = [
            input_ids[position + 1] if supervised[position + 1] else IGNORE_INDEX
            for position in range(len(input_ids) - 1)
        ]
        return input_ids, targets + [IGNORE_INDEX]

    def encode(self, conversation: Conversation, *, for_inference: bool = False) -> EncodedConversation:
        """Training sequence (main + branches, targets) or, with `for_inference`, the prompt ending after [/INST]."""
        pieces = self._pieces(conversation, for_inference)
        input_ids: list[int] = []
        supervised: list[bool] = []
        image_starts: list[tuple[int, _Piece]] = []
        for piece in pieces:
            if piece.is_image:
                image_starts.append((len(input_ids), piece))
            input_ids += piece.ids
            supervised += [piece.supervised] * len(piece.ids)

        # Truncate the main sequence, never inside an image: cut before an image it would split.
        main_length = len(input_ids)
        if not for_inference and main_length > self.max_length:
            main_length = self.max_length
            for start, _ in image_starts:
                if start < main_length < start + self.num_query_tokens:
                    main_length = start
        elif for_inference and main_length > self.max_length:
            raise DataError(
                f"{conversation.source}: the prompt has {main_length} tokens, more than max_length={self.max_length}"
            )
        input_ids = input_ids[:main_length]
        kept_images = [(start, piece) for start, piece in image_starts if start + self.num_query_tokens <= main_length]

        targets = [IGNORE_INDEX] * main_length
        for position in range(main_length - 1):
            if supervised[position + 1]:
                targets[position] = input_ids[position + 1]
        branches = []
        for start, piece in kept_images:
            if piece.caption is not None:  # an assistant image: the token before it predicts <start>
                targets[start - 1] = self.start_token_id
                branches.append((start, piece))

        encoded = EncodedConversation(
            input_ids=input_ids,
            targets=targets,
            position_ids=list(range(main_length)),
            segment_ids=[MAIN_SEGMENT] * main_length,
            branch_prefix=[0] * main_length,
            images=[piece.image for _, piece in kept_images],
            image_positions=[start for start, _ in kept_images],
            main_length=main_length,
            source=conversation.source,
        )
        if for_inference:
            return encoded
        for branch_index, (start, piece) in enumerate(branches, start=1):
            branch_ids = [self.start_token_id] + self.text_ids(piece.caption.strip()) + [self.end_token_id]
            encoded.input_ids += branch_ids
            encoded.targets += branch_ids[1:] + [IGNORE_INDEX]
            encoded.position_ids += list(range(start, start + len(branch_ids)))
            encoded.segment_ids += [branch_index] * len(branch_ids)
            encoded.branch_prefix += [start] * len(branch_ids)
        return encoded
