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


class ServerRefused(BatchError):
    """A ComfyUI server answered a request with an HTTP error (not a proxy's 502-504): what it said, and where."""

    def __init__(self, url: str, path: str, code: int, reason: object, body: bytes = b""):
        self.url, self.path, self.code, self.body = url, path, code, body
        super().__init__(f"ComfyUI at {url} answered {path} with HTTP {code} {reason}. Its console says why; "
                         "fix that and run again (finished jobs are kept and not run twice)")


class UploadRefused(BatchError):
    """A server refused one input image: that job's error, not the batch's."""
