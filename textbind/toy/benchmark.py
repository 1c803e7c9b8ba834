"""The toy world's held-out evaluation as a benchmark of the harness (`textbind eval toy --data data/toy/eval`).

Items: `describe/N` (describe an unseen image; `describe.json`) and `draw/N` (a drawing or edit
request; `draw.json`), as written by `textbind.toy.datagen`. Metrics:
- `caption_attribute_accuracy`: share of descriptions naming every object's colour, shape and size
  (and position, for two objects) correctly, and nothing else;
- `describe_colour_accuracy`: share of descriptions naming exactly the image's colours (partial credit);
- `drawing_accuracy`: share of drawing / edit requests whose first emitted caption parses to exactly the
  expected scene; `drawing_by_kind/draw` and `drawing_by_kind/edit` split it by request kind, and the
  details' `edits_by_kind` splits the edits further by what they change and how many objects the edited
  image holds (`"colour/2": {"right": 7, "total": 12}`: colour edits of two-object images).
Answers are capped at 96 new tokens and 2 images (the toy answers are short).
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from textbind.data.conversation import Conversation, DataError, Turn, parse_record
from textbind.eval.config import EvalConfig
from textbind.eval.harness import EvalItem, Metric, Scores, file_fingerprint
from textbind.generation import DecodingConfig
from textbind.toy.dialogue import edits_between
from textbind.toy.world import COLOURS, parse_caption, scene_attributes_match

DESCRIBE_PROMPT = "Describe this image. <image>"
MAX_NEW_TOKENS = 96
MAX_IMAGES = 2
MAX_FAILURES = 10  # failures kept per set in the details, for inspection


def _describe_conversation(image: Path, source: str) -> Conversation:
    if not image.is_file():
        raise DataError(f"{source}: image file {image} not found")
    return Conversation([Turn("user", DESCRIBE_PROMPT, [str(image)])], source=source)


def _draw_conversation(item: dict[str, Any], source: str, image_dir: Path) -> Conversation:
    conversation = parse_record(item, source, str(image_dir))
    conversation.image_dir = str(image_dir)  # the file's image_dir may be relative to elsewhere
    for turn in conversation.turns:
        for image in turn.image_list:
            path = conversation.image_path(image)
            if isinstance(path, str) and not Path(path).is_file():
                raise DataError(f"{source}: image file {path} not found")
    return conversation


def _edit_kind(turns: list[Any], expected_caption: str) -> str:
    """What an edit request changes, and in how many objects: "colour/2" (a colour edit of a two-object
    image), from the conversation's latest image to the expected one; "unknown" when that is not one edit."""
    captions = [caption for turn in turns if isinstance(turn, dict) for caption in turn.get("caption_list") or []]
    before = parse_caption(captions[-1]) if captions else None
    after = parse_caption(expected_caption)
    edits = edits_between(before, after) if before is not None and after is not None else []
    if not edits:
        return "unknown"
    assert before is not None  # an edit was found from it
    return f"{edits[0].kind}/{len(before.objects)}"


