"""Writes the example workflows: each as the frontend's UI format (this folder, listed in ComfyUI's template
browser) and as the queue API's format (api/, for `POST /prompt`), from one description per graph.

    python example_workflows/build.py

Names: the template browser shows a UI file's name as the template's title, so a UI file is named after its
workflow's title (`Kontext - edit a photo with one instruction.json`; `ui_name` says which characters stay); its API
twin keeps the short id that `kontext-batch --workflow` takes (`api/kontext_edit_api.json`). Each UI file has a
same-name .jpg thumbnail beside it, from thumbnails.py.

The pack's own nodes are laid out from their declarations (nodes/*.py spec()); ComfyUI's core nodes
from the table below, which tests/comfyui/test_workflows.py checks against ComfyUI itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MODELS_NOTE = (
    "Model files (ComfyUI/models/...):\n"
    "- diffusion_models/flux1-kontext-dev.safetensors (black-forest-labs/FLUX.1-Kontext-dev), or an fp8 version "
    "such as flux1-dev-kontext_fp8_scaled.safetensors\n"
    "- vae/ae.safetensors (the FLUX VAE)\n"
    "- text_encoders/t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn_scaled.safetensors) and "
    "text_encoders/clip_l.safetensors\n"
    "Pick your files in the loaders after loading this workflow (press R to refresh the lists)."
)

# ComfyUI core nodes used here: sockets (name, type, optional), widgets (name, value) in the frontend's
# order, outputs (name, type), the frontend's title when it is not the id. Widgets named in `ui_only` exist only in
# the page (not in the API format).
CORE = {
    "LoadImage": dict(title="Load Image", widgets=[("image", "example.png"), ("upload", "image")], ui_only={"upload"},
                      outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": dict(title="Save Image", sockets=[("images", "IMAGE", False)],
                      widgets=[("filename_prefix", "kontext")]),
    "PreviewImage": dict(title="Preview Image", sockets=[("images", "IMAGE", False)]),
    "DualCLIPLoader": dict(widgets=[("clip_name1", "clip_l.safetensors"), ("clip_name2", "t5xxl_fp16.safetensors"),
                                    ("type", "flux"), ("device", "default")], outputs=[("CLIP", "CLIP")]),
    "CLIPTextEncodeFlux": dict(sockets=[("clip", "CLIP", False)],
                               widgets=[("clip_l", ""), ("t5xxl", ""), ("guidance", 3.5)],
                               outputs=[("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": dict(sockets=[("conditioning", "CONDITIONING", False)], widgets=[("guidance", 2.5)],
                         outputs=[("CONDITIONING", "CONDITIONING")]),
    "ReferenceLatent": dict(sockets=[("conditioning", "CONDITIONING", False), ("latent", "LATENT", True)],
                            outputs=[("CONDITIONING", "CONDITIONING")]),
    "FluxKontextImageScale": dict(sockets=[("image", "IMAGE", False)], outputs=[("IMAGE", "IMAGE")]),
    "VAELoader": dict(title="Load VAE", widgets=[("vae_name", "ae.safetensors")], outputs=[("VAE", "VAE")]),
    "VAEEncode": dict(title="VAE Encode", sockets=[("pixels", "IMAGE", False), ("vae", "VAE", False)],
                      outputs=[("LATENT", "LATENT")]),
    "VAEDecode": dict(title="VAE Decode", sockets=[("samples", "LATENT", False), ("vae", "VAE", False)],
                      outputs=[("IMAGE", "IMAGE")]),
    "EmptySD3LatentImage": dict(widgets=[("width", 1024), ("height", 1024), ("batch_size", 1)],
                                outputs=[("LATENT", "LATENT")]),
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


PACK = "comfyui_kontext_pack"


def load_pack(name: str = PACK):
    """The node pack imported as ComfyUI imports it: the repository folder as a package under a name of its own
    (a plain `import nodes` would be ambiguous: ComfyUI has a top-level module of that name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _pack_nodes():
    load_pack()
    return {node.spec().node_id: node.spec() for node in importlib.import_module(f"{PACK}.nodes").NODES}


@dataclass
class NodeType:
    sockets: list[tuple[str, str, bool]]
    widgets: list[tuple[str, Any]]  # defaults, in widgets_values order
    outputs: list[tuple[str, str]]
    ui_only: set[str] = field(default_factory=set)
    seeds: set[str] = field(default_factory=set)  # widgets followed by control_after_generate
    display_name: str = ""


def node_types() -> dict[str, NodeType]:
    types = {name: NodeType(d.get("sockets", []), d.get("widgets", []), d.get("outputs", []), d.get("ui_only", set()),
                            display_name=d.get("title", name)) for name, d in CORE.items()}
    for node_id, spec in _pack_nodes().items():
        sockets = [(i.name, ",".join(i.accepted_types), i.optional) for i in spec.inputs if not i.is_widget]
        widgets = [(i.name, i.default) for i in spec.widget_order()]
        seeds = {i.name for i in spec.inputs if i.control_after_generate}
        types[node_id] = NodeType(sockets, widgets, [(o.name, o.type) for o in spec.outputs], set(), seeds,
                                  spec.display_name)
    return types


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    values: dict[str, Any]
    title: str | None = None
    size: tuple[int, int] | None = None


class Graph:
    def __init__(self, types: dict[str, NodeType]):
        self.types = types
        self.nodes: list[Node] = []
        self.links: list[tuple[int, Node, str, Node, str]] = []  # (id, source, output, target, input)

    def add(self, type: str, pos: tuple[int, int], title: str | None = None, size=None, **values) -> Node:
        if type not in FRONTEND_ONLY:
            known = {w for w, _ in self.types[type].widgets}
            unknown = set(values) - known
            assert not unknown, f"{type} has no widget {unknown}"
        node = Node(len(self.nodes) + 1, type, pos, values, title, size)
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[int, int], text: str, size=(460, 220)) -> Node:
        return self.add("Note", pos, size=size, text=text)

    def link(self, source: Node, output: str, target: Node, input: str) -> None:
        outputs = [name for name, _ in self.types[source.type].outputs]
        sockets = [name for name, _, _ in self.types[target.type].sockets]
        assert output in outputs and input in sockets, (source.type, output, target.type, input)
        self.links.append((len(self.links) + 1, source, output, target, input))

    # --- the two formats ---

    def _widget_values(self, node: Node) -> list:
        if node.type in FRONTEND_ONLY:
            return [node.values["text"]]
        values = []
        kind = self.types[node.type]
        for name, default in kind.widgets:
            values.append(node.values.get(name, default))
            if name in kind.seeds:
                values.append(node.values.get("control_after_generate", "randomize"))
        return values

    def _order(self) -> dict[int, int]:
        """Execution order for the page: a topological order of the links."""
        incoming = {n.id: {s.id for _, s, _, t, _ in self.links if t is n} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and incoming[n.id] <= done]
            for node_id in ready:
                order[node_id] = len(order)
            done.update(ready)
        return order

    def ui(self) -> dict:
        order = self._order()
        nodes = []
        for node in self.nodes:
            entry: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(node.pos)}
            inputs, outputs = [], []
            if node.type not in FRONTEND_ONLY:
                kind = self.types[node.type]
                for name, type_, optional in kind.sockets:
                    link = next((lid for lid, _, _, t, i in self.links if t is node and i == name), None)
                    inputs.append({"name": name, "type": type_, "link": link, **({"shape": 7} if optional else {})})
                for slot, (name, type_) in enumerate(kind.outputs):
                    links = [lid for lid, s, o, _, _ in self.links if s is node and o == name]
                    outputs.append({"name": name, "type": type_, "links": links or None, "slot_index": slot})
            rows = len(inputs) + len(outputs) + len(self._widget_values(node))
            entry.update(size=list(node.size or (340, 40 + 26 * rows)), flags={}, order=order[node.id], mode=0,
                         inputs=inputs, outputs=outputs,
                         properties={} if node.type in FRONTEND_ONLY else {"Node name for S&R": node.type},
                         widgets_values=self._widget_values(node))
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
        links = []
        for lid, source, output, target, input_name in self.links:
            out_slot = [n for n, _ in self.types[source.type].outputs].index(output)
            in_slot = [n for n, _, _ in self.types[target.type].sockets].index(input_name)
            links.append([lid, source.id, out_slot, target.id, in_slot, self.types[source.type].outputs[out_slot][1]])
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                continue
            kind = self.types[node.type]
            inputs: dict[str, Any] = {}
            for name, default in kind.widgets:
                if name not in kind.ui_only:
                    inputs[name] = node.values.get(name, default)
            for lid, source, output, target, input_name in self.links:
                if target is node:
                    inputs[input_name] = [str(source.id), [n for n, _ in self.types[source.type].outputs].index(output)]
            prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs,
                                    "_meta": {"title": node.title or kind.display_name}}
        return prompt


