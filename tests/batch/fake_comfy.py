"""An in-process stand-in for ComfyUI's queue API with the client's interface, for the runner's unit tests.

It runs one queued prompt per event call, in queue order, and emits what ComfyUI sends (execution_start,
progress, execution_success / execution_error), writing history one poll after success as ComfyUI can.
What a prompt produces is decided by `behavior(graph, attempt_of_that_input, input_bytes)`: None for success,
an error text (a RuntimeError in the Kontext Edit node, as out of memory would be), or a dict of the
execution_error fields to send instead (LoadImage's PIL.UnidentifiedImageError, say).

Several fakes stand for several servers: each has its own address, queue, uploads and prompt ids. `kill()`
makes one stop answering (every call raises ServerUnreachable, as the client does for a refused connection),
losing its queue as a restart does, or keeping it as behind a broken network; `revive()` makes it answer again.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque

from kontext_batch.client import QueueRejected
from kontext_batch.errors import ServerUnreachable
from kontext_batch.workflow import load_workflow

STEPS = 3


def object_info_for(*workflow_names: str) -> dict:
    """Node definitions with ComfyUI's shapes for every node type of the named workflows."""
    known = {
        "seed": ["INT", {"min": 0, "max": 2**64 - 1}], "noise_seed": ["INT", {"min": 0, "max": 2**64 - 1}],
        "steps": ["INT", {"min": 1, "max": 10000}], "guidance": ["FLOAT", {"min": 0.0, "max": 100.0}],
        "denoise": ["FLOAT", {"min": 0.0, "max": 1.0}], "sampler": [["dev", "distilled", "true_cfg"]],
        "image": [["example.png"], {"image_upload": True}], "prompt": ["STRING", {"multiline": True}],
    }
    info = {}
    for name in workflow_names:
        for node in load_workflow(name).graph.values():
            entry = info.setdefault(node["class_type"],
                                    {"input": {"required": {}, "optional": {}},
                                     "output_node": node["class_type"] in ("SaveImage", "PreviewImage")})
            for input_name, value in node["inputs"].items():
                spec = ["LINK"] if isinstance(value, list) else known.get(input_name, ["STRING", {}])
                entry["input"]["required"][input_name] = spec
    return info


def output_bytes(input_content: bytes, prompt: str) -> bytes:
    return b"PNG:" + hashlib.sha1(input_content + prompt.encode()).hexdigest().encode()


