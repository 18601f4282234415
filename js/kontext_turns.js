// Kontext session nodes: after a run, a strip of every turn's thumbnail on the node. Clicking a thumbnail
// picks that turn: on Kontext Pick Turn it sets the node's `turn` widget; on the other session nodes it
// sets the `turn` of every Kontext Pick Turn their session output feeds. Kontext Image Prep shows the
// sizes it chose.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SESSION_NODES = new Set(["KontextStartSession", "KontextEditTurn", "KontextPickTurn", "KontextEditLoop"]);
const STRIP = "kontext_turn_strip";
const SIZES = "kontext_sizes";

const STYLE = `
.kontext-strip { display: flex; gap: 4px; overflow-x: auto; padding: 4px; box-sizing: border-box; height: 100%; }
.kontext-strip figure { margin: 0; flex: 0 0 auto; cursor: pointer; text-align: center; font: 11px sans-serif;
  color: var(--input-text, #ddd); border: 2px solid transparent; border-radius: 4px; }
.kontext-strip figure.current { border-color: var(--p-primary-color, #4a90e2); }
.kontext-strip img { height: 72px; display: block; border-radius: 2px; }
.kontext-sizes { font: 11px monospace; white-space: pre; padding: 4px; color: var(--input-text, #ddd); }
`;

function addStyle() {
  if (document.getElementById("kontext-style")) return;
  const style = document.createElement("style");
  style.id = "kontext-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function imageUrl(image) {
  const params = new URLSearchParams({
    filename: image.filename,
    subfolder: image.subfolder ?? "",
    type: image.type ?? "temp",
  });
  return api.apiURL(`/view?${params}`);
}

// The Kontext Pick Turn nodes a click on this node's strip should set.
function pickTurnNodes(node) {
  if (node.comfyClass === "KontextPickTurn") return [node];
  const graph = node.graph ?? app.graph;
  const links = node.outputs?.find((o) => o.name === "session")?.links ?? [];
  return links
    .map((id) => graph.links?.[id] ?? graph.links?.get?.(id))
    .filter(Boolean)
    .map((link) => graph.getNodeById(link.target_id))
    .filter((target) => target?.comfyClass === "KontextPickTurn");
}

function pickTurn(node, turn) {
  for (const target of pickTurnNodes(node)) {
    const widget = target.widgets?.find((w) => w.name === "turn");
    if (!widget) continue;
    widget.value = turn;
    widget.callback?.(turn, app.canvas, target);
  }
  (node.graph ?? app.graph).setDirtyCanvas(true, true);
}

function domWidget(node, name, className, height) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const element = document.createElement("div");
    element.className = className;
    widget = node.addDOMWidget(name, name, element, { serialize: false, getMinHeight: () => height });
  }
  return widget;
}

function showTurns(node, message) {
  const turns = message?.kontext_turns ?? [];
  const images = message?.kontext_images ?? [];
  if (!turns.length) return;
  addStyle();
  const widget = domWidget(node, STRIP, "kontext-strip", 100);
  const figures = turns.map((turn, index) => {
    const figure = document.createElement("figure");
    if (turn.current) figure.classList.add("current");
    figure.title = turn.turn === 0 ? "turn 0: the starting image" : `turn ${turn.turn} (from ${turn.parent}): ${turn.prompt}`;
    if (images[index]) {
      const img = document.createElement("img");
      img.src = imageUrl(images[index]);
      img.alt = `turn ${turn.turn}`;
      figure.appendChild(img);
    }
    const caption = document.createElement("figcaption");
    caption.textContent = String(turn.turn);
    figure.appendChild(caption);
    figure.addEventListener("click", () => pickTurn(node, turn.turn));
    return figure;
  });
  widget.element.replaceChildren(...figures);
  node.setSize([Math.max(node.size[0], 320), Math.max(node.size[1], node.computeSize()[1])]);
  (node.graph ?? app.graph).setDirtyCanvas(true, true);
}

function showSizes(node, message) {
  const text = message?.text?.[0];
  if (!text) return;
  addStyle();
  const widget = domWidget(node, SIZES, "kontext-sizes", 60);
  widget.element.textContent = text;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
}

app.registerExtension({
  name: "comfyui-kontext.turns",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const show = SESSION_NODES.has(nodeData.name) ? showTurns : nodeData.name === "KontextImagePrep" ? showSizes : null;
    if (!show) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      show(this, message);
    };
  },
});
