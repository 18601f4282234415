"""ComfyUI's HTTP and websocket API, as far as a batch needs it.

HTTP: /object_info, /upload/image, /prompt, /queue, /history/{id}, /view, /interrupt.
Websocket: /ws?clientId=...; ComfyUI sends a prompt's execution events (start, per-node progress,
success, error, interrupted) to the client id that queued it, so the socket is opened before queueing.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from .errors import BatchError, ServerRefused, ServerUnreachable, UploadRefused


class QueueRejected(Exception):
    """/prompt refused the prompt (validation): `error` and `node_errors` as ComfyUI sent them."""

    def __init__(self, answer: dict):
        self.answer = answer
        error = answer.get("error") or {}
        lines = [error.get("message", "the prompt was rejected")
                 + (f": {error['details']}" if error.get("details") else "")]
        for node_id, node_error in (answer.get("node_errors") or {}).items():
            for item in node_error.get("errors", []):
                lines.append(f"node {node_id} ({node_error.get('class_type', '?')}): {item.get('message', '')}"
                             + (f" ({item['details']})" if item.get("details") else ""))
        super().__init__("; ".join(lines))

    @property
    def node_ids(self) -> set[str]:
        return set((self.answer.get("node_errors") or {}).keys())


def server_urls(hosts: list[str] = (), ports: list[int] = (), urls: list[str] = ()) -> list[str]:
    """The servers a command line names: every --url, then every --host with its --port.

    One --port (or none: 8188) applies to every host; several pair with the hosts in order, or, with a single
    host (or none: 127.0.0.1), each is a server on that host (one ComfyUI per GPU of one machine). --host/--port
    add servers to the --url ones only when given.
    """
    addresses = [(url if "://" in url else f"http://{url}").rstrip("/") for url in urls]
    if hosts or ports or not urls:
        hosts, ports = list(hosts) or ["127.0.0.1"], list(ports) or [8188]
        if len(ports) == 1:
            pairs = [(host, ports[0]) for host in hosts]
        elif len(hosts) == 1:
            pairs = [(hosts[0], port) for port in ports]
        elif len(hosts) == len(ports):
            pairs = list(zip(hosts, ports))
        else:
            raise BatchError(f"{len(hosts)} --host and {len(ports)} --port do not pair up: give one --port for every "
                             "host, one --port per --host in the same order, or several --port for one --host")
        addresses += [f"http://{host}:{port}" for host, port in pairs]
    twice = sorted({a for a in addresses if addresses.count(a) > 1})
    if twice:
        raise BatchError(f"{', '.join(twice)} is named twice; name each server once")
    return addresses


def server_label(url: str) -> str:
    """The short name progress lines and messages use: host:port (and a path, behind a proxy)."""
    parts = urllib.parse.urlsplit(url)
    return parts.netloc + parts.path.rstrip("/")


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or f"kontext-batch-{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self._socket = None

    # --- HTTP ---------------------------------------------------------------------------------------
    def _call(self, path: str, payload: Any = None, body: bytes | None = None,
              content_type: str = "application/json") -> bytes:
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
        request = urllib.request.Request(self.base_url + path, data=data,
                                         headers={"Content-Type": content_type} if data is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code in (502, 503, 504):  # a proxy in front of a ComfyUI that is gone
                raise ServerUnreachable(self.base_url, f"HTTP {error.code} {error.reason}") from None
            raise ServerRefused(self.base_url, path, error.code, error.reason, error.read()) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError, http.client.HTTPException) as error:
            raise ServerUnreachable(self.base_url, getattr(error, "reason", None) or error) from None

    def _json(self, path: str, payload: Any = None) -> Any:
        return json.loads(self._call(path, payload) or b"null")

    def object_info(self) -> dict:
        return self._json("/object_info")

    def upload_image(self, content: bytes, filename: str, subfolder: str = "kontext-batch") -> str:
        """Stores the bytes in ComfyUI's input folder; returns the value a LoadImage input takes."""
        boundary = uuid.uuid4().hex
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts = []
        for name, value in (("subfolder", subfolder), ("overwrite", "true"), ("type", "input")):
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
                     f"Content-Type: {mime}\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            answer = json.loads(self._call("/upload/image", body=b"".join(parts),
                                           content_type=f"multipart/form-data; boundary={boundary}"))
        except ServerRefused as refusal:
            raise UploadRefused(
                f"ComfyUI at {self.base_url} refused the upload of {filename} (HTTP {refusal.code}: "
                f"{refusal.body[:200].decode(errors='replace').strip() or 'no reason given'})") from None
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue_prompt(self, graph: dict) -> str:
        try:
            answer = self._json("/prompt", {"prompt": graph, "client_id": self.client_id})
        except ServerRefused as refusal:
            try:
                answer = json.loads(refusal.body or b"{}")
            except json.JSONDecodeError:
                answer = {"error": {"message": f"HTTP {refusal.code}"}}
            raise QueueRejected(answer) from None
        if "prompt_id" not in answer:
            raise QueueRejected(answer)
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def queued_ids(self) -> tuple[list[str], list[str]]:
        """(running, pending) prompt ids in ComfyUI's queue."""
        queue = self._json("/queue")
        return ([item[1] for item in queue.get("queue_running", [])],
                [item[1] for item in queue.get("queue_pending", [])])

    def view(self, filename: str, subfolder: str, folder_type: str) -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        return self._call(f"/view?{query}")

    def delete_queued(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            self._call("/queue", {"delete": list(prompt_ids)})

    def interrupt(self, prompt_id: str) -> None:
        """Stops the prompt if it is the one running (ComfyUI >= 0.3.4x ignores a prompt that is not)."""
        self._call("/interrupt", {"prompt_id": prompt_id})

    # --- websocket ----------------------------------------------------------------------------------
    def connect_events(self) -> str | None:
        """Opens the event socket; None when open, else why not (the runner then polls history)."""
        try:
            import websocket  # websocket-client
        except ImportError:
            return "the websocket-client package is missing: pip install websocket-client"
        parts = urllib.parse.urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        address = f"{scheme}://{parts.netloc}{parts.path}/ws"
        try:
            self._socket = websocket.create_connection(f"{address}?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as error:
            self._socket = None
            return (f"no event socket at {address} ({type(error).__name__}: {error}); a proxy in between may need "
                    "websockets enabled")
        return None

    def next_event(self, timeout: float) -> dict | None:
        """The next JSON event, or None after `timeout` s without one (binary preview frames are skipped)."""
        if self._socket is None:
            return None
        import websocket

        self._socket.settimeout(timeout)
        try:
            message = self._socket.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (OSError, websocket.WebSocketException):
            self._socket = None  # the runner falls back to polling history
            return None
        if isinstance(message, bytes):
            return None
        try:
            return json.loads(message)
        except json.JSONDecodeError:
            return None

    @property
    def has_events(self) -> bool:
        return self._socket is not None

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except Exception:  # closing a dead socket has nothing left to report
                pass
            self._socket = None
