"""The prompt node: text -> ComfyUI CONDITIONING through the core's T5-XXL + CLIP-L."""

from __future__ import annotations

from . import convert, resolve
from .model_cache import TextEncodersRef
from .schema import TEXT_ENCODERS, KontextNode, NodeResult, Output, Socket, String, node_spec


class KontextPrompt(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextPrompt", "Kontext Prompt",
            "Encodes an instruction (\"make it a snowy night\", \"put her in a red dress\") for Kontext Edit. The "
            "output is ordinary CONDITIONING: ComfyUI's FluxGuidance and ReferenceLatent nodes work on it.",
            [
                Socket("text_encoders", TEXT_ENCODERS),
                String("prompt", multiline=True, tooltip="What to change, and what to keep."),
            ],
            [Output("CONDITIONING", "conditioning")],
        )

    @classmethod
    def run(cls, text_encoders: TextEncodersRef, prompt: str) -> NodeResult:
        text = resolve.encode_prompts(text_encoders, [prompt])
        # No guidance here: Kontext Edit's guidance widget applies unless FluxGuidance sets one.
        return NodeResult((convert.conditioning_to_comfy(text),))
