"""The modality's words: the same finding sentences serve images and text ("test images" / "test sentences").

:func:`modality_words` sets the modality for a block (the suite while it words the findings, the report while it
renders); :func:`word` and :func:`units` read it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["modality", "modality_words", "units", "word"]

# The modality's words: the same sentences serve images and text ("test images" / "test sentences").
_WORDS = {
    "image": {
        "units": "images",
        "unit": "image",
        "region": "inside the object",
        "maps": "maps",
        "ceiling": "under a one-pixel shift or new noise",
    },
    "text": {
        "units": "sentences",
        "unit": "sentence",
        "region": "on the decisive tokens",
        "maps": "token attributions",
        "ceiling": "with every sentence shifted by one token, a neutral word put before it",
    },
}

_MODALITY: contextvars.ContextVar[str] = contextvars.ContextVar("tunelens_modality", default="image")


def word(key: str) -> str:
    """The current modality's word for ``key`` (``units``, ``unit``, ``region``, ``maps``, ``ceiling``)."""
    return _WORDS[_MODALITY.get()][key]


def units() -> str:
    """What the data is made of in the current modality: ``images`` or ``sentences``."""
    return word("units")


def modality() -> str:
    """The current modality: ``image`` or ``text``."""
    return _MODALITY.get()


@contextlib.contextmanager
def modality_words(modality: str) -> Iterator[None]:
    """Findings formatted inside this block use the words of ``modality`` (``image`` or ``text``)."""
    token = _MODALITY.set(modality if modality in _WORDS else "image")
    try:
        yield
    finally:
        _MODALITY.reset(token)
