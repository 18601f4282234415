"""The pack inside a real ComfyUI 0.8 (on the CPU, on loopback only): registration through the V3 entry
point, the node definitions ComfyUI serves, and the example workflows queued through its API and run
on tiny models saved under the real file names.

Needs ComfyUI's source with its own environment: ~/ComfyUI (or $COMFYUI_PATH) and its .venv holding
ComfyUI's requirements.txt and this pack's requirements.txt. Skipped, saying why, without them.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfyui_server import PYTHON, chromium_paths, comfyui_page, request_json
from node_pack import COMFYUI, REPO, nodes_module, workflow_builder
from test_workflows import CORE_NODES, UI_ONLY_WIDGETS, WORKFLOWS

RUN_SECONDS = 300
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _queue(comfyui, prompt: dict) -> dict:
    """Queue an API-format prompt and wait for its history entry (or the validation error)."""
    answer = request_json(f"{comfyui['url']}/prompt", {"prompt": prompt, "client_id": "kontext-tests"})
    if "prompt_id" not in answer:
        return {"validation": answer}
    prompt_id = answer["prompt_id"]
    deadline = time.time() + RUN_SECONDS
    while time.time() < deadline:
        history = request_json(f"{comfyui['url']}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"the prompt did not finish in {RUN_SECONDS} s; log:\n{comfyui['log'].read_text()[-3000:]}")


def _for_tiny_models(prompt: dict) -> dict:
    """Kontext's preferred ~1 MP sizes are far too big for a CPU test: keep the images' own sizes, 2 steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if "resize" in inputs:
            inputs["resize"] = "keep"
        if "steps" in inputs:
            inputs["steps"] = 2
        if node["class_type"] == "EmptySD3LatentImage":
            inputs.update(width=64, height=48)
        if "context_margin" in inputs:
            inputs["context_margin"] = 4  # a crop smaller than the 40x24 test image
    return prompt


def _widget_names(info: dict) -> list[str]:
    names = []
    for group in ("required", "optional"):
        for name in info["input_order"].get(group, []):
            kind = info["input"][group][name][0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
    return names


def test_comfyui_registers_every_node_as_declared(comfyui):
    info = comfyui["object_info"]
    for node in nodes_module().NODES:
        spec = node.spec()
        assert spec.node_id in info, f"{spec.node_id} is not registered; log:\n{comfyui['log'].read_text()[-2000:]}"
        served = info[spec.node_id]
        assert served["category"] == "Kontext" and served["display_name"] == spec.display_name
        assert served["output"] == [o.type for o in spec.outputs]
        assert served["output_name"] == [o.name for o in spec.outputs]
        for item in spec.inputs:
            group = "optional" if item.optional else "required"
            kind = served["input"][group][item.name][0]
            assert kind == ",".join(item.accepted_types), (spec.node_id, item.name, kind)
        assert _widget_names(served) == [i.name for i in spec.widget_order()], spec.node_id


def test_core_node_table_matches_comfyui(comfyui):
    info = comfyui["object_info"]
    for name, core in CORE_NODES.items():
        served = info[name]
        sockets = {k: v[0] for group in ("required", "optional") for k, v in served["input"].get(group, {}).items()
                   if not isinstance(v[0], list) and v[0] not in WIDGET_TYPES}
        assert sockets == core["sockets"], name
        assert served["output"] == core["outputs"], name
        widgets = [w for w in core["widgets"] if w not in UI_ONLY_WIDGETS.get(name, set())]
        assert _widget_names(served) == widgets, name


RUNNABLE = ["kontext_edit", "kontext_edit_lora", "kontext_edit_chain", "kontext_multi_reference",
            "kontext_text_to_image", "kontext_edit_loop", "kontext_masked_edit", "kontext_crop_stitch"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_workflow_runs(comfyui, name):
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text()))
    result = _queue(comfyui, prompt)
    assert "validation" not in result, result
    status = result["status"]
    assert status["status_str"] == "success", (status, comfyui["log"].read_text()[-4000:])
    saved = [image for output in result["outputs"].values() for image in output.get("images", [])
             if image.get("type") == "output"]
    assert saved and all((comfyui["base"] / "output" / i["subfolder"] / i["filename"]).exists() for i in saved)
    if name in ("kontext_masked_edit", "kontext_crop_stitch"):
        _assert_outside_the_mask_is_the_input(comfyui, prompt, saved[0])
    if name in ("kontext_edit_chain", "kontext_edit_loop"):
        turns = [o["kontext_turns"] for o in result["outputs"].values() if "kontext_turns" in o]
        assert turns and max(len(t) for t in turns) == (4 if name == "kontext_edit_chain" else 5)
        assert any(o.get("kontext_images") for o in result["outputs"].values())


