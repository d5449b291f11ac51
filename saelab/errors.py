"""The one exception type that user-facing code raises for bad input.

The CLI prints a `SaelabError` as a single line (no traceback); anything else is a bug
and keeps its traceback.
"""


class SaelabError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""


class ConfigError(SaelabError):
    """A config key or value that is not allowed; the message names the key."""
