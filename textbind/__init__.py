"""textbind: multi-turn interleaved multimodal instruction following (TextBind), reimplemented."""

__version__ = "0.1.0"

IMAGE_TOKEN = "<image>"
START_TOKEN = "<start>"
END_TOKEN = "<end>"
SPECIAL_TOKENS = (IMAGE_TOKEN, START_TOKEN, END_TOKEN)
IGNORE_INDEX = -100  # the target of a position that predicts nothing
