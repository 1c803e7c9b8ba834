"""The toy shapes world: a tiny synthetic TextBind setting (data, caption grammar, renderer)."""

from textbind.toy.renderer import ToyRenderer
from textbind.toy.world import (
    COLOURS,
    LAYOUTS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    all_scenes,
    caption,
    draw_scene,
    parse_caption,
    random_scene,
    scene_attributes_match,
)

__all__ = [
    "COLOURS",
    "LAYOUTS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapeObject",
    "ToyRenderer",
    "all_scenes",
    "caption",
    "draw_scene",
    "parse_caption",
    "random_scene",
    "scene_attributes_match",
]
