"""Seeds that depend only on their parts: the data streams and the data engine derive every random choice from one."""

from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts, the same in every process and Python version (unlike hash()).

    Kept apart from the training stack, so that the engine's steps that need no model do not import torch.
    """
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")
