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