class ToyBenchmark:
    name = "toy"

    def __init__(self, data_path: str, options: EvalConfig | None = None, limit_per_set: int = 0) -> None:
        self.eval_dir = Path(data_path)
        self.options = options or EvalConfig()
        self.limit_per_set = limit_per_set  # only the first N items of each set (0: all)

    def settings(self) -> dict[str, Any]:
        return {"describe": file_fingerprint(self.eval_dir / "describe.json"),
                "draw": file_fingerprint(self.eval_dir / "draw.json"), "limit_per_set": self.limit_per_set}

    def generation_config(self, config: DecodingConfig) -> DecodingConfig:
        return replace(config, max_new_tokens=min(config.max_new_tokens, MAX_NEW_TOKENS),
                       max_images=min(config.max_images, MAX_IMAGES))

    def _read(self, name: str) -> list[Any]:
        path = self.eval_dir / name
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: cannot read the toy evaluation set ({error})") from error
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list")
        return items

    def items(self) -> list[EvalItem]:
        """Every describe item, then every draw item (the first `limit_per_set` of each when given)."""
        describe, draw = self._read("describe.json"), self._read("draw.json")
        if self.limit_per_set:
            describe, draw = describe[: self.limit_per_set], draw[: self.limit_per_set]
        items = []
        for index, item in enumerate(describe):
            source = f"describe.json item {index}"
            if not isinstance(item, dict) or "image" not in item or "scene" not in item:
                items.append(EvalItem(f"describe/{index}", None, {"kind": "describe"},
                                      error=f"{source}: expected an object with 'image' and 'scene'"))
                continue
            image = self.eval_dir / item["image"]
            reference = {"kind": "describe", "content": item["scene"], "images": [str(image)]}
            items.append(EvalItem(f"describe/{index}", partial(_describe_conversation, image, source), reference))
        for index, item in enumerate(draw):
            source = f"draw.json item {index}"
            if not isinstance(item, dict) or "expected_caption" not in item:
                items.append(EvalItem(f"draw/{index}", None, {"kind": "draw"},
                                      error=f"{source}: expected a conversation with 'expected_caption'"))
                continue
            turns = item.get("conversation") or []
            kind = "edit" if len(turns) > 1 else "draw"
            request = turns[-1].get("content", "") if turns and isinstance(turns[-1], dict) else ""
            reference = {"kind": kind, "request": request, "expected_caption": item["expected_caption"],
                         "content": "<image>", "captions": [item["expected_caption"]]}
            if kind == "edit":
                reference["edit_kind"] = _edit_kind(turns, item["expected_caption"])
            items.append(EvalItem(f"draw/{index}", partial(_draw_conversation, item, source,
                                                           self.eval_dir / "images"), reference))
        return items

    def score(self, records: list[dict[str, Any]], output_dir: Path) -> Scores:
        describe = [r for r in records if r["reference"].get("kind") == "describe"]
        draw = [r for r in records if r["reference"].get("kind") in ("draw", "edit")]
        item_scores: dict[str, dict[str, float]] = {}
        described = colours_right = 0
        describe_failures: list[dict[str, str]] = []
        for record in describe:
            answer = "" if record.get("error") else (record.get("prediction") or {}).get("content", "")
            scene = record["reference"].get("content", "")
            expected = parse_caption(scene)
            named = {word.strip(".,;:!?").lower() for word in answer.split()} & set(COLOURS)
            colour_right = expected is not None and named == {obj.colour for obj in expected.objects}
            right = expected is not None and scene_attributes_match(expected, answer)
            colours_right += colour_right
            described += right
            item_scores[record["id"]] = {"correct": float(right)}
            if not right and len(describe_failures) < MAX_FAILURES:
                describe_failures.append({"expected": scene, "answer": answer})
        drawn = 0
        kinds = {"draw": [0, 0], "edit": [0, 0]}  # kind -> [right, total]
        edit_kinds: dict[str, dict[str, int]] = {}
        draw_failures: list[dict[str, str]] = []
        for record in draw:
            reference = record["reference"]
            prediction = {} if record.get("error") else (record.get("prediction") or {})
            captions = prediction.get("captions") or []
            emitted = captions[0] if captions else ""
            expected = parse_caption(reference["expected_caption"])
            right = expected is not None and parse_caption(emitted) == expected
            kinds[reference["kind"]][0] += right
            kinds[reference["kind"]][1] += 1
            if reference["kind"] == "edit":
                counts = edit_kinds.setdefault(reference.get("edit_kind", "unknown"), {"right": 0, "total": 0})
                counts["right"] += right
                counts["total"] += 1
            drawn += right
            item_scores[record["id"]] = {"correct": float(right)}
            if not right and len(draw_failures) < MAX_FAILURES:
                draw_failures.append({"request": reference.get("request", ""),
                                      "expected": reference["expected_caption"],
                                      "emitted": emitted, "answer": prediction.get("content", "")})
        metrics = {
            "caption_attribute_accuracy": Metric(described / max(1, len(describe)), len(describe)),
            "describe_colour_accuracy": Metric(colours_right / max(1, len(describe)), len(describe)),
            "drawing_accuracy": Metric(drawn / max(1, len(draw)), len(draw)),
        }
        drawing_by_kind = {kind: right / total for kind, (right, total) in kinds.items() if total}
        for kind, (_, total) in kinds.items():
            if total:
                metrics[f"drawing_by_kind/{kind}"] = Metric(drawing_by_kind[kind], total)
        details = {
            "num_eval_examples": {"describe": len(describe), "draw": len(draw)},
            "drawing_by_kind": drawing_by_kind,
            "edits_by_kind": dict(sorted(edit_kinds.items())),
            "describe_failures": describe_failures,
            "draw_failures": draw_failures,
        }
        return Scores(metrics, item_scores, details, "correct")


def build_benchmark(data_path: str, options: EvalConfig) -> ToyBenchmark:
    return ToyBenchmark(data_path, options)
