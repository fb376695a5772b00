"""The one exception type for mistakes a user can fix (bad input, bad flags, bad paths)."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""