class FakeComfy:
    def __init__(self, object_info: dict, behavior=None, history_lag: int = 1, name: str = ""):
        self.info = object_info
        self.base_url = f"http://{name or 'fake'}:8188"
        self.behavior = behavior or (lambda graph, attempt, inputs: None)
        self.history_lag = history_lag
        self.uploads: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.queue: deque[tuple[str, dict]] = deque()
        self.active: list[str] = []               # executing, or finished without a history entry yet
        self.histories: dict[str, dict] = {}
        self._pending_history: list[list] = []   # [polls left, prompt id, entry, input+prompt digest]
        self._events: deque[dict] = deque()
        self.queued: list[tuple[str, dict]] = []  # every prompt ever queued
        self.max_in_queue = 0
        self.deleted: list[str] = []
        self.interrupted: list[str] = []
        self.attempts: dict[str, int] = {}
        self.finished: list[tuple[str, str]] = []  # (prompt id, input+prompt digest) of every success in history
        self.websocket = True                     # it offers an event socket
        self.has_events = False                   # the socket is open (connect_events opens it)
        self.dead = False
        self.on_event = None                      # hook: called before each event is returned
        self._ids = (f"{name + '-' if name else ''}pid-{i}" for i in itertools.count(1))
        self.rejection = None                     # an answer dict /prompt refuses with
        self.object_info_asked = 0                # /object_info requests, answered or not

    def _answer(self) -> None:
        if self.dead:
            raise ServerUnreachable(self.base_url, "[Errno 111] Connection refused")

    def kill(self, lose_queue: bool = True) -> None:
        """Stops answering; its socket closes. `lose_queue`: it went down (its queue is gone when it comes back,
        its history kept); else only unreachable, queue intact."""
        self.dead = True
        self.has_events = False
        if lose_queue:
            self.restart()

    def revive(self) -> None:
        self.dead = False

    # the client's interface
    def object_info(self):
        self.object_info_asked += 1
        self._answer()
        return self.info

    def upload_image(self, content: bytes, filename: str, subfolder: str = "kontext-batch") -> str:
        self._answer()
        name = f"{subfolder}/{filename}"
        self.uploads[name] = content
        return name

    def queue_prompt(self, graph: dict) -> str:
        self._answer()
        if self.rejection is not None:
            raise QueueRejected(self.rejection)
        prompt_id = next(self._ids)
        self.queue.append((prompt_id, graph))
        self.queued.append((prompt_id, graph))
        self.max_in_queue = max(self.max_in_queue, len(self.queue) + len(self.active))
        return prompt_id

    def history(self, prompt_id: str):
        self._answer()
        if not self.has_events:  # no socket: a poll is when the fake gets to run the queue
            self._run_next()
            self._events.clear()
        for item in self._pending_history:
            item[0] -= 1
        for polls, pid, entry, key in [i for i in self._pending_history if i[0] < 0]:
            self.histories[pid] = entry  # as in ComfyUI, leaving the queue and entering the history is one step
            self.active.remove(pid)
            if entry["status"]["status_str"] == "success":
                self.finished.append((pid, key))
        self._pending_history = [i for i in self._pending_history if i[0] >= 0]
        return self.histories.get(prompt_id)

    def queued_ids(self):
        self._answer()
        return (list(self.active), [pid for pid, _ in self.queue])

    def restart(self):
        """ComfyUI restarted: its queue and running prompts are gone, its history kept (on disk here)."""
        self.queue.clear()
        self.active.clear()
        self._pending_history.clear()
        self._events.clear()

    def view(self, filename: str, subfolder: str, folder_type: str) -> bytes:
        self._answer()
        return self.files[f"{folder_type}/{subfolder}/{filename}"]

    def delete_queued(self, prompt_ids):
        self._answer()
        self.deleted += list(prompt_ids)
        self.queue = deque(item for item in self.queue if item[0] not in prompt_ids)

    def interrupt(self, prompt_id):
        self._answer()
        self.interrupted.append(prompt_id)

    def connect_events(self):
        if self.dead:
            return "connection refused"
        self.has_events = self.websocket
        return None if self.websocket else "the fake has no websocket"

    def close(self):
        self.has_events = False

    def next_event(self, timeout: float):
        if self.dead or not self.has_events:
            return None
        if not self._events:
            self._run_next()
        if not self._events:
            return None
        event = self._events.popleft()
        if self.on_event is not None:
            self.on_event(event)
        return event if self.has_events and not self.dead else None

    # running a prompt
    def _run_next(self) -> None:
        if not self.queue:
            return
        prompt_id, graph = self.queue.popleft()
        self.active.append(prompt_id)
        image_value = next((n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"), None)
        content = self.uploads.get(image_value, b"workflow-default-image")
        prompt = next((n["inputs"]["prompt"] for n in graph.values() if n["class_type"] == "KontextPrompt"), "")
        key = hashlib.sha1(content + prompt.encode()).hexdigest()
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self._events.append({"type": "execution_start", "data": {"prompt_id": prompt_id}})
        for step in range(1, STEPS + 1):
            self._events.append({"type": "progress", "data": {"prompt_id": prompt_id, "value": step, "max": STEPS}})
        error = self.behavior(graph, self.attempts[key], content)
        if error:
            data = {"prompt_id": prompt_id, "node_id": "7", "node_type": "KontextEdit",
                    "exception_type": "RuntimeError",
                    **(error if isinstance(error, dict) else {"exception_message": error})}
            self._events.append({"type": "execution_error", "data": data})
            entry = {"status": {"status_str": "error", "completed": False,
                                "messages": [["execution_error", data]]}, "outputs": {}}
        else:
            filename = f"kontext_edit_{prompt_id}.png"
            self.files[f"output//{filename}"] = output_bytes(content, prompt)
            self._events.append({"type": "execution_success", "data": {"prompt_id": prompt_id}})
            save_id = next(i for i, n in graph.items() if n["class_type"] == "SaveImage")
            entry = {"status": {"status_str": "success", "completed": True, "messages": []},
                     "outputs": {save_id: {"images": [{"filename": filename, "subfolder": "", "type": "output"}]}}}
        self._pending_history.append([self.history_lag, prompt_id, entry, key])
