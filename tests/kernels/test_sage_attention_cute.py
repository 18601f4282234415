"""sage8's attention kernel in CuTe DSL (kontext_kernels/sage_attention_cute.py).

Without a GPU the kernel is compiled for sm_90a (CuTe DSL compiles without one) and its SASS checked for what its
schedule is for: block j-1's P·V in flight during block j's softmax (a wgmma wait that leaves one group running),
each MMA's k steps kept in one wgmma group (not serialised), no spills. On a Hopper GPU it is checked, on fresh
random q, k, v, against `sage_attention.attend_reference` at awkward sizes (query and key counts that are not whole
128-token tiles, batch 2, 3 heads), with the Gluon kernel's tolerances (test_sage_attention_hopper.py), every
build of it (cute_runtime.VARIANTS). Skipped where `nvidia-cutlass-dsl` is not installed (the `hopper` extra) and no
build is exported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from attention_cases import (
    FP8_BOUND,
    GPU_KERNEL_VS_REFERENCE,
    attention_inputs,
    exact_attention,
)
from conftest import rel_error, rel_l2, spills, wgmmas_pipelined

from kontext_kernels import cute_runtime
from kontext_kernels import sage_attention as sa

try:
    import cutlass  # noqa: F401
    has_cute_dsl = True
except Exception:  # noqa: BLE001 - the DSL's import loads a large native library
    has_cute_dsl = False

needs_cute_dsl = pytest.mark.skipif(not has_cute_dsl, reason="nvidia-cutlass-dsl is not installed")
# On a GPU the kernel may also come exported ahead of time (cute_runtime.MODULE_VARIABLE), the DSL not installed.
hopper_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
                                     and cute_runtime.available()), reason="needs a Hopper GPU and the kernel")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """SASS of the kernel built for sm_90a with Sage8Hopper's switches, each in a fresh process (the DSL reads its
    dump settings at import)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    built = {}

    def sass_of_variant(**variant) -> str:
        key = tuple(sorted(variant.items()))
        if key not in built:
            dump = tmp_path_factory.mktemp("cute_dump")
            env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="cubin", CUTE_DSL_DUMP_DIR=str(dump))
            code = f"from kontext_kernels import sage_attention_cute as k; k.compiled(128, **{variant!r})"
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True,
                           text=True)
            cubins = list(dump.rglob("*.cubin"))
            assert len(cubins) == 1, cubins
            built[key] = subprocess.run([str(cuobjdump), "-sass", str(cubins[0])], capture_output=True, text=True,
                                        check=True).stdout
        return built[key]

    return sass_of_variant


@needs_cute_dsl
@pytest.mark.parametrize("row_sums_in_pv", [False, True], ids=["softmax_row_sums", "row_sums_in_pv"])
def test_builds_with_pv_in_flight_during_the_softmax(build, row_sums_in_pv):
    sass = build(row_sums_in_pv=row_sums_in_pv)
    # Q·Kᵀ: four 64x128x32 int8 wgmmas (128 channels) for block 0 and in the loop; P·V: four e4m3 ones (128 keys) in
    # the loop and after it, 128 channels wide, or 136 with the ones' 8 columns.
    columns = 136 if row_sums_in_pv else 128
    assert len(re.findall(r"IGMMA\.64x128x32\.S8\.S8", sass)) == 2 * 4
    assert len(re.findall(rf"QGMMA\.64x{columns}x32\.F32\.E4M3\.E4M3", sass)) == 2 * 4
    # The loop waits for the scores with P·V's group still running, then for P·V after the softmax.
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    assert wgmmas_pipelined(sass), "ptxas serialised the wgmmas"
    # P reaches P·V's register operand without moving between threads (the keys' order).
    assert "SHFL.IDX" not in sass
    assert "UTMALDG" in sass and "USETMAXREG" in sass
    loop = _key_block_loop(sass)
    assert not spills(loop), "registers spill in the key-block loop"
    # The softmax adds up P (64 a row pair a block, in both the whole and the masked block's paths), unless the
    # tensor cores do.
    additions = len(re.findall(r"\bFADD\b", loop))
    assert additions < 32 if row_sums_in_pv else additions >= 2 * 64, additions


@needs_cute_dsl
def test_the_runtime_knows_the_default_builds_row_sums():
    # cute_runtime restates ROW_SUMS_IN_PV (it must not import the DSL); sage_attention.last_config reports it.
    from kontext_kernels import sage_attention_cute

    assert cute_runtime.ROUNDED_ROW_SUMS == sage_attention_cute.ROW_SUMS_IN_PV
    assert cute_runtime.VARIANTS["softmax_row_sums"] == {"row_sums_in_pv": not sage_attention_cute.ROW_SUMS_IN_PV}


