"""Shared fixtures: tiny random models (also as a ComfyUI models folder), the golden vectors, relative-error helper."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch._functorch.config
from PIL import Image

from kontext_core import save_autoencoder, save_transformer
from kontext_core.model.autoencoder import Autoencoder
from kontext_core.model.config import AutoencoderConfig, TransformerConfig
from kontext_core.model.transformer import KontextTransformer

# A custom op whose outputs alias its inputs or each other is an error here, as it is where CI=1 is set, not the
# warning it is elsewhere: the compiled tests then fail on every machine, not only on CI's.
if hasattr(torch._functorch.config, "error_on_custom_op_aliasing"):  # a recent setting; older torch does not check
    torch._functorch.config.error_on_custom_op_aliasing = True

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("KONTEXT_GOLDEN_DIR", REPO.parent / "shared" / "reference" / "golden"))
REFERENCE = GOLDEN.parent


# Modules whose @triton.jit decorators read TRITON_INTERPRET when they run, i.e. at import; helpers first.
KERNEL_MODULES = tuple(f"kontext_kernels.{name}" for name in (
    "e4m3", "tiles", "modulation", "qk_norm_rope", "ffn", "fp8_qkv", "row_quant", "int8_gemm", "sage_attention",
    "sage_qkv"))


def reload_kernel_modules() -> None:
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))


def _import_inductor_helpers() -> None:
    """Import inductor's @triton.jit helpers while TRITON_INTERPRET is unset: imported first inside an
    interpreter block, they would stay interpreter functions for the process, and a later GPU test's
    inductor kernels, which call them, would fail to compile."""
    from kontext_kernels.runtime import triton_available

    if triton_available():
        importlib.import_module("torch._inductor.runtime.triton_helpers")


@contextlib.contextmanager
def kernels_built_for(mode: str):
    """The kernel modules rebuilt for Triton's CPU interpreter ("interpreter") or the GPU ("cuda"),
    switched on; put back as they were afterwards."""
    import kontext_kernels

    if mode == "interpreter":
        _import_inductor_helpers()
    was_enabled = kontext_kernels.runtime._enabled
    with pytest.MonkeyPatch.context() as patch:
        if mode == "interpreter":
            patch.setenv("TRITON_INTERPRET", "1")
        else:
            patch.delenv("TRITON_INTERPRET", raising=False)
        patch.delenv("KONTEXT_KERNELS", raising=False)
        reload_kernel_modules()
        kontext_kernels.set_enabled(True)
        try:
            yield
        finally:
            patch.undo()
            reload_kernel_modules()
            kontext_kernels.set_enabled(was_enabled)


NO_TRITON = "triton is not installed (pip install triton==3.6.0); the kernels fall back to their references"


@contextlib.contextmanager
def kernel_device(mode: str):
    """For a fixture parametrised over "interpreter" and "cuda": the device the kernels run on ("cpu" under
    Triton's interpreter), with the kernel modules built for it; skips where Triton or a CUDA GPU is missing."""
    from kontext_kernels.runtime import triton_available

    if not triton_available():
        pytest.skip(NO_TRITON)
    if mode == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with kernels_built_for(mode):
        yield "cpu" if mode == "interpreter" else "cuda"


def velocity_apart_and_paired(model, args: tuple, compiled: bool,
                              device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The 8-bit model's velocity with a row-quantizer launch per stream, then with both double-block streams' rows
    in one launch (fused.set_paired_row_quantizers), eager or in compiled blocks; and the paired launches made."""
    from kontext_core.compute import fused
    from kontext_kernels.runtime import launches

    pairing_default = fused._paired_row_formats
    torch._dynamo.reset()
    try:
        if compiled:
            model.compile_blocks(backend="aot_eager" if device == "cpu" else "inductor")
        with torch.no_grad():
            fused.set_paired_row_quantizers(False)
            before = launches["row_quantizer_pair"]
            apart = model.velocity(*args)
            assert launches["row_quantizer_pair"] == before, "a paired launch while pairing was off"
            fused.set_paired_row_quantizers(True)
            paired = model.velocity(*args)
    finally:
        fused._paired_row_formats = pairing_default
        torch._dynamo.reset()
    return apart, paired, launches["row_quantizer_pair"] - before


@contextlib.contextmanager
def eight_bit_kernels(mode: str):
    """`kernels_built_for(mode)` with fp8 GEMMs on, through PyTorch's CPU `_scaled_mm` under the interpreter;
    yields the device the tests run on."""
    from kontext_core.compute import quant

    with kernels_built_for(mode):
        quant.set_fp8_matmul(True, on_cpu=mode == "interpreter")
        try:
            yield "cpu" if mode == "interpreter" else "cuda"
        finally:
            quant.set_fp8_matmul(True)


def check_compiled_blocks(model, quantized, device: str, kernel: str, expected_launches: int) -> None:
    """`quantized`'s blocks compiled ("aot_eager" on the CPU: traced as the compiler does, no code generated)
    compute what its eager blocks do, the opaque `kernel` op launched `expected_launches` times inside them.
    The compiler's own fusions round differently from eager bf16, which moves some 8-bit roundings: compiled
    and eager are each measured against the float32 `model`."""
    torch._dynamo.reset()
    args = tiny_edit_args(1, torch.bfloat16, device)
    graphs = compiled_graphs()
    try:
        with torch.no_grad():
            exact = model.velocity(*as_float32(args))
            eager = quantized.velocity(*args)
            quantized.compile_blocks(backend="aot_eager" if device == "cpu" else "inductor")
            before = launches_of(kernel)
            compiled = quantized.velocity(*args)
        assert compiled_graphs() - graphs == 2  # the blocks really ran compiled, the kernel inside
        assert launches_of(kernel) - before == expected_launches
    finally:
        torch._dynamo.reset()
    eager_error = rel_l2(eager, exact)
    assert rel_l2(compiled, exact) <= 1.15 * eager_error
    assert rel_l2(compiled, eager) <= eager_error


def launches_of(kernel: str) -> int:
    from kontext_kernels.runtime import launches

    return launches[kernel]


def tiny_quantized_pair(device: str, dtype: torch.dtype = torch.float8_e4m3fn):
    """(float32 model, its copy with 8-bit `dtype` block weights computing in bf16): one block of each kind keeps
    the interpreter quick."""
    import copy

    from kontext_core.compute import quant

    config = TransformerConfig.tiny(depth=1, depth_single_blocks=1)
    model = randomize_(KontextTransformer(config), seed=11).to(device).eval()
    return model, quant.quantize_model(copy.deepcopy(model).to(torch.bfloat16), dtype)


@contextlib.contextmanager
def kernels_off():
    """The PyTorch references instead of the kernels, for the block; the switch restored even on failure."""
    import kontext_kernels

    was_enabled = kontext_kernels.runtime._enabled
    kontext_kernels.set_enabled(False)
    try:
        yield
    finally:
        kontext_kernels.set_enabled(was_enabled)


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process: a test compares it before and after, to
    tell that compilation really happened (and how many graphs it took)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def fp8_tensor_cores() -> bool:
    """A CUDA GPU with fp8 tensor cores (Ada, Hopper or newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def fresh_generator() -> torch.Generator:
    """A CPU generator on a fresh random seed: new inputs every run, reproducible from the seed."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def random_linear(in_features: int, out_features: int, dtype: torch.dtype, device: str,
                  generator: torch.Generator, bias_scale: float = 1.0) -> torch.nn.Linear:
    """nn.Linear with weights ~ N(0, 1/in_features) and biases ~ N(0, bias_scale^2)."""
    layer = torch.nn.Linear(in_features, out_features).to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
        layer.bias.copy_(torch.randn(out_features, generator=generator) * bias_scale)
    return layer


def random_block_lora(model: torch.nn.Module, seed: int, rank: int = 8, scale: float = 0.5):
    """`random_block_lora_file`'s tensors as a LoraWeights."""
    from kontext_core.adapters.lora import lora_from_state_dict

    return lora_from_state_dict(random_block_lora_file(model, seed, rank, scale), name=f"random rank-{rank}")


def random_block_lora_file(model: torch.nn.Module, seed: int, rank: int = 8, scale: float = 0.5
                           ) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors in BFL's key layout on every linear of the blocks (nn.Linear or QuantizedLinear), its
    delta ~`scale` times a unit-variance layer's weight."""
    from kontext_core.compute.quant import QuantizedLinear

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if (isinstance(module, (torch.nn.Linear, QuantizedLinear))
                and name.startswith(("double_blocks.", "single_blocks."))):
            tensors[f"diffusion_model.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5)
            tensors[f"diffusion_model.{name}.lora_B.weight"] = (
                scale * torch.randn(module.out_features, rank, generator=generator) / rank**0.5)
    return tensors


def sass_of(kernel) -> str:
    """The SASS of a compiled Triton / Gluon kernel (`triton.compile`'s result), by the cuobjdump Triton ships."""
    import subprocess
    import tempfile

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(kernel.asm["cubin"])
    try:
        return subprocess.run([str(tools / "cuobjdump"), "-sass", file.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(file.name)


def spills(sass: str) -> bool:
    """Whether a kernel's SASS touches local memory (LDL / STL): registers spilled to the stack."""
    return re.search(r"\b(LDL|STL)\b", sass) is not None


def wgmmas_pipelined(sass: str) -> bool:
    """Whether ptxas kept each MMA's k steps in one group: only the group's last wgmma carries the scoreboard
    (`gsb0`). Where ptxas serialises the kernel's wgmmas (its C7512 / C7514 notes) every wgmma carries it, each
    waited on before the next."""
    wgmmas = re.findall(r"\b[IQH]GMMA\.[^;]*;", sass)
    return sum("gsb0" in line for line in wgmmas) < len(wgmmas) / 2


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours - reference| / max|reference|, the golden README's measure."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def reordering_tolerance(reference: torch.Tensor, terms: int, chained: int = 1) -> dict[str, float]:
    """allclose's rtol and atol for two results that differ only in the order of their floating-point sums.

    BLAS blocking and thread count choose that order, so a 16-core machine sums attention in other pieces
    than a 2-core one. A sum of n terms rounded in another order moves by at most lambda * sqrt(n) * u times
    its terms' magnitude, except with probability below 2 exp(-lambda^2 / 2) (Higham & Mary, "A new approach
    to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019); lambda = 8 puts that under 1e-13.
    `terms` is the longest sum on the way, `chained` how many such sums follow one another (layers); the
    magnitude is the reference's largest value, and rtol leaves each value its own final rounding.
    """
    unit_roundoff = torch.finfo(reference.dtype).eps / 2
    magnitude = reference.abs().max().item()
    return dict(rtol=4 * unit_roundoff, atol=chained * 8 * math.sqrt(terms) * unit_roundoff * magnitude)


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||, in float64."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def as_float32(args: tuple) -> tuple:
    """`velocity` arguments with every floating-point tensor in float32 (for a float32 reference model)."""
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def tiny_edit_args(batch: int, dtype: torch.dtype, device: str) -> tuple:
    """Fresh random `velocity` arguments for TransformerConfig.tiny(): a 20x12 target, a 6x10 context and
    7 text tokens (sizes no tile divides)."""
    from kontext_core import context_tokens, pack_latent, position_ids

    generator = fresh_generator()

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    img, ids = pack_latent(randn(batch, 16, 20, 12)), position_ids(20, 12, batch=batch, device=device)
    ctx, ctx_ids = context_tokens([randn(batch, 16, 6, 10)], (20, 12), "kontext")
    return (img, ids, randn(batch, 7, 48), torch.zeros(batch, 7, 3, device=device), torch.rand(batch, device=device),
            randn(batch, 32), torch.full((batch,), 2.5, device=device), ctx, ctx_ids)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norms and biases, matrices at a scale that keeps activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim == 1 and ("scale" in name or "norm" in name) and name.endswith(("scale", "weight")):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.05 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)
    return model


class FakeEncoders:
    """Deterministic embeddings per prompt, so tests need no T5/CLIP; counts calls."""

    def __init__(self, txt_dim: int, pooled_dim: int):
        self.txt_dim, self.pooled_dim, self.calls = txt_dim, pooled_dim, 0

    def encode(self, prompts):
        self.calls += 1
        txt, pooled = [], []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(sum(map(ord, prompt)) + 7)
            txt.append(torch.randn(1, 6, self.txt_dim, generator=generator))
            pooled.append(torch.randn(1, self.pooled_dim, generator=generator))
        return torch.cat(txt), torch.cat(pooled)


@pytest.fixture
def tiny_transformer() -> KontextTransformer:
    return randomize_(KontextTransformer(TransformerConfig.tiny()), seed=1).eval()


@pytest.fixture
def tiny_autoencoder() -> Autoencoder:
    return randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=2).eval()


@pytest.fixture
def pipeline(tiny_transformer, tiny_autoencoder):
    """The tiny models as a KontextPipeline, with FakeEncoders for the text encoders."""
    from kontext_core.pipeline import KontextPipeline

    config = tiny_transformer.config
    return KontextPipeline(tiny_transformer, tiny_autoencoder, FakeEncoders(config.context_in_dim, config.vec_in_dim))


def write_models_folder(folder: Path, transformer: KontextTransformer, autoencoder: Autoencoder, *,
                        real_vocabularies: bool, layout: str = "comfy") -> None:
    """The models in a ComfyUI models/ folder under the real file names and key layouts: the transformer (in
    `layout`) in diffusion_models/, the AE in vae/, tiny T5 and CLIP (`tiny_encoders.tiny_text_encoder_files`) in
    text_encoders/."""
    from tiny_encoders import tiny_text_encoder_files  # here: tiny_encoders imports conftest

    save_transformer(transformer, folder / "diffusion_models" / "flux1-kontext-dev.safetensors", layout=layout)
    save_autoencoder(autoencoder, folder / "vae" / "ae.safetensors")
    tiny_text_encoder_files(folder / "text_encoders", transformer.config, real_vocabularies)


@pytest.fixture
def models_tree(tiny_transformer, tiny_autoencoder, tmp_path):
    """The tiny models in a ComfyUI models/ folder under the real file names, tokenizers beside it and a photo:
    (tmp_path, the photo, the CLI options that point at them) for `kontext edit`, `t2i` and `eval` runs."""
    from tiny_encoders import clip_tokenizer_dir, t5_tokenizer_dir  # here: tiny_encoders imports conftest

    write_models_folder(tmp_path / "ComfyUI" / "models", tiny_transformer, tiny_autoencoder, real_vocabularies=False)
    tokenizers = ["--t5-tokenizer", str(t5_tokenizer_dir(tmp_path / "t5tok")),
                  "--clip-tokenizer", str(clip_tokenizer_dir(tmp_path / "cliptok"))]
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 24), (200, 30, 90)).save(image)
    common = ["--models", str(tmp_path / "ComfyUI"), *tokenizers, "--steps", "2", "--dtype", "fp32", "--device", "cpu"]
    return tmp_path, image, common


def golden_dir() -> Path:
    if not (GOLDEN / "meta.json").exists():
        pytest.skip(f"golden vectors not found at {GOLDEN} (set KONTEXT_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((golden_dir() / "meta.json").read_text())


# The live ComfyUI server (skips without one), one per session for every live test module; a pair of them for
# batches over several servers.
from comfyui_server import comfyui, comfyui_pair  # noqa: E402,F401

# ComfyUI's side of the nodes, faked (`comfy`), and the tiny models loaded by the loader nodes (`models`): the
# node tests without ComfyUI share them.
from fake_comfy_adapter import comfy, models  # noqa: E402,F401
