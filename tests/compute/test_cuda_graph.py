"""CUDA-graph replay of a step (kontext_core/compute/cuda_graph.py) against the plain step.

On the GPU: replays equal eager steps for changing inputs with one capture, a new shape or a replaced
weight captures again; LoRAs on the fly replay, a strength change without a new capture. Anywhere: a
hooked model is refused by `prepare`, and off CUDA the wrapper is the plain call.
"""

from __future__ import annotations

import pytest
import torch

from conftest import fp8_tensor_cores, random_block_lora, randomize_, rel_error, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig, apply_lora
from kontext_core.compute import quant
from kontext_core.compute.cuda_graph import GraphedVelocity

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(device: str) -> KontextTransformer:
    return randomize_(KontextTransformer(TransformerConfig.tiny()), seed=3).to(device).eval()


def _replays_eager(graphed: GraphedVelocity, args, tolerance: float = 1e-5) -> bool:
    """The graph's step equals the plain model's on the same inputs."""
    return rel_error(graphed(*args), graphed.model.velocity(*args)) < tolerance


def _graphed_cuda_model() -> tuple[KontextTransformer, GraphedVelocity, tuple]:
    model = _model("cuda")
    return model, GraphedVelocity(model), tiny_edit_args(1, torch.float32, "cuda")


def test_without_cuda_the_plain_step_runs():
    model = _model("cpu")
    graphed = GraphedVelocity(model)
    args = tiny_edit_args(1, torch.float32, "cpu")
    with torch.no_grad():
        assert torch.equal(graphed(*args), model.velocity(*args))
    assert graphed.captures == 0


def test_prepare_refuses_a_hooked_model_with_the_reason():
    model = _model("cpu")
    graphed = GraphedVelocity(model)
    assert graphed.prepare() is None
    handle = model.single_blocks[0].linear2.register_forward_hook(lambda module, inputs, output: output)
    assert "forward hooks" in graphed.prepare()
    handle.remove()
    assert graphed.prepare() is None


@needs_cuda
def test_replays_equal_eager_steps_with_one_capture():
    model = _model("cuda")
    graphed = GraphedVelocity(model)
    with torch.no_grad():
        for _ in range(3):
            args = tiny_edit_args(1, torch.float32, "cuda")  # fresh inputs, same shapes
            assert _replays_eager(graphed, args)
        assert graphed.captures == 1
        args = tiny_edit_args(2, torch.float32, "cuda")  # a new batch size: a new graph
        assert _replays_eager(graphed, args)
        assert graphed.captures == 2


@needs_cuda
def test_replaced_weights_and_hooks_are_respected():
    model, graphed, args = _graphed_cuda_model()
    with torch.no_grad():
        graphed(*args)
        layer = model.single_blocks[0].linear2
        layer.weight = torch.nn.Parameter(layer.weight * 2, requires_grad=False)  # a new tensor, a new address
        assert graphed.prepare() is None
        assert _replays_eager(graphed, args)
        assert graphed.captures == 2
        handle = layer.register_forward_hook(lambda module, inputs, output: output * 0.5)
        assert graphed.prepare() is not None  # the caller then runs the plain model
        handle.remove()
    assert graphed.captures == 2


def test_prepare_accepts_loras_on_the_fly():
    model = _model("cpu")
    graphed = GraphedVelocity(model)
    with apply_lora(model, random_block_lora(model, seed=4), mode="on_the_fly"):
        assert graphed.prepare() is None


@needs_cuda
def test_loras_on_the_fly_replay_and_a_new_strength_needs_no_capture():
    model, graphed, args = _graphed_cuda_model()
    with torch.no_grad():
        plain = model.velocity(*args)
        handle = apply_lora(model, random_block_lora(model, seed=5), 0.7, mode="on_the_fly")
        assert graphed.prepare() is None
        with_lora = graphed(*args)
        assert rel_error(with_lora, model.velocity(*args)) < 1e-5 and rel_error(with_lora, plain) > 0.05
        handle.set_strength(-0.4)  # the factors are rewritten in place: the captured graph reads them
        assert graphed.prepare() is None
        assert _replays_eager(graphed, args)
        assert graphed.captures == 1
        handle.remove()
        apply_lora(model, random_block_lora(model, seed=6, rank=40), 0.7, mode="on_the_fly")
        assert graphed.prepare() is None  # factors of another shape (rank 40, padded to 64): a new capture
        assert _replays_eager(graphed, args)
        assert graphed.captures == 2


