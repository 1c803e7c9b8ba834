"""Small builders of conversations shared by the tests."""

from __future__ import annotations

from textbind.data.conversation import Conversation, Turn


def conversation(*turns: tuple, image_dir: str = "", source: str = "test record") -> Conversation:
    """turns: (role, content[, image_list[, caption_list]])"""
    built = []
    for turn in turns:
        role, content, *rest = turn
        images = list(rest[0]) if rest else []
        captions = list(rest[1]) if len(rest) > 1 else []
        built.append(Turn(role, content, images, captions))
    return Conversation(built, image_dir=str(image_dir), source=source)


def one_output_image(image_dir) -> Conversation:
    return conversation(
        ("user", "What is this? <image>", ["0.png"]),
        ("assistant", "A red block. Here is a green one: <image> Do you like it?", ["1.png"], ["a green block"]),
        image_dir=image_dir,
    )


def several_output_images(image_dir) -> Conversation:
    return conversation(
        ("system", "You draw things."),
        ("user", "Show me two blocks."),
        ("assistant", "<image> and <image>", ["2.png", "3.png"], ["a blue block", "a yellow block on grass"]),
        ("user", "Compare <image> with this one.", ["4.png"]),
        ("assistant", "The purple one is bigger. An orange one: <image>", ["5.png"], ["an orange block"]),
        image_dir=image_dir,
    )


def overfit(model_config, conversations: list[Conversation], steps: int, lr: float = 3e-3):
    """A tiny model with every module trained (Adam, full batch, seed 0) until it repeats `conversations`."""
    from dataclasses import replace

    import torch

    from textbind.config import MODULE_NAMES
    from textbind.data.collate import collate
    from textbind.data.samples import prepare_sample
    from textbind.data.sequence import ConversationEncoder
    from textbind.loss import compute_loss
    from textbind.model.builder import build_model

    torch.manual_seed(0)
    bundle = build_model(replace(model_config, trainable=list(MODULE_NAMES)))
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=256)
    batch = collate([prepare_sample(c, encoder, bundle.image_processor) for c in conversations],
                    bundle.tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(bundle.model.parameters(), lr=lr)
    bundle.model.train()
    for _ in range(steps):
        loss = compute_loss(bundle.model, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bundle.model.eval().requires_grad_(False)
    return bundle
