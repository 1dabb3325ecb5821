"""The one exception type the CLI turns into a one-line message and exit code 2."""


class HyftError(Exception):
    """A problem the user can act on: bad input, a missing file, an unknown name, a diverged run."""
