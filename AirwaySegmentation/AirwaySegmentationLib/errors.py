"""Errors raised for bad user input.

Every public function that reads user-supplied data raises :class:`AirwayInputError`
with a one-sentence message (what was wrong, what was expected, what to do).  The CLI
prints that sentence and exits with status 2, never a traceback.
"""


class AirwayInputError(ValueError):
    """User input (a file, an array, a parameter) is not usable; the message says why."""
