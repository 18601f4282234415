"""Our kernels as opaque `kontext::` operators: torch.compile'd blocks call them without tracing inside.

`torch.library.custom_op` would wrap every call in an autograd function and a frame that disables
dynamo, host time paid per launch (~15 us a call on this project's CPU machines) on a step that can
be launch-bound. Inference needs neither, so each operator is a schema, one kernel the dispatcher
calls directly (CompositeExplicitAutograd: any device) and a fake for tracing. Inference only: the
operators have no backward.
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("kontext", "FRAGMENT")
# Every operator's name, in the order registered (the tests hold each to torch.compile's contract).
REGISTERED: list[str] = []


def define(schema: str, impl: Callable, fake: Callable) -> None:
    """Register `kontext::<name>` from a schema such as "quantize_rows(Tensor x) -> (Tensor, Tensor)"."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"kontext::{name}", fake, lib=_LIBRARY)
    REGISTERED.append(name)
