"""The package's layering and its configuration, checked from the source."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from textbind.config import RunConfig

PACKAGE = Path(__file__).resolve().parents[1] / "textbind"
SANDBOXES = ("textbind.toy", "textbind.testing")
# The one sanctioned way into the sandbox: the decoder factory picks the toy renderer by name, lazily.
ALLOWED = {("textbind/image_decoder.py", "textbind.toy.renderer"),
           ("textbind/image_decoder.py", "textbind.toy.renderer.ToyRenderer")}


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_product_code_never_imports_the_toy_world_or_test_helpers():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative.startswith(("textbind/toy/", "textbind/testing/")):
            continue
        for module in imported_modules(path):
            if module.startswith(SANDBOXES) and (relative, module) not in ALLOWED:
                offenders.append(f"{relative} imports {module}")
    assert not offenders, "product code must not depend on the sandbox:\n" + "\n".join(offenders)


def test_the_check_sees_an_offending_import(tmp_path):
    offending = tmp_path / "offending.py"
    offending.write_text("def f():\n    from textbind.toy.world import caption\n"
                         "    import textbind.testing.tiny_sdxl\n")
    assert [m for m in imported_modules(offending) if m.startswith(SANDBOXES)] == [
        "textbind.toy.world", "textbind.toy.world.caption", "textbind.testing.tiny_sdxl"]


def test_every_config_field_is_read_somewhere():
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py") if path.name != "config.py")
    unread = []
    for section in dataclasses.fields(RunConfig):
        for item in dataclasses.fields(section.default_factory()):
            if not re.search(rf"\.{item.name}\b", source):
                unread.append(f"{section.name}.{item.name}")
    assert not unread, f"config keys that no code reads (remove or use them): {unread}"
