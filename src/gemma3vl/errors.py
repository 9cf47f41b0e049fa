"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class Gemma3VLError(Exception):
    """A user-facing error: the message names the file, key, shape or line at fault."""
