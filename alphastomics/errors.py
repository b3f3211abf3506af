"""The one exception type for problems a user can fix (bad file, key, value or flag)."""

from __future__ import annotations


class UserInputError(ValueError):
    """A problem with the user's input; the CLI prints its message on one line and exits 2.

    The message must name the file, key or value at fault and say how to fix it.
    """
