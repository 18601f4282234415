"""Our models in ComfyUI's memory management, without ComfyUI: a fake memory manager stands in for
`comfy_adapter.manage / load_models / forget` and watches every module call, so a model that runs while
"moved out" (not loaded again after ComfyUI lent its memory to another model) fails the test.

The real ModelPatcher / load_models_gpu path is tested against ComfyUI itself in test_comfyui_live.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import FakeEncoders
from node_pack import nodes_module
from kontext_core.adapters.lora import factor_bytes, on_the_fly_bytes
from test_nodes import FAST, FakeComfyVae, _image, _prompt, fp8_model_with_lora

nodes = nodes_module()
adapter = nodes_module("comfy_adapter")
model_cache = nodes_module("model_cache")
resolve = nodes_module("resolve")


class NotLoaded(AssertionError):
    pass


class FakeMemoryManager:
    """What the pack asks of ComfyUI's memory manager, recorded; `evict` is ComfyUI freeing memory for others."""

    def __init__(self):
        self.handles, self.events, self.forgotten = [], [], []

    def storage_device(self, device, kind):
        return device

    def manage(self, modules, device, kind, name):
        handle = SimpleNamespace(name=name, kind=kind, modules=modules, device=device, loaded=False)
        for module in modules.values():
            for sub in module.modules():
                sub.register_forward_pre_hook(lambda *_, h=handle: self._ran(h))
        self.handles.append(handle)
        return handle

    def _ran(self, handle):
        if not handle.loaded:
            raise NotLoaded(f"{handle.name} ran while ComfyUI had it moved out")
        if self.events[-1] != ("run", handle.name):
            self.events.append(("run", handle.name))

    def load_models(self, handles, memory_required=0):
        self.events.append(("load", *sorted(h.name for h in handles)))
        if memory_required:
            self.events.append(("room", memory_required))
        for handle in handles:
            handle.loaded = True

    def count_extra_bytes(self, handle, extra):  # as ComfyUI's patcher: only a change of size is news
        if handle is not None and getattr(handle, "extra", 0) != extra:
            handle.extra = extra
            self.events.append(("count", handle.name, extra))

    def forget(self, handle):
        self.forgotten.append(handle)
        handle.loaded = False

    def evict(self):
        self.events.append(("evict",))
        for handle in self.handles:
            handle.loaded = False

    def named(self, name):
        return next(h for h in self.handles if h.name == name)


@pytest.fixture
def manager(monkeypatch):
    fake = FakeMemoryManager()
    for name in ("storage_device", "manage", "load_models", "forget", "count_extra_bytes"):
        monkeypatch.setattr(adapter, name, getattr(fake, name))
    return fake


@pytest.fixture
def managed(manager, models):
    """The tiny models, loaded by the loader nodes while ComfyUI's memory manager is there."""
    model_cache.CACHE.release()  # start from an empty cache: the loader nodes below load and hand them over
    manager.handles.clear(), manager.events.clear(), manager.forgotten.clear()
    models.model = nodes.KontextModelLoader.run("kontext_tiny.safetensors").outputs[0]
    models.vae = nodes.KontextVAELoader.run("ae_tiny.safetensors").outputs[0]
    model_cache.CACHE.put(models.text.key, models.encoders)
    return models


def test_loaders_hand_each_model_to_comfyui_once(managed, manager):
    transformer, ae = manager.named("KontextTransformer"), manager.named("KontextAutoencoder")
    assert transformer.modules == {"model": resolve.transformer(managed.model)}
    assert ae.modules == {"model": resolve.autoencoder(managed.vae)}
    assert (transformer.kind, ae.kind) == ("transformer", "autoencoder")
    assert transformer.device == torch.device("cpu")
    assert not transformer.loaded and not ae.loaded  # loading a file does not take the GPU; using it does
    nodes.KontextModelLoader.run("kontext_tiny.safetensors")
    nodes.KontextVAELoader.run("ae_tiny.safetensors")
    assert len(manager.handles) == 2  # cached across runs: no second load, no second handle


def test_edit_has_each_model_loaded_right_before_it_runs(managed, manager):
    cond = _prompt(managed, "make it red")
    manager.events.clear()
    nodes.KontextEdit.run(managed.model, managed.vae, cond, seed=1, image=_image(1), **FAST)
    assert manager.events == [
        ("load", "KontextAutoencoder"), ("run", "KontextAutoencoder"),  # encode the image
        ("load", "KontextTransformer"), ("run", "KontextTransformer"),  # sample
        ("load", "KontextAutoencoder"), ("run", "KontextAutoencoder"),  # decode
    ]


def test_models_comfyui_moved_out_come_back_before_they_run(managed, manager, tiny_autoencoder):
    """ComfyUI's own VAE frees memory for itself (load_models_gpu may move ours out): sampling still works."""
    class EvictingComfyVae(FakeComfyVae):
        def encode(self, image):
            manager.evict()
            return super().encode(image)

    cond = _prompt(managed, "make it red")
    theirs = EvictingComfyVae(tiny_autoencoder)  # ComfyUI's VAE: not ours, not managed by us
    latent = nodes.KontextEdit.run(managed.model, theirs, cond, seed=1, image=_image(1), **FAST).outputs[0]
    assert manager.events[-2:] == [("load", "KontextTransformer"), ("run", "KontextTransformer")]
    assert latent["samples"].shape[1] == 16

    state = nodes.KontextStartSession.run(managed.model, managed.vae, _image(2), resize="keep",
                                          text_encoders=managed.text).outputs[0]
    state = nodes.KontextEditTurn.run(state, "a", seed=1, steps=2).outputs[0]
    manager.evict()  # between two queue runs, another checkpoint took the memory
    state = nodes.KontextEditTurn.run(state, "b", seed=2, steps=2).outputs[0]
    assert len(state.turns) == 3


