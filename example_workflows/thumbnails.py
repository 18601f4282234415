"""Pictures of the example graphs, taken in ComfyUI's own frontend: each workflow's thumbnail for the template
browser (this folder, `<workflow file name>.jpg`, which ComfyUI serves as /api/workflow_templates/<pack>/<name>.jpg)
and, for each node's help page, the node among its neighbours in the first example that uses it (js/docs/img/).

    python example_workflows/thumbnails.py            # after build.py, whenever a graph changes

Needs what the live tests need: ComfyUI's source and its venv at ~/ComfyUI (or $COMFYUI_PATH), selenium, and
Chromium with chromedriver (Debian: apt-get install chromium chromium-driver). ComfyUI runs on the CPU on
127.0.0.1 with this pack, empty stand-ins for the model files the graphs name (nothing is run, the loaders
only list them) and a drawn picture for Load Image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HELP_IMAGES = REPO / "js" / "docs" / "img"

THUMBNAIL_SIZE = (512, 384)  # 4:3, as the template browser's cards show them
HELP_IMAGE_WIDTH = 640  # the help panel scales it down to its width
JPEG_QUALITY = 82
# Where a loader's file name input looks (ComfyUI's models/ folders).
MODEL_FOLDERS = {"model_name": "diffusion_models", "vae_name": "vae", "t5_name": "text_encoders",
                 "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                 "lora_name": "loras"}
# A fresh user's first page opens the template browser and warns about missing models; the minimap and the
# canvas info would sit on the pictures; zoomed out, nodes would be drawn without their text.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0}
# A large page: the graphs are drawn near their full size, then scaled down (sharper than drawn small).
PAGE_SIZE = (2400, 1800)
FRONTEND_ONLY = {"Note", "MarkdownNote"}

# Loads a graph, hides everything but the canvas (and the widgets drawn over it), and zooms so that the nodes
# `ids` (all but notes when null) fill the box [x, y, w, h] of the page; answers where they are, in page pixels.
_SHOW = """
const [workflow, ids, box, done] = arguments;
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  const app = window.app;
  if (!document.getElementById("kontext-thumbnail-style")) {
    await app.extensionManager.command.execute("Workspace.ToggleFocusMode");
    const style = document.createElement("style");
    style.id = "kontext-thumbnail-style";
    style.textContent = "body * { visibility: hidden !important; } "
      + "#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }";
    document.head.appendChild(style);
    await pause(500);
  }
  await app.loadGraphData(workflow);
  // Load Image grows by its preview once the picture has loaded.
  for (let i = 0; i < 50; i++) {
    const loaded = (n) => n.imgs?.length && n.imgs.every((m) => m.complete);
    const loading = app.graph._nodes.some((n) => n.type === "LoadImage" && !loaded(n));
    if (!loading) break;
    await pause(100);
  }
  await pause(300);
  const canvas = app.canvas;
  canvas.deselectAll?.();
  const chosen = app.graph._nodes.filter((n) => ids ? ids.includes(n.id) : !["Note", "MarkdownNote"].includes(n.type));
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const node of chosen) {
    // the title bar, and the pack's badge above it
    x0 = Math.min(x0, node.pos[0]); y0 = Math.min(y0, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 20);
    x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
  }
  const rect = canvas.canvas.getBoundingClientRect();
  const [bx, by] = [box[0] - rect.left, box[1] - rect.top];
  const [bw, bh] = [Math.min(box[2], rect.width), Math.min(box[3], rect.height)];
  const margin = 16;
  const scale = Math.min((bw - 2 * margin) / (x1 - x0), (bh - 2 * margin) / (y1 - y0), 1);
  const [gw, gh] = [(x1 - x0) * scale, (y1 - y0) * scale];
  const [left, top] = [bx + (bw - gw) / 2, by + (bh - gh) / 2];
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale - x0, top / scale - y0];
  canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 600)));
  done({scale, graph: [rect.left + left - margin, rect.top + top - margin, gw + 2 * margin, gh + 2 * margin],
        missing: (ids ?? []).filter((id) => !chosen.some((n) => n.id === id))});
})().catch((error) => done({error: String(error)}));
"""


def _tests_helpers():
    """tests/comfyui_server.py: the live tests' way to start ComfyUI and open its page."""
    sys.path[:0] = [str(REPO / "tests")]
    import comfyui_server
    from node_pack import nodes_module, workflow_builder

    return comfyui_server, workflow_builder(), [node.spec().node_id for node in nodes_module().NODES]


def drawn_photo(size=(768, 512)) -> Image.Image:
    """A house on a hill in the evening sun, drawn: Load Image's preview in the pictures."""
    width, height = size
    picture = Image.new("RGB", size)
    draw = ImageDraw.Draw(picture)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(70 + 150 * t), int(110 + 80 * t), int(190 - 40 * t)))
    draw.ellipse([width * 0.68, height * 0.12, width * 0.82, height * 0.33], fill=(255, 221, 150))
    draw.polygon([(0, height * 0.72), (width * 0.3, height * 0.42), (width * 0.58, height * 0.7), (width, height * 0.5),
                  (width, height), (0, height)], fill=(60, 110, 80))
    draw.rectangle([width * 0.18, height * 0.55, width * 0.42, height * 0.85], fill=(200, 80, 60))
    draw.polygon([(width * 0.15, height * 0.56), (width * 0.3, height * 0.4), (width * 0.45, height * 0.56)],
                 fill=(120, 50, 40))
    draw.rectangle([width * 0.27, height * 0.68, width * 0.33, height * 0.85], fill=(80, 50, 30))
    return picture


