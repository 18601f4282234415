"""What the person sees while a batch runs: an overall bar and the running turn's sampling steps, on stderr."""

from __future__ import annotations

import sys


class SilentProgress:
    def start(self, total: int, already: int) -> None: ...
    def turn_started(self, label: str) -> None: ...
    def step(self, value: int, maximum: int) -> None: ...
    def message(self, text: str) -> None: ...
    def turn_finished(self, text: str, turns: int) -> None: ...
    def close(self) -> None: ...


class BarProgress(SilentProgress):
    """An overall bar (turns) and a bar for the running turn's sampling steps, on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.overall = self.steps = None

    def start(self, total: int, already: int) -> None:
        from tqdm import tqdm

        self.overall = tqdm(total=total, initial=already, desc="batch", unit="turn", position=0,
                            file=sys.stderr, disable=self.quiet or None, dynamic_ncols=True)
        self.steps = tqdm(total=0, desc="", unit="step", position=1, leave=False, file=sys.stderr,
                          disable=self.quiet or None, dynamic_ncols=True)

    def turn_started(self, label: str) -> None:
        if self.steps is not None:
            self.steps.reset(total=0)
            self.steps.set_description(label)

    def step(self, value: int, maximum: int) -> None:
        if self.steps is not None and maximum:
            if self.steps.total != maximum:
                self.steps.reset(total=maximum)
            self.steps.n = value
            self.steps.refresh()

    def message(self, text: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def turn_finished(self, text: str, turns: int) -> None:
        self.message(text)
        if self.overall is not None:
            self.overall.update(turns)

    def close(self) -> None:
        for bar in (self.steps, self.overall):
            if bar is not None:
                bar.close()
