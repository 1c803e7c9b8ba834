"""Conversations to token sequences: Llama-2 chat format, image tokens, targets, caption branches, truncation.

One encoded conversation is a flat sequence: the main sequence first, then one caption branch per
assistant image that survived truncation. For an assistant image whose 32 tokens start at p:
  - the main-sequence token at p-1 predicts `<start>`; the image tokens themselves predict nothing,
    except the last one, which predicts the text after the image;
  - its branch `<start> c1 .. cn <end>` has position ids p .. p+n+1, sees main tokens [0, p) and
    earlier tokens of its own branch only, and `<start>` predicts c1, ..., cn predicts `<end>`.
`targets[i]` is the token position i must predict (already shifted), or IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from textbind import END_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import Conversation, DataError, split_at_images

MAIN_SEGMENT = 0


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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_query_tokens: int, max_length: int = 768) -> None:
        self.tokenizer = tokenizer
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

    def _pieces(self, conversation: Conversation, for_inference: bool) -> list[_Piece]:
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
