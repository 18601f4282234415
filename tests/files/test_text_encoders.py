"""T5 and CLIP text encoders: every file layout users have, against transformers' own models.

Reference: `transformers.T5EncoderModel` / `CLIPTextModel` holding the very weights we wrote to disk.
Tolerances: relative error (max |ours - reference| / max |reference|) < 1e-5 in float32: same weights,
same math. The fp8 files are exact against their dequantized weights (< 1e-5); the scaled one is also
compared with the float32 original: e4m3 moves these weights by 2.7 % (Frobenius) and this tiny random T5
amplifies weight error about 6x (fp16 rounding, 5e-4, gives 3e-3 at the output), so its output may differ
by up to 25 % (Frobenius; 16 % measured).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from kontext_core.checkpoints.files import CheckpointError, save_sharded
from kontext_core.model.config import TransformerConfig
from kontext_core.compute.quant import quantize_weight
from kontext_core.text import text_encoders
from kontext_core.text.text_encoders import (
    TextEncoders,
    clip_l_config,
    load_clip_encoder,
    load_clip_tokenizer,
    load_t5_encoder,
    load_t5_tokenizer,
    load_text_encoders,
    t5_xxl_config,
)

from conftest import rel_error
from tiny_encoders import (CLIP_TINY, T5_TINY, WORDS, clip_tensors, clip_tokenizer_dir, t5_tensors, t5_tokenizer_dir,
                           tiny_clip, tiny_t5)

PROMPTS = ["a photo of a cat", "make the dog red", "turn it into a painting"]


# ---------------------------------------------------------------------------------------------------------
# Files in more layouts (the tiny models, their files and tokenizers are tiny_encoders.py's)


def scaled_fp8(tensors: dict[str, torch.Tensor], scaled: bool = True) -> dict[str, torch.Tensor]:
    """ComfyUI's t5xxl_fp8_e4m3fn(_scaled): linear weights in e4m3 (with `scale_weight`), the rest fp16."""
    out = {}
    kept = ("shared.weight", "embed_tokens.weight", "relative_attention_bias.weight")
    for key, tensor in tensors.items():
        if tensor.ndim == 2 and not key.endswith(kept):
            weight, scale = quantize_weight(tensor) if scaled else (tensor.to(torch.float8_e4m3fn), None)
            out[key] = weight
            if scale is not None:
                out[key[: -len("weight")] + "scale_weight"] = scale
                out[key[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[key] = tensor.half()
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def dequantized(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What a file's weights are in float32 (the model keys, prefix removed)."""
    out = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix) or key.endswith(("scale_weight", "scale_input")) or key == "scaled_fp8":
            continue
        scale_key = key[: -len("weight")] + "scale_weight"
        scale = tensors[scale_key] if scale_key in tensors else 1.0
        out[key[len(prefix):]] = tensor.float() * scale
    return out


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(weights, strict=False)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny T5 and CLIP, their files in every layout, and a diffusers folder with tokenizers."""
    root = tmp_path_factory.mktemp("text_encoders")
    t5, clip = tiny_t5(), tiny_clip()
    save_file(t5_tensors(t5), root / "t5xxl_fp16.safetensors")
    save_file(clip_tensors(clip), root / "clip_l.safetensors")
    t5_tok, clip_tok = t5_tokenizer_dir(root / "t5_tok"), clip_tokenizer_dir(root / "clip_tok")

    # diffusers: CLIP with 4 heads (only its config.json says so), T5 sharded
    diffusers = root / "FLUX.1-Kontext-dev"
    clip4 = tiny_clip(seed=5, num_attention_heads=4)
    (diffusers / "text_encoder").mkdir(parents=True)
    clip4.config.to_json_file(diffusers / "text_encoder" / "config.json")
    save_file({f"text_model.{k}": v.clone() for k, v in clip4.state_dict().items()},
              diffusers / "text_encoder" / "model.safetensors")
    (diffusers / "text_encoder_2").mkdir()
    t5.config.to_json_file(diffusers / "text_encoder_2" / "config.json")
    save_sharded(t5_tensors(t5, embed_tokens=False), diffusers / "text_encoder_2", "model", max_shard_bytes=20_000)
    t5_tokenizer_dir(diffusers / "tokenizer_2")
    clip_tokenizer_dir(diffusers / "tokenizer")
    return dict(root=root, t5=t5, clip=clip, clip4=clip4, t5_tok=t5_tok, clip_tok=clip_tok, diffusers=diffusers)


def t5_ids(vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(0))


def clip_ids(vocab: int = 64) -> torch.Tensor:
    ids = torch.randint(0, vocab - 1, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[0, 9], ids[1, 40] = vocab - 1, vocab - 1  # end of text, where the pooled output is taken
    return ids


@torch.no_grad()
def t5_out(model, ids=None):
    return model(input_ids=t5_ids() if ids is None else ids).last_hidden_state


@torch.no_grad()
def clip_out(model, ids=None):
    out = model(input_ids=clip_ids() if ids is None else ids)
    return out.pooler_output, out.last_hidden_state


def tiny_encoders(files, cache_size: int = 16, device: str = "cpu") -> TextEncoders:
    t5 = load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", dtype="fp32", device=device)
    clip = load_clip_encoder(files["root"] / "clip_l.safetensors", dtype="fp32", device=device)
    return TextEncoders(t5, clip, load_t5_tokenizer(files["t5_tok"]), load_clip_tokenizer(files["clip_tok"]),
                        cache_size=cache_size, device=device)


# ---------------------------------------------------------------------------------------------------------
# Configs


def test_default_configs_are_t5_xxl_and_clip_l():
    with torch.device("meta"):
        t5, clip = T5EncoderModel(t5_xxl_config()), CLIPTextModel(clip_l_config())
    # google/t5-v1_1-xxl's encoder and openai/clip-vit-large-patch14's text model
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert t5.config.is_gated_act and t5.config.dense_act_fn == "gelu_new"
    assert (clip.config.hidden_act, clip.config.eos_token_id, clip.config.pad_token_id) == ("quick_gelu", 2, 1)


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers, file by file


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer.", "transformer."])
@pytest.mark.parametrize("embed_tokens", [True, False])
def test_t5_file_matches_transformers(tmp_path, files, prefix, embed_tokens):
    path = tmp_path / "t5xxl_fp32.safetensors"
    save_file(t5_tensors(files["t5"], prefix, embed_tokens), path)
    ours = load_t5_encoder(path, dtype="fp32")
    assert ours.config.num_layers == 2 and ours.config.num_heads == 4 and ours.config.d_kv == 8
    assert ours.shared.weight is ours.encoder.embed_tokens.weight
    assert rel_error(t5_out(ours), t5_out(files["t5"])) < 1e-5


@pytest.mark.parametrize("prefix", ["", "text_encoders.clip_l.transformer."])
def test_clip_file_matches_transformers(tmp_path, files, prefix):
    path = tmp_path / "clip_l.safetensors"
    save_file(clip_tensors(files["clip"], prefix), path)
    ours = load_clip_encoder(path, dtype="fp32")
    (pooled, hidden), (ref_pooled, ref_hidden) = clip_out(ours), clip_out(files["clip"])
    assert pooled.shape == (2, 64)
    assert rel_error(pooled, ref_pooled) < 1e-5 and rel_error(hidden, ref_hidden) < 1e-5


def test_fp16_file_loads_in_float16_with_wo_in_float32(files):
    ours = load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", dtype="fp16")
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and ours.shared.weight.dtype == torch.float16
    assert torch.isfinite(t5_out(ours)).all()


@pytest.mark.parametrize("scaled", [True, False], ids=["fp8_e4m3fn_scaled", "fp8_e4m3fn"])
def test_fp8_t5_file(tmp_path, files, scaled):
    stored = scaled_fp8(t5_tensors(files["t5"], "text_encoders.t5xxl.transformer."), scaled)
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(stored, path)
    ours = t5_out(load_t5_encoder(path, dtype="fp32"))
    reference = with_weights(tiny_t5(), dequantized(stored, "text_encoders.t5xxl.transformer."))
    assert rel_error(ours, t5_out(reference)) < 1e-5
    if scaled:  # unscaled e4m3 of these small weights is mostly subnormal, far from the original
        original = t5_out(files["t5"])
        assert ((ours - original).norm() / original.norm()).item() < 0.25


def test_diffusers_folder_encodes_like_transformers(files):
    encoders = load_text_encoders(files["diffusers"], dtype="fp32")
    assert encoders.clip.config.num_attention_heads == 4  # from text_encoder/config.json, not the shapes
    t5_embeddings, clip_pooled = encoders.encode(PROMPTS)
    assert t5_embeddings.shape == (3, 512, 32) and clip_pooled.shape == (3, 64)

    t5_ids_, clip_ids_ = encoders.tokenize(PROMPTS)
    assert rel_error(t5_embeddings, t5_out(files["t5"], t5_ids_)) < 1e-5
    assert rel_error(clip_pooled, clip_out(files["clip4"], clip_ids_)[0]) < 1e-5


def test_bundled_checkpoint_holds_both(tmp_path, files):
    bundle = {**t5_tensors(files["t5"], "text_encoders.t5xxl.transformer."),
              **clip_tensors(files["clip"], "text_encoders.clip_l.transformer."),
              "model.diffusion_model.img_in.weight": torch.zeros(4, 4)}
    save_file(bundle, tmp_path / "flux1-kontext-dev-bundle.safetensors")
    encoders = load_text_encoders(tmp_path / "flux1-kontext-dev-bundle.safetensors", dtype="fp32",
                                  t5_tokenizer=files["t5_tok"], clip_tokenizer=files["clip_tok"])
    assert rel_error(t5_out(encoders.t5), t5_out(files["t5"])) < 1e-5
    assert rel_error(clip_out(encoders.clip)[0], clip_out(files["clip"])[0]) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Tokens, cache, offload


def test_padding_and_truncation(files):
    encoders = tiny_encoders(files)
    long_prompt = " ".join(WORDS * 40)  # > 512 T5 tokens, > 77 CLIP tokens
    t5_ids_, clip_ids_ = encoders.tokenize(["a cat", long_prompt])
    assert t5_ids_.shape == (2, 512) and clip_ids_.shape == (2, 77)
    eos = encoders.t5_tokenizer.eos_token_id
    assert t5_ids_[0, :3].tolist() == [3, 6, eos] and (t5_ids_[0, 3:] == 0).all()  # "a cat </s>" then padding
    assert t5_ids_[1, -1] == eos and (t5_ids_[1] != 0).all()  # truncated, still ends with </s>
    bos, end = encoders.clip_tokenizer.bos_token_id, encoders.clip_tokenizer.eos_token_id
    assert clip_ids_[0, 0] == bos and clip_ids_[1, 0] == bos and clip_ids_[1, -1] == end
    assert (clip_ids_[0, 3:] == end).all()  # "<bos> a cat" (cat is one token), then end of text as padding


def test_cache_returns_the_same_tensors_without_running_the_models(files):
    encoders = tiny_encoders(files, cache_size=2)
    calls = []
    encoders.t5.register_forward_hook(lambda *_: calls.append("t5"))
    encoders.clip.register_forward_hook(lambda *_: calls.append("clip"))

    first = encoders.encode(PROMPTS[:2])
    assert calls == ["t5", "clip"]
    again = encoders.encode(list(reversed(PROMPTS[:2])))
    assert calls == ["t5", "clip"] and encoders.cache_hits == 2
    assert torch.equal(again[0], first[0].flip(0)) and torch.equal(again[1], first[1].flip(0))

    # A batch with one new prompt (twice) runs the models once, on that prompt only; the LRU entry goes.
    t5_embeddings, _ = encoders.encode([PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    assert calls == ["t5", "clip"] * 2 and torch.equal(t5_embeddings[0], t5_embeddings[2])
    assert list(encoders._cache) == [PROMPTS[0], PROMPTS[2]]  # least recently used first
    encoders.encode(PROMPTS[1])
    assert calls == ["t5", "clip"] * 3

    uncached = tiny_encoders(files, cache_size=0)
    assert torch.equal(uncached.encode(PROMPTS[:2])[0], first[0]) and not uncached._cache


def test_offload_on_a_cpu_only_machine_is_harmless(files):
    encoders = tiny_encoders(files)
    first = encoders.encode(PROMPTS[0])[0]
    encoders.offload()
    assert encoders.t5.device.type == "cpu" and torch.equal(encoders.encode(PROMPTS[0])[0], first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving the encoders off the GPU needs a CUDA device")
def test_offload_frees_the_gpu_and_encode_brings_the_models_back(files):
    encoders = tiny_encoders(files, device="cuda")
    reference = tiny_encoders(files).encode(PROMPTS)
    t5_embeddings, clip_pooled = encoders.encode(PROMPTS[:2])
    assert t5_embeddings.device.type == "cuda" and clip_pooled.device.type == "cuda"
    encoders.offload()
    assert encoders.t5.device.type == "cpu" and encoders.clip.device.type == "cpu"
    encoders.encode(PROMPTS[0])  # cached: the models stay off the GPU
    assert encoders.t5.device.type == "cpu"
    t5_embeddings, clip_pooled = encoders.encode(PROMPTS)
    assert encoders.t5.device.type == "cuda" and encoders.clip.device.type == "cuda"
    assert rel_error(t5_embeddings.cpu(), reference[0]) < 1e-4 and rel_error(clip_pooled.cpu(), reference[1]) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Errors that speak to the person


def test_t5_and_clip_swapped(files):
    with pytest.raises(CheckpointError, match=r"clip_l.safetensors is a CLIP text encoder, not T5-XXL.*`clip_path`"):
        load_t5_encoder(files["root"] / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16.safetensors is a T5 text encoder, not CLIP-L.*`t5_path`"):
        load_clip_encoder(files["root"] / "t5xxl_fp16.safetensors")


def test_clip_g_is_refused_for_clip_l(tmp_path):
    # SDXL's / SD3's clip_g file, picked as the CLIP: the shapes say 1280 wide (a small vocabulary keeps it light).
    path = tmp_path / "clip_g.safetensors"
    prefix = "text_model."
    save_file({f"{prefix}embeddings.token_embedding.weight": torch.zeros(10, 1280),
               f"{prefix}embeddings.position_embedding.weight": torch.zeros(77, 1280),
               f"{prefix}encoder.layers.0.mlp.fc1.weight": torch.zeros(16, 1280),
               f"{prefix}encoder.layers.0.layer_norm1.weight": torch.zeros(1280)}, path)
    with pytest.raises(CheckpointError, match="clip_g.safetensors is CLIP-G.*CLIP-L"):
        load_clip_encoder(path)


@pytest.mark.parametrize("keys, what", [
    (["img_in.weight", "double_blocks.0.img_attn.qkv.weight"], "a FLUX transformer"),
    (["decoder.conv_in.weight", "encoder.conv_in.weight"], "an autoencoder"),
])
def test_not_a_text_encoder(tmp_path, keys, what):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    for load, expected in ((load_t5_encoder, "not a T5-XXL text encoder"), (load_clip_encoder, "not a CLIP-L")):
        with pytest.raises(CheckpointError, match=rf"model.safetensors looks like {what}.*{expected}"):
            load(path)


def test_missing_tensors_are_named(tmp_path, files):
    tensors = t5_tensors(files["t5"])
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"], tensors["encoder.final_layer_norm.weight"]
    save_file(tensors, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 2 tensors .*first: encoder.block.1.layer.1.DenseReluDense"
                                              r".wo.weight, encoder.final_layer_norm.weight"):
        load_t5_encoder(tmp_path / "t5xxl_fp16.safetensors")
    last_shard = sorted((files["diffusers"] / "text_encoder_2").glob("model-0*.safetensors"))[-1]
    with pytest.raises(CheckpointError, match=rf"{last_shard.name} is one shard .*Pass the folder"):
        load_t5_encoder(last_shard)


def test_unsupported_dtypes(tmp_path, files):
    tensors = clip_tensors(files["clip"])
    tensors["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(128, 64, dtype=torch.int8)
    save_file(tensors, tmp_path / "clip_l_int8.safetensors")
    with pytest.raises(CheckpointError, match=r"fc1.weight is stored as I8.*clip_l.safetensors"):
        load_clip_encoder(tmp_path / "clip_l_int8.safetensors")
    for dtype in ("fp8", "int4", torch.int8):
        with pytest.raises(CheckpointError, match=r"unsupported dtype .* choose bf16, fp16 or fp32"):
            load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", dtype=dtype)


def test_config_that_does_not_match_the_file(files):
    with pytest.raises(CheckpointError, match=r"tensors the config does not have .*encoder.block.1"):
        load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", config=T5Config(**{**T5_TINY, "num_layers": 1}))
    with pytest.raises(CheckpointError, match=r"has shape \[64, 64\] but the CLIP text encoder config needs"):
        load_clip_encoder(files["root"] / "clip_l.safetensors",
                          config=CLIPTextConfig(**{**CLIP_TINY, "hidden_size": 32}))


# ---------------------------------------------------------------------------------------------------------
# Encoders that do not fit the transformer: refused by what they are, before any weight is read


def test_encoders_of_the_transformers_widths_load(files):
    fits = TransformerConfig.tiny(context_in_dim=32, vec_in_dim=64)  # the tiny files' widths
    encoders = load_text_encoders(files["root"] / "t5xxl_fp16.safetensors", files["root"] / "clip_l.safetensors",
                                  t5_tokenizer=files["t5_tok"], clip_tokenizer=files["clip_tok"], dtype="fp32",
                                  transformer_config=fits)
    assert encoders.encode("a cat")[1].shape == (1, 64)


def test_encoders_of_other_widths_are_named_against_the_transformer(files):
    transformer = TransformerConfig.tiny(context_in_dim=48, vec_in_dim=32)
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16.safetensors: T5 with hidden size 32, that is a T5 32 "
                                              r"wide; this transformer reads 48-wide text features .*t5xxl_fp16"):
        load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", transformer_config=transformer)
    with pytest.raises(CheckpointError, match=r"clip_l.safetensors: CLIP with hidden size 64, that is a CLIP 64 wide, "
                                              r"not what this transformer reads: a 32-wide pooled vector"):
        load_clip_encoder(files["root"] / "clip_l.safetensors", transformer_config=transformer)


def test_a_clip_b_file_for_flux_is_named_before_its_weights_are_read(tmp_path):
    # The case: a 512-wide CLIP given as clip_l; FLUX reads CLIP-L's 768-wide pooled vector. Only the
    # tensors whose shapes give the config are written: the check comes before the missing ones are noticed.
    path = tmp_path / "clip_b.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 512),
               "text_model.embeddings.position_embedding.weight": torch.zeros(77, 512),
               "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(16, 512),
               "text_model.encoder.layers.0.layer_norm1.weight": torch.zeros(512)}, path)
    with pytest.raises(CheckpointError, match=r"clip_b.safetensors: CLIP with hidden size 512, that is the text tower "
                                              r"of CLIP ViT-B, not what this transformer reads: a 768-wide pooled "
                                              r"vector \(FLUX: CLIP-L, 768\). Use CLIP-L: clip_l.safetensors"):
        load_clip_encoder(path, transformer_config=TransformerConfig())


@pytest.mark.parametrize("overrides, expected", [
    (dict(vocab_size=256384), r"vocabulary 256384 \(T5-XXL v1.1: 32128\): that is UMT5"),
    (dict(vocab_size=250112), r"that is mT5"),
    (dict(d_model=2048, d_ff=5120, num_heads=32), r"T5 with hidden size 2048, that is T5-XL; this transformer reads "
                                                   r"4096-wide"),
    (dict(feed_forward_proj="relu", d_ff=65536), r"feed_forward 65536 \(T5-XXL v1.1: 10240\), activation relu"),
    (dict(num_layers=12), r"layers 12 \(T5-XXL v1.1: 24\)"),
])
def test_t5_layouts_flux_was_not_trained_with_are_refused(overrides, expected):
    with pytest.raises(CheckpointError, match=expected + r".*Use T5-XXL v1.1: t5xxl_fp16.safetensors"):
        text_encoders.check_t5_fits(t5_xxl_config(**overrides), TransformerConfig(), "t5.safetensors")


def test_flux_sizes_accept_t5_xxl_and_clip_l_of_any_context_length():
    flux = TransformerConfig()
    text_encoders.check_t5_fits(t5_xxl_config(), flux)
    text_encoders.check_clip_fits(clip_l_config(), flux)
    text_encoders.check_clip_fits(clip_l_config(max_position_embeddings=248), flux)  # LongCLIP-L
    with pytest.raises(CheckpointError, match=r"the CLIP text encoder: a CLIP with layers 6 \(CLIP-L: 12\)"):
        text_encoders.check_clip_fits(clip_l_config(num_hidden_layers=6), flux)


def test_a_pipeline_refuses_encoders_its_transformer_cannot_read(files, tiny_transformer, tiny_autoencoder):
    from conftest import FakeEncoders
    from kontext_core.pipeline import KontextPipeline

    encoders = tiny_encoders(files)  # T5 32 wide, CLIP 64 wide; the tiny transformer reads 48 and 32
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16.safetensors: T5 with hidden size 32"):
        KontextPipeline(tiny_transformer, tiny_autoencoder, encoders)
    KontextPipeline(tiny_transformer, tiny_autoencoder, FakeEncoders(48, 32))  # stand-ins have no configs


def test_without_a_tokenizer_anywhere_the_bundled_copies_are_used(files, monkeypatch):
    # Nothing beside the weights, nothing in the Hugging Face cache under these names: kontext_core's own copies.
    monkeypatch.setattr(text_encoders, "T5_TOKENIZER_REPO", "kontext-tests/no-such-tokenizer")
    monkeypatch.setattr(text_encoders, "CLIP_TOKENIZER_REPO", "kontext-tests/no-such-tokenizer")
    t5 = load_t5_tokenizer(weights_path=files["root"] / "t5xxl_fp16.safetensors")
    clip = load_clip_tokenizer(weights_path=files["root"] / "clip_l.safetensors")
    assert (len(t5), t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (32100, 0, 1, 2)
    assert (len(clip), clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (49408, 49406, 49407, 49407)
    # Ids published for these sentences: transformers' T5 documentation, and CLIP's widely quoted prompt.
    assert t5("The <extra_id_0> walks in <extra_id_1> park").input_ids == [37, 32099, 10681, 16, 32098, 2447, 1]
    assert t5("The house is wonderful.").input_ids == [37, 629, 19, 1627, 5, 1]
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bundled_tokenizers_equal_the_transformers_classes_built_from_their_vocabularies(tmp_path):
    """The configs shipped beside the vocabularies change nothing: T5TokenizerFast on tokenizer.json alone and
    CLIPTokenizer on vocab.json + merges.txt alone give the same ids, padded and truncated as FLUX does."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    bundled = text_encoders.BUNDLED_TOKENIZERS
    t5, clip = load_t5_tokenizer(bundled / "t5"), load_clip_tokenizer(bundled / "clip_l")
    t5_alone = T5TokenizerFast(tokenizer_file=str(bundled / "t5" / "tokenizer.json"))
    vocabulary = tmp_path / "clip_vocabulary"
    vocabulary.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (vocabulary / name).write_bytes((bundled / "clip_l" / name).read_bytes())
    clip_alone = CLIPTokenizer.from_pretrained(str(vocabulary))
    prompts = PROMPTS + ["Make the sky  stormy, keep the café's sign; 3 cats & a dog!", "x " * 600]
    for ours, alone, length in ((t5, t5_alone, 512), (clip, clip_alone, 77)):
        encode = dict(padding="max_length", max_length=length, truncation=True)
        assert ours(prompts, **encode).input_ids == alone(prompts, **encode).input_ids


def test_bundled_copies_are_package_data_with_their_licenses():
    bundled = text_encoders.BUNDLED_TOKENIZERS
    for folder, vocabulary, license_text in (("t5", "tokenizer.json", "Apache License"),
                                             ("clip_l", "vocab.json", "MIT License")):
        assert (bundled / folder / vocabulary).stat().st_size < 4_000_000
        assert license_text in (bundled / folder / "LICENSE").read_text()
        assert "Origin:" in (bundled / folder / "NOTICE").read_text()


def test_tokenizer_order_explicit_then_beside_the_weights_then_cache_then_bundled(files, monkeypatch):
    cached = object()
    monkeypatch.setattr(text_encoders, "_from_hub", lambda repo, allow_download: cached)
    assert load_t5_tokenizer(weights_path=files["root"] / "t5xxl_fp16.safetensors") is cached
    beside = load_t5_tokenizer(weights_path=files["diffusers"])  # tokenizer_2/ of the diffusers folder
    assert beside is not cached and len(beside) == 3 + len(WORDS)
    assert len(load_t5_tokenizer(files["t5_tok"], weights_path=files["diffusers"])) == 3 + len(WORDS)


def test_tokenizer_named_by_an_uncached_repo_says_how_to_fetch_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"the T5 tokenizer kontext-tests/no-such-tokenizer is neither a folder "
                                              r"nor a repo found in the Hugging Face cache .*`allow_download=True`.*"
                                              r"leave `t5_tokenizer` unset"):
        load_t5_tokenizer("kontext-tests/no-such-tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no CLIP tokenizer in .*empty: expected tokenizer.json"):
        load_clip_tokenizer(tmp_path / "empty")


def test_tokenizer_of_another_model_is_refused(files):
    t5 = load_t5_encoder(files["root"] / "t5xxl_fp16.safetensors", dtype="fp32")
    clip = load_clip_encoder(files["root"] / "clip_l.safetensors", dtype="fp32")
    clip_tokenizer = load_clip_tokenizer(files["clip_tok"])
    with pytest.raises(CheckpointError, match=r"T5 tokenizer has 60 tokens but the T5 model only 40.*`t5_tokenizer`"):
        TextEncoders(t5, clip, clip_tokenizer, clip_tokenizer)
    # The bundled T5 v1.1 tokenizer with a model of 40 tokens: the pairing is named, not an index error later.
    with pytest.raises(CheckpointError, match=r"T5 tokenizer has 32100 tokens but the T5 model only 40; they belong "
                                              r"to different models"):
        TextEncoders(t5, clip, load_t5_tokenizer(text_encoders.BUNDLED_TOKENIZERS / "t5"), clip_tokenizer)


def test_spiece_model_folder(tmp_path):
    """A folder holding only spiece.model, as google/t5-v1_1-xxl ships it (reading it needs protobuf)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(PROMPTS) + "\n" * 2 + "\n".join(WORDS) * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=30, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = tmp_path / "t5_tokenizer"
    folder.mkdir()
    (tmp_path / "spiece.model").rename(folder / "spiece.model")
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match=r"spiece.model needs the protobuf package"):
            load_t5_tokenizer(folder)
        return
    tokenizer = load_t5_tokenizer(folder)
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(ids) == 16 and 1 in ids and ids[-1] == 0
