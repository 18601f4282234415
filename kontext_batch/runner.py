"""The batch loop: keep a bounded number of turns in each server's queue, follow them, collect their outputs.

ComfyUI's history is the truth about a prompt; websocket events only say when to look (and drive the
progress bars). Every finished turn is on disk and in the manifest before the next event is read, so an
interruption at any point loses nothing that finished.

With several servers (servers.py keeps their state) a turn goes to whichever has room, and its inputs are
uploaded there; a multi-turn job's next turn may run on another server, which gets the previous output as
downloaded here. A server that stops answering is marked down and its unfinished turns go back to the batch's
queue, for the others; it is asked again after a backoff and takes turns once it answers, its copies of the
turns that ran elsewhere meanwhile taken out of its queue. When no server answers for a while, the run stops;
the manifest is as complete as ever and a re-run resumes.

A failed turn is queued again, up to `retries` times, unless another attempt could not change its outcome: an
image that cannot be read (found here before uploading, or reported by ComfyUI's LoadImage), a value that
ComfyUI's validation or a node rejects. Those are recorded at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import QueueRejected
from .errors import BatchError, ServerUnreachable, UploadRefused
from .jobs import NAMED_FIELDS, Job
from .manifest import Manifest
from .progress import SilentProgress
from .servers import Server, ServerPool
from .workflow import FieldMap, Target

POLL_WITH_EVENTS_S = 5.0   # history is polled anyway, in case an event was missed
POLL_WITHOUT_EVENTS_S = 1.0
FINISHING_POLL_S = 0.2     # ComfyUI announces success a moment before the history entry exists
EVENTS_PER_READ = 50

# Exceptions that a node raises for its inputs: the same job fails the same way on every attempt. PIL's two say
# the image cannot be read (LoadImage on a corrupt or unsupported file); ValueError and TypeError are how nodes
# (ours included: CheckpointError is a ValueError) reject a value. Anything else (out of memory, a CUDA error,
# an API node's lost connection or timeout) may pass on another attempt.
UNREADABLE_IMAGE_EXCEPTIONS = {"UnidentifiedImageError", "DecompressionBombError"}
REJECTED_VALUE_EXCEPTIONS = {"ValueError", "TypeError", "CheckpointError"}


def lasting_failure(error: dict) -> str | None:
    """Why the failure in ComfyUI's execution_error `error` will recur on a retry; None when a retry may help."""
    exception = str(error.get("exception_type", "")).rpartition(".")[2]  # ComfyUI sends "module.Class"
    message = str(error.get("exception_message", ""))
    if exception in UNREADABLE_IMAGE_EXCEPTIONS or "cannot identify image file" in message:
        return "ComfyUI cannot read the input image"
    if exception in REJECTED_VALUE_EXCEPTIONS:
        return f"{error.get('node_type', 'a node')} rejected its inputs"
    return None


def unreadable_image(path: Path) -> str | None:
    """Why LoadImage will fail on `path` whatever the attempt, as far as this machine can tell: None when it
    reads or cannot judge (no Pillow here, or a format this Pillow lacks and ComfyUI's may have, e.g. HEIC)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return None
    if path.suffix.lower() not in Image.registered_extensions():
        return None
    try:
        with Image.open(path):
            return None  # identified; a truncated file still loads in ComfyUI, which allows truncated images
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        return f"{path} is not a readable image ({error})"


class UnreadableImage(Exception):
    """A job's image that LoadImage could never read: the job fails without being queued."""


@dataclass
class Flight:
    """A turn queued in one ComfyUI server."""
    job: Job
    turn: int
    attempt: int
    prompt_id: str
    server: Server
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    upload_s: float = 0.0
    finishing: bool = False


@dataclass
class Summary:
    done: int = 0            # turns finished in this run
    failed: int = 0          # jobs that failed in this run
    skipped_done: int = 0    # jobs already complete in the manifest
    skipped_failed: int = 0  # jobs recorded as failed before (re-run them with retry_failed)
    remaining: int = 0       # turns not finished when the run stopped
    interrupted: bool = False
    stopped: str | None = None  # why the run ended before the batch: every server down (a re-run resumes)
    errors: list[str] = field(default_factory=list)