def test_room_is_made_for_on_the_fly_lora_factors_and_they_are_counted(managed, manager, comfy, tiny_transformer):
    """fp8 weights take LoRAs on the fly: their factors (GPU memory beside the weights, moving with the model)
    get room made before they are made and are counted with the model after; dropping the LoRA uncounts them."""
    fp8, transformer, with_lora = fp8_model_with_lora(comfy, tiny_transformer)
    cond = _prompt(managed, "x")
    expected = on_the_fly_bytes(transformer, [model_cache.lora(with_lora.loras[0])])
    assert expected > 0

    manager.events.clear()
    nodes.KontextEdit.run(with_lora, managed.vae, cond, seed=1, image=_image(1), **FAST)
    assert factor_bytes(transformer) == expected
    sampling = manager.events[manager.events.index(("load", "KontextTransformer")):]
    assert sampling[:5] == [("load", "KontextTransformer"), ("load", "KontextTransformer"), ("room", expected),
                            ("count", "KontextTransformer", expected), ("run", "KontextTransformer")], sampling

    manager.events.clear()  # the same LoRA again: kept, no room to make
    nodes.KontextEdit.run(with_lora, managed.vae, cond, seed=1, image=_image(1), **FAST)
    assert not any(event[0] == "room" for event in manager.events)
    nodes.KontextEdit.run(fp8, managed.vae, cond, seed=1, image=_image(1), **FAST)
    assert factor_bytes(transformer) == 0 and ("count", "KontextTransformer", 0) in manager.events


def test_without_the_manager_models_would_run_moved_out(managed, manager):
    """The fake really catches a model used while moved out (so the tests above can fail)."""
    transformer = resolve.transformer(managed.model)
    with pytest.raises(NotLoaded):
        transformer.img_in(torch.zeros(1, transformer.img_in.in_features))
    model_cache.ready(transformer)
    transformer.img_in(torch.zeros(1, transformer.img_in.in_features))


class TinyTextEncoders(FakeEncoders):
    """FakeEncoders with weights: T5 and CLIP modules that run on each encode."""

    def __init__(self):
        super().__init__(48, 32)
        self.t5, self.clip = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.offloaded = 0

    def encode(self, prompts):
        self.t5(torch.zeros(1, 4))
        self.clip(torch.zeros(1, 4))
        return super().encode(prompts)

    def offload(self, device="cpu"):
        self.offloaded += 1


def test_text_encoders_are_managed_and_left_to_comfyui(comfy, manager, monkeypatch):
    for name in ("t5xxl_fp16.safetensors", "clip_l.safetensors"):
        (comfy.root / "text_encoders" / name).write_bytes(b"0")
    monkeypatch.setattr(model_cache, "load_text_encoders", lambda *a, **k: TinyTextEncoders())
    ref = nodes.KontextTextEncodersLoader.run("t5xxl_fp16.safetensors", "clip_l.safetensors").outputs[0]
    handle = manager.named("KontextTextEncoders")
    encoders = model_cache.text_encoders(ref)
    assert handle.modules == {"t5": encoders.t5, "clip": encoders.clip} and handle.kind == "text_encoders"
    nodes.KontextPrompt.run(ref, "make it red")
    assert manager.events[-2:] == [("load", "KontextTextEncoders"), ("run", "KontextTextEncoders")]

    # On a GPU: managed encoders stay for ComfyUI to move out when needed; unmanaged ones leave at once.
    on_gpu = model_cache.TextEncodersRef("a", "b", "bf16", "cuda")
    model_cache.CACHE.put(on_gpu.key, encoders, handle)
    resolve.encode_prompts(on_gpu, ["x"])
    assert encoders.offloaded == 0
    plain = TinyTextEncoders()
    model_cache.CACHE.put(on_gpu.key, plain)
    assert manager.forgotten == [handle]  # replaced: taken out of ComfyUI's list
    plain.t5.register_forward_pre_hook(lambda *_: None)
    resolve.encode_prompts(on_gpu, ["x"])
    assert plain.offloaded == 1


def test_release_takes_our_models_out_of_comfyuis_list(managed, manager):
    transformer, ae = manager.named("KontextTransformer"), manager.named("KontextAutoencoder")
    assert model_cache.CACHE.release(managed.model.key) == 1
    assert manager.forgotten == [transformer] and managed.model.key not in model_cache.CACHE.handles
    model_cache.CACHE.release()  # "Unload Models" in ComfyUI
    assert ae in manager.forgotten and not model_cache.CACHE.handles and not model_cache.CACHE.models
    resolve.transformer(managed.model)  # the next run loads it again, and hands it over again
    assert manager.handles[-1].name == "KontextTransformer" and manager.handles[-1] is not transformer


@pytest.mark.skipif(adapter.available(), reason="checks the fallbacks used when ComfyUI is not importable")
def test_without_comfyui_nothing_is_managed(models):
    device = torch.device("cpu")
    assert adapter.storage_device(device, "transformer") == device
    assert adapter.manage({"model": torch.nn.Linear(2, 2)}, device, "transformer", "KontextTransformer") is None
    adapter.load_models([None])
    adapter.forget(None)
    assert adapter.loaded_handles() == []
    assert not model_cache.CACHE.handles  # the loader nodes cached the models, unmanaged
    transformer = resolve.transformer(models.model)
    assert not model_cache.is_managed(transformer)
    model_cache.ready(transformer)  # nothing to do
