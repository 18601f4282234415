"""sage8's warp-specialised attention kernel for Hopper (kontext_kernels/sage_attention_hopper.py).

Gluon kernels do not run under Triton's interpreter: without a GPU the kernel is compiled for sm_90 and its SASS
checked for what the schedule needs. On a Hopper GPU it is checked, on fresh random q, k, v, against
`sage_attention.attend_reference` (the same arithmetic in PyTorch, 128-key blocks) at awkward sizes: query and
key counts that are not whole 128-token tiles (a masked last key block, a single partial one), batch 2, 3 heads,
head dims 64, 128 and 96 (padded to 128); and against exact attention (float64).

Tolerances, as tests/kernels/test_sage_attention.py states them: the kernel against the reference max|diff| / max|ref|
<= 1e-2 (the GPU's exp2 approximation moves a few values of P across an e4m3 rounding, by an e4m3 step each),
against exact attention rel L2 <= 5% (e4m3 P·V: ~3.7% measured on such inputs).
"""

from __future__ import annotations

import re

import pytest
import torch

from attention_cases import FP8_BOUND, GPU_KERNEL_VS_REFERENCE, attention_inputs, exact_attention
from conftest import rel_error, rel_l2, sass_of, spills, wgmmas_pipelined
from kontext_kernels import sage_attention as sa
from kontext_kernels import sage_attention_hopper as hopper_kernel
from kontext_kernels.runtime import launches

needs_gluon = pytest.mark.skipif(not hopper_kernel.gluon_available(),
                                 reason="this Triton has no Gluon with Hopper warp specialisation")
hopper_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
                                     and hopper_kernel.gluon_available()), reason="needs a Hopper GPU and Gluon")


@needs_gluon
@pytest.mark.parametrize("channels", [128, 64])
def test_builds_for_sm90_with_8bit_wgmma_tma_and_register_split(channels):
    kernel = hopper_kernel.build_offline(channels)
    sass = sass_of(kernel)
    # Each consumer: Q·Kᵀ as four 64x128x32 int8 wgmmas (128 channels: K = 128) or two (64), for block 0 and in the
    # loop; P·V as four 64x{channels}x32 e4m3 wgmmas (128 keys) in the loop and after it.
    assert len(re.findall(r"IGMMA\.64x128x32\.S8\.S8", sass)) == 2 * 2 * channels // 32
    assert len(re.findall(rf"QGMMA\.64x{channels}x32\.F32\.E4M3\.E4M3", sass)) == 2 * 2 * 4
    # P reaches P·V's register operand with no data movement (the key order, sage_attention.key_tokens): no
    # shuffles, and one byte permute per operand register (joining two packed conversions) at most.
    assert "SHFL.IDX" not in sass
    assert len(re.findall(r"\bPRMT\b", sass)) <= 2 * 2 * 16
    assert "UTMALDG" in sass and "SYNCS.PHASECHK" in sass and "USETMAXREG" in sass
    assert not spills(sass), "registers spill"
    assert kernel.metadata.shared <= 227 * 1024
    assert wgmmas_pipelined(sass)


def _fadds(sass: str) -> int:
    return len(re.findall(r"\bFADD\b", sass))


@needs_gluon
@pytest.mark.parametrize("channels", [128, 64])
def test_row_sums_on_the_tensor_cores_build_without_serialising_the_wgmmas(channels):
    plain = sass_of(hopper_kernel.build_offline(channels, row_sums_on_tensor_cores=False))
    kernel = hopper_kernel.build_offline(channels, row_sums_on_tensor_cores=True)
    sass = sass_of(kernel)
    # P times ones: four 64x8x32 e4m3 wgmmas a key block, per consumer, for block 0 and in the loop.
    assert len(re.findall(r"QGMMA\.64x8x32\.F32\.E4M3\.E4M3", sass)) == 2 * 2 * 4
    assert len(re.findall(rf"QGMMA\.64x{channels}x32\.F32\.E4M3\.E4M3", sass)) == 2 * 2 * 4
    assert wgmmas_pipelined(sass), "ptxas serialised the wgmmas"
    assert not spills(sass), "registers spill"
    # The softmax's row sums (63 additions a thread per row pair and block, whole and masked block paths, two
    # consumers) are gone: at least 200 FADDs fewer.
    assert _fadds(plain) - _fadds(sass) >= 200, (_fadds(plain), _fadds(sass))


