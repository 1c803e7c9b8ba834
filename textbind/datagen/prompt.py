"""Step 4: the prompt of each request: instructions + in-context examples from a seed pool + the images.

The template is a text file users edit (default: textbind/datagen/data/prompt_template.txt): `[system]`
and `[user]` lines start the two messages, `#` lines are comments, and `{examples}`, `{num_images}` and
`{images}` are filled in. The user message must end with a line `Images:` followed by `{images}`, which
becomes one line per image, `<img0>caption 0</img0>`, `<img1>caption 1</img1>`, ... with the captions
verbatim and nothing after the last line: servers (and the toy LLM) may rely on that.

The seed-example pool is JSONL (default: textbind/datagen/data/seed_examples.jsonl), one conversation
per line: `{"id", "images": [{"caption"}], "response": "Human: ... <img0>caption</img0> ..."}`.
`textbind datagen promote` appends the best-rated generated conversations to a copy of it.
Each request's examples are drawn from the pool with a generator seeded by the run seed and the
conversation's index, so every prompt is reproducible from the seed and the config.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from textbind.data.conversation import DataError
from textbind.datagen.config import PromptConfig
from textbind.seeding import stable_seed

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_TEMPLATE = DATA_DIR / "prompt_template.txt"
DEFAULT_SEED_EXAMPLES = DATA_DIR / "seed_examples.jsonl"
IMAGES_HEADER = "Images:"
EXAMPLE_IMAGES_HEADER = "Example images:"  # not "Images:": only the request's own images follow that line
PLACEHOLDERS = ("{examples}", "{num_images}", "{images}")
_TAG = re.compile(r"<img(\d+)>(.*?)</img\1>", re.DOTALL)


@dataclass
class PromptTemplate:
    system: str
    user: str
    path: str


@dataclass
class SeedExample:
    id: str
    captions: list[str]
    response: str


def image_lines(captions: list[str]) -> str:
    return "\n".join(f"<img{index}>{caption}</img{index}>" for index, caption in enumerate(captions))


def load_template(path: str = "") -> PromptTemplate:
    """The template at `path` ("" for the packaged one), checked for the image-list contract."""
    file = Path(path) if path else DEFAULT_TEMPLATE
    if not file.is_file():
        raise DataError(f"prompt.template: file not found: {file}")
    sections: dict[str, list[str]] = {}
    current = None
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        if line.strip() in ("[system]", "[user]"):
            current = line.strip()[1:-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip():
            raise DataError(f"{file}: text before the first [system] or [user] line: {line!r}")
    if "user" not in sections:
        raise DataError(f"{file}: no [user] section")
    system = "\n".join(sections.get("system", [])).strip()
    user = "\n".join(sections["user"]).strip()
    if not user.endswith(f"\n{IMAGES_HEADER}\n{{images}}"):
        raise DataError(f"{file}: the [user] message must end with a line {IMAGES_HEADER!r} and then {{images}}")
    return PromptTemplate(system, user, str(file))


def load_seed_examples(path: str = "") -> list[SeedExample]:
    """The seed-example pool at `path` ("" for the packaged one); a bad line is an error naming it."""
    file = Path(path) if path else DEFAULT_SEED_EXAMPLES
    if not file.is_file():
        raise DataError(f"prompt.seed_examples: file not found: {file}")
    examples = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            record = json.loads(line)
            captions = [str(image["caption"]) for image in record["images"]]
            response = str(record["response"]).strip()
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{where}: expected {{\"id\", \"images\": [{{\"caption\"}}], \"response\"}} "
                            f"({error!r})") from error
        for index, caption in _TAG.findall(response):
            if int(index) >= len(captions) or captions[int(index)] != caption.strip():
                raise DataError(f"{where}: <img{index}> does not quote image {index}'s caption")
        examples.append(SeedExample(str(record.get("id") or f"line-{number}"), captions, response))
    return examples


def render_examples(examples: list[SeedExample]) -> str:
    blocks = []
    for number, example in enumerate(examples, start=1):
        blocks.append(f"Example {number}\n{EXAMPLE_IMAGES_HEADER}\n{image_lines(example.captions)}\n"
                      f"Conversation:\n{example.response}")
    return "\n\n".join(blocks)


def choose_examples(pool: list[SeedExample], count: int, seed: int, index: int) -> list[SeedExample]:
    """`count` distinct examples for conversation `index` (fewer when the pool is smaller), seeded."""
    rng = random.Random(stable_seed(seed, "examples", index))
    return rng.sample(pool, min(count, len(pool)))


def build_messages(template: PromptTemplate, examples: list[SeedExample], captions: list[str]) -> list[dict]:
    """The chat messages of one request."""
    # Filled by plain replacement, in one pass, so braces or placeholders inside captions stay as written.
    values = {"{examples}": render_examples(examples), "{num_images}": str(len(captions)),
              "{images}": image_lines(captions)}
    pattern = re.compile("|".join(re.escape(placeholder) for placeholder in PLACEHOLDERS))
    user = pattern.sub(lambda match: values[match.group(0)], template.user)
    messages = [{"role": "system", "content": template.system}] if template.system else []
    return messages + [{"role": "user", "content": user}]


class PromptBuilder:
    """Messages for conversation `index` with the given captions, from the configured template and pool."""

    def __init__(self, config: PromptConfig, seed: int) -> None:
        self.template = load_template(config.template)
        self.pool = load_seed_examples(config.seed_examples)
        self.num_examples = config.num_examples
        self.seed = seed

    def messages(self, index: int, captions: list[str]) -> list[dict]:
        examples = choose_examples(self.pool, self.num_examples, self.seed, index)
        return build_messages(self.template, examples, captions)