def _assert_outside_the_mask_is_the_input(comfyui, prompt: dict, saved: dict) -> None:
    """Where the (grown) mask is 0 the saved image is the loaded one: Load Image's 8-bit levels / 255 through Save
    Image's own conversion (255 * x, truncated to 8 bits), computed the same way here."""
    from kontext_core.masks import MaskedEdit

    edit = next(v["inputs"] for v in prompt.values() if v["class_type"] == "KontextEdit")
    loaded = Image.open(comfyui["base"] / "input" / "example_masked.png")
    mask = 1.0 - np.asarray(loaded.getchannel("A"), dtype=np.float32) / 255.0
    plan = MaskedEdit.prepare(mask, loaded.size, grow=edit["grow"], feather=edit["feather"])
    outside = (plan.weights[0] == 0).numpy()
    expected = np.clip(255.0 * (np.asarray(loaded.convert("RGB")).astype(np.float32) / 255.0), 0, 255).astype(np.uint8)
    result = np.asarray(Image.open(comfyui["base"] / "output" / saved["subfolder"] / saved["filename"]))
    assert result.shape == expected.shape and outside.any() and not outside.all()
    assert np.array_equal(result[outside], expected[outside])


def test_native_text_encoder_workflow_validates(comfyui):
    """ComfyUI accepts the graph (types, links, values); its own loaders cannot read the tiny stand-in files,
    so the run may stop there, but never at a Kontext node."""
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / "kontext_native_text_encoders_api.json").read_text()))
    result = _queue(comfyui, prompt)
    assert "validation" not in result, result
    if result["status"]["status_str"] != "success":
        errors = [m for m in result["status"]["messages"] if m[0] == "execution_error"]
        assert errors and not errors[0][1]["node_type"].startswith("Kontext"), errors


def test_errors_reach_the_page(comfyui):
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / "kontext_edit_api.json").read_text()))
    edit = next(k for k, v in prompt.items() if v["class_type"] == "KontextEdit")
    del prompt[edit]["inputs"]["image"]  # nothing sets the size any more
    result = _queue(comfyui, prompt)
    errors = [m for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "nothing sets the output size" in errors[0][1]["exception_message"]


def _defaults(node_id: str, **values) -> dict:
    spec = next(n.spec() for n in nodes_module().NODES if n.spec().node_id == node_id)
    inputs = {i.name: i.default for i in spec.inputs if i.is_widget and i.default is not None}
    return {"class_type": node_id, "inputs": {**inputs, **values}}


def test_comfyuis_vae_and_vae_decode_work_with_kontext_nodes(comfyui):
    """Kontext Edit with ComfyUI's Load VAE; ComfyUI's VAE Decode reads Kontext Edit's LATENT as the same image."""
    prompt = {
        "1": _defaults("KontextModelLoader", model_name="flux1-kontext-dev.safetensors"),
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_ae_full.safetensors"}},
        "3": _defaults("KontextTextEncodersLoader", t5_name="t5xxl_fp16.safetensors", clip_name="clip_l.safetensors"),
        "4": _defaults("KontextPrompt", text_encoders=["3", 0], prompt="make it red"),
        "5": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": _defaults("KontextEdit", model=["1", 0], vae=["2", 0], conditioning=["4", 0], image=["5", 0], seed=1,
                       steps=2, resize="keep"),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "native_decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "kontext_decode"}},
    }
    result = _queue(comfyui, prompt)
    assert "validation" not in result, result
    assert result["status"]["status_str"] == "success", (result["status"], comfyui["log"].read_text()[-4000:])
    native, ours = (np.asarray(Image.open(comfyui["base"] / "output" / result["outputs"][k]["images"][0]["filename"]),
                               dtype=np.int16) for k in ("8", "9"))
    assert native.shape == ours.shape == (16, 32, 3)  # 40x24 kept, snapped to the AE's 16
    assert np.abs(native - ours).max() <= 2


