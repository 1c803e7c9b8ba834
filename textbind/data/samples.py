"""From a conversation to one model-ready sample: encoded tokens plus the pixels of its images."""

from __future__ import annotations

from typing import Any

import torch

from textbind.data.conversation import Conversation, load_image
from textbind.data.sequence import ConversationEncoder, EncodedConversation


def pixel_values_for(images: list[Any], image_processor: Any, source: str) -> torch.Tensor:
    """(N, 3, H, W) pixels for image paths or PIL images; unreadable files raise DataError naming them."""
    if not images:
        return torch.zeros(0, 3, 1, 1)
    loaded = [load_image(image, source) for image in images]
    return image_processor(images=loaded, return_tensors="pt")["pixel_values"]


def prepare_sample(
    conversation: Conversation, encoder: ConversationEncoder, image_processor: Any, *, for_inference: bool = False
) -> tuple[EncodedConversation, torch.Tensor]:
    encoded = encoder.encode(conversation, for_inference=for_inference)
    return encoded, pixel_values_for(encoded.images, image_processor, conversation.source)
