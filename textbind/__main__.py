"""`python -m textbind ...` is the `textbind` command (see `textbind.cli`)."""

import sys

from textbind.cli import main

if __name__ == "__main__":
    sys.exit(main())
