"""Tiny random T5 and CLIP text encoders, their files in the layouts users have, and tokenizers for them:
stand-ins for t5xxl_fp16 / clip_l wherever a test needs text encoders that load and run in a moment."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from conftest import randomize_
from kontext_core.model.config import TransformerConfig

T5_TINY = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
CLIP_TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
WORDS = "a photo of cat dog the red blue sky make it into painting turn city over green hat on".split()


def tiny_t5(seed: int = 3, **overrides) -> T5EncoderModel:
    return randomize_(T5EncoderModel(T5Config(**{**T5_TINY, **overrides})), seed).eval()


def tiny_clip(seed: int = 4, **overrides) -> CLIPTextModel:
    return randomize_(CLIPTextModel(CLIPTextConfig(**{**CLIP_TINY, **overrides})), seed).eval()


def t5_tensors(model: T5EncoderModel, prefix: str = "", embed_tokens: bool = True) -> dict[str, torch.Tensor]:
    """The HF key layout of t5xxl_fp16.safetensors (tied embeddings written twice, as the release does)."""
    tensors = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    if not embed_tokens:
        del tensors[prefix + "encoder.embed_tokens.weight"]
    return tensors


def clip_tensors(model: CLIPTextModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """clip_l.safetensors: `text_model.` names, plus the tensors such files carry that the text model has not."""
    tensors = {f"{prefix}text_model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    hidden = model.config.hidden_size
    tensors[f"{prefix}text_projection.weight"] = torch.randn(hidden, hidden)
    tensors[f"{prefix}logit_scale"] = torch.tensor(4.6)
    tensors[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return tensors


def t5_tokenizer_dir(folder):
    """A T5-like tokenizer: pad 0, </s> 1 appended to every sequence, unk 2."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def clip_tokenizer_dir(folder):
    """A CLIP BPE tokenizer in the diffusers `tokenizer/` files (vocab.json, merges.txt); end-of-text is the
    highest id, as in CLIP, since the pooled output is taken at the highest id."""
    letters = list(string.ascii_lowercase)
    merges = ["c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>"]
    vocab = letters + [c + "</w>" for c in letters] + ["ca", "cat</w>", "ph", "pho", "phot", "photo</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_text_encoder_files(folder: Path, config: TransformerConfig, real_vocabularies: bool = True) -> None:
    """t5xxl_fp16 / clip_l stand-ins in `folder`, in the released files' key layouts, as wide as `config` needs.
    `real_vocabularies`: the vocabularies of the tokenizers kontext_core ships (what the README command runs);
    else the tiny ones of `t5_tokenizer_dir` / `clip_tokenizer_dir`."""
    t5_options = dict(d_model=config.context_in_dim)
    clip_options = dict(hidden_size=config.vec_in_dim)
    if real_vocabularies:  # one layer each: a 32k / 49k-token embedding is most of these files
        t5_options.update(vocab_size=32128, num_layers=1, num_heads=config.context_in_dim // 8)
        clip_options.update(vocab_size=49408, intermediate_size=64, num_hidden_layers=1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t5_tensors(tiny_t5(**t5_options)), folder / "t5xxl_fp16.safetensors")
    save_file(clip_tensors(tiny_clip(**clip_options)), folder / "clip_l.safetensors")
