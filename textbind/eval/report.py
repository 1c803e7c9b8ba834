"""report.html: one self-contained page with every benchmark's metrics and sample items, gold beside generated.

Images are embedded as base64 thumbnails (the page needs no other file and no network). For each
benchmark the page shows the metrics table, then a seeded sample of items and the worst and best
items by the benchmark's ranking metric (or eval.report_metric): the context's last user turn, the
gold turn and the generated turn side by side, with their images and captions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from textbind.eval.harness import PREDICTIONS_FILE, REPORT_FILE, read_predictions

THUMBNAIL_SIZE = 256
RANKED_ITEMS = 3  # worst and best items shown per benchmark

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.item { border: 1px solid #bbb; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }
.pair { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1em; }
.turn { background: #f6f6f6; padding: 0.5em; border-radius: 4px; white-space: pre-wrap; overflow-wrap: anywhere; }
.caption { font-style: italic; color: #555; }
.error { color: #a00; }
img { max-width: 256px; max-height: 256px; display: block; margin: 0.3em 0; }
h3 small { font-weight: normal; color: #666; }
"""


def image_data_uri(path: str | Path) -> str | None:
    """A PNG thumbnail of the image file as a data: URI, or None if it cannot be read."""
    try:
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    except (OSError, ValueError):
        return None
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _escape(text: Any) -> str:
    return html.escape(str(text))


def _images(paths: list[str | None], captions: list[str], base: Path) -> str:
    parts = []
    for k, path in enumerate(paths):
        caption = captions[k] if k < len(captions) else ""
        uri = image_data_uri(path if Path(path).is_absolute() else base / path) if path else None
        if uri:
            parts.append(f'<img src="{uri}" alt="image {k}">')
        else:
            parts.append('<div class="caption">(no image file)</div>')
        if caption:
            parts.append(f'<div class="caption">caption: {_escape(caption)}</div>')
    for caption in captions[len(paths):]:
        parts.append(f'<div class="caption">caption (not rendered): {_escape(caption)}</div>')
    return "".join(parts)


def _item_html(record: dict[str, Any], scores: dict[str, float], base: Path, label: str) -> str:
    reference = record.get("reference", {})
    prediction = record.get("prediction") or {}
    context = record.get("context") or []
    user = context[-1] if context and context[-1]["role"] == "user" else None
    parts = [f'<div class="item"><h4>{_escape(label)} item {_escape(record["id"])} '
             + " ".join(f"{_escape(k)}={v:.3f}" for k, v in scores.items()) + "</h4>"]
    if len(context) > 1:  # the earlier turns, folded
        earlier = "".join(f'<div class="turn"><b>{_escape(turn["role"])}:</b> {_escape(turn["content"])}'
                          f'{_images([p for p in turn.get("images", []) if p], [], base)}</div>'
                          for turn in context[:-1])
        parts.append(f"<details><summary>{len(context) - 1} earlier turn(s)</summary>{earlier}</details>")
    if user:
        parts.append(f'<div class="turn"><b>user:</b> {_escape(user["content"])}'
                     f'{_images([p for p in user.get("images", []) if p], [], base)}</div>')
    gold_text = reference.get("content") or reference.get("answer") or reference.get("expected_caption") or ""
    gold = f'<div class="turn"><b>gold</b>\n{_escape(gold_text)}' \
           f'{_images(reference.get("images", []), reference.get("captions", []), base)}</div>'
    if record.get("error"):
        generated = f'<div class="turn error"><b>failed</b>\n{_escape(record["error"])}</div>'
    else:
        generated = f'<div class="turn"><b>generated</b>\n{_escape(prediction.get("content", ""))}' \
                    f'{_images(prediction.get("images", []), prediction.get("captions", []), base)}</div>'
    parts.append(f'<div class="pair">{gold}{generated}</div></div>')
    return "".join(parts)


def _metrics_table(report: dict[str, Any]) -> str:
    rows = ["<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>count</th></tr>"]
    for name, metric in report["metrics"].items():
        interval = metric.get("ci95")
        shown = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ""
        rows.append(f'<tr><td>{_escape(name)}</td><td class="number">{metric["value"]:.3f}</td>'
                    f'<td class="number">{shown}</td><td class="number">{metric["count"]}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def benchmark_section(directory: Path, samples: int, ranking_metric: str = "", seed: int = 0) -> tuple[str, str]:
    """(the benchmark's metrics table, its sample and ranked items)."""
    report = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
    records = list(read_predictions(directory / PREDICTIONS_FILE).values())
    item_scores = report.get("item_scores", {})
    name = _escape(report["benchmark"])
    table = (f'<h2>{name} <small>{report["num_items"]} items, {report["num_failed"]} failed</small></h2>'
             + _metrics_table(report))
    parts = [f'<h2 id="{name}">{name}: items</h2>']
    by_id = {record["id"]: record for record in records}
    chosen = random.Random(seed).sample(records, min(samples, len(records)))
    if chosen:
        parts.append("<h3>Sample</h3>")
        parts += [_item_html(r, item_scores.get(r["id"], {}), directory, "sample") for r in chosen]
    metric = ranking_metric or report.get("ranking_metric", "")
    ranked = sorted((scores[metric], item_id) for item_id, scores in item_scores.items()
                    if metric in scores and item_id in by_id)
    if ranked:
        worst, best = ranked[:RANKED_ITEMS], ranked[::-1][:RANKED_ITEMS]
        for title, chosen_ids in (("Worst", worst), ("Best", best)):
            parts.append(f"<h3>{title} by {_escape(metric)}</h3>")
            parts += [_item_html(by_id[item_id], item_scores[item_id], directory, title.lower())
                      for _, item_id in chosen_ids]
    return table, "".join(parts)


def write_html_report(output_dir: str | Path, benchmarks: list[str], samples: int = 8, ranking_metric: str = "",
                      seed: int = 0) -> Path:
    """OUTPUT_DIR/report.html over the benchmarks' directories that hold a report.json."""
    output = Path(output_dir)
    present = [name for name in benchmarks if (output / name / REPORT_FILE).is_file()]
    sections = [benchmark_section(output / name, samples, ranking_metric, seed) for name in present]
    contents = " · ".join(f'<a href="#{_escape(name)}">{_escape(name)} items</a>' for name in present)
    page = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>textbind evaluation</title>"
        f"<style>{STYLE}</style></head><body><h1>textbind evaluation</h1><p>{contents}</p>"
        + "".join(table for table, _ in sections) + "".join(items for _, items in sections) + "</body></html>"
    )
    path = output / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
