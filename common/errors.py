"""Errors ppsehr raises for bad input; each names the file, row, field or query it is about."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice a misspelled `word` most likely meant, or None."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str], listing: str | None = None) -> str:
    """The tail of an error message about an unknown `word`: "; did you mean 'x'?", else " (`listing`)"
    when one is given, else nothing."""
    close = closest(word, choices)
    return f"; did you mean {close!r}?" if close else f" ({listing})" if listing else ""


class PpsehrError(Exception):
    """Base class: a problem a user can fix, with a message that says where it is."""


class DictionaryError(PpsehrError):
    """The consortium dictionary is malformed or inconsistent."""


class MappingError(PpsehrError):
    """A site mapping is malformed, or the site table does not fit it."""


class PlanError(PpsehrError):
    """A query plan is malformed or not allowed."""


class ReleaseError(PpsehrError):
    """A release could not be written or does not verify."""
