"""The one exception type for bad user input.

Every check on what a user passes in (files, units, atom indices, names) raises
:class:`ConfSampleError` with one sentence naming what is wrong, at the place where the
input enters the package. The CLI prints that sentence without a traceback.
"""


class ConfSampleError(ValueError):
    """Bad input: the message names the file, argument or atoms at fault."""
