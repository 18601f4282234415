"""What a node declares — inputs, outputs, names — as plain data, readable without ComfyUI.

`v3.py` turns these into ComfyUI V3 classes (`comfy_api.latest.io`); the tests read them directly to
check the example workflows' links and widget values. The names follow V3's (`Int`, `Combo`,
`control_after_generate`, `optional`) so the translation is one line per type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

CATEGORY = "Kontext"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# The pack's own wire types.
MODEL = "KONTEXT_MODEL"
VAE = "KONTEXT_VAE"
TEXT_ENCODERS = "KONTEXT_TEXT_ENCODERS"
SESSION = "KONTEXT_SESSION"
STEP_CACHE = "KONTEXT_STEP_CACHE"


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # ComfyUI type name: IMAGE, LATENT, INT, COMBO, KONTEXT_MODEL ...
    optional: bool = False
    tooltip: str | None = None
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] = ()  # COMBO choices (a callable is asked each time)
    multiline: bool = False
    control_after_generate: bool = False  # a seed: the UI adds the fixed / increment / randomize widget
    also: tuple[str, ...] = ()  # further types this socket accepts (ComfyUI's MultiType)

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def accepted_types(self) -> tuple[str, ...]:
        return (self.type, *self.also)

    def choices(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options)


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    category: str = CATEGORY
    output_node: bool = False

    def input(self, name: str) -> Input:
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(f"{self.node_id} has no input {name!r}")

    def widget_order(self) -> list[Input]:
        """Widgets as the frontend lays them out (and stores them in widgets_values): required, then optional."""
        widgets = [i for i in self.inputs if i.is_widget]
        return [i for i in widgets if not i.optional] + [i for i in widgets if i.optional]


@dataclass
class NodeResult:
    outputs: tuple
    ui: dict | None = None


class KontextNode:
    """A node: `spec()` declares it, `run(**inputs)` does its work (optional inputs arrive only when connected)."""

    @classmethod
    def spec(cls) -> NodeSpec:
        raise NotImplementedError

    @classmethod
    def run(cls, **inputs) -> NodeResult:
        raise NotImplementedError


# Short constructors, in the order the V3 API names them.

def Socket(name: str, type: str, *, optional: bool = False, tooltip: str | None = None,
           also: tuple[str, ...] = ()) -> Input:
    return Input(name, type, optional=optional, tooltip=tooltip, also=also)


def Int(name: str, default: int, min: int, max: int, *, step: int = 1, tooltip: str | None = None,
        control_after_generate: bool = False, optional: bool = False) -> Input:
    return Input(name, "INT", default=default, min=min, max=max, step=step, tooltip=tooltip,
                 control_after_generate=control_after_generate, optional=optional)


def Float(name: str, default: float, min: float, max: float, *, step: float = 0.01,
          tooltip: str | None = None) -> Input:
    return Input(name, "FLOAT", default=default, min=min, max=max, step=step, tooltip=tooltip)


def Boolean(name: str, default: bool, *, tooltip: str | None = None) -> Input:
    return Input(name, "BOOLEAN", default=default, tooltip=tooltip)


def String(name: str, default: str = "", *, multiline: bool = False, tooltip: str | None = None) -> Input:
    return Input(name, "STRING", default=default, multiline=multiline, tooltip=tooltip)


def Combo(name: str, options: Sequence[str] | Callable[[], Sequence[str]], default: str | None = None, *,
          tooltip: str | None = None, optional: bool = False) -> Input:
    return Input(name, "COMBO", options=options if callable(options) else tuple(options), default=default,
                 tooltip=tooltip, optional=optional)


def Seed(name: str = "seed") -> Input:
    return Int(name, 0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True,
               tooltip="The noise seed: the same seed gives the same image on any device.")


def node_spec(node_id: str, display_name: str, description: str, inputs: Sequence[Input],
              outputs: Sequence[Output], **extra: Any) -> NodeSpec:
    return NodeSpec(node_id, display_name, description, tuple(inputs), tuple(outputs), **extra)


__all__ = [
    "Boolean", "CATEGORY", "Combo", "Float", "Input", "Int", "KontextNode", "MODEL", "NodeResult", "NodeSpec", "Output",
    "SESSION", "STEP_CACHE", "Seed", "Socket", "String", "TEXT_ENCODERS", "VAE", "WIDGET_TYPES", "node_spec",
]