def prepare_base(base: Path, prompts: list[dict]) -> None:
    """custom_nodes/ with this pack, the model files and input images the API prompts name, the settings."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-kontext").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    for prompt in prompts:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if name in MODEL_FOLDERS and isinstance(value, str):
                    folder = base / "models" / MODEL_FOLDERS[name]
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / value).touch()
                if node["class_type"] == "LoadImage" and name == "image" and not (base / "input" / value).exists():
                    drawn_photo().save(base / "input" / value)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(SETTINGS))


def _jpeg(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return out.getvalue()


def shoot(driver, workflow: dict, ids: list[int] | None, box: tuple[int, int, int, int]) -> Image.Image:
    """The page's picture of `workflow` zoomed onto `ids` (every node but notes when None), cut to the graph."""
    shown = driver.execute_async_script(_SHOW, workflow, ids, list(box))
    if "error" in shown or shown["missing"]:
        raise RuntimeError(f"the frontend could not show the graph: {shown}")
    page = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    ratio = page.width / driver.execute_script("return window.innerWidth")  # device pixels per page pixel
    x, y, w, h = (round(v * ratio) for v in shown["graph"])
    return page.crop((max(x, 0), max(y, 0), min(x + w, page.width), min(y + h, page.height)))


def thumbnail(picture: Image.Image) -> Image.Image:
    """The graph centred on the canvas colour at THUMBNAIL_SIZE."""
    width, height = THUMBNAIL_SIZE
    scale = min(width / picture.width, height / picture.height)
    fitted = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                            Image.LANCZOS)
    card = Image.new("RGB", THUMBNAIL_SIZE, picture.getpixel((2, 2))[:3])
    card.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return card


def neighbourhood(workflow: dict, node_type: str) -> list[int] | None:
    """The first node of `node_type` and the nodes linked to it (notes aside), or None when there is none."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    node = next((n for n in workflow["nodes"] if n["type"] == node_type), None)
    if node is None:
        return None
    linked = {node["id"]}
    for _, source, _, target, _, _ in workflow["links"]:
        if node["id"] in (source, target):
            linked |= {source, target}
    return sorted(i for i in linked if nodes[i]["type"] not in FRONTEND_ONLY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI's source folder (default $COMFYUI_PATH or ~/ComfyUI)")
    parser.add_argument("--only", choices=("thumbnails", "help"), help="take only these pictures")
    args = parser.parse_args()
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    server, build, node_types = _tests_helpers()
    if not (server.COMFYUI / "main.py").exists() or not server.PYTHON.exists():
        sys.exit(f"needs ComfyUI's source and its .venv at {server.COMFYUI} (or --comfyui)")
    if server.chromium_paths() is None:
        sys.exit("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")

    workflows = {name: ui for name, (ui, _) in build.build().items()}
    help_graphs = {name: ui for name, (ui, _) in build.build(build.HELP_GRAPHS).items()}
    api = [prompt for _, prompt in build.build().values()] + [p for _, p in build.build(build.HELP_GRAPHS).values()]

    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        prepare_base(base, api)
        with server.running_comfyui(base) as url, server.comfyui_page(url, *PAGE_SIZE) as driver:
            time.sleep(2)  # the page's first settings and extensions
            view = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            if args.only != "help":
                # The largest 4:3 box of the page, centred.
                height = min(view[1], view[0] * 3 // 4)
                box = ((view[0] - height * 4 // 3) // 2, (view[1] - height) // 2, height * 4 // 3, height)
                written = set()
                for name, workflow in workflows.items():
                    target = HERE / f"{build.ui_name(name)}.jpg"
                    target.write_bytes(_jpeg(thumbnail(shoot(driver, workflow, None, box))))
                    written.add(target)
                    print(f"{target.name}: {target.stat().st_size // 1024} KB")
                for stale in set(HERE.glob("*.jpg")) - written:
                    stale.unlink()
                    print(f"removed {stale.name} (no workflow of that name)")
            if args.only != "thumbnails":
                HELP_IMAGES.mkdir(parents=True, exist_ok=True)
                box = (0, 0, view[0], view[1])
                for node_type in node_types:
                    graph = next(((w, ids) for w in [*workflows.values(), *help_graphs.values()]
                                  if (ids := neighbourhood(w, node_type))), None)
                    if graph is None:
                        print(f"{node_type}: in no example nor help graph (build.py's HELP_GRAPHS); no picture")
                        continue
                    picture = shoot(driver, graph[0], graph[1], box)
                    if picture.width > HELP_IMAGE_WIDTH:
                        picture = picture.resize((HELP_IMAGE_WIDTH, round(picture.height * HELP_IMAGE_WIDTH
                                                                          / picture.width)), Image.LANCZOS)
                    target = HELP_IMAGES / f"{node_type}.jpg"
                    target.write_bytes(_jpeg(picture))
                    print(f"js/docs/img/{target.name}: {target.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
