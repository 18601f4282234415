"""The ComfyUI servers of one batch: which has room for a turn, which are down, when to ask those again.

A batch may run on several ComfyUI servers (one per GPU, or one per machine), all with the same nodes and
models. Each keeps at most `max_queued` of the batch's turns in its queue; a turn goes to the server with the
fewest, ties to the one given fewest so far, so that a lone multi-turn job alternates and every server is used.
A server that stops answering is marked down; it is asked again after a pause that doubles on every failed try,
up to a ceiling, and takes turns again once it answers. What the runner does about a server's turns when it
goes down or comes back is the runner's business; this module only keeps the state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .client import server_label
from .errors import BatchError


@dataclass
class Server:
    client: Any                                            # ComfyClient, or the tests' fake
    url: str
    label: str
    flights: dict[str, Any] = field(default_factory=dict)  # prompt id -> the runner's Flight, ours in its queue
    up: bool = False                 # not until it has answered
    checked: bool = False            # it answered once, and its /object_info was checked against the workflow
    retired: str | None = None       # why it takes no more turns in this batch (it refused the workflow)
    down_reason: str = "not asked yet"
    retry_at: float = 0.0            # when a down server is asked again (time.monotonic)
    backoff_s: float = 0.0           # the pause before the next try after that one fails
    assigned: int = 0                # turns given to it in this run
    uploads: dict[str, str] = field(default_factory=dict)  # content digest -> its LoadImage value there
    orphans: set[str] = field(default_factory=set)         # our prompts it held when it went down, run elsewhere since
    last_poll: float = 0.0
    events_worked: bool = False      # a socket opened once: worth opening again after a restart
    node_definitions: dict | None = field(default=None, repr=False)  # its /object_info, once it answered it

    @classmethod
    def for_client(cls, client) -> "Server":
        return cls(client, client.base_url, server_label(client.base_url))

    def object_info(self) -> dict:
        """Its node definitions, asked once per run (the answer is large: every node type with every input);
        a server that did not answer is asked again next time."""
        if self.node_definitions is None:
            self.node_definitions = self.client.object_info()
        return self.node_definitions

    @property
    def usable(self) -> bool:
        return self.up and self.retired is None

    @property
    def retry_in(self) -> float:
        return max(0.0, self.retry_at - time.monotonic())


class ServerPool:
    def __init__(self, clients: list, max_queued: int, first_backoff_s: float = 2.0, max_backoff_s: float = 60.0):
        """`clients`: a client per server, or Server objects already made for them (the command line makes
        them to read the first one's /object_info, which they keep)."""
        if max_queued < 1:
            raise BatchError("--max-queued must be at least 1")
        if not clients:
            raise BatchError("no ComfyUI server to run the batch on")
        self.max_queued = max_queued
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max(max_backoff_s, first_backoff_s)
        self.servers = [c if isinstance(c, Server) else Server.for_client(c) for c in clients]
        for server in self.servers:
            server.backoff_s = first_backoff_s

    def __iter__(self):
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def find(self, url: str | None) -> Server | None:
        return next((s for s in self.servers if s.url == url), None)

    @property
    def usable(self) -> list[Server]:
        return [s for s in self.servers if s.usable]

    @property
    def all_down(self) -> bool:
        return not self.usable

    def with_room(self) -> Server | None:
        open_ = [s for s in self.usable if len(s.flights) < self.max_queued]
        return min(open_, key=lambda s: (len(s.flights), s.assigned), default=None)

    def mark_down(self, server: Server, reason: str) -> list:
        """Marks `server` down (again) and takes its flights off it; returns them, oldest first."""
        now = time.monotonic()
        server.orphans |= set(server.flights)
        flights = self._take_flights(server)
        server.uploads.clear()  # a server that comes back may be a fresh one, with an empty input folder
        server.down_reason = reason
        server.retry_at = now + server.backoff_s
        server.backoff_s = min(server.backoff_s * 2, self.max_backoff_s)
        return flights

    def retire(self, server: Server, reason: str) -> list:
        """Takes `server` out of this batch (it refused the workflow); returns its flights, oldest first."""
        flights = self._take_flights(server)
        server.retired = reason
        return flights

    @staticmethod
    def _take_flights(server: Server) -> list:
        """`server` takes no more turns for now; its flights, oldest first, are the caller's to queue again."""
        flights = sorted(server.flights.values(), key=lambda f: f.queued_at)
        server.flights.clear()
        server.up = False
        return flights

    def mark_up(self, server: Server) -> None:
        server.up = True
        server.down_reason = ""
        server.backoff_s = self.first_backoff_s

    def due(self) -> list[Server]:
        """Down servers whose pause is over."""
        now = time.monotonic()
        return [s for s in self.servers if not s.up and s.retired is None and now >= s.retry_at]

    def next_try_in(self) -> float:
        waiting = [s.retry_at for s in self.servers if not s.up and s.retired is None]
        return max(0.0, min(waiting) - time.monotonic()) if waiting else 0.0
