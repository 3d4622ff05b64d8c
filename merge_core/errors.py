"""brmerge's user-facing errors: one root, one line naming the problem and the fix.

``BrmergeError`` is the root of every error that a user's input or environment causes (a bad
recipe, a missing model, an invalid campaign, ...). The command line prints these as one line
and exits with status 2; any other exception is a bug and keeps its traceback. It lives here,
in the lowest layer, so that ``merge_core``, ``evals``, ``benchmarks_ptbr`` and ``search`` can
all raise it without importing each other; importing this module loads nothing else.

It subclasses ``ValueError`` so callers that caught the old ``ValueError`` subclasses keep
working; new code catches ``BrmergeError``.
"""


class BrmergeError(ValueError):
    """A user error: the message is one line naming the problem and the fix."""


class MergeError(BrmergeError):
    """A merge cannot proceed as asked (bad recipe, bad parameter, bad input)."""


class RecipeError(MergeError):
    """The recipe is invalid; the message names the field, the value and the fix."""