@needs_gluon
@pytest.mark.parametrize("channels", [128, 64])
def test_pv_during_the_softmax_builds_with_p_through_shared_memory(channels):
    sass = sass_of(hopper_kernel.build_offline(channels, pv_during_softmax=True))
    # P·V reads P from a shared tile: no register-operand wgmma, and P stored with stmatrix (four a thread and block,
    # for block 0 and in the loop, two consumers).
    assert len(re.findall(rf"QGMMA\.64x{channels}x32\.F32\.E4M3\.E4M3 R\d+, gdesc", sass)) == 2 * 2 * 4
    assert len(re.findall(r"\bSTSM\.16\.M88\.4\b", sass)) == 2 * 2 * 4
    # The scores are waited on with the P·V issued after them still in flight (wgmma groups retire in order).
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    assert wgmmas_pipelined(sass), "ptxas serialised the wgmmas"
    assert not spills(sass), "registers spill"


def _longest_fadd_chain(sass: str) -> int:
    """The most FADDs in a row, each taking the one before's result, in straight-line SASS order (a register
    written by any other instruction starts again)."""
    depth, longest = {}, 0
    for line in sass.splitlines():
        match = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+(R\d+)\s*,(.*?);", line)
        if not match:
            continue
        opcode, target, sources = match.groups()
        if opcode == "FADD":
            depth[target] = 1 + max((depth.get(r, 0) for r in re.findall(r"R\d+", sources)), default=0)
            longest = max(longest, depth[target])
        else:
            depth.pop(target, None)
    return longest


@needs_gluon
def test_tree_rows_cut_the_row_sums_chain_with_as_many_additions():
    plain = sass_of(hopper_kernel.build_offline(128, tree_rows=False))
    tree = sass_of(hopper_kernel.build_offline(128, tree_rows=True))
    # A row's 32 values a thread: a chain of ~32 additions, against the tree's 4 folds, one reduction and shuffles.
    assert _longest_fadd_chain(plain) >= 30
    assert _longest_fadd_chain(tree) <= 12, _longest_fadd_chain(tree)
    assert _fadds(tree) == _fadds(plain)
    assert "SHFL.IDX" not in tree  # the folds move no data between threads
    assert wgmmas_pipelined(tree), "ptxas serialised the wgmmas"
    assert not spills(tree), "registers spill"


@needs_gluon
@pytest.mark.parametrize("pv_during_softmax", [True, False], ids=["pv_during_softmax", "in_turn"])
def test_turns_are_named_barriers_balanced_between_the_consumers(pv_during_softmax):
    sass = sass_of(hopper_kernel.build_offline(128, pv_during_softmax=pv_during_softmax, turns=True))
    first, second = hopper_kernel._TURN_BARRIERS
    waits = {i: len(re.findall(rf"BAR\.SYNC\.DEFER_BLOCKING 0x{i:x}, 0x100\b", sass)) for i in (first, second)}
    passes = {i: len(re.findall(rf"BAR\.ARV 0x{i:x}, 0x100\b", sass)) for i in (first, second)}
    if pv_during_softmax:
        # The first consumer waits on its barrier in the loop and once after it; the second passes to it once
        # before its loop and in it. The second consumer waits on its own in the loop only; the first passes to it
        # in the loop.
        expected = {first: 2, second: 1}, {first: 2, second: 1}
    else:
        # Each consumer waits before block 0's P·V and before each P·V in the loop; the second passes once before
        # block 0's P·V and after each Q·Kᵀ in the loop, the first after each Q·Kᵀ in the loop and once after
        # its last P·V.
        expected = {first: 2, second: 2}, {first: 2, second: 2}
    assert (waits, passes) == expected, (waits, passes)
    assert wgmmas_pipelined(sass) and not spills(sass)


SHAPES = [  # (batch, heads, length_q, length_k, head_dim)
    (2, 3, 150, 300, 64),     # two whole key blocks and a masked one; a partial query tile
    (1, 3, 300, 150, 128),
    (1, 2, 200, 77, 128),     # one key block, partial
    (2, 2, 256, 384, 128),    # whole tiles only: the folded scores everywhere
    (1, 3, 129, 1100, 96),    # head dim 96 padded to 128; nine key blocks, more than the ring's stages
]


@hopper_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_sums_on_tensor_cores, pv_during_softmax, turns, tree_rows",
                         [(False, False, False, True), (False, False, False, False), (True, False, False, True),
                          (False, False, True, True), (False, False, True, False), (False, True, False, True),
                          (False, True, True, True)],
                         ids=["plain", "chain_rows", "row_sums_mma", "turns", "turns_chain_rows", "pv_during_softmax",
                              "pv_during_softmax_turns"])
