"""The one exception type for bad user data.

A `DataError` message is meant to be shown as is, on one line: it names the
file (and line, where there is one), what was expected and what to do.
The CLIs catch it at the top and print it without a traceback.
"""

_WORKER_PREFIX = 'Caught DataError in DataLoader worker'
_TRACEBACK_TAIL = 'DataError: '


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""

    def __init__(self, message=''):
        # A DataLoader worker's error is re-raised in the main process as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\nbasic.errors.DataError: <message>"):
        # keep the one-line message the worker raised.
        if isinstance(message, str) and message.startswith(_WORKER_PREFIX):
            last = message.rstrip('\n').rsplit('\n', 1)[-1]
            if _TRACEBACK_TAIL in last:
                message = last.split(_TRACEBACK_TAIL, 1)[1]
        super().__init__(message)
