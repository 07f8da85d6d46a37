"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (bad path, bad recipe, bad
data). The CLI turns it into one line on stderr and exit code 2; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""
