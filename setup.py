"""Build shim: the metadata is in pyproject.toml. This file adds what pyproject cannot say: the packages are
found automatically, and the top-level `configs/` and `data/examples.json` ship inside the wheel as package
data under `textbind/_resources/` (found by `textbind.resources.find_resource`)."""

from setuptools import find_packages, setup

RESOURCES = {"textbind._resources.configs": "configs", "textbind._resources.data": "data"}

setup(
    packages=[*find_packages(include=["textbind", "textbind.*"]), *RESOURCES],
    package_dir=RESOURCES,
    package_data={
        "textbind._resources.configs": ["**/*.yaml", "**/*.json"],
        "textbind._resources.data": ["examples.json", "examples/*.png", "README.md"],
        "textbind.datagen": ["data/*.txt", "data/*.jsonl"],  # the data engine's prompt template and seed examples
    },
)