def _log_since(comfyui, offset: int) -> str:
    return comfyui["log"].read_text(errors="replace")[offset:]


def _wait_for_log(comfyui, offset: int, text: str, seconds: float = 60, *, ask_again=None,
                  every: float = 5.0) -> str:
    """The log since `offset` once it holds `text`; `ask_again()` is called every `every` s until then."""
    deadline = time.time() + seconds
    asked = time.time()
    while text not in (log := _log_since(comfyui, offset)):
        assert time.time() < deadline, f"no '{text}' in the log within {seconds} s:\n{log[-3000:]}"
        if ask_again is not None and time.time() - asked > every:
            ask_again()
            asked = time.time()
        time.sleep(0.2)
    return log


def test_comfyui_unloads_our_models_and_we_reload_them(comfyui):
    """Our models sit in ComfyUI's list of loaded models: ComfyUI loads them for a run (its log says
    "Requested to load KontextTransformer"), keeps them across runs, unloads them when it frees memory
    (/free, like the Unload Models button: our patcher reports it), and the next run loads them again."""
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / "kontext_edit_api.json").read_text()))
    edit = next(k for k, v in prompt.items() if v["class_type"] == "KontextEdit")

    def run(seed: int) -> str:
        prompt[edit]["inputs"]["seed"] = seed  # a new seed: Kontext Edit runs again (not from ComfyUI's cache)
        offset = len(comfyui["log"].read_text(errors="replace"))
        result = _queue(comfyui, prompt)
        assert result.get("status", {}).get("status_str") == "success", (result, _log_since(comfyui, offset))
        return _log_since(comfyui, offset)

    run(9001)  # our models are loaded (and, with the integration, among ComfyUI's loaded models)
    offset = len(comfyui["log"].read_text(errors="replace"))
    free = urllib.request.Request(f"{comfyui['url']}/free", data=json.dumps({"unload_models": True}).encode(),
                                  method="POST", headers={"Content-Type": "application/json"})

    def ask_to_free() -> None:
        urllib.request.urlopen(free, timeout=30).close()  # answers with an empty body

    # ComfyUI's worker reads /free's flag when its queue wakes it (PromptQueue.set_flag notifies the queue). A
    # /free that lands while the worker is still collecting garbage after the last prompt wakes nobody, and its
    # flag would wait for the next prompt: asked again until the log shows the unload.
    ask_to_free()
    freed = _wait_for_log(comfyui, offset, "ComfyUI unloaded KontextTransformer", ask_again=ask_to_free)
    assert "ComfyUI unloaded KontextAutoencoder" in freed
    again = run(9002)  # released from our cache too: loaded from the file and handed to ComfyUI again
    assert "Requested to load KontextTransformer" in again and "Requested to load KontextAutoencoder" in again
    kept = run(9003)  # still loaded: ComfyUI finds it among its loaded models, nothing is requested
    assert "Requested to load Kontext" not in kept and "ComfyUI unloaded Kontext" not in kept


