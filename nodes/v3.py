"""The pack's nodes as ComfyUI V3 classes (`comfy_api.latest`), built from their `schema` declarations.

Only imported inside ComfyUI (by the pack's `comfy_entrypoint`); everything else in `nodes/` works
without ComfyUI.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import NODES, comfy_adapter, model_cache
from .schema import Input, KontextNode, Output

_TYPES = {
    "IMAGE": io.Image, "MASK": io.Mask, "LATENT": io.Latent, "CONDITIONING": io.Conditioning, "VAE": io.Vae,
    "INT": io.Int, "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean, "COMBO": io.Combo,
}


def _comfy_type(name: str):
    if name not in _TYPES:
        _TYPES[name] = io.Custom(name)
    return _TYPES[name]


def _input(spec: Input):
    common = dict(optional=spec.optional, tooltip=spec.tooltip)
    if spec.type == "INT":
        made = io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, **common)
    elif spec.type == "FLOAT":
        made = io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    elif spec.type == "STRING":
        made = io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    elif spec.type == "BOOLEAN":
        made = io.Boolean.Input(spec.name, default=spec.default, **common)
    elif spec.type == "COMBO":
        made = io.Combo.Input(spec.name, options=spec.choices(), default=spec.default, **common)
    else:
        made = _comfy_type(spec.type).Input(spec.name, **common)
    if spec.also:
        return io.MultiType.Input(made, types=[_comfy_type(t) for t in spec.also])
    return made


def _output(spec: Output):
    return _comfy_type(spec.type).Output(spec.name, display_name=spec.name, tooltip=spec.tooltip)


def comfy_node(node: type[KontextNode]) -> type[io.ComfyNode]:
    """A V3 node class whose schema is `node.spec()` and whose execute is `node.run`."""

    def define_schema(cls) -> io.Schema:
        spec = node.spec()
        return io.Schema(node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
                         description=spec.description, inputs=[_input(i) for i in spec.inputs],
                         outputs=[_output(o) for o in spec.outputs], is_output_node=spec.output_node)

    def execute(cls, **inputs) -> io.NodeOutput:
        result = node.run(**inputs)
        return io.NodeOutput(*result.outputs, ui=result.ui)

    return type(node.__name__, (io.ComfyNode,), {
        "__doc__": node.__doc__, "__module__": node.__module__,
        "define_schema": classmethod(define_schema), "execute": classmethod(execute),
    })


class KontextExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [comfy_node(node) for node in NODES]


def extension() -> KontextExtension:
    # "Unload Models" in ComfyUI's menu (and its recovery from running out of memory) frees ours too.
    # Registered here: ComfyUI 0.8 never calls ComfyExtension.on_load.
    comfy_adapter.on_unload_models(model_cache.CACHE.release)
    return KontextExtension()
