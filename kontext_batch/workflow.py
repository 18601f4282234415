"""API-format workflows: loading one, naming the inputs a batch fills, checking them, filling them per job.

A field (image, prompt, seed, steps, guidance) is filled at one or more targets, each a node input of the
workflow. Targets are named by node title or id (`"Kontext Edit".seed`, `7.seed`, or just `7` when the
field's usual input name applies), or found automatically from the node types the pack's workflows and
ComfyUI's own FLUX workflows use. Everything is checked against the server's /object_info before a job
is queued: node types present, inputs existing and not wired to another node, values of the right type.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import BatchError

PACK_WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows" / "api"
PACK_NAME = "comfyui-kontext"
FIELDS = ("image", "prompt", "seed", "steps", "guidance")

# Where each field goes when not named: the first node type present wins. Prompt and image must then be
# unique; seed, steps and guidance go to every node of that type (a chain's turns all get the steps).
AUTO_TARGETS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "image": [("LoadImage", ("image",))],
    "prompt": [("KontextPrompt", ("prompt",)), ("KontextEditTurn", ("prompt",)),
               ("CLIPTextEncodeFlux", ("clip_l", "t5xxl")), ("CLIPTextEncode", ("text",))],
    "seed": [("KontextEdit", ("seed",)), ("KontextEditTurn", ("seed",)), ("KontextEditLoop", ("seed",)),
             ("KSampler", ("seed",)), ("RandomNoise", ("noise_seed",)), ("KSamplerAdvanced", ("noise_seed",))],
    "steps": [("KontextEdit", ("steps",)), ("KontextEditTurn", ("steps",)), ("KontextEditLoop", ("steps",)),
              ("KSampler", ("steps",)), ("BasicScheduler", ("steps",))],
    "guidance": [("KontextEdit", ("guidance",)), ("KontextEditTurn", ("guidance",)),
                 ("KontextEditLoop", ("guidance",)), ("FluxGuidance", ("guidance",))],
}
UNIQUE_FIELDS = ("image", "prompt")
IMAGE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image")}


@dataclass(frozen=True)
class Target:
    node_id: str
    input: str


class Workflow:
    """An API-format prompt graph: {node id: {"class_type", "inputs", "_meta": {"title"}}}."""

    def __init__(self, graph: dict, source: str):
        self.graph = graph
        self.source = source

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.graph, sort_keys=True).encode()).hexdigest()[:16]

    def title(self, node_id: str) -> str:
        return self.graph[node_id].get("_meta", {}).get("title") or self.graph[node_id]["class_type"]

    def describe(self, target: Target) -> str:
        return f"{self.title(target.node_id)} (node {target.node_id}).{target.input}"

    def class_type(self, node_id: str) -> str:
        return self.graph[node_id]["class_type"]

    def find_node(self, ref: str) -> str | None:
        """A node id from an id or a title; None when nothing matches; an error when a title is ambiguous."""
        ref = ref.strip().strip('"')
        if ref in self.graph:
            return ref
        matches = [i for i in self.graph if self.title(i) == ref] or \
                  [i for i in self.graph if self.title(i).casefold() == ref.casefold()]
        if len(matches) > 1:
            raise BatchError(f"{len(matches)} nodes of {self.source} are titled '{ref}' (ids "
                             f"{', '.join(matches)}); name one by its id")
        return matches[0] if matches else None

    def parse_target(self, spec: str, field: str | None = None) -> Target:
        """NODE.INPUT, or NODE alone for a field whose usual input name the node has."""
        node_id = self.find_node(spec)
        if node_id is not None:
            if field is None:
                raise BatchError(f"'{spec}' names a node; name the input too, as {spec}.INPUT")
            return Target(node_id, self._default_input(node_id, field, spec))
        node_ref, dot, input_name = spec.rpartition(".")
        node_id = self.find_node(node_ref) if dot else None
        if node_id is None:
            raise BatchError(f"no node '{node_ref if dot else spec}' in {self.source}; its nodes are: "
                             f"{self.node_list()}")
        if input_name not in self.graph[node_id]["inputs"]:
            raise BatchError(f"node {self.title(node_id)} (id {node_id}, {self.class_type(node_id)}) has no input "
                             f"'{input_name}'; its inputs are: {', '.join(self.graph[node_id]['inputs'])}")
        return Target(node_id, input_name)

    def _default_input(self, node_id: str, field: str, spec: str) -> str:
        inputs = self.graph[node_id]["inputs"]
        candidates = {name for _, names in AUTO_TARGETS[field] for name in names}
        found = [name for name in inputs if name in candidates]
        if len(found) != 1:
            raise BatchError(f"which input of {self.title(node_id)} (id {node_id}) takes the {field}? write it as "
                             f"{spec}.INPUT (its inputs: {', '.join(inputs)})")
        return found[0]

    def node_list(self) -> str:
        return "; ".join(f"{i} {self.title(i)} ({self.class_type(i)})" for i in self.graph)

    def auto_targets(self, field: str) -> list[Target]:
        for class_type, input_names in AUTO_TARGETS[field]:
            nodes = [i for i in self.graph if self.class_type(i) == class_type]
            if not nodes:
                continue
            if field in UNIQUE_FIELDS and len(nodes) > 1:
                flag = f"--{field}-field"
                raise BatchError(f"{self.source} has {len(nodes)} {class_type} nodes ("
                                 f"{', '.join(f'{self.title(i)} = id {i}' for i in nodes)}); name the one that "
                                 f"takes the {field} with {flag} TITLE-OR-ID")
            return [Target(i, name) for i in nodes for name in input_names]
        return []

    def is_image_input(self, target: Target) -> bool:
        return (self.class_type(target.node_id), target.input) in IMAGE_INPUTS

    def output_nodes(self, object_info: Mapping) -> list[str]:
        return [i for i in self.graph if object_info.get(self.class_type(i), {}).get("output_node")]

    def filled(self, values: Mapping[Target, Any]) -> dict:
        graph = copy.deepcopy(self.graph)
        for target, value in values.items():
            graph[target.node_id]["inputs"][target.input] = value
        return graph


def load_workflow(name_or_path: str) -> Workflow:
    """A workflow file in ComfyUI's API format, or the name of one of the pack's (kontext_edit, ...)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        for candidate in (PACK_WORKFLOWS / f"{name_or_path}_api.json", PACK_WORKFLOWS / f"{name_or_path}.json"):
            if candidate.exists():
                path = candidate
                break
        else:
            known = sorted(p.name[:-len("_api.json")] for p in PACK_WORKFLOWS.glob("*_api.json"))
            raise BatchError(f"no workflow file {name_or_path}; give an API-format JSON file or one of the pack's: "
                             f"{', '.join(known) or '(the example_workflows/api folder is missing)'}")
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise BatchError(f"cannot read the workflow {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise BatchError(f"the workflow {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise BatchError(f"{path} is a UI-format workflow (what the editor saves); the queue API takes the API format: "
                         "in ComfyUI use Workflow > Export (API), or use the pack's API twins in example_workflows/api")
    if isinstance(graph, dict) and isinstance(graph.get("prompt"), dict):
        graph = graph["prompt"]  # a saved /prompt request body
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in graph.values()):
        raise BatchError(f"{path} is not an API-format workflow: expected {{node id: {{\"class_type\": ..., "
                         "\"inputs\": {...}}}}}; export it from ComfyUI with Workflow > Export (API)")
    return Workflow({str(k): v for k, v in graph.items()}, source=path.name)


class FieldMap:
    """The targets of each field, resolved and checked against the server's node definitions."""

    def __init__(self, workflow: Workflow, object_info: Mapping, named: Mapping[str, list[str]],
                 needed: set[str], output_specs: list[str] = ()):
        self.workflow = workflow
        self.object_info = object_info
        self._resolution = (named, needed, list(output_specs))
        check_node_types(workflow, object_info)
        self.targets: dict[str, list[Target]] = {}
        for field in FIELDS:
            specs = named.get(field) or []
            targets = [workflow.parse_target(s, field) for s in specs] or \
                      (workflow.auto_targets(field) if field in needed else [])
            if field in needed and not targets:
                looked = ", ".join(f"{c}.{'/'.join(n)}" for c, n in AUTO_TARGETS[field])
                raise BatchError(f"{workflow.source} has no node to take the {field} (looked for {looked}); "
                                 f"name one with --{field}-field NODE.INPUT")
            for target in targets:
                self._check_fillable(target)
            self.targets[field] = targets
        image_targets = self.targets.get("image", [])
        if len(image_targets) > 1:
            raise BatchError("the image goes to one LoadImage input; several --image-field were given")
        if image_targets and not workflow.is_image_input(image_targets[0]):
            raise BatchError(f"{workflow.describe(image_targets[0])} is not a LoadImage image input; "
                             "the image field must name a Load Image node")
        self.output_nodes = [self._output_node(s) for s in output_specs] or workflow.output_nodes(object_info)
        if not self.output_nodes:
            raise BatchError(f"{workflow.source} has no output node (Save Image, Preview Image): nothing would "
                             "come back; add a Save Image node")

    def check_server(self, object_info: Mapping) -> None:
        """Raises BatchError when another server, with these node definitions, could not take the same fields
        (a batch over several servers fills every server's workflow as resolved against the first)."""
        FieldMap(self.workflow, object_info, *self._resolution)

    def _output_node(self, spec: str) -> str:
        node_id = self.workflow.find_node(spec)
        if node_id is None:
            raise BatchError(f"--output-node takes a node title or id of {self.workflow.source}; its nodes are: "
                             f"{self.workflow.node_list()}")
        return node_id

    def override_target(self, spec: str, where: str) -> Target:
        """The input a NODE.INPUT column (or --set) names, checked to take a value; errors name the row."""
        try:
            target = self.workflow.parse_target(spec)
            self._check_fillable(target)
        except BatchError as error:
            raise BatchError(f"{where}: {spec}: {error}") from None
        return target

    def _check_fillable(self, target: Target) -> None:
        value = self.workflow.graph[target.node_id]["inputs"].get(target.input)
        if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            raise BatchError(f"{self.workflow.describe(target)} is wired to node {value[0]}; a batch can only fill "
                             "inputs that hold a value (a widget)")
        self.input_spec(target)

    def input_spec(self, target: Target) -> list:
        info = self.object_info[self.workflow.class_type(target.node_id)]
        for group in ("required", "optional"):
            spec = info.get("input", {}).get(group, {}).get(target.input)
            if spec is not None:
                return spec
        raise BatchError(f"{self.workflow.describe(target)}: the server's {self.workflow.class_type(target.node_id)} "
                         "has no such input (the node pack on the server may be a different version)")

    def coerce(self, target: Target, value: Any, where: str) -> Any:
        """A value of the type the server declares for the input, or an error naming the row."""
        spec = self.input_spec(target)
        kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        choices = kind if isinstance(kind, list) else (options.get("options") if kind == "COMBO" else None)
        if self.workflow.is_image_input(target):
            choices = None  # an uploaded image is not among the files the server listed
        parsed, expected = _parse(value, "COMBO" if choices is not None else kind, choices)
        if expected is None and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            low, high = options.get("min"), options.get("max")
            if (low is not None and parsed < low) or (high is not None and parsed > high):
                expected = f"between {low} and {high}"
        if expected is not None:
            raise BatchError(f"{where}: {self.workflow.describe(target)} must be {expected}, found {value!r}")
        return parsed


def _parse(value: Any, kind: str, choices: list | None) -> tuple[Any, str | None]:
    """(value as `kind`, None), or (None, what was expected)."""
    if kind == "COMBO":
        if value in choices:
            return value, None
        return None, f"one of {', '.join(map(str, choices[:12]))}{' ...' if len(choices) > 12 else ''}"
    if kind == "INT" and not isinstance(value, bool):
        try:  # exactly, first: seeds go up to 2**64 - 1, beyond float's 53 bits
            return int(str(value).strip()), None
        except ValueError:
            pass
    if kind in ("INT", "FLOAT"):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if kind == "INT":  # "5.0" from a spreadsheet
            return (int(number), None) if number is not None and number.is_integer() else (None, "a whole number")
        return (number, None) if number is not None else (None, "a number")
    if kind == "BOOLEAN":
        word = str(value).strip().lower()
        if isinstance(value, bool) or word in ("true", "1", "yes", "false", "0", "no"):
            return (value if isinstance(value, bool) else word in ("true", "1", "yes")), None
        return None, "true or false"
    return (value if isinstance(value, str) else json.dumps(value)), None


def check_node_types(workflow: Workflow, object_info: Mapping) -> None:
    missing = sorted({n["class_type"] for n in workflow.graph.values()} - set(object_info))
    if not missing:
        return
    ours = [m for m in missing if m.startswith("Kontext")]
    others = [m for m in missing if m not in ours]
    advice = []
    if ours:
        advice.append(f"{', '.join(ours)} come from {PACK_NAME}: clone it into ComfyUI/custom_nodes, install its "
                      "requirements.txt with ComfyUI's Python and restart ComfyUI")
    if others:
        advice.append(f"{', '.join(others)} come from custom node packs this server lacks (ComfyUI-Manager's "
                      "'Install Missing Custom Nodes' finds them)")
    raise BatchError(f"{workflow.source} uses node types this ComfyUI does not have: {', '.join(missing)}. "
                     + "; ".join(advice) + ".")
