"""Entry point of `python -m textbind.serve`, the same as `python -m textbind demo` (see `textbind.serve.app`)."""

import sys

from textbind.serve.app import main

if __name__ == "__main__":
    sys.exit(main())