# --- the workflows ---------------------------------------------------------------------------------

# The loaders stack in the first column (as tall as the frontend draws them); images start below them.
PHOTO_Y = 600


def _loaders(g: Graph, text: bool = True):
    model = g.add("KontextModelLoader", (0, 0), model_name="flux1-kontext-dev.safetensors")
    vae = g.add("KontextVAELoader", (0, 250), vae_name="ae.safetensors")
    encoders = g.add("KontextTextEncodersLoader", (0, 400), t5_name="t5xxl_fp16.safetensors",
                     clip_name="clip_l.safetensors") if text else None
    return model, vae, encoders


def _photo_edit(g: Graph, model: Node, model_output: str, encoders: Node, vae: Node, prompt_text: str, seed: int,
                prefix: str, masked: bool = False, **edit_values) -> None:
    """Photo + prompt -> Kontext Edit (on `model`'s `model_output`) -> Save Image; `masked`: the photo's mask
    (painted in the Mask Editor) limits the edit."""
    photo = g.add("LoadImage", (0, PHOTO_Y), **({"image": "example_masked.png"} if masked else {}))
    prompt = g.add("KontextPrompt", (400, 0), prompt=prompt_text)
    edit = g.add("KontextEdit", (800, 0), size=(360, 520) if masked else None, seed=seed, **edit_values)
    save = g.add("SaveImage", (1200, 0), size=(500, 540), filename_prefix=prefix)
    g.link(encoders, "text_encoders", prompt, "text_encoders")
    g.link(model, model_output, edit, "model")
    g.link(vae, "vae", edit, "vae")
    g.link(prompt, "conditioning", edit, "conditioning")
    g.link(photo, "IMAGE", edit, "image")
    if masked:
        g.link(photo, "MASK", edit, "mask")
    g.link(edit, "image", save, "images")


