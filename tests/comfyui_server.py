"""A real ComfyUI 0.8 for live tests, started once per session on loopback with `--cpu`, with this pack
linked into its custom_nodes and tiny random models saved under the real file names.

Needs ComfyUI's source at ~/ComfyUI (or $COMFYUI_PATH) with its own environment in .venv (ComfyUI's
requirements.txt and this pack's requirements.txt); the fixture skips, saying why, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kontext_core import Autoencoder, AutoencoderConfig, KontextTransformer, TransformerConfig
from kontext_core import save_autoencoder
from node_pack import COMFYUI, REPO

PYTHON = COMFYUI / ".venv" / "bin" / "python"
STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read() or b"{}") | {"http_status": error.code}


def _require_comfyui() -> None:
    if not (COMFYUI / "main.py").exists():
        pytest.skip(f"needs ComfyUI's source at {COMFYUI} (set COMFYUI_PATH)")
    if not PYTHON.exists():
        pytest.skip(f"needs ComfyUI's own environment at {PYTHON}: python3 -m venv {COMFYUI}/.venv, then pip install "
                    "torch torchvision, ComfyUI's requirements.txt and this pack's requirements.txt into it")


def prepare_base(base: Path, comfy_vae: bool = True) -> None:
    """A ComfyUI base directory: this pack in custom_nodes, tiny random models under the real file names, an
    input image. `comfy_vae`: also a full-size (random) FLUX AE, the only kind ComfyUI's own Load VAE reads."""
    # Imported here, not at the top: conftest imports this module (for its fixtures) and tiny_encoders imports conftest.
    from conftest import random_block_lora_file, randomize_, write_models_folder

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-kontext").symlink_to(REPO, target_is_directory=True)
    models = base / "models"
    for folder in ("diffusion_models", "vae", "text_encoders", "loras"):
        (models / folder).mkdir(parents=True)
    config = TransformerConfig.tiny()
    transformer = randomize_(KontextTransformer(config), 1)
    write_models_folder(models, transformer, randomize_(Autoencoder(AutoencoderConfig.tiny()), 2),
                        real_vocabularies=True, layout="bfl")
    save_file(random_block_lora_file(transformer, seed=3), str(models / "loras" / "kontext_lora.safetensors"))
    if comfy_vae:
        full_ae = randomize_(Autoencoder(AutoencoderConfig()), 5).to(torch.bfloat16)
        save_autoencoder(full_ae, models / "vae" / "flux_ae_full.safetensors")
        del full_ae
    (base / "input").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(base / "input" / "example.png")
    # The masked examples' input: as the Mask Editor saves a painted image, the region erased to transparent
    # (Load Image's MASK is 1 - alpha).
    masked = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    masked[..., 3] = 255
    masked[6:16, 22:34, 3] = 0
    Image.fromarray(masked, "RGBA").save(base / "input" / "example_masked.png")


def share_models(base: Path, models_from: Path) -> None:
    """A second base directory with the first one's pack and models, and input and output folders of its own."""
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-kontext").symlink_to(REPO, target_is_directory=True)
    (base / "models").symlink_to(models_from / "models", target_is_directory=True)
    (base / "input").mkdir()


class Server:
    """One ComfyUI process on loopback with `base` as its base directory, logging to base/comfyui.log."""

    def __init__(self, base: Path, extra_arguments: tuple[str, ...] = ()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}  # the log is read as it grows
        self.process = subprocess.Popen(
            [str(PYTHON), str(COMFYUI / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
             "--preview-method", "latent2rgb", *extra_arguments],
            cwd=base, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_until_up(self) -> None:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                _fail(f"ComfyUI exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                request_json(f"{self.url}/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    _fail(f"ComfyUI did not answer in {STARTUP_SECONDS} s")
                time.sleep(1)

    def kill(self) -> None:
        """As a crash or a pulled plug would: no chance to answer anything more."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def describe(self) -> dict:
        return {"url": self.url, "base": self.base, "log": self.log_path, "server": self}


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    _require_comfyui()
    base = tmp_path_factory.mktemp("comfyui")
    prepare_base(base)
    server = Server(base)
    try:
        server.wait_until_up()
        yield {**server.describe(), "object_info": request_json(f"{server.url}/object_info")}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def comfyui_pair(tmp_path_factory):
    """Two ComfyUI servers with the same tiny models, each with its own port, input and output folders, for a
    batch spread over both. Module-scoped: a test may kill one (the module's later tests get what is left)."""
    _require_comfyui()
    first, second = tmp_path_factory.mktemp("comfyui-a"), tmp_path_factory.mktemp("comfyui-b")
    prepare_base(first, comfy_vae=False)
    share_models(second, first)
    servers = [Server(first), Server(second)]  # starting side by side
    try:
        for server in servers:
            server.wait_until_up()
        yield [server.describe() for server in servers]
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def running_comfyui(base: Path, extra_arguments: tuple[str, ...] = ()):
    """ComfyUI on 127.0.0.1 (a free port) with `base` as its base directory (custom_nodes/, models/, input/,
    user/ there), logging to base/comfyui.log; yields its URL and stops it after. Outside pytest (the
    thumbnail script) its failures are RuntimeErrors."""
    server = Server(base, extra_arguments)
    try:
        server.wait_until_up()
        yield server.url
    finally:
        server.stop()


def _fail(message: str):
    if "PYTEST_CURRENT_TEST" in os.environ:
        pytest.fail(message)
    raise RuntimeError(message)


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver",)


def chromium_paths() -> tuple[str, str] | None:
    """(browser, chromedriver), or None where either is missing."""
    chromium = next((p for p in CHROMIUM if Path(p).exists()), None)
    driver = next((p for p in CHROMEDRIVER if Path(p).exists()), None)
    return (chromium, driver) if chromium and driver else None


@contextlib.contextmanager
def comfyui_page(url: str, width: int = 1600, height: int = 1000):
    """ComfyUI's frontend in headless Chromium (selenium), with a fresh profile, once its graph exists."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = chromium_paths()
    if found is None:
        raise RuntimeError("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", f"--user-data-dir={profile}"):
            options.add_argument(argument)
        options.binary_location = found[0]
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        driver.set_script_timeout(120)
        try:
            driver.get(url + "/")
            deadline = time.time() + 120
            while not driver.execute_script("return !!(window.app && window.app.graph)"):
                if time.time() > deadline:
                    raise RuntimeError("ComfyUI's page did not start")
                time.sleep(0.5)
            yield driver
        finally:
            driver.quit()
