from setuptools import find_packages, setup

setup(
    name="textbind",
    version="0.1.0",
    description="TextBind: multi-turn interleaved multimodal instruction following",
    packages=find_packages(include=["textbind", "textbind.*"]),
    package_data={"textbind.datagen": ["data/*.txt", "data/*.jsonl"]},  # the prompt template and seed examples
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt") if line.strip() and not line.startswith("#")],
    entry_points={
        "console_scripts": ["textbind=textbind.cli:main"],
        # lmms-eval finds `--model textbind` here (textbind.eval.lmms).
        "lmms_eval.models": ["textbind = textbind.eval.lmms:manifests"],
    },
    extras_require={
        "test": ["pytest>=8", "ruff", "playwright", "gradio_client"],
        # lmms-eval's own requirements pull torchvision and another torch: on a machine whose torch is
        # pinned, install it with `pip install --no-deps lmms-eval loguru` instead (see the README).
        "eval": ["lmms-eval>=0.7,<0.8", "openpyxl"],
    },
)
