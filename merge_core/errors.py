"""brmerge's user-facing errors: one root, one line naming the problem and the fix.

``BrmergeError`` is the root of every error that a user's input or environment causes (a bad
recipe, a missing model, an invalid campaign, ...). The command line prints these as one line
and exits with status 2; any other exception is a bug and keeps its traceback. It lives here,
in the lowest layer, so that ``merge_core``, ``evals``, ``benchmarks_ptbr`` and ``search`` can
all raise it without importing each other; importing this module loads nothing but ``difflib``.

``did_you_mean`` is the one helper that suggests the closest valid name in such a message.

It keeps subclassing ``ValueError``: every user error is a bad value given to brmerge, and a
program that uses brmerge as a library may catch it as the standard exception for one. The
cost is that ``except ValueError`` inside brmerge would catch user errors and bugs alike, so
brmerge itself never catches ``ValueError`` around its own calls: it catches ``BrmergeError``,
or the one standard exception a conversion documents (``float("x")``), turned at once into a
``BrmergeError`` with the fix.
"""


import difflib
from collections.abc import Iterable


def did_you_mean(name: object, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class BrmergeError(ValueError):
    """A user error: the message is one line naming the problem and the fix."""


class MergeError(BrmergeError):
    """A merge cannot proceed as asked (bad recipe, bad parameter, bad input)."""


class RecipeError(MergeError):
    """The recipe is invalid; the message names the field, the value and the fix."""