class BatchRunner:
    """Runs `jobs` on one ComfyUI server or several (`clients`: one client, or a list of them, or of
    servers.Server objects made for them).

    A server that stops answering is asked again after `backoff_s[0]` seconds, the pause doubling on each
    failed try up to `backoff_s[1]`; while none answers, the run waits `wait_for_servers_s` for one to come
    back, then stops with Summary.stopped set.
    """

    def __init__(self, clients, fields: FieldMap, jobs: list[Job], manifest: Manifest, out_dir: Path, *,
                 max_queued: int = 2, retries: int = 2, retry_failed: bool = False, progress=None,
                 backoff_s: tuple[float, float] = (2.0, 60.0), wait_for_servers_s: float = 60.0):
        clients = list(clients) if isinstance(clients, (list, tuple)) else [clients]
        self.pool = ServerPool(clients, max_queued, *backoff_s)
        self.fields = fields
        self.workflow = fields.workflow
        self.jobs = jobs
        self.manifest = manifest
        self.out_dir = Path(out_dir)
        self.retries = retries
        self.retry_failed = retry_failed
        self.wait_for_servers_s = wait_for_servers_s
        self.progress = progress or SilentProgress()
        self.ready: deque[tuple[Job, int, int]] = deque()   # (job, turn, attempt)
        self.summary = Summary()
        self._names = _output_names(jobs)
        self._interrupting = False
        self._started = False
        self._first_reader = -1
        for job in jobs:  # every job's values are checked before anything is queued
            self.values(job, 0, image_name=None, check=True)

    # --- what a turn sends ------------------------------------------------------------------------
    def values(self, job: Job, turn: int, image_name: str | None, check: bool = False,
               server: Server | None = None) -> dict[Target, Any]:
        """The inputs to fill for one turn on `server`; with `check`, only validated (nothing is uploaded)."""
        targets, coerce = self.fields.targets, self.fields.coerce
        values: dict[Target, Any] = {}
        if (job.image is not None or job.turns > 1) and not targets.get("image"):
            raise BatchError(f"{job.source}: an image goes in (a given image, or an earlier turn's output) but "
                             f"{self.workflow.source} has no LoadImage to take it; choose an edit workflow or "
                             "name the input with --image-field")
        if image_name is not None:
            for target in targets["image"]:
                values[target] = image_name
        for target in targets.get("prompt", []):
            values[target] = coerce(target, job.prompts[turn], job.source)
        if job.seed is not None:
            for target in targets.get("seed", []):
                values[target] = coerce(target, job.seed, job.source)
        for name, value in job.overrides:
            if name in NAMED_FIELDS:
                if not targets.get(name):
                    raise BatchError(f"{job.source}: {name} is set but {self.workflow.source} has no {name} input "
                                     f"to fill; name one with --{name}-field NODE.INPUT")
                for target in targets[name]:
                    values[target] = coerce(target, value, job.source)
                continue
            target = self.fields.override_target(name, job.source)
            if self.workflow.is_image_input(target):
                path = Path(str(value)).expanduser()
                path = path if path.is_absolute() else job.base_dir / path
                if not path.is_file():
                    raise BatchError(f"{job.source}: {name} names the image {value}, which does not exist")
                values[target] = path.name if check else self._upload(server, path)
            else:
                values[target] = coerce(target, value, job.source)
        return values

    def _upload(self, server: Server, path: Path, from_user: bool = True) -> str:
        """`from_user`: one of the user's images, checked before it travels (an earlier turn's output is
        ComfyUI's own)."""
        problem = unreadable_image(path) if from_user else None
        if problem is not None:
            raise UnreadableImage(problem)
        content = path.read_bytes()
        digest = hashlib.sha1(content).hexdigest()
        if digest not in server.uploads:
            # Named by content: re-uploading on resume overwrites the same file instead of piling up copies.
            server.uploads[digest] = server.client.upload_image(
                content, f"{path.stem}-{digest[:10]}{path.suffix.lower()}")
        return server.uploads[digest]

    def _turn_input(self, job: Job, turn: int) -> Path | None:
        """Turn k+1 takes turn k's output as downloaded here: whichever server runs it gets it uploaded."""
        if turn == 0:
            return job.image
        previous = self.manifest.turn_done(job.key, turn - 1)
        return self.out_dir / previous["outputs"][0]

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> Summary:
        with _ctrl_c_between_steps() as ctrl_c:
            return self._run(ctrl_c)

    def _run(self, ctrl_c: "_CtrlC") -> Summary:
        try:
            self._ask_servers()
            self._plan()
            self.progress.start(sum(j.turns for j in self.jobs), already=self._turns_already_done(),
                                servers=[s.label for s in self.pool])
            self._started = True
            for server in self.pool:
                self._show_state(server)
            give_up_at = None  # while every server is down: when the run stops waiting for one
            while self.ready or self._flying():
                ctrl_c.check()
                self._ask_servers()
                if self.pool.all_down:
                    now = time.monotonic()
                    if give_up_at is None:
                        give_up_at = now + self.wait_for_servers_s
                    if now >= give_up_at:
                        self.summary.stopped = self._all_down()
                        break
                    # Short naps keep Ctrl-C prompt; none reaches past the next try or the end of the wait.
                    time.sleep(min(0.2, self.pool.next_try_in(), give_up_at - now))
                    continue
                give_up_at = None
                while self.ready and (server := self.pool.with_room()) is not None:
                    self._submit(server, *self.ready.popleft())
                    ctrl_c.check()
                self._read_events()
                self._poll_due()
        except KeyboardInterrupt:
            self._interrupt()
        finally:
            self.progress.close()
        self.summary.remaining = sum(j.turns - self.manifest.next_turn(j.key, j.turns) for j in self.jobs
                                     if not self._failed(j))
        if self.summary.stopped:
            self.summary.stopped += (f"; {self.summary.remaining} turn(s) not done. Start ComfyUI again (or name "
                                     "other servers), then run the same command to resume")
        return self.summary

    def _flying(self) -> bool:
        return any(server.flights for server in self.pool)

    def _failed(self, job: Job) -> bool:
        return any(self.manifest.turn_failed(job.key, t) for t in range(job.turns))

    def _turns_already_done(self) -> int:
        return sum(self.manifest.next_turn(j.key, j.turns) for j in self.jobs)

    def _plan(self) -> None:
        """What a re-run still has to do: skip what is done, collect what ComfyUI finished meanwhile."""
        seen: set[str] = set()
        for job in self.jobs:
            if job.key in seen:
                continue  # the same row twice is one job
            seen.add(job.key)
            if self._failed(job) and not self.retry_failed:
                self.summary.skipped_failed += 1
                continue
            turn = self.manifest.next_turn(job.key, job.turns)
            if turn == job.turns:
                self.summary.skipped_done += 1
                continue
            # A later turn needs the previous turn's output; if it was deleted, redo that turn.
            while turn > 0 and not (self.out_dir / self.manifest.turn_done(job.key, turn - 1)["outputs"][0]).exists():
                turn -= 1
            queued = self.manifest.unfinished(job.key, turn)
            if queued and self._adopt(job, turn, queued):
                continue
            self.ready.append((job, turn, 1))

    def _adopt(self, job: Job, turn: int, queued: dict) -> bool:
        """A turn queued by an earlier run: follow it if its server still has it, collect it if it finished."""
        prompt_id, attempt = queued["prompt_id"], queued.get("attempt", 1)
        named = queued.get("server")
        if named is None:
            candidates = list(self.pool)  # recorded before servers were: any of them may have it
        else:
            server = self.pool.find(named)
            if server is not None and not server.usable:
                server.orphans.add(prompt_id)  # run elsewhere now: taken out of its queue when it answers
            candidates = [server] if server is not None else []
        for server in candidates:
            if not server.usable:
                continue
            try:
                history = server.client.history(prompt_id)
                running, pending = server.client.queued_ids()
            except ServerUnreachable as error:
                self._server_down(server, error.reason)
                continue
            if history is None and prompt_id not in running + pending:
                continue  # this server lost it (restarted, or we deleted it when interrupted), or never had it
            if history is not None and history.get("status", {}).get("status_str") != "success":
                return False  # failed or interrupted then: that run did not record it, so try again
            flight = Flight(job, turn, attempt, prompt_id, server)
            server.flights[prompt_id] = flight
            if history is not None:
                with self._answering(server):
                    self._check_history(flight)
            return True
        return False

    # --- servers ----------------------------------------------------------------------------------
    def _ask_servers(self) -> None:
        for server in self.pool.due():
            self._ask(server)

    def _ask(self, server: Server) -> None:
        """A server not (or no longer) known to answer: does it now? Checked against the workflow the first
        time; our prompts it held when it went down are taken out of its queue (they run elsewhere now)."""
        client = server.client
        try:
            running, pending = client.queued_ids()
            if not server.checked:
                object_info = server.object_info()
                try:
                    self.fields.check_server(object_info)
                except BatchError as error:
                    if not self._started:  # a server that cannot run the batch is a mistake to fix first
                        raise BatchError(f"{server.label}: {error}") from None
                    self._retire(server, str(error))
                    return
            if server.orphans:
                _withdraw(client, server.orphans, running, pending)
        except ServerUnreachable as error:
            first = not server.checked and server.down_reason == "not asked yet"
            self.pool.mark_down(server, error.reason)
            if first and len(self.pool) > 1:
                self.progress.warning(f"{server.label} does not answer ({error.reason}); going on with the others, "
                                      f"asking it again in {server.retry_in:.0f} s")
            self._show_state(server)
            return
        server.orphans.clear()
        came_back, late = server.checked, server.down_reason != "not asked yet"
        server.checked = True
        problem = client.connect_events()
        server.events_worked |= client.has_events
        if problem and not came_back:
            self.progress.warning(f"no websocket to ComfyUI at {server.label} ({problem}); following its jobs by "
                                  "polling its history, without step progress")
        self.pool.mark_up(server)
        if late:
            self.progress.warning(f"{server.label} answers {'again' if came_back else 'now'}; it takes jobs")
        self._show_state(server)

    @contextmanager
    def _answering(self, server: Server):
        """Around the calls to one server: if it does not answer, it is marked down and its turns go back to
        the batch's queue."""
        try:
            yield
        except ServerUnreachable as error:
            self._server_down(server, error.reason)

    def _server_down(self, server: Server, reason: str) -> None:
        if not server.up:
            return
        flights = self.pool.mark_down(server, reason)
        server.client.close()
        for flight in reversed(flights):  # the same attempt: the server failed, not the job
            self.ready.appendleft((flight.job, flight.turn, flight.attempt))
        where = "the other servers" if len(self.pool) > 1 else "it"
        waiting = f"; its {len(flights)} unfinished turn(s) wait for {where}" if flights else ""
        self.progress.warning(f"{server.label} stopped answering ({reason}); asking it again in "
                              f"{server.retry_in:.0f} s{waiting}")
        self._show_state(server)

    def _retire(self, server: Server, reason: str) -> None:
        for flight in reversed(self.pool.retire(server, reason)):
            self.ready.appendleft((flight.job, flight.turn, flight.attempt))
        server.client.close()
        self.progress.warning(f"{server.label} takes no jobs of this batch: {reason}")
        self._show_state(server)

    def _show_state(self, server: Server) -> None:
        if not self._started:
            return  # the lines exist once the run has started; then every server's is shown
        if server.retired:
            self.progress.server_status(server.label, "not used (it refused the workflow)")
        elif not server.up:
            self.progress.server_status(server.label, f"down ({server.down_reason})")
        elif not server.flights:
            self.progress.server_status(server.label, "idle")

    def _all_down(self) -> str:
        down = "; ".join(f"{s.label}: {s.retired or s.down_reason}" for s in self.pool)
        waited = f" and none came back in {self.wait_for_servers_s:.0f} s" if self.wait_for_servers_s else ""
        return f"no ComfyUI server answers ({down}){waited}"

    # --- one turn ---------------------------------------------------------------------------------
    def _submit(self, server: Server, job: Job, turn: int, attempt: int) -> None:
        started = time.monotonic()
        source = self._turn_input(job, turn)
        values: dict[Target, Any] = {}
        try:
            image = self._upload(server, source, from_user=turn == 0) if source is not None else None
            values = self.values(job, turn, image, server=server)
            prompt_id = server.client.queue_prompt(self.workflow.filled(values))
        except UnreadableImage as unreadable:
            self._record_error(job, turn, attempt, None, f"{unreadable}; not queued: replace the file, then run "
                                                         "again with --retry-failed")
            return
        except UploadRefused as refusal:
            self._record_error(job, turn, attempt, None, f"{refusal}; not queued: check the file, then run again "
                                                         "with --retry-failed", server)
            return
        except ServerUnreachable as error:
            self.ready.appendleft((job, turn, attempt))
            self._server_down(server, error.reason)
            return
        except QueueRejected as rejection:
            filled = {t.node_id for t in values}
            if rejection.node_ids and rejection.node_ids <= filled:
                # The values of this job were refused: a job error, not the workflow's.
                self._record_error(job, turn, attempt, None, f"ComfyUI rejected the job: {rejection}", server)
                return
            if all(s.retired for s in self.pool if s is not server):
                raise BatchError(f"ComfyUI rejected the workflow {self.workflow.source}: {rejection}. This is not "
                                 "a problem of one job: fix the workflow (or the models it names) and run "
                                 "again") from None
            self.ready.appendleft((job, turn, attempt))
            self._retire(server, f"it rejected the workflow ({rejection}); its nodes or models may differ from "
                                 "the other servers'")
            return
        server.assigned += 1
        self.manifest.append("queued", key=job.key, turn=turn, prompt_id=prompt_id, attempt=attempt, server=server.url)
        server.flights[prompt_id] = Flight(job, turn, attempt, prompt_id, server,
                                           queued_at=time.monotonic(), upload_s=time.monotonic() - started)

    def _read_events(self) -> None:
        listening = [s for s in self.pool.usable if s.client.has_events]
        if not listening:
            time.sleep(0.2)
            return
        # Each read starts at the next server: returning early to refill the queues must not leave the last ones
        # unread.
        self._first_reader = (self._first_reader + 1) % len(listening)
        listening = listening[self._first_reader:] + listening[:self._first_reader]
        wait = 0.5 / len(listening)
        for server in listening:
            refill = False
            with self._answering(server):
                for _ in range(EVENTS_PER_READ):  # what has arrived, bounded: one busy server cannot starve the rest
                    event = server.client.next_event(timeout=wait)
                    if event is None or not server.up:
                        break
                    self._on_event(server, event)
                    if self.ready and self.pool.with_room() is not None:
                        refill = True  # a turn finished: refill the queues before reading on
                        break
                if server.up and not server.client.has_events:
                    # Its socket closed: ask now whether the server is still there (and still has our prompts).
                    self._poll(server)
            if refill:
                return

    def _on_event(self, server: Server, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        flight = server.flights.get(data.get("prompt_id"))
        if flight is None:
            return
        if kind == "execution_start":
            flight.started_at = time.monotonic()
            self.progress.turn_started(server.label, self._label(flight))
        elif kind == "progress":
            self.progress.step(server.label, data.get("value", 0), data.get("max", 0))
        elif kind == "execution_error":
            self._execution_error(flight, data)
        elif kind == "execution_interrupted" and not self._interrupting:
            self._failure(flight, "interrupted in ComfyUI (Cancel was pressed, or another client interrupted it)")
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            flight.finishing = True
            self._check_history(flight)

    def _poll_due(self) -> None:
        now = time.monotonic()
        for server in self.pool.usable:
            if not server.flights:
                continue
            finishing = any(f.finishing for f in server.flights.values())
            interval = FINISHING_POLL_S if finishing else (
                POLL_WITH_EVENTS_S if server.client.has_events else POLL_WITHOUT_EVENTS_S)
            if now - server.last_poll > interval:
                server.last_poll = now
                with self._answering(server):
                    self._poll(server)

    def _poll(self, server: Server) -> None:
        """Looks up every flight of `server` in its history; one in neither its queue nor its history was lost
        (ComfyUI restarted, or someone cleared its queue) and is queued again."""
        running, pending = server.client.queued_ids()  # before the history: a prompt leaves the queue and
        waiting = set(running) | set(pending)            # enters the history at once, so none slips between
        for prompt_id in list(server.flights):
            flight = server.flights.get(prompt_id)
            if flight is None:
                continue
            if not self._check_history(flight) and prompt_id not in waiting and prompt_id in server.flights:
                del server.flights[prompt_id]
                self.progress.message(f"{server.label} no longer has {self._label(flight)} (restarted, or its queue "
                                      "was cleared); queueing it again")
                self.ready.appendleft((flight.job, flight.turn, flight.attempt))
        if server.events_worked and not server.client.has_events:
            # It answers with its socket closed (it restarted between two polls, or a proxy dropped the socket).
            server.client.connect_events()

    def _check_history(self, flight: Flight) -> bool:
        """Acts on the prompt's history entry; False when its server has none (yet)."""
        if flight.server.flights.get(flight.prompt_id) is not flight:
            return True
        history = flight.server.client.history(flight.prompt_id)
        if history is None:
            return False
        status = history.get("status", {})
        if status.get("status_str") == "success" and status.get("completed"):
            self._collect(flight, history)
        elif status.get("status_str") == "error":
            messages = {name: data for name, data in status.get("messages", [])}
            if "execution_error" in messages:
                self._execution_error(flight, messages["execution_error"])
            elif not self._interrupting:
                self._failure(flight, "interrupted in ComfyUI (Cancel was pressed, or another client interrupted it)")
        return True

    def _collect(self, flight: Flight, history: dict) -> None:
        server = flight.server
        started = time.monotonic()
        images = []
        for node_id in self.fields.output_nodes:
            images += history.get("outputs", {}).get(node_id, {}).get("images", [])
        saved = [i for i in images if i.get("type") == "output"]
        images = saved or images  # Preview Image results (type temp) only when nothing was saved
        if not images:
            del server.flights[flight.prompt_id]
            self._record_error(flight.job, flight.turn, flight.attempt, flight.prompt_id,
                               "the workflow ran but its output nodes returned no images", server)
            return
        # Downloaded before the flight is let go: if the server goes away meanwhile, the turn runs elsewhere.
        contents = [server.client.view(i["filename"], i.get("subfolder", ""), i.get("type", "output")) for i in images]
        del server.flights[flight.prompt_id]
        outputs = []
        for index, (image, content) in enumerate(zip(images, contents)):
            name = self._names[flight.job.key]
            name += f"_turn{flight.turn + 1}" if flight.job.turns > 1 else ""
            name += f"_{index + 1}" if len(images) > 1 else ""
            name += Path(image["filename"]).suffix or ".png"
            write_atomic(self.out_dir / name, content)
            outputs.append(name)
        now = time.monotonic()
        run_s = now - (flight.started_at or flight.queued_at)
        self.manifest.append(
            "done", key=flight.job.key, turn=flight.turn, turns=flight.job.turns,
            **self._describe(flight.job, flight.turn), prompt_id=flight.prompt_id, attempt=flight.attempt,
            server=server.url, outputs=outputs,
            timings={"upload_s": round(flight.upload_s, 3),
                     "queue_wait_s": round((flight.started_at or flight.queued_at) - flight.queued_at, 3),
                     "run_s": round(run_s, 3), "download_s": round(now - started, 3),
                     "total_s": round(now - flight.queued_at + flight.upload_s, 3)})
        self.summary.done += 1
        where = f" on {server.label}" if len(self.pool) > 1 else ""
        self.progress.turn_finished(f"done  {self._label(flight)} -> {', '.join(outputs)} ({run_s:.1f} s{where})",
                                    turns=1)
        self._show_state(server)
        if flight.turn + 1 < flight.job.turns:
            self.ready.appendleft((flight.job, flight.turn + 1, 1))  # finish chains before starting new images

    def _execution_error(self, flight: Flight, error: dict) -> None:
        message = (f"{error.get('node_type', '?')} (node {error.get('node_id', '?')}): "
                   f"{error.get('exception_type', 'error')}: {str(error.get('exception_message', '')).strip()}")
        lasting = lasting_failure(error)
        if lasting is not None:
            message += f" (not retried: {lasting}, which another attempt would not change)"
        self._failure(flight, message, retry=lasting is None)

    def _failure(self, flight: Flight, message: str, retry: bool = True) -> None:
        del flight.server.flights[flight.prompt_id]
        self._show_state(flight.server)
        if retry and flight.attempt <= self.retries:
            self.progress.message(f"retry {self._label(flight)} (attempt {flight.attempt + 1} of "
                                  f"{self.retries + 1}): {message}")
            self.ready.appendleft((flight.job, flight.turn, flight.attempt + 1))
            return
        self._record_error(flight.job, flight.turn, flight.attempt, flight.prompt_id, message, flight.server)

    def _record_error(self, job: Job, turn: int, attempt: int, prompt_id: str | None, message: str,
                      server: Server | None = None) -> None:
        self.manifest.append("error", key=job.key, turn=turn, turns=job.turns, **self._describe(job, turn),
                             prompt_id=prompt_id, attempt=attempt, server=server.url if server else None, outputs=[],
                             error=message)
        self.summary.failed += 1
        self.summary.errors.append(f"{job.source}: {message}")
        self.progress.turn_finished(f"FAILED {job.name} turn {turn + 1}/{job.turns}: {message}",
                                    turns=job.turns - turn)

    def _describe(self, job: Job, turn: int) -> dict:
        return {"input": str(job.image) if job.image else None, "source": job.source, "prompt": job.prompts[turn],
                "seed": job.seed, "overrides": dict(job.overrides)}

    def _label(self, flight: Flight) -> str:
        turns = f" turn {flight.turn + 1}/{flight.job.turns}" if flight.job.turns > 1 else ""
        return f"{flight.job.name}{turns}"

    def _interrupt(self) -> None:
        """Ctrl-C: take our waiting prompts out of every server's queue and stop ours where one is running."""
        self._interrupting = True
        self.summary.interrupted = True
        for server in self.pool.usable:
            ours = set(server.flights)
            if not ours:
                continue
            try:
                _withdraw(server.client, ours, *server.client.queued_ids())
            except ServerUnreachable:
                server.flights.clear()  # the server went away: nothing of ours is left running there
        # Turns that finished a moment ago are collected now rather than on the next run.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            finishing = [f for s in self.pool.usable for f in s.flights.values() if f.finishing]
            if not finishing:
                break
            for flight in finishing:
                try:
                    self._check_history(flight)
                except ServerUnreachable:
                    flight.server.flights.pop(flight.prompt_id, None)
            time.sleep(FINISHING_POLL_S)


def _withdraw(client, prompt_ids: set[str], running: list[str], pending: list[str]) -> None:
    """Takes `prompt_ids` out of the server's queue (`running`, `pending` as it just listed them): the waiting
    ones deleted, the running one interrupted."""
    client.delete_queued([p for p in pending if p in prompt_ids])
    for prompt_id in running:
        if prompt_id in prompt_ids:
            client.interrupt(prompt_id)


class _CtrlC:
    """Ctrl-C noted by the signal handler, raised as KeyboardInterrupt only where the loop checks for it."""

    def __init__(self):
        self.pressed = False

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


@contextmanager
def _ctrl_c_between_steps():
    """While the runner works, a first Ctrl-C waits for the step under way (queueing a prompt and recording
    it are one step: a prompt queued but not yet known as ours could not be taken out of ComfyUI's queue);
    a second one stops at once. Outside the main thread signals cannot be caught: KeyboardInterrupt as usual."""
    ctrl_c = _CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield ctrl_c
        return

    def note(signum, frame):
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        ctrl_c.pressed = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


_umask_lock = threading.Lock()
_umask_by_setting: int | None = None


def _mode_for_replacing(path: Path) -> int:
    """The mode `open(path, "wb")` would leave: an existing file's own, else 0o666 less the umask.

    kontext_core.files_out does the same for the model's outputs; this client does not import kontext_core (it
    would load torch), hence this twin, kept in step by tests/files/test_files_out.py.
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def _current_umask() -> int:
    try:  # Linux 4.7+ reports it without changing it
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    global _umask_by_setting
    with _umask_lock:
        # Elsewhere only setting it reads it, and for that instant other threads' files get 0o077: once only.
        if _umask_by_setting is None:
            _umask_by_setting = os.umask(0o077)
            os.umask(_umask_by_setting)
        return _umask_by_setting


def write_atomic(path: Path, content: bytes) -> None:
    """`content` into `path` through a temporary file beside it, synced before the rename: a crash leaves the
    old file or the new one, never half of one; the new one has the mode a plain write would have given it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, _mode_for_replacing(path))
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_names(jobs: list[Job]) -> dict[str, str]:
    """The image's name where it is unique in the batch, with the job key where it is not."""
    counts: dict[str, int] = {}
    for job in {j.key: j for j in jobs}.values():
        counts[job.name] = counts.get(job.name, 0) + 1
    return {j.key: j.name if counts[j.name] == 1 else f"{j.name}-{j.key[:8]}" for j in jobs}
