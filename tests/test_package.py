"""The package: declared dependencies cover the imports, and a built wheel installs, runs and finds its configs."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Modules an extra provides that the inference path (chat, infer, demo, export) must not need.
EXTRA_ONLY_MODULES = ("deepspeed", "webdataset", "braceexpand", "wandb", "torchmetrics", "openai", "sklearn",
                      "rapidfuzz", "openpyxl", "lmms_eval", "tensorboard")
INFERENCE_MODULES = ("textbind.cli", "textbind.chat", "textbind.inference", "textbind.serve.app",
                     "textbind.export_hf", "textbind.runtime", "textbind.generation", "textbind.image_decoder")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group(0))


def declared(*extras: str) -> set[str]:
    names = {requirement_name(item) for item in PYPROJECT["dependencies"]}
    for extra in extras:
        names |= {requirement_name(item) for item in PYPROJECT["optional-dependencies"][extra]}
    return names - {"textbind"}


def third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, for every import in the package that is not stdlib or ours."""
    found: dict[str, str] = {}
    for file in sorted((ROOT / "textbind").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "textbind":
                    found.setdefault(top, str(file.relative_to(ROOT)))
    return found


def test_every_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    everything = declared(*PYPROJECT["optional-dependencies"])
    undeclared = {}
    for module, file in third_party_imports().items():
        names = {normalise(name) for name in distributions.get(module, [module])}
        if not names & everything:
            undeclared[module] = file
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_requirements_txt_holds_the_package_dependencies():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pinned = {requirement_name(line) for line in lines if line}
    missing = declared("train", "eval", "datagen", "serve") - pinned
    assert not missing, f"requirements.txt lacks {sorted(missing)}"
    assert "torch==2.13.0" in lines  # the CPU build on CPU machines (unpinned, pip picks a CUDA build)
    assert not declared() & {"deepspeed", "webdataset", "wandb", "torchmetrics", "openai"}


CHECK_INSTALLED = """
import pathlib, sys, textbind
from textbind.config import load_config
from textbind.resources import find_resource
from textbind.serve.app import resolve_examples_path
package = pathlib.Path(textbind.__file__).resolve().parent
assert str(package).startswith(sys.argv[1]), package  # the installed copy, not the checkout
config = load_config("configs/toy/first_stage.yaml")
engine = pathlib.Path(config.train.deepspeed_config)
assert engine.is_file() and engine.is_relative_to(package), engine
assert pathlib.Path(resolve_examples_path("data/examples.json")).is_relative_to(package)
for name in ["configs/model/llama2_7b.yaml", "configs/model/tiny.yaml", "configs/train/second_stage.yaml",
             "configs/deepspeed/zero2_bf16.json", "configs/toy/model.yaml"]:
    assert find_resource(name).is_relative_to(package), name
# the inference path (chat, infer, demo, export) imports nothing that only an extra provides
for name in sys.argv[2].split(","):
    __import__(name)
extra_only = set(sys.argv[3].split(",")) & set(sys.modules)
assert not extra_only, f"the inference path imports {sorted(extra_only)}"
print("ok", textbind.__version__)
"""


@pytest.mark.slow
def test_wheel_and_sdist_build_and_the_wheel_installs(tmp_path):
    """`pip wheel --no-deps .` and `python -m build --sdist`; the wheel in a fresh venv (no editable checkout
    on its path) runs `textbind --help`, finds the shipped configs and examples from elsewhere, and its
    inference path imports no module of an extra."""
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = dict(capture_output=True, text=True, timeout=300, env=environment)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, cwd=tmp_path, **run)
    (wheel,) = wheels.glob("textbind-*.whl")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "sdist"), str(ROOT)],
                   check=True, cwd=tmp_path, **run)
    (sdist,) = (tmp_path / "sdist").glob("textbind-*.tar.gz")
    assert sdist.stat().st_size > 10_000

    venv = tmp_path / "venv"
    # No pip of its own (seconds saved): this pip installs into it. --ignore-installed: the machine's own
    # (editable) textbind must not count as installed.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, **run)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, cwd=tmp_path, **run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    help_text = subprocess.run([str(venv / "bin/textbind"), "--help"], check=True, cwd=elsewhere, **run).stdout
    assert "export" in help_text and "train" in help_text
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, cwd=elsewhere, **run).stdout.strip()
    result = subprocess.run([str(venv / "bin/python"), "-c", CHECK_INSTALLED, site, ",".join(INFERENCE_MODULES),
                             ",".join(EXTRA_ONLY_MODULES)], cwd=elsewhere, **run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok " + importlib.import_module("textbind").__version__)