def single_edit(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nOne edit: load a photo, say what to change. Kontext Edit resizes it to the Kontext "
           "size nearest its aspect ratio.\n\n" + MODELS_NOTE)
    model, vae, encoders = _loaders(g)
    _photo_edit(g, model, "model", encoders, vae, "make it a snowy winter night, keep everything else the same", 42,
                "kontext_edit")


def lora_edit(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nAn edit with a LoRA: Kontext LoRA sits between the model loader and Kontext Edit; "
           "chain more of them to stack LoRAs. On bf16 weights the LoRA is merged the first time a run uses it (a "
           "few seconds) and kept until a run asks for other LoRAs or strengths, so steps run at full speed; on fp8 "
           "weights it is added on the fly (~7% a step), since fp8 would round its small changes away.\n\n"
           + MODELS_NOTE + "\n- loras/: your FLUX.1 Kontext LoRA (BFL/ComfyUI, diffusers or kohya format)")
    model, vae, encoders = _loaders(g)
    lora = g.add("KontextLoRA", (400, 300), lora_name="kontext_lora.safetensors", strength=1.0)
    g.link(model, "model", lora, "model")
    _photo_edit(g, lora, "model", encoders, vae, "restyle the photo in the LoRA's style, keep the composition", 5,
                "kontext_lora")


def edit_chain(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nThree edits in a row. Each Kontext Edit Turn edits the turn before it directly in "
           "latent space (no VAE round trip between turns). To branch, put a Kontext Pick Turn between two turns.\n\n"
           + MODELS_NOTE)
    model, vae, encoders = _loaders(g)
    photo = g.add("LoadImage", (0, PHOTO_Y))
    start = g.add("KontextStartSession", (400, 0))
    g.link(model, "model", start, "model")
    g.link(vae, "vae", start, "vae")
    g.link(photo, "IMAGE", start, "image")
    g.link(encoders, "text_encoders", start, "text_encoders")
    previous = start
    prompts = ["give the person a red knitted hat", "now put them on a sunny beach", "make it a watercolor painting"]
    for number, text in enumerate(prompts):
        turn = g.add("KontextEditTurn", (800 + 400 * number, 0), title=f"Turn {number + 1}", prompt=text,
                     seed=100 + number)
        g.link(previous, "session", turn, "session")
        preview = g.add("PreviewImage", (800 + 400 * number, 420), size=(360, 380))
        g.link(turn, "image", preview, "images")
        previous = turn
    save = g.add("SaveImage", (2000, 0), size=(420, 460), filename_prefix="kontext_turn3")
    g.link(previous, "image", save, "images")