def test_comfyuis_memory_manager_moves_our_models(tmp_path):
    """ComfyUI's own load_models_gpu / free_memory / unload_all_models (in ComfyUI's environment, no server)
    on our cached models: counted at their real size, unloaded without leaving our cache, loaded back for
    the next use (working), and released from our cache by Unload Models."""
    if not (COMFYUI / "main.py").exists() or not PYTHON.exists():
        pytest.skip(f"needs ComfyUI's source and environment at {COMFYUI}")
    script = tmp_path / "memory.py"
    script.write_text(f"""
import sys
sys.path[:0] = [{str(COMFYUI)!r}, {str(REPO / "tests")!r}, {str(REPO)!r}]
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = ["memory-test", "--cpu"]
import torch
import comfy.model_management as mm
from node_pack import nodes_module
from kontext_core import KontextTransformer, TransformerConfig, save_transformer

model_cache, adapter = nodes_module("model_cache"), nodes_module("comfy_adapter")
path = {str(tmp_path / "kontext.safetensors")!r}
save_transformer(KontextTransformer(TransformerConfig.tiny()), path)
ref = model_cache.TransformerRef(path, "fp32", str(mm.get_torch_device()))
model = model_cache.transformer(ref)
handle = model_cache.CACHE.handle_of(model)
assert handle is not None and handle not in mm.loaded_models()
model_cache.ready(model)
assert handle in mm.loaded_models(), "not among ComfyUI's loaded models"
weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
assert handle.model_size() == handle.loaded_size() == weights, (handle.model_size(), handle.loaded_size(), weights)

unloaded = mm.free_memory(1e30, mm.get_torch_device())  # ComfyUI needs all the memory for another model
assert handle not in mm.loaded_models() and any(m.model is handle for m in unloaded)
assert handle.loaded_size() == 0 and model_cache.CACHE.handle_of(model) is handle  # still cached
model_cache.ready(model)
assert handle in mm.loaded_models() and handle.loaded_size() == weights
with torch.no_grad():  # it still works after the round trip
    model.img_in(torch.zeros(1, model.img_in.in_features))

# fp8 weights take a LoRA on the fly: ComfyUI counts its factors with the model, loaded, and without them after.
from safetensors.torch import save_file
resolve = nodes_module("resolve")
fp8_path = {str(tmp_path / "kontext_fp8.safetensors")!r}
save_transformer(KontextTransformer(TransformerConfig.tiny()), fp8_path, weights="fp8_e4m3fn_scaled")
fp8_ref = model_cache.TransformerRef(fp8_path, "fp8", str(mm.get_torch_device()))
fp8_model = model_cache.transformer(fp8_ref)
layer = fp8_model.double_blocks[0].img_attn.qkv
lora_path = {str(tmp_path / "lora.safetensors")!r}
save_file({{"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(8, layer.in_features),
           "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(layer.out_features, 8)}},
          lora_path)
fp8_handle = model_cache.CACHE.handle_of(fp8_model)
model_cache.ready(fp8_model)
fp8_weights = fp8_handle.model_size()
resolve.set_loras(fp8_model, fp8_ref.with_lora(model_cache.LoraRef(lora_path, 1.0)))
from kontext_core.adapters.lora import factor_bytes
extra = factor_bytes(fp8_model)
assert extra > 0 and fp8_handle.model_size() == fp8_handle.loaded_size() == fp8_weights + extra, (
    fp8_handle.model_size(), fp8_handle.loaded_size(), fp8_weights, extra)
model_cache.ready(fp8_model)
assert fp8_handle.loaded_size() == fp8_weights + extra
resolve.set_loras(fp8_model, fp8_ref)
assert factor_bytes(fp8_model) == 0 and fp8_handle.model_size() == fp8_handle.loaded_size() == fp8_weights

adapter.on_unload_models(model_cache.CACHE.release)
mm.unload_all_models()  # "Unload Models"
assert handle not in mm.loaded_models() and not model_cache.CACHE.models and not model_cache.CACHE.handles
again = model_cache.transformer(ref)
model_cache.ready(again)
assert again is not model and model_cache.CACHE.handle_of(again) in mm.loaded_models()
model_cache.CACHE.release()
assert not mm.loaded_models(), "a released model stayed in ComfyUI's list"
print("memory integration ok")
""")
    done = subprocess.run([str(PYTHON), str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_SECONDS, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0 and "memory integration ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_frontend_extension_is_served(comfyui):
    listed = request_json(f"{comfyui['url']}/extensions")
    path = next((p for p in listed if p.endswith("/kontext_turns.js")), None)
    assert path is not None, listed
    with urllib.request.urlopen(f"{comfyui['url']}{path}", timeout=30) as response:
        assert b"registerExtension" in response.read()


def _pack_folder(comfyui) -> str:
    """The pack's folder name under custom_nodes/, as the frontend finds it: from a node's python_module."""
    module = comfyui["object_info"]["KontextEdit"]["python_module"]
    assert module.startswith("custom_nodes."), module
    return module.split(".")[1]


def _fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


def test_template_browser_lists_the_workflows_and_serves_their_thumbnails(comfyui):
    """What the template browser asks for: /workflow_templates lists the pack's UI files by name, then each
    template's .json and .jpg come from /api/workflow_templates/<pack>/<name> (the name is the title)."""
    pack, build = _pack_folder(comfyui), workflow_builder()
    listed = request_json(f"{comfyui['url']}/workflow_templates")
    assert sorted(listed[pack]) == sorted(build.ui_name(i) for i in build.WORKFLOWS)
    name = urllib.parse.quote(build.ui_name("kontext_edit"))  # spaces: the browser escapes them
    workflow, _ = _fetch(f"{comfyui['url']}/api/workflow_templates/{pack}/{name}.json")
    assert json.loads(workflow) == _ui_workflow("kontext_edit")
    thumbnail, kind = _fetch(f"{comfyui['url']}/api/workflow_templates/{pack}/{name}.jpg")
    assert kind == "image/jpeg"
    with Image.open(io.BytesIO(thumbnail)) as picture:
        assert picture.format == "JPEG" and picture.size == (512, 384)


def test_help_panel_gets_each_nodes_page_and_picture(comfyui):
    """The node help panel reads /extensions/<pack>/docs/<node id>.md (WEB_DIRECTORY is js/) and resolves a
    relative picture against /extensions/<pack>/docs/."""
    pack = _pack_folder(comfyui)
    for node in nodes_module().NODES:
        node_id = node.spec().node_id
        page, kind = _fetch(f"{comfyui['url']}/extensions/{pack}/docs/{node_id}.md")
        assert "text/html" not in kind, kind  # the panel takes an HTML answer for a missing page
        page = page.decode()
        assert page.startswith(f"# {node.spec().display_name}") and "## Inputs" in page
    picture_path = re.search(r"!\[[^\]]*\]\(([^)]+)\)", page)[1]
    picture, kind = _fetch(f"{comfyui['url']}/extensions/{pack}/docs/{picture_path}")
    assert kind == "image/jpeg" and Image.open(io.BytesIO(picture)).format == "JPEG"


# --- in the browser: ComfyUI's own frontend (needs selenium and Chromium with chromedriver) -----------------

@pytest.fixture(scope="module")
def page(comfyui):
    pytest.importorskip("selenium.webdriver", reason="needs selenium to drive ComfyUI's frontend")
    if chromium_paths() is None:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    with comfyui_page(comfyui["url"]) as driver:
        yield driver


_LOAD_AND_CONVERT = """
const [workflow, done] = arguments;
(async () => {
  try {
    await window.app.loadGraphData(workflow);
    done({output: (await window.app.graphToPrompt()).output});
  } catch (error) { done({error: String(error)}); }
})();
"""


def _ui_workflow(workflow_id: str) -> dict:
    return json.loads((WORKFLOWS / f"{workflow_builder().ui_name(workflow_id)}.json").read_text())


@pytest.mark.parametrize("name", list(workflow_builder().WORKFLOWS))
def test_frontend_turns_each_ui_workflow_into_its_api_twin(page, name):
    """ComfyUI's frontend loads the UI file and writes exactly the API twin when it queues it."""
    result = page.execute_async_script(_LOAD_AND_CONVERT, _ui_workflow(name))
    assert "error" not in result, result
    assert result["output"] == json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())


_LOAD_PICTURE = """
const [url, done] = arguments;
const picture = new Image();
picture.onload = () => done({width: picture.naturalWidth, height: picture.naturalHeight});
picture.onerror = () => done({error: `could not load ${picture.src}`});
picture.src = url;
"""


def test_template_thumbnails_load_in_the_page(comfyui, page):
    """The browser loads each thumbnail from the URL the template browser writes: the name as it is, unescaped."""
    pack, build = _pack_folder(comfyui), workflow_builder()
    for workflow_id in build.WORKFLOWS:
        url = f"/api/workflow_templates/{pack}/{build.ui_name(workflow_id)}.jpg"
        shown = page.execute_async_script(_LOAD_PICTURE, url)
        assert shown == {"width": 512, "height": 384}, (workflow_id, shown)


_QUEUE_LOOP = """
const [workflow, done] = arguments;
(async () => {
  const app = window.app;
  await app.loadGraphData(workflow);
  for (const node of app.graph._nodes) {
    for (const widget of node.widgets ?? []) {
      if (widget.name === "resize") widget.value = "keep";
      if (widget.name === "steps") widget.value = 2;
    }
  }
  await app.queuePrompt(0, 1);
  done(true);
})();
"""
_STRIP = """
const loop = window.app.graph._nodes.find((n) => n.comfyClass === "KontextEditLoop");
const strip = loop.widgets.find((w) => w.name === "kontext_turn_strip");
return strip ? strip.element.children.length : 0;
"""
_CLICK_TURN_3 = """
const app = window.app;
const loop = app.graph._nodes.find((n) => n.comfyClass === "KontextEditLoop");
const pick = app.graph._nodes.find((n) => n.comfyClass === "KontextPickTurn");
const figures = [...loop.widgets.find((w) => w.name === "kontext_turn_strip").element.querySelectorAll("figure")];
figures[3].click();
return {count: figures.length, images: figures.map((f) => !!f.querySelector("img")),
        current: figures.map((f) => f.classList.contains("current")),
        turn: pick.widgets.find((w) => w.name === "turn").value};
"""


def test_turn_strip_in_the_page_picks_a_turn(page):
    page.execute_async_script(_QUEUE_LOOP, _ui_workflow("kontext_edit_loop"))
    deadline = time.time() + RUN_SECONDS  # polled from here: one long script would outlast selenium's own timeout
    while not page.execute_script(_STRIP):
        assert time.time() < deadline, f"no turn strip on Kontext Edit Loop {RUN_SECONDS} s after queueing"
        time.sleep(0.5)
    result = page.execute_script(_CLICK_TURN_3)
    assert result["count"] == 5 and all(result["images"])  # turn 0 and the four prompts
    assert result["current"] == [False, False, False, False, True]
    assert result["turn"] == 3  # the click set Kontext Pick Turn's widget


def test_wrong_model_file_gives_a_clear_node_error(comfyui):
    """An autoencoder file put among the diffusion models: the loader names what it is and where it belongs."""
    shutil.copy(comfyui["base"] / "models" / "vae" / "ae.safetensors",
                comfyui["base"] / "models" / "diffusion_models" / "not_a_transformer.safetensors")
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / "kontext_edit_api.json").read_text()))
    loader = next(k for k, v in prompt.items() if v["class_type"] == "KontextModelLoader")
    name_input = next(k for k, v in prompt[loader]["inputs"].items()
                      if isinstance(v, str) and v.endswith(".safetensors"))
    prompt[loader]["inputs"][name_input] = "not_a_transformer.safetensors"
    result = _queue(comfyui, prompt)
    assert "validation" not in result, result
    errors = [m for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0][1]["node_type"] == "KontextModelLoader"
    assert "autoencoder (VAE)" in errors[0][1]["exception_message"]


