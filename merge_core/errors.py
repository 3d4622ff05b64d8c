"""User-facing errors of the merge core: one line naming the problem and the fix."""


class MergeError(ValueError):
    """A merge cannot proceed as asked (bad recipe, bad parameter, bad input)."""


class RecipeError(MergeError):
    """The recipe is invalid; the message names the field, the value and the fix."""
