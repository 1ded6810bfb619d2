"""The one exception type for user mistakes; the entrypoint renders it as one line."""


class SelfAlignError(Exception):
    """A mistake the user can fix (bad file, bad field, bad override). Shown without a traceback."""
