"""What the person sees while a batch runs, on stderr: an overall bar counting the turns of every server, and
a line per server with the turn it runs and that turn's sampling steps (or why it runs nothing)."""

from __future__ import annotations

import sys


class SilentProgress:
    def start(self, total: int, already: int, servers: list[str] = ()) -> None: ...
    def turn_started(self, server: str, label: str) -> None: ...
    def step(self, server: str, value: int, maximum: int) -> None: ...
    def server_status(self, server: str, text: str) -> None: ...
    def message(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def turn_finished(self, text: str, turns: int) -> None: ...
    def close(self) -> None: ...


class BarProgress(SilentProgress):
    """tqdm bars: the batch's turns on the first line, then one steps bar per server."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.overall = None
        self.lines: dict[str, object] = {}  # server label -> its steps bar
        self.named = False                  # with one server, its name would only repeat the address given

    def start(self, total: int, already: int, servers: list[str] = ()) -> None:
        from tqdm import tqdm

        self.overall = tqdm(total=total, initial=already, desc="batch", unit="turn", position=0,
                            file=sys.stderr, disable=self.quiet or None, dynamic_ncols=True)
        self.named = len(servers) > 1
        for position, server in enumerate(servers or [""], start=1):
            self.lines[server] = tqdm(total=0, desc=self._desc(server, ""), unit="step", position=position,
                                      leave=False, file=sys.stderr, disable=self.quiet or None, dynamic_ncols=True)

    def _desc(self, server: str, text: str) -> str:
        return f"{server}: {text}" if self.named else text

    def _line(self, server: str):
        return self.lines.get(server) or next(iter(self.lines.values()), None)

    def turn_started(self, server: str, label: str) -> None:
        line = self._line(server)
        if line is not None:
            line.reset(total=0)
            line.set_description(self._desc(server, label))

    def step(self, server: str, value: int, maximum: int) -> None:
        line = self._line(server)
        if line is not None and maximum:
            if line.total != maximum:
                line.reset(total=maximum)
            line.n = value
            line.refresh()

    def server_status(self, server: str, text: str) -> None:
        line = self._line(server)
        if line is not None and self.named:
            line.reset(total=0)
            line.set_description(self._desc(server, text))

    def message(self, text: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def warning(self, text: str) -> None:
        """What changes the run (a server down or back), shown even with --quiet."""
        from tqdm import tqdm

        tqdm.write(f"kontext-batch: {text}", file=sys.stderr)

    def turn_finished(self, text: str, turns: int) -> None:
        self.message(text)
        if self.overall is not None:
            self.overall.update(turns)

    def close(self) -> None:
        for bar in [*self.lines.values(), self.overall]:
            if bar is not None:
                bar.close()
