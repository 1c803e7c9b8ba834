"""Seeds that depend only on their parts: every random choice of the engine derives from the run seed."""

from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts, the same in every process and Python version (unlike hash()).

    The scheme of textbind.data.streams.stable_seed, kept here so that the engine's steps that need no
    model (sampling, prompting, generation) do not import the training stack and torch.
    """
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")
