"""The base of StaySafe's named errors: bad input or a missing resource, with a message that says what to fix.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback."""


class StaySafeError(Exception):
    """An error the user can fix; the message names the file, line, option or model and what was expected."""


class SpecError(StaySafeError, ValueError):
    """An option of a run is invalid; the message names the option and what was expected."""
