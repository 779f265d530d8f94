"""The one exception type for bad user data.

A `DataError` message is meant to be shown as is, on one line: it names the
file (and line, where there is one), what was expected and what to do.
The CLIs catch it at the top and print it without a traceback.
"""


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""
