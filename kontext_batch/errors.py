"""The error types the command prints as a message (what was wrong and what to do), not a traceback."""


class BatchError(Exception):
    pass


class ServerUnreachable(BatchError):
    """A ComfyUI server did not answer (refused, reset, timed out, a proxy's 502-504): the server's trouble, not
    the job's. With several servers the runner marks it down and carries on with the others."""

    def __init__(self, url: str, reason: object):
        self.url, self.reason = url, str(reason)
        super().__init__(f"cannot reach ComfyUI at {url} ({reason}). Start ComfyUI (python main.py, or comfy launch), "
                         "or give its address with --host/--port or --url")