@pytest.mark.skipif(not fp8_tensor_cores(), reason="needs a GPU with fp8 tensor cores (Ada or Hopper)")
def test_an_eager_fp8_model_with_a_lora_replays():
    # Eager, every fp8 layer quantizes its activations on the GPU (the modulation's one-row inputs in PyTorch):
    # nothing there may copy from the host, which a capture refuses.
    model = quant.quantize_model(_model("cuda").to(torch.bfloat16))
    apply_lora(model, random_block_lora(model, seed=7), 0.7, mode="on_the_fly")
    graphed = GraphedVelocity(model)
    args = tiny_edit_args(1, torch.bfloat16, "cuda")
    with torch.no_grad():
        assert graphed.prepare() is None
        assert _replays_eager(graphed, args, tolerance=1e-3)  # the same kernels, replayed
        assert graphed.captures == 1


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                    reason="needs a CUDA GPU with int8 tensor cores (Ampere or newer)")
def test_an_eager_int8_model_with_a_lora_replays():
    # The int8 GEMM's autotuning and its TMA descriptors are host work: done before the capture (warm-up),
    # the descriptors' addresses then fixed in the graph like every other kernel argument.
    model = quant.quantize_model(_model("cuda").to(torch.bfloat16), torch.int8)
    apply_lora(model, random_block_lora(model, seed=7), 0.7, mode="on_the_fly")
    graphed = GraphedVelocity(model)
    args = tiny_edit_args(1, torch.bfloat16, "cuda")
    with torch.no_grad():
        assert graphed.prepare() is None
        assert _replays_eager(graphed, args, tolerance=1e-3)
        assert graphed.captures == 1


def test_pipeline_runs_plainly_and_says_why_when_the_model_has_hooks(tiny_transformer, tiny_autoencoder, monkeypatch):
    # The pipeline's choice per sampling run, on the CPU: the device is made to read as CUDA, so the
    # choice is taken as on a GPU; no graph is captured here (that needs CUDA, tests above).
    from kontext_core.pipeline import KontextPipeline

    monkeypatch.setattr(KontextPipeline, "device", property(lambda self: torch.device("cuda")))
    pipe = KontextPipeline(tiny_transformer, tiny_autoencoder, cuda_graphs=True)
    graphed = pipe._graphed_velocity()
    assert isinstance(graphed, GraphedVelocity) and graphed.model is tiny_transformer
    handle = tiny_transformer.double_blocks[0].img_attn.qkv.register_forward_hook(lambda m, i, o: o)
    with pytest.warns(UserWarning, match="CUDA graphs not used for this run: forward hooks"):
        assert pipe._graphed_velocity() is None
    handle.remove()
    assert pipe._graphed_velocity() is graphed  # the same wrapper again once the hooks are gone
    pipe.cuda_graphs = False
    assert pipe._graphed_velocity() is None  # switched off: the graph (and its memory) forgotten
    assert GraphedVelocity.of(tiny_transformer) is not graphed


def test_pipelines_around_one_model_share_its_graph(tiny_transformer, tiny_autoencoder, monkeypatch):
    # The nodes build a pipeline per queue run: a graph captured in one run is replayed by the next.
    from kontext_core.pipeline import KontextPipeline

    monkeypatch.setattr(KontextPipeline, "device", property(lambda self: torch.device("cuda")))
    first = KontextPipeline(tiny_transformer, tiny_autoencoder, cuda_graphs=True)._graphed_velocity()
    again = KontextPipeline(tiny_transformer, tiny_autoencoder, cuda_graphs=True)._graphed_velocity()
    assert first is again and first.model is tiny_transformer


def test_the_shared_graph_dies_with_its_model():
    """The cache of graphs per model must not keep a model (its weights, the graph's memory) alive once the
    caller lets it go: a ComfyUI model switch or `kontext eval presets` loading the next preset."""
    import gc
    import weakref

    model = KontextTransformer(TransformerConfig.tiny())
    graphed = GraphedVelocity.of(model)
    assert GraphedVelocity.of(model) is graphed and graphed.model is model
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
    with pytest.raises(RuntimeError, match="has been freed"):
        graphed.model


@pytest.mark.skipif(not fp8_tensor_cores(), reason="needs a GPU with fp8 tensor cores (Ada or Hopper)")
def test_recording_and_reusing_steps_each_replay_their_own_graph():
    # sage8's frozen statistics (sample_euler's attention_statistics_refresh): record steps and reuse steps run
    # different kernels, so each has a graph; the run replayed equals the eager run, two captures for five steps.
    from kontext_core import set_attention_backend
    from kontext_core.compute import attention
    from kontext_core.sampling import TextConditioning, sample_euler

    model = _model("cuda").to(torch.bfloat16)
    img, ids, txt, _, _, y, _, ctx, ctx_ids = tiny_edit_args(1, torch.bfloat16, "cuda")
    steps = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    graphed = GraphedVelocity(model)
    previous = attention.get_attention_backend()
    set_attention_backend("sage8")
    try:
        with torch.no_grad():
            runs = [sample_euler(model, img.float(), ids, TextConditioning(txt, y), steps, context=ctx,
                                 context_ids=ctx_ids, attention_statistics_refresh=2, velocity_fn=velocity_fn)
                    for velocity_fn in (None, graphed)]
    finally:
        set_attention_backend(previous)
        attention.forget_frozen_statistics()
    assert graphed.captures == 2
    assert rel_error(runs[1], runs[0]) < 1e-3
