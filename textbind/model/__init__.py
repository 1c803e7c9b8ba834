"""The MIM model and its builders."""

from textbind.model.builder import ModelBundle, build_model, load_tokenizer
from textbind.model.mim import IGNORE_INDEX, MIMModel, MIMOutput

__all__ = ["IGNORE_INDEX", "MIMModel", "MIMOutput", "ModelBundle", "build_model", "load_tokenizer"]