def test_interrupt_stops_sampling_mid_run(comfyui):
    prompt = _for_tiny_models(json.loads((WORKFLOWS / "api" / "kontext_edit_api.json").read_text()))
    edit = next(k for k, v in prompt.items() if v["class_type"] == "KontextEdit")
    prompt[edit]["inputs"]["steps"] = 5000  # far longer than the test waits
    prompt[edit]["inputs"]["seed"] = 12345  # not cached from an earlier run
    answer = request_json(f"{comfyui['url']}/prompt", {"prompt": prompt, "client_id": "kontext-tests"})
    prompt_id = answer["prompt_id"]
    deadline = time.time() + RUN_SECONDS
    while not request_json(f"{comfyui['url']}/queue")["queue_running"]:
        assert time.time() < deadline, "the prompt never started"
        time.sleep(0.2)
    time.sleep(2.0)  # well inside the sampling loop
    started = time.time()
    interrupt = urllib.request.Request(f"{comfyui['url']}/interrupt", data=b"{}", method="POST",
                                       headers={"Content-Type": "application/json"})
    urllib.request.urlopen(interrupt, timeout=30).close()  # answers with an empty body
    while True:
        history = request_json(f"{comfyui['url']}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            break
        assert time.time() - started < 30, "sampling did not stop after the interrupt"
        time.sleep(0.2)
    status = history[prompt_id]["status"]
    assert status["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in status["messages"]), status["messages"]