def _key_block_loop(sass: str) -> str:
    """The SASS of the consumers' loop over key blocks: from the target of the backward branch that closes it to
    that branch, the loop being the one that holds the wait leaving P·V in flight. (ptxas may spill a value or
    two outside it, set once and read in the epilogue; it depends on its version.)"""
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines()
             if (m := re.search(r"/\*([0-9a-f]{4,})\*/", line))]
    overlap = next(address for address, line in lines if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line)
    for address, line in lines:
        branch = re.search(r"\bBRA (0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) <= overlap <= address:
            start = int(branch.group(1), 16)
            return "\n".join(text for at, text in lines if start <= at <= address)
    raise AssertionError("no loop around the overlapped wait")


SHAPES = [  # (batch, heads, length_q, length_k)
    (2, 3, 150, 300),   # two whole key blocks and a masked one; a partial query tile
    (1, 2, 200, 77),    # one key block, partial
    (2, 2, 256, 384),   # whole tiles only: the folded scores everywhere
    (1, 3, 129, 1100),  # nine key blocks, more than the ring's stages
    (1, 1, 130, 8700),  # the edit's key length: sums over 68 blocks (an accumulation that drifts shows here)
]
# Value by value the kernel is held to the reference up to here; the Gluon kernel's tolerance was set on shorter
# key lengths (its row sums and the reference's differ in their order).
LONGEST_COMPARED_VALUE_BY_VALUE = 1100


@hopper_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("build_name", list(cute_runtime.VARIANTS))
def test_matches_the_reference(shape, build_name):
    # Each build of the kernel (cute_runtime.VARIANTS), exported beside the default one or compiled here.
    kernel = cute_runtime.variant_kernel(build_name)
    if kernel is None:
        pytest.skip(f"{build_name}: neither exported beside {cute_runtime.MODULE_VARIABLE} nor compilable here")
    row_sums_in_pv = cute_runtime.VARIANTS[build_name].get("row_sums_in_pv", cute_runtime.ROUNDED_ROW_SUMS)
    batch, heads, length_q, length_k = shape
    q, k, v = attention_inputs(batch, heads, length_q, length_k, 128, "cuda")
    operands = sa.quantize_operands(q, k, v, fp8_pv=True, permute_keys=True)
    out = torch.empty((batch, length_q, heads, 128), dtype=torch.bfloat16, device="cuda")
    cute_runtime.launch(operands, out, kernel)
    # P's row sums from the tensor cores sum P as P·V multiplies it (e4m3): the reference's rounded_row_sums.
    reference = sa.attend_reference(operands, torch.float32, block_n=128, rounded_row_sums=row_sums_in_pv)
    ours, exact = out.transpose(1, 2), exact_attention(q, k, v)
    if length_k <= LONGEST_COMPARED_VALUE_BY_VALUE:
        assert rel_error(ours.float(), reference) <= GPU_KERNEL_VS_REFERENCE + 2**-8
    # As accurate as the reference, within 10%: a sum that drifts over many key blocks fails this at the edit's length
    # (P·V added into the running output did, 8.6% against 3.8% at 8667 keys; bench/RESULTS.md, 2026-12-07).
    assert rel_l2(ours.double(), exact) <= 1.1 * rel_l2(reference.double(), exact)
    assert rel_l2(ours.double(), exact) <= FP8_BOUND


@hopper_gpu
def test_sage_attention_dispatches_to_it_when_chosen(monkeypatch):
    from kontext_kernels.runtime import launches

    monkeypatch.setattr(sa, "HOPPER_KERNEL", "cute")
    q, k, v = attention_inputs(1, 2, 300, 300, 128, "cuda")
    before = launches["sage_attention_cute"]
    out = sa.sage_attention(q, k, v)
    assert launches["sage_attention_cute"] == before + 1 and sa.last_config["kernel"] == "cute"
    assert rel_l2(out.double(), exact_attention(q, k, v)) <= FP8_BOUND
    # Head dim 96 (padded to 128): the kernel would write whole 128-channel rows; the Gluon kernel takes it.
    q, k, v = attention_inputs(1, 2, 300, 300, 96, "cuda")
    out = sa.sage_attention(q, k, v)
    assert launches["sage_attention_cute"] == before + 1 and sa.last_config["kernel"] == "gluon"
    assert rel_l2(out.double(), exact_attention(q, k, v)) <= FP8_BOUND



def test_a_wrong_kernel_choice_or_module_path_names_the_fix(tmp_path):
    env = dict(os.environ, KONTEXT_SAGE_HOPPER_KERNEL="cutlass")
    chosen = subprocess.run([sys.executable, "-c", "import kontext_kernels.sage_attention"], cwd=ROOT, env=env,
                            check=False, capture_output=True, text=True)
    assert chosen.returncode != 0 and "choose one of gluon, cute, triton" in chosen.stderr
    with pytest.raises(FileNotFoundError, match="sage_attention_cute.export"):
        cute_runtime.load_module(str(tmp_path / "sage8.so"))
    with pytest.raises(ValueError, match="not one of sage8's CuTe DSL builds: sage8, softmax_row_sums"):
        cute_runtime.variant_kernel("pv_in_output")
    q, k, v = attention_inputs(1, 1, 20, 20, 128, "cpu")
    with pytest.raises(ValueError, match="permute_keys=True"):
        cute_runtime.launch(sa.quantize_operands_reference(q, k, v), torch.empty(1, 20, 1, 128))


def test_launching_where_no_build_can_be_had_names_the_install(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cute_runtime, "variant_kernel", lambda name=cute_runtime.DEFAULT_BUILD: None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[hopper\]'"):
        cute_runtime.launch(SimpleNamespace(keys_permuted=True), torch.empty(1, 20, 1, 128))


def test_choosing_it_where_it_cannot_be_had_warns_and_leaves_it(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cute_runtime, "available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cute_runtime._warn_unavailable.cache_clear()
    q8 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), shape=(1, 2, 128, 128))
    operands = SimpleNamespace(keys_permuted=True, head_dim=128, q8=q8)
    # Shapes it does not take are no reason to warn: the Gluon kernel is the one meant for them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cute_runtime.takes(SimpleNamespace(keys_permuted=True, head_dim=96, q8=q8), torch.bfloat16)
        assert not cute_runtime.takes(operands, torch.float32)
    with pytest.warns(UserWarning, match=r"pip install -e '\.\[hopper\]'"):
        assert not cute_runtime.takes(operands, torch.bfloat16)
