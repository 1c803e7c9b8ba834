"""Entry point of `python -m textbind.serve`: the browser demo (see `textbind.serve.app`)."""

import os
import sys

# Before Gradio is imported: no usage statistics or version checks from a demo that may run offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from textbind.serve.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
