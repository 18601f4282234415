// Runs js/kontext_turns.js against stand-ins for ComfyUI's app/api modules and a minimal DOM, then plays
// a run and a click: prints one JSON line with what the page would show and which turn got picked.
// Usage: node turn_strip_harness.mjs <folder holding scripts/ and extensions/kontext/kontext_turns.js>
import { pathToFileURL } from "node:url";
import path from "node:path";

const root = process.argv[2];

class Element {
  constructor(tag) { this.tag = tag; this.children = []; this.listeners = {}; this.className = ""; this.textContent = "";
    this.classList = { items: new Set(), add: (c) => this.classList.items.add(c) }; }
  appendChild(child) { this.children.push(child); return child; }
  replaceChildren(...children) { this.children = children; }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  click() { this.listeners.click?.(); }
}
globalThis.document = {
  head: new Element("head"),
  createElement: (tag) => new Element(tag),
  getElementById: () => null,
};

const { app } = await import(pathToFileURL(path.join(root, "scripts", "app.js")));
await import(pathToFileURL(path.join(root, "extensions", "kontext", "kontext_turns.js")));
const extension = app.extensions[0];

function makeNode(comfyClass, widgets = []) {
  class NodeType {}
  extension.beforeRegisterNodeDef(NodeType, { name: comfyClass });
  const node = new NodeType();
  Object.assign(node, {
    comfyClass, widgets, size: [200, 100], outputs: [{ name: "session", links: [] }],
    addDOMWidget(name, type, element) { const w = { name, type, element }; this.widgets.push(w); return w; },
    setSize(size) { this.size = size; }, computeSize() { return [200, 180]; },
  });
  return node;
}

const turn = makeNode("KontextEditTurn", [{ name: "prompt", value: "" }]);
const picked = [];
const pick = makeNode("KontextPickTurn", [{ name: "turn", value: 0, callback: (v) => picked.push(v) }]);
const graph = { links: { 7: { target_id: 2 } }, getNodeById: (id) => (id === 2 ? pick : null), setDirtyCanvas() {} };
turn.graph = graph; pick.graph = graph; turn.outputs[0].links = [7];

const message = {
  kontext_turns: [{ turn: 0, parent: null, prompt: "", current: false }, { turn: 1, parent: 0, prompt: "a hat", current: false },
                  { turn: 2, parent: 1, prompt: "a beach", current: true }],
  kontext_images: [0, 1, 2].map((i) => ({ filename: `t${i}.png`, subfolder: "", type: "temp" })),
};
turn.onExecuted(message);
const strip = turn.widgets.find((w) => w.name === "kontext_turn_strip");
const figures = strip.element.children;
figures[1].click();
const fromTurnNode = pick.widgets[0].value;
pick.onExecuted(message);
pick.widgets.find((w) => w.name === "kontext_turn_strip").element.children[2].click();

const prep = makeNode("KontextImagePrep");
prep.onExecuted({ text: ["image: 40x24 -> 1328x800"] });

console.log(JSON.stringify({
  thumbnails: figures.map((f) => f.children[0]?.src),
  captions: figures.map((f) => f.children[1]?.textContent),
  current: figures.map((f) => f.classList.items.has("current")),
  fromTurnNode, fromPickNode: pick.widgets[0].value, callbacks: picked,
  sizes: prep.widgets.find((w) => w.name === "kontext_sizes")?.element.textContent,
}));
