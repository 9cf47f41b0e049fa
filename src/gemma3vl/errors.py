"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class Gemma3VLError(Exception):
    """A user-facing error: the message names the file, key, shape or line at fault.

    ``same_on_every_rank`` marks an error that every torchrun rank raises alike, because it follows from the
    command line and the settings alone (a layout that does not divide, a bad setting): rank 0 alone prints it.
    Any other error a rank other than 0 raises is printed with that rank's number."""

    same_on_every_rank: bool = False


def on_every_rank(exc: Gemma3VLError) -> Gemma3VLError:
    """Mark ``exc`` as raised alike by every rank (see ``Gemma3VLError``); returns it, for ``raise on_every_rank(...)``."""
    exc.same_on_every_rank = True
    return exc


class SettingError(Gemma3VLError):
    """A setting's value out of its range, as ``name=value requirement``; ``name``, ``value`` and ``requirement``
    let a caller say it in its own terms (the CLI names the flag that set it: ``--top-k 0 must be >= 1``)."""

    def __init__(self, name: str, value: object, requirement: str):
        super().__init__(f"{name}={value} {requirement}")
        self.name, self.value, self.requirement = name, value, requirement
