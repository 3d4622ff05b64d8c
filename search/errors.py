"""Errors of the search layer, under the project's one root ``BrmergeError``.

The command line prints any ``BrmergeError`` as one line (exit status 2); every other
exception is a bug and keeps its traceback.
"""

from merge_core.errors import BrmergeError


class SearchError(BrmergeError):
    """A campaign cannot run, resume or be read as asked."""


class SchedulerError(SearchError):
    """The study and the campaign disagree (items, genome) in a way a resume cannot mend."""


class DriverError(SearchError):
    """The driver cannot start or continue the campaign (study exists, nothing to resume, ...)."""