def test_matches_the_reference(shape, out_dtype, row_sums_on_tensor_cores, pv_during_softmax, turns, tree_rows):
    # tree_rows (the default schedule's row max and sum as trees, or Triton's chains) only reorders float32
    # additions and maxima: the same bound.
    batch, heads, length_q, length_k, head_dim = shape
    q, k, v = attention_inputs(batch, heads, length_q, length_k, head_dim, "cuda")
    operands = sa.quantize_operands(q, k, v, fp8_pv=True)
    assert hopper_kernel.ready_for(operands)
    out = torch.empty((batch, length_q, heads, head_dim), dtype=out_dtype, device="cuda")
    before = launches["sage_attention_hopper"]
    hopper_kernel.launch(operands, out, row_sums_on_tensor_cores=row_sums_on_tensor_cores,
                         pv_during_softmax=pv_during_softmax, turns=turns, tree_rows=tree_rows)
    assert launches["sage_attention_hopper"] == before + 1
    reference = sa.attend_reference(operands, torch.float32, block_n=hopper_kernel.BLOCK_N,
                                    rounded_row_sums=row_sums_on_tensor_cores)
    assert rel_error(out.transpose(1, 2).float(), reference) <= GPU_KERNEL_VS_REFERENCE + (
        0 if out_dtype == torch.float32 else 2**-8)  # bf16's one rounding of the output
    assert rel_l2(out.transpose(1, 2).double(), exact_attention(q, k, v)) <= FP8_BOUND


@hopper_gpu
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("pv_during_softmax, turns", [(False, False), (False, True), (True, False), (True, True)])
def test_ring_depths_agree(stages, pv_during_softmax, turns):
    q, k, v = attention_inputs(1, 2, 256, 1000, 128, "cuda")
    operands = sa.quantize_operands(q, k, v, fp8_pv=True)
    out = torch.empty((1, 256, 2, 128), dtype=torch.float32, device="cuda")
    hopper_kernel.launch(operands, out, stages=stages, pv_during_softmax=pv_during_softmax, turns=turns)
    reference = sa.attend_reference(operands, torch.float32, block_n=hopper_kernel.BLOCK_N)
    assert rel_error(out.transpose(1, 2), reference) <= GPU_KERNEL_VS_REFERENCE


@hopper_gpu
def test_sage_attention_dispatches_to_it_on_hopper(monkeypatch):
    q, k, v = attention_inputs(2, 3, 150, 150, 64, "cuda")
    before = launches["sage_attention_hopper"]
    out = sa.sage_attention(q, k, v)
    assert launches["sage_attention_hopper"] == before + 1 and sa.last_config["kernel"] == "gluon"
    # A pinned variant, or the switch, takes the Triton-language kernel. Each is checked against the reference at its
    # own key-block width (the autotuner may choose 64-key blocks, whose P rounds differently).
    operands = sa.quantize_operands_reference(q, k, v)
    outputs = [(out, hopper_kernel.BLOCK_N)]
    pinned = sa._launch_attention(sa.quantize_operands(q, k, v), q.dtype, config={"BLOCK_M": 64, "BLOCK_N": 128,
                                                                                  "num_warps": 4})
    outputs.append((pinned, 128))
    monkeypatch.setattr(sa, "HOPPER_KERNEL", "triton")
    switched = sa.sage_attention(q, k, v)
    assert launches["sage_attention_hopper"] == before + 1 and sa.last_config["kernel"] == "triton"
    outputs.append((switched, sa.last_config["BLOCK_N"]))
    for output, block_n in outputs:
        reference = sa.attend_reference(operands, torch.float32, block_n=block_n)
        assert rel_error(output.float(), reference) <= GPU_KERNEL_VS_REFERENCE + 2**-8  # and bf16's rounding


def test_not_chosen_off_hopper_or_off_its_operands():
    q, k, v = attention_inputs(1, 2, 130, 130, 64, "cpu")
    for fp8_pv in (True, False):
        operands = sa.quantize_operands_reference(q, k, v, fp8_pv=fp8_pv, k_rows=128, permute_keys=True)
        assert not hopper_kernel.ready_for(operands)
    assert not sa.quantize_operands(q, k, v).keys_permuted


@needs_gluon
@pytest.mark.parametrize("capability, taken", [((9, 0), True), ((10, 0), False), ((12, 0), False), ((8, 9), False)])
def test_only_hopper_itself_takes_the_gluon_kernels(monkeypatch, capability, taken):
    # wgmma exists on sm_90 only: a Blackwell GPU (10.x, 12.x) keeps the Triton-language kernels.
    from kontext_kernels import runtime

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    runtime._sm90.cache_clear()
    try:
        assert runtime.sm90(torch.device("cuda", 0)) is taken
        assert hopper_kernel.takes(torch.device("cuda", 0), True, 1, 128, 128) is taken
    finally:
        runtime._sm90.cache_clear()
