"""The example workflows: every node exists, every link joins matching types, widget values fit their nodes,
each UI workflow and its API twin are the same graph, and the files are what build.py writes.

Core node names are checked against ComfyUI's source when it is at ~/ComfyUI (or $COMFYUI_PATH), else
against CORE_NODES below; CORE_NODES' types are checked against a running ComfyUI in
test_comfyui_live.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from node_pack import COMFYUI, REPO, nodes_module, workflow_builder

WORKFLOWS = REPO / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# ComfyUI 0.8 core nodes the examples use: sockets {name: type}, widgets in the page's order, output types.
CORE_NODES = {
    "LoadImage": dict(sockets={}, widgets=["image", "upload"], outputs=["IMAGE", "MASK"]),
    "SaveImage": dict(sockets={"images": "IMAGE"}, widgets=["filename_prefix"], outputs=[]),
    "PreviewImage": dict(sockets={"images": "IMAGE"}, widgets=[], outputs=[]),
    "DualCLIPLoader": dict(sockets={}, widgets=["clip_name1", "clip_name2", "type", "device"], outputs=["CLIP"]),
    "CLIPTextEncodeFlux": dict(sockets={"clip": "CLIP"}, widgets=["clip_l", "t5xxl", "guidance"],
                               outputs=["CONDITIONING"]),
    "FluxGuidance": dict(sockets={"conditioning": "CONDITIONING"}, widgets=["guidance"], outputs=["CONDITIONING"]),
    "ReferenceLatent": dict(sockets={"conditioning": "CONDITIONING", "latent": "LATENT"}, widgets=[],
                            outputs=["CONDITIONING"]),
    "FluxKontextImageScale": dict(sockets={"image": "IMAGE"}, widgets=[], outputs=["IMAGE"]),
    "VAELoader": dict(sockets={}, widgets=["vae_name"], outputs=["VAE"]),
    "VAEEncode": dict(sockets={"pixels": "IMAGE", "vae": "VAE"}, widgets=[], outputs=["LATENT"]),
    "VAEDecode": dict(sockets={"samples": "LATENT", "vae": "VAE"}, widgets=[], outputs=["IMAGE"]),
    "EmptySD3LatentImage": dict(sockets={}, widgets=["width", "height", "batch_size"], outputs=["LATENT"]),
}
UI_ONLY_WIDGETS = {"LoadImage": {"upload"}}


def _pack_specs() -> dict:
    return {node.spec().node_id: node.spec() for node in nodes_module().NODES}


def _definition(node_type: str) -> dict:
    """{sockets: {name: accepted types}, widgets: [names incl. control_after_generate], outputs: [(name, type)]}."""
    specs = _pack_specs()
    if node_type in specs:
        spec = specs[node_type]
        widgets = []
        for item in spec.widget_order():
            widgets.append(item.name)
            if item.control_after_generate:
                widgets.append("control_after_generate")
        return {"sockets": {i.name: set(i.accepted_types) for i in spec.inputs if not i.is_widget},
                "required": {i.name for i in spec.inputs if not i.is_widget and not i.optional},
                "widgets": widgets, "outputs": [(o.name, o.type) for o in spec.outputs], "spec": spec}
    core = CORE_NODES[node_type]
    return {"sockets": {k: {v} for k, v in core["sockets"].items()},
            "required": set(core["sockets"]) - ({"latent"} if node_type == "ReferenceLatent" else set()),
            "widgets": core["widgets"], "outputs": [(None, t) for t in core["outputs"]], "spec": None}


def _comfyui_node_names() -> set[str] | None:
    """Node ids ComfyUI defines (V1 NODE_CLASS_MAPPINGS keys and V3 node_id=...), read from its source."""
    if not (COMFYUI / "nodes.py").exists():
        return None
    names = set()
    for path in [COMFYUI / "nodes.py", *(COMFYUI / "comfy_extras").glob("*.py")]:
        text = path.read_text(errors="replace")
        names.update(re.findall(r'node_id\s*=\s*"([A-Za-z0-9_]+)"', text))
        mappings = re.search(r"NODE_CLASS_MAPPINGS\s*=\s*\{(.*?)\n\}", text, re.S)
        if mappings:
            names.update(re.findall(r'^\s*"([A-Za-z0-9_]+)"\s*:', mappings[1], re.M))
    return names


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _api_twin(ui_path: Path) -> Path:
    build = workflow_builder()
    ids = {build.ui_name(i): i for i in build.WORKFLOWS}
    assert ui_path.stem in ids, f"{ui_path.name} is none of build.py's WORKFLOWS: run python {build.__file__}"
    return WORKFLOWS / "api" / f"{build.api_name(ids[ui_path.stem])}.json"


def test_the_examples_are_there_each_with_its_api_twin():
    build = workflow_builder()
    assert {"kontext_edit", "kontext_edit_lora", "kontext_edit_chain", "kontext_multi_reference",
            "kontext_text_to_image", "kontext_edit_loop", "kontext_native_text_encoders", "kontext_masked_edit",
            "kontext_crop_stitch"} <= set(build.WORKFLOWS)
    rerun = f"run python {build.__file__}"
    assert {p.stem for p in UI_FILES} == {build.ui_name(i) for i in build.WORKFLOWS}, rerun
    assert {p.stem for p in (WORKFLOWS / "api").glob("*.json")} == {build.api_name(i) for i in build.WORKFLOWS}, rerun


def test_each_ui_workflow_has_a_thumbnail():
    """The template browser shows <name>.jpg beside <name>.json (example_workflows/thumbnails.py takes them)."""
    from PIL import Image

    rerun = "run python example_workflows/thumbnails.py"
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == {p.stem for p in UI_FILES}, rerun
    for path in UI_FILES:
        thumbnail = path.with_suffix(".jpg")
        with Image.open(thumbnail) as picture:
            assert picture.format == "JPEG" and picture.width == 512, thumbnail.name
        assert thumbnail.stat().st_size < 100_000, thumbnail.name


def test_ui_file_names_are_titles_safe_in_urls():
    """The template browser titles a template with its file name and fetches it (and its .jpg) at a URL built
    from the name unescaped: descriptive names, nothing that a URL or a file system reads specially."""
    for path in UI_FILES:
        assert re.fullmatch(r"Kontext - [A-Za-z0-9 ,()-]+", path.stem), path.name


def test_core_node_table_names_exist_in_comfyui():
    names = _comfyui_node_names()
    if names is None:
        pytest.skip(f"ComfyUI's source is not at {COMFYUI} (set COMFYUI_PATH); checked against CORE_NODES only")
    assert set(CORE_NODES) <= names, set(CORE_NODES) - names
    assert not set(_pack_specs()) & names, "a pack node id clashes with a ComfyUI node"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_nodes_links_and_widgets(path):
    workflow = _load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    known = set(_pack_specs()) | set(CORE_NODES) | FRONTEND_ONLY
    comfy_names = _comfyui_node_names()
    for node in nodes.values():
        assert node["type"] in known, f"{path.name}: unknown node type {node['type']}"
        if comfy_names is not None and node["type"] in CORE_NODES:
            assert node["type"] in comfy_names

    # The nodes' sockets and widgets are the ones their definitions declare.
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY:
            continue
        definition = _definition(node["type"])
        declared = {i["name"]: i for i in node["inputs"] if "widget" not in i}
        assert set(declared) == set(definition["sockets"]), (path.name, node["type"])
        for name, entry in declared.items():
            assert set(entry["type"].split(",")) == definition["sockets"][name], (node["type"], name)
        assert [o["type"] for o in node["outputs"]] == [t for _, t in definition["outputs"]], node["type"]
        if definition["spec"] is not None:
            assert [o["name"] for o in node["outputs"]] == [n for n, _ in definition["outputs"]]
        assert len(node["widgets_values"]) == len(definition["widgets"]), (path.name, node["type"])
        for name in definition["required"]:
            assert declared[name]["link"] is not None, f"{path.name}: {node['type']}.{name} is not connected"
        spec = definition["spec"]
        if spec is not None:  # combo values with fixed choices are among them
            for name, value in zip(definition["widgets"], node["widgets_values"]):
                if name == "control_after_generate":
                    assert value in ("fixed", "increment", "decrement", "randomize")
                    continue
                item = spec.input(name)
                if item.type == "COMBO" and not callable(item.options):
                    assert value in item.choices(), (node["type"], name, value)
                if item.type in ("INT", "FLOAT"):
                    assert item.min <= value <= item.max, (node["type"], name, value)

    # Every link joins an output to an input of a type it accepts, and both ends list it.
    for link_id, source, out_slot, target, in_slot, link_type in workflow["links"]:
        output = nodes[source]["outputs"][out_slot]
        entry = nodes[target]["inputs"][in_slot]
        assert output["type"] == link_type, (path.name, link_id)
        assert link_type in entry["type"].split(","), (path.name, link_id, link_type, entry["type"])
        assert link_id in (output["links"] or []) and entry["link"] == link_id, (path.name, link_id)
    for node in nodes.values():
        for entry in node["inputs"]:
            if entry["link"] is not None:
                assert any(link[0] == entry["link"] for link in workflow["links"])


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_has_a_note_on_model_files(path):
    notes = [n for n in _load(path)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{path.name} has no Note"
    text = " ".join(n["widgets_values"][0] for n in notes)
    for folder in ("diffusion_models", "vae", "text_encoders"):
        assert folder in text, f"{path.name}: the note does not say what goes in {folder}"


def _ui_as_graph(workflow: dict) -> dict:
    """{node id: (type, {input: value or (source id, slot)})} with widget values named, UI-only ones dropped."""
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node_id, node in nodes.items():
        inputs = {}
        names = _definition(node["type"])["widgets"]
        for name, value in zip(names, node["widgets_values"]):
            if name != "control_after_generate" and name not in UI_ONLY_WIDGETS.get(node["type"], set()):
                inputs[name] = value
        for entry in node["inputs"]:
            if entry["link"] is not None:
                _, source, slot, _, _, _ = links[entry["link"]]
                inputs[entry["name"]] = (str(source), slot)
        graph[str(node_id)] = (node["type"], inputs)
    return graph


def _api_as_graph(prompt: dict) -> dict:
    return {node_id: (node["class_type"],
                      {k: tuple(v) if isinstance(v, list) else v for k, v in node["inputs"].items()})
            for node_id, node in prompt.items()}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_and_api_twin_are_the_same_graph(path):
    assert _ui_as_graph(_load(path)) == _api_as_graph(_load(_api_twin(path)))


def test_files_are_what_build_py_writes():
    build = workflow_builder()
    for name, (ui, api) in build.build().items():
        ui_file = WORKFLOWS / f"{build.ui_name(name)}.json"
        api_file = WORKFLOWS / "api" / f"{build.api_name(name)}.json"
        assert ui_file.exists() and _load(ui_file) == json.loads(json.dumps(ui)), f"run python {build.__file__}"
        assert _load(api_file) == json.loads(json.dumps(api)), f"run python {build.__file__}"
