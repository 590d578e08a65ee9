"""One exception type for mistakes a user can fix; the CLI prints it as one line and exits non-zero."""


class MtnlgError(Exception):
    """A user-facing error: the message names the problem and the fix."""