def multi_reference(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nTwo references: a character and a style. The first image is the one edited (the "
           "output has its size); the second is placed beside it in the model's context. Kontext Image Prep shows "
           "the sizes chosen and crops instead of stretching.\n\n" + MODELS_NOTE)
    model, vae, encoders = _loaders(g)
    character = g.add("LoadImage", (0, PHOTO_Y), title="Character")
    style = g.add("LoadImage", (0, PHOTO_Y + 370), title="Style")
    prep = g.add("KontextImagePrep", (400, PHOTO_Y))
    prompt = g.add("KontextPrompt", (400, 0),
                   prompt="paint the person from the first image in the style of the second image")
    edit = g.add("KontextEdit", (800, 0), seed=7)
    save = g.add("SaveImage", (1200, 0), size=(500, 540), filename_prefix="kontext_reference")
    g.link(character, "IMAGE", prep, "image")
    g.link(style, "IMAGE", prep, "image_2")
    g.link(encoders, "text_encoders", prompt, "text_encoders")
    g.link(model, "model", edit, "model")
    g.link(vae, "vae", edit, "vae")
    g.link(prompt, "conditioning", edit, "conditioning")
    g.link(prep, "image", edit, "image")
    g.link(prep, "image_2", edit, "image_2")
    g.link(edit, "image", save, "images")


def text_to_image(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nText to image: no image to edit, so an Empty SD3 Latent Image sets the size.\n\n"
           + MODELS_NOTE)
    model, vae, encoders = _loaders(g)
    size = g.add("EmptySD3LatentImage", (0, PHOTO_Y))
    prompt = g.add("KontextPrompt", (400, 0), prompt="a red fox sitting in fresh snow at dawn, soft light")
    edit = g.add("KontextEdit", (800, 0), seed=1)
    save = g.add("SaveImage", (1200, 0), size=(500, 540), filename_prefix="kontext_t2i")
    g.link(encoders, "text_encoders", prompt, "text_encoders")
    g.link(model, "model", edit, "model")
    g.link(vae, "vae", edit, "vae")
    g.link(prompt, "conditioning", edit, "conditioning")
    g.link(size, "LATENT", edit, "target")
    g.link(edit, "image", save, "images")


def edit_loop(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nA list of prompts, one per line: each edits the result of the line before. Every "
           "turn is saved (turn 0 is the starting image). After a run, click a thumbnail on Kontext Pick Turn to "
           "continue from that turn.\n\n" + MODELS_NOTE)
    model, vae, encoders = _loaders(g)
    photo = g.add("LoadImage", (0, PHOTO_Y))
    start = g.add("KontextStartSession", (400, 0))
    loop = g.add("KontextEditLoop", (800, 0), size=(400, 420), seed=10,
                 prompts="make it autumn\nadd falling leaves\nmake it dusk with warm street lights\n"
                         "turn it into an oil painting")
    save = g.add("SaveImage", (1250, 0), size=(500, 540), filename_prefix="kontext_loop")
    pick = g.add("KontextPickTurn", (800, 480), turn=2)
    preview = g.add("PreviewImage", (1250, 600), size=(400, 400))
    g.link(model, "model", start, "model")
    g.link(vae, "vae", start, "vae")
    g.link(photo, "IMAGE", start, "image")
    g.link(encoders, "text_encoders", start, "text_encoders")
    g.link(start, "session", loop, "session")
    g.link(loop, "images", save, "images")
    g.link(loop, "session", pick, "session")
    g.link(pick, "image", preview, "images")


def native_text_encoders(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nComfyUI's own nodes around the Kontext sampler: DualCLIPLoader + CLIP Text Encode "
           "(Flux) + FluxGuidance for the prompt, Load VAE + VAE Encode + ReferenceLatent for the image (the reference "
           "rides on the conditioning, as in ComfyUI's Kontext workflows), VAE Decode and Save Image for the output. "
           "The guidance set by FluxGuidance is the one used.\n\n" + MODELS_NOTE)
    model = g.add("KontextModelLoader", (0, 0), model_name="flux1-kontext-dev.safetensors")
    clip = g.add("DualCLIPLoader", (0, 250))
    vae = g.add("VAELoader", (0, 460))
    photo = g.add("LoadImage", (0, PHOTO_Y))
    scale = g.add("FluxKontextImageScale", (400, PHOTO_Y))
    encode = g.add("VAEEncode", (400, PHOTO_Y + 120))
    text = g.add("CLIPTextEncodeFlux", (400, 0), clip_l="change the sky to a dramatic sunset",
                 t5xxl="change the sky to a dramatic sunset, keep the buildings and people unchanged")
    guidance = g.add("FluxGuidance", (800, 0), guidance=2.5)
    reference = g.add("ReferenceLatent", (800, 140))
    edit = g.add("KontextEdit", (1200, 0), seed=3)
    decode = g.add("VAEDecode", (1600, 0))
    save = g.add("SaveImage", (1900, 0), size=(500, 540), filename_prefix="kontext_native")
    g.link(clip, "CLIP", text, "clip")
    g.link(text, "CONDITIONING", guidance, "conditioning")
    g.link(guidance, "CONDITIONING", reference, "conditioning")
    g.link(photo, "IMAGE", scale, "image")
    g.link(scale, "IMAGE", encode, "pixels")
    g.link(vae, "VAE", encode, "vae")
    g.link(encode, "LATENT", reference, "latent")
    g.link(model, "model", edit, "model")
    g.link(vae, "VAE", edit, "vae")
    g.link(reference, "CONDITIONING", edit, "conditioning")
    g.link(edit, "latent", decode, "samples")
    g.link(vae, "VAE", decode, "vae")
    g.link(decode, "IMAGE", save, "images")


MASK_NOTE = ("Paint the region to change: right-click Load Image > Open in MaskEditor, paint over it, save. Its MASK "
             "output goes to Kontext Edit's mask (white = edit); any mask node works too, and a LATENT's noise mask "
             "(Set Latent Noise Mask) on target as well.")


def masked_edit(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nA masked edit: only the painted region changes; everywhere else the saved image is "
           "the loaded one, pixel for pixel, at its own size. grow widens the mask; feather fades the edit in over "
           "that many pixels inside the mask's border. The sampler keeps the rest of the image in its latent at "
           "every step, so the edit fits its surroundings.\n\n" + MASK_NOTE + "\n\n" + MODELS_NOTE, size=(460, 320))
    model, vae, encoders = _loaders(g)
    _photo_edit(g, model, "model", encoders, vae, "replace the painted area with a bouquet of red tulips", 11,
                "kontext_masked", masked=True, grow=4, feather=12)


def crop_and_stitch(g: Graph, note: str) -> None:
    g.note((-500, 0), note + "\n\nCrop and stitch: with crop_to_mask on, only the mask's box plus context_margin "
           "pixels around it is cut out, edited at the Kontext size nearest its shape (a small region gets a whole "
           "megapixel of detail), scaled back and pasted in through the feathered mask. Outside the mask the image "
           "is unchanged, pixel for pixel.\n\n" + MASK_NOTE + "\n\n" + MODELS_NOTE, size=(460, 320))
    model, vae, encoders = _loaders(g)
    _photo_edit(g, model, "model", encoders, vae, "add a small golden name tag with the word KONTEXT", 12,
                "kontext_crop_stitch", masked=True, grow=4, feather=8, crop_to_mask=True, context_margin=96)


def latent_round_trip(g: Graph, note: str) -> None:
    """Kontext Encode Image and Kontext Decode Latent around an edit: encode once, edit the latent, decode."""
    model, vae, encoders = _loaders(g)
    photo = g.add("LoadImage", (0, PHOTO_Y))
    encode = g.add("KontextEncode", (400, PHOTO_Y))
    prompt = g.add("KontextPrompt", (400, 0), prompt="make it a snowy winter night, keep everything else the same")
    edit = g.add("KontextEdit", (800, 0), seed=42)
    decode = g.add("KontextDecode", (1200, 0))
    preview = g.add("PreviewImage", (1200, 160), size=(400, 400))
    g.link(vae, "vae", encode, "vae")
    g.link(photo, "IMAGE", encode, "image")
    g.link(encoders, "text_encoders", prompt, "text_encoders")
    g.link(model, "model", edit, "model")
    g.link(vae, "vae", edit, "vae")
    g.link(prompt, "conditioning", edit, "conditioning")
    g.link(encode, "latent", edit, "context")
    g.link(vae, "vae", decode, "vae")
    g.link(edit, "latent", decode, "latent")
    g.link(decode, "image", preview, "images")


def cached_edit(g: Graph, note: str) -> None:
    """Kontext Step Cache feeding Kontext Edit: an edit that skips the blocks on steps that barely change."""
    model, vae, encoders = _loaders(g)
    photo = g.add("LoadImage", (0, PHOTO_Y))
    prompt = g.add("KontextPrompt", (400, 0), prompt="make it a snowy winter night, keep everything else the same")
    cache = g.add("KontextStepCache", (400, PHOTO_Y))
    edit = g.add("KontextEdit", (800, 0), seed=42)
    preview = g.add("PreviewImage", (1200, 0), size=(400, 400))
    g.link(encoders, "text_encoders", prompt, "text_encoders")
    g.link(model, "model", edit, "model")
    g.link(vae, "vae", edit, "vae")
    g.link(prompt, "conditioning", edit, "conditioning")
    g.link(photo, "IMAGE", edit, "image")
    g.link(cache, "cache", edit, "cache")
    g.link(edit, "image", preview, "images")


# id: (graph, title). The title heads the workflow's note and names its UI file.
WORKFLOWS = {
    "kontext_edit": (single_edit, "Kontext - edit a photo with one instruction"),
    "kontext_edit_lora": (lora_edit, "Kontext - edit with a LoRA"),
    "kontext_edit_chain": (edit_chain, "Kontext - three edits in a row (edit turns)"),
    "kontext_multi_reference": (multi_reference, "Kontext - two references, a character and a style"),
    "kontext_text_to_image": (text_to_image, "Kontext - text to image"),
    "kontext_edit_loop": (edit_loop, "Kontext - a list of edits, one per line"),
    "kontext_native_text_encoders": (native_text_encoders, "Kontext - with ComfyUI text encoders, VAE and Save Image"),
    "kontext_masked_edit": (masked_edit, "Kontext - a masked edit, the rest kept pixel for pixel"),
    "kontext_crop_stitch": (crop_and_stitch, "Kontext - crop and stitch, a small region at full detail"),
}

# Graphs that are no template, drawn for the help pages of nodes no example uses (thumbnails.py).
HELP_GRAPHS = {
    "kontext_latent_round_trip": (latent_round_trip, "Kontext - encode, edit the latent, decode"),
    "kontext_cached_edit": (cached_edit, "Kontext - an edit with step caching"),
}


def ui_name(workflow_id: str) -> str:
    """The UI file's name without .json: its title, kept to characters that are safe in a file name on every
    system and in the URL the template browser builds from it (/api/workflow_templates/<pack>/<name>.json and
    .jpg, not escaped): letters, digits, spaces and - , ( ); a colon becomes " -", anything else is dropped."""
    title = WORKFLOWS[workflow_id][1].replace(":", " -")
    return re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9 ,()-]", "", title)).strip()


