"""The batch loop: keep a bounded number of turns in ComfyUI's queue, follow them, collect their outputs.

ComfyUI's history is the truth about a prompt; websocket events only say when to look (and drive the
progress bars). Every finished turn is on disk and in the manifest before the next event is read, so an
interruption at any point loses nothing that finished.

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
from .errors import BatchError
from .jobs import NAMED_FIELDS, Job
from .manifest import Manifest
from .progress import SilentProgress
from .workflow import FieldMap, Target

POLL_WITH_EVENTS_S = 5.0   # history is polled anyway, in case an event was missed
POLL_WITHOUT_EVENTS_S = 1.0
FINISHING_POLL_S = 0.2     # ComfyUI announces success a moment before the history entry exists

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
    """A turn queued in ComfyUI."""
    job: Job
    turn: int
    attempt: int
    prompt_id: str
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
    errors: list[str] = field(default_factory=list)


class BatchRunner:
    def __init__(self, client, fields: FieldMap, jobs: list[Job], manifest: Manifest, out_dir: Path, *,
                 max_queued: int = 2, retries: int = 2, retry_failed: bool = False, progress=None):
        if max_queued < 1:
            raise BatchError("--max-queued must be at least 1")
        self.client = client
        self.fields = fields
        self.workflow = fields.workflow
        self.jobs = jobs
        self.manifest = manifest
        self.out_dir = Path(out_dir)
        self.max_queued = max_queued
        self.retries = retries
        self.retry_failed = retry_failed
        self.progress = progress or SilentProgress()
        self.flights: dict[str, Flight] = {}
        self.ready: deque[tuple[Job, int, int]] = deque()   # (job, turn, attempt)
        self.summary = Summary()
        self._uploaded: dict[str, str] = {}                  # content digest -> LoadImage value
        self._names = _output_names(jobs)
        self._interrupting = False
        for job in jobs:  # every job's values are checked before anything is queued
            self.values(job, 0, image_name=None, check=True)

    # --- what a turn sends ------------------------------------------------------------------------
    def values(self, job: Job, turn: int, image_name: str | None, check: bool = False) -> dict[Target, Any]:
        """The inputs to fill for one turn; with `check`, only validated (nothing is uploaded)."""
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
                values[target] = path.name if check else self._upload(path)
            else:
                values[target] = coerce(target, value, job.source)
        return values

    def _upload(self, path: Path, from_user: bool = True) -> str:
        """`from_user`: one of the user's images, checked before it travels (an earlier turn's output is
        ComfyUI's own)."""
        problem = unreadable_image(path) if from_user else None
        if problem is not None:
            raise UnreadableImage(problem)
        content = path.read_bytes()
        digest = hashlib.sha1(content).hexdigest()
        if digest not in self._uploaded:
            # Named by content: re-uploading on resume overwrites the same file instead of piling up copies.
            self._uploaded[digest] = self.client.upload_image(content, f"{path.stem}-{digest[:10]}{path.suffix.lower()}")
        return self._uploaded[digest]

    def _turn_input(self, job: Job, turn: int) -> Path | None:
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
            self._plan()
            self.progress.start(sum(j.turns for j in self.jobs), already=self._turns_already_done())
            last_poll = 0.0
            while self.ready or self.flights:
                ctrl_c.check()
                while self.ready and len(self.flights) < self.max_queued:
                    self._submit(*self.ready.popleft())
                    ctrl_c.check()
                event = self.client.next_event(timeout=0.5) if self.client.has_events else None
                if event is not None:
                    self._on_event(event)
                elif not self.client.has_events:
                    time.sleep(0.2)
                finishing = any(f.finishing for f in self.flights.values())
                interval = FINISHING_POLL_S if finishing else (
                    POLL_WITH_EVENTS_S if self.client.has_events else POLL_WITHOUT_EVENTS_S)
                if time.monotonic() - last_poll > interval:
                    last_poll = time.monotonic()
                    self._poll()
        except KeyboardInterrupt:
            self._interrupt()
        finally:
            self.progress.close()
        self.summary.remaining = sum(j.turns - self.manifest.next_turn(j.key, j.turns) for j in self.jobs
                                     if not self._failed(j))
        return self.summary

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
            prompt_id = self.manifest.unfinished_prompt(job.key, turn)
            if prompt_id and self._adopt(job, turn, prompt_id):
                continue
            self.ready.append((job, turn, 1))

    def _adopt(self, job: Job, turn: int, prompt_id: str) -> bool:
        """A turn queued by an earlier run: follow it if ComfyUI still has it, collect it if it finished."""
        attempt = self.manifest.last(job.key, turn).get("attempt", 1)
        history = self.client.history(prompt_id)
        running, pending = self.client.queued_ids()
        if history is None and prompt_id not in running + pending:
            return False  # ComfyUI lost it (restarted, or we deleted it when interrupted): queue again
        self.flights[prompt_id] = Flight(job, turn, attempt, prompt_id)
        if history is not None:
            status = history.get("status", {}).get("status_str")
            if status != "success":
                del self.flights[prompt_id]
                return False  # failed or interrupted then: that run did not record it, so try again
            self._check_history(prompt_id)
        return True

    def _submit(self, job: Job, turn: int, attempt: int) -> None:
        started = time.monotonic()
        source = self._turn_input(job, turn)
        try:
            values = self.values(job, turn, self._upload(source, from_user=turn == 0) if source is not None else None)
        except UnreadableImage as unreadable:
            self._record_error(job, turn, attempt, None, f"{unreadable}; not queued: replace the file, then run "
                                                         "again with --retry-failed")
            return
        graph = self.workflow.filled(values)
        try:
            prompt_id = self.client.queue_prompt(graph)
        except QueueRejected as rejection:
            filled = {t.node_id for t in values}
            if rejection.node_ids and rejection.node_ids <= filled:
                # The values of this job were refused: a job error, not the workflow's.
                self._record_error(job, turn, attempt, None, f"ComfyUI rejected the job: {rejection}")
                return
            raise BatchError(f"ComfyUI rejected the workflow {self.workflow.source}: {rejection}. This is not a "
                             "problem of one job: fix the workflow (or the models it names) and run again") from None
        self.manifest.append("queued", key=job.key, turn=turn, prompt_id=prompt_id, attempt=attempt)
        self.flights[prompt_id] = Flight(job, turn, attempt, prompt_id,
                                         queued_at=time.monotonic(), upload_s=time.monotonic() - started)

    def _on_event(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        flight = self.flights.get(data.get("prompt_id"))
        if flight is None:
            return
        if kind == "execution_start":
            flight.started_at = time.monotonic()
            self.progress.turn_started(self._label(flight))
        elif kind == "progress":
            self.progress.step(data.get("value", 0), data.get("max", 0))
        elif kind == "execution_error":
            self._execution_error(flight, data)
        elif kind == "execution_interrupted" and not self._interrupting:
            self._failure(flight, "interrupted in ComfyUI (Cancel was pressed, or another client interrupted it)")
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            flight.finishing = True
            self._check_history(flight.prompt_id)

    def _poll(self) -> None:
        """Looks up every flight in ComfyUI's history; one in neither the queue nor the history was lost
        (ComfyUI restarted, or someone cleared its queue) and is queued again."""
        running, pending = self.client.queued_ids()  # before the history: a prompt leaves the queue and
        waiting = set(running) | set(pending)          # enters the history at once, so none slips between
        for prompt_id in list(self.flights):
            if not self._check_history(prompt_id) and prompt_id not in waiting and prompt_id in self.flights:
                flight = self.flights.pop(prompt_id)
                self.progress.message(f"ComfyUI no longer has {self._label(flight)} (restarted, or its queue was "
                                      "cleared); queueing it again")
                self.ready.appendleft((flight.job, flight.turn, flight.attempt))

    def _check_history(self, prompt_id: str) -> bool:
        """Acts on the prompt's history entry; False when ComfyUI has none (yet)."""
        flight = self.flights.get(prompt_id)
        if flight is None:
            return True
        history = self.client.history(prompt_id)
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
        del self.flights[flight.prompt_id]
        started = time.monotonic()
        images = []
        for node_id in self.fields.output_nodes:
            images += history.get("outputs", {}).get(node_id, {}).get("images", [])
        saved = [i for i in images if i.get("type") == "output"]
        images = saved or images  # Preview Image results (type temp) only when nothing was saved
        if not images:
            self._record_error(flight.job, flight.turn, flight.attempt, flight.prompt_id,
                               "the workflow ran but its output nodes returned no images")
            return
        outputs = []
        for index, image in enumerate(images):
            content = self.client.view(image["filename"], image.get("subfolder", ""), image.get("type", "output"))
            name = self._names[flight.job.key]
            name += f"_turn{flight.turn + 1}" if flight.job.turns > 1 else ""
            name += f"_{index + 1}" if len(images) > 1 else ""
            name += Path(image["filename"]).suffix or ".png"
            write_atomic(self.out_dir / name, content)
            outputs.append(name)
        now = time.monotonic()
        run_s = now - (flight.started_at or flight.queued_at)
        self.manifest.append(
            "done", key=flight.job.key, turn=flight.turn, turns=flight.job.turns, **self._describe(flight.job, flight.turn),
            prompt_id=flight.prompt_id, attempt=flight.attempt, outputs=outputs,
            timings={"upload_s": round(flight.upload_s, 3),
                     "queue_wait_s": round((flight.started_at or flight.queued_at) - flight.queued_at, 3),
                     "run_s": round(run_s, 3), "download_s": round(now - started, 3),
                     "total_s": round(now - flight.queued_at + flight.upload_s, 3)})
        self.summary.done += 1
        self.progress.turn_finished(f"done  {self._label(flight)} -> {', '.join(outputs)} ({run_s:.1f} s)", turns=1)
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
        del self.flights[flight.prompt_id]
        if retry and flight.attempt <= self.retries:
            self.progress.message(f"retry {self._label(flight)} (attempt {flight.attempt + 1} of "
                                  f"{self.retries + 1}): {message}")
            self.ready.appendleft((flight.job, flight.turn, flight.attempt + 1))
            return
        self._record_error(flight.job, flight.turn, flight.attempt, flight.prompt_id, message)

    def _record_error(self, job: Job, turn: int, attempt: int, prompt_id: str | None, message: str) -> None:
        self.manifest.append("error", key=job.key, turn=turn, turns=job.turns, **self._describe(job, turn),
                             prompt_id=prompt_id, attempt=attempt, outputs=[], error=message)
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
        """Ctrl-C: take our waiting prompts out of ComfyUI's queue and stop ours if it is running."""
        self._interrupting = True
        self.summary.interrupted = True
        ours = set(self.flights)
        try:
            running, pending = self.client.queued_ids()
            self.client.delete_queued([p for p in pending if p in ours])
            for prompt_id in running:
                if prompt_id in ours:
                    self.client.interrupt(prompt_id)
        except BatchError:
            return  # the server went away: nothing of ours is left running there
        # Turns that finished a moment ago are collected now rather than on the next run.
        deadline = time.monotonic() + 3.0
        while any(f.finishing for f in self.flights.values()) and time.monotonic() < deadline:
            for flight in [f for f in self.flights.values() if f.finishing]:
                self._check_history(flight.prompt_id)
            time.sleep(FINISHING_POLL_S)


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
    would load torch), hence this twin, kept in step by tests/test_files_out.py.
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
