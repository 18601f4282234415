"""The one error type the command prints as a message (what was wrong and what to do), not a traceback."""


class BatchError(Exception):
    pass