def api_name(workflow_id: str) -> str:
    return f"{workflow_id}_api"


def build(graphs: dict | None = None) -> dict[str, tuple[dict, dict]]:
    """{id: (UI format, API format)} of WORKFLOWS (or of `graphs`, such as HELP_GRAPHS)."""
    types = node_types()
    built = {}
    for name, (make, title) in (WORKFLOWS if graphs is None else graphs).items():
        graph = Graph(types)
        make(graph, title)
        built[name] = (graph.ui(), graph.api())
    return built


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    written = set()
    for name, (ui, api) in build().items():
        ui_file, api_file = HERE / f"{ui_name(name)}.json", HERE / "api" / f"{api_name(name)}.json"
        ui_file.write_text(json.dumps(ui, indent=2) + "\n")
        api_file.write_text(json.dumps(api, indent=2) + "\n")
        written |= {ui_file, api_file}
        print(f"{ui_file.name}, api/{api_file.name}")
    # Every workflow file here is one of these: one left from an old name would be listed as a template.
    for stale in sorted({*HERE.glob("*.json"), *(HERE / "api").glob("*.json")} - written):
        stale.unlink()
        print(f"removed {stale.relative_to(HERE)} (not one of WORKFLOWS)")
    print("thumbnails: python example_workflows/thumbnails.py")


if __name__ == "__main__":
    main()
