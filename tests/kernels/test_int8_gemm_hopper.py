"""The warp-specialised int8 GEMM for Hopper (kontext_kernels/int8_gemm_hopper.py).

Gluon kernels do not run under Triton's interpreter: on a machine with no GPU the kernel is compiled for sm_90
(Triton ships ptxas) and its SASS checked for what the schedule needs. On a Hopper GPU it is checked against the
exact product (int8_gemm.int8_linear_reference, float64 sums) on awkward shapes: rows and columns that are not
whole tiles, a K tail that TMA fills with zeros, programs with an odd number of tiles (the second consumer takes
one fewer), with and without a bias, bf16 and fp16 outputs. Tolerance: relative L2 error 1e-2 (the output's one
rounding to 16 bits is ~2e-3).
"""

from __future__ import annotations

import contextlib
import re
import types

import pytest
import torch

from conftest import rel_l2, sass_of, spills
from kontext_kernels import int8_gemm, int8_gemm_hopper
from kontext_kernels.runtime import launches

needs_gluon = pytest.mark.skipif(not int8_gemm_hopper.gluon_available(),
                                 reason="this Triton has no Gluon with Hopper warp specialisation")


@needs_gluon
@pytest.mark.parametrize("has_bias, residual, batched, paired",
                         [(True, False, False, False), (False, False, False, False), (True, True, False, False),
                          (True, True, True, False), (True, False, False, True), (True, True, False, True)],
                         ids=["bias", "no-bias", "gated-residual", "gated-residual-two-batches", "paired",
                              "paired-gated-residual"])
def test_builds_for_sm90_with_wgmma_tma_and_register_split(has_bias, residual, batched, paired):
    kernel = int8_gemm_hopper.build_offline(torch.bfloat16, has_bias, residual=residual, batched=batched,
                                            paired=paired)
    _check_build(kernel)


@needs_gluon
@pytest.mark.parametrize("paired", [False, True], ids=["one", "paired"])
def test_the_cooperative_schedule_builds_for_sm90(paired):
    # 128x256 tiles, each consumer 64 rows of each against the same weight stage: per consumer and K step, 4 k32
    # steps x two 128-wide wgmmas. Plain epilogues only: its gated residual spills (64x256 values a consumer).
    kernel = int8_gemm_hopper.build_offline(torch.bfloat16, True, paired=paired, schedule="cooperative")
    _check_build(kernel)


@needs_gluon
@pytest.mark.parametrize("paired", [False, True], ids=["one", "paired"])
def test_every_plan_candidate_builds_for_sm90_within_shared_memory(paired):
    # The tuner launches every candidate on a shape's first product: none may fail to build or launch for want of
    # shared memory (a 5-stage ping-pong ring takes ~224 KB of the 227).
    for plan in int8_gemm_hopper.PLAN_CANDIDATES:
        kernel = int8_gemm_hopper.build_offline(torch.bfloat16, True, stages=plan.stages, paired=paired,
                                                schedule=plan.schedule)
        _check_build(kernel)


def _check_build(kernel) -> None:
    sass = sass_of(kernel)
    # Two consumers, each 128x128 of output (a ping-pong tile, or half a cooperative 128x256 one) of 64x128x32 int8
    # wgmmas over a 128-deep K step.
    assert len(re.findall(r"IGMMA\.64x128x32\.S8\.S8", sass)) == 2 * 8
    assert "UTMALDG" in sass and "UTMASTG" in sass
    assert "SYNCS.PHASECHK" in sass  # mbarrier waits between the loader and the consumers
    assert "USETMAXREG" in sass  # registers moved from the loader's warpgroup to the consumers
    assert not spills(sass), "registers spill"
    assert kernel.metadata.shared <= 227 * 1024


def _operands(M: int, N: int, K: int, device: str):
    data = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    scale = torch.rand(M, device=device) * 1e-3 + 1e-4
    weight_scale = torch.rand(N, device=device) * 1e-2 + 1e-3
    return data, scale, weight, weight_scale


hopper_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
                                     and int8_gemm_hopper.gluon_available()), reason="needs a Hopper GPU and Gluon")


@hopper_gpu
@pytest.mark.parametrize("M, N, K", [(300, 200, 208), (128, 128, 128), (1000, 520, 3072), (8704, 3072, 384),
                                     (77, 9216, 256), (4096, 4096, 3072)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["pingpong", "cooperative"])
def test_matches_the_exact_product(M, N, K, bias, out_dtype, schedule):
    torch.manual_seed(M + N + K)
    data, scale, weight, weight_scale = _operands(M, N, K, "cuda")
    bias_values = torch.randn(N, device="cuda", dtype=out_dtype) if bias else None
    assert int8_gemm_hopper.ready_for(data, weight, out_dtype)
    out = int8_gemm_hopper.launch(data, scale, weight, weight_scale, bias_values, out_dtype, schedule=schedule)
    reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, bias_values, torch.float32)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert rel_l2(out.float(), reference) < 1e-2


@hopper_gpu
@pytest.mark.parametrize("stages", [3, 4, 5])
def test_ring_depths_agree(stages):
    torch.manual_seed(stages)
    data, scale, weight, weight_scale = _operands(1100, 1024, 1536, "cuda")
    out = int8_gemm_hopper.launch(data, scale, weight, weight_scale, None, torch.bfloat16, stages=stages)
    reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, None, torch.float32)
    assert rel_l2(out.float(), reference) < 1e-2


@hopper_gpu
def test_int8_linear_dispatches_to_it_on_hopper(monkeypatch):
    data, scale, weight, weight_scale = _operands(512, 256, 256, "cuda")
    before = launches["int8_linear_pingpong"]
    out = int8_gemm.int8_linear(data, scale.reshape(-1, 1), weight, weight_scale, None, torch.bfloat16)
    assert launches["int8_linear_pingpong"] == before + 1
    monkeypatch.setattr(int8_gemm, "HOPPER_KERNEL", "triton")
    other = int8_gemm.int8_linear(data, scale.reshape(-1, 1), weight, weight_scale, None, torch.bfloat16)
    assert launches["int8_linear_pingpong"] == before + 1
    assert rel_l2(out.float(), other.float()) < 1e-2


def test_not_chosen_off_hopper():
    data = torch.zeros(256, 256, dtype=torch.int8)
    assert not int8_gemm_hopper.ready_for(data, data, torch.bfloat16)


@hopper_gpu
@pytest.mark.parametrize("batch, length, N, K", [(1, 8704, 3072, 384), (2, 150, 520, 208), (1, 77, 3072, 256)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("schedule", ["pingpong", "cooperative"])
def test_the_gated_residual_in_the_epilogue(batch, length, N, K, bias, schedule, monkeypatch):
    # With the cooperative schedule chosen, a gated residual still takes ping-pong's epilogue (the cooperative one
    # spills): the same result either way.
    monkeypatch.setattr(int8_gemm_hopper, "SCHEDULE", schedule)
    # residual + gate * product from the epilogue, against the float64 product: rows that fill no tile, two
    # batches whose rows meet inside one tile (150 rows), a gate that is a strided chunk of a modulation output.
    torch.manual_seed(batch * length + N)
    data, scale, weight, weight_scale = _operands(batch * length, N, K, "cuda")
    bias_values = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    residual = torch.randn(batch, length, N, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(batch, 1, 3 * N, device="cuda", dtype=torch.bfloat16)[..., N:2 * N]
    rows = data.view(batch, length, K)
    before = launches["int8_linear_gated_residual"]
    out = int8_gemm.int8_linear_gated_residual(rows, scale[:, None], weight, weight_scale, bias_values, gate,
                                               residual)
    assert launches["int8_linear_gated_residual"] == before + 1  # the fused epilogue ran, not the fallback
    exact = int8_gemm.int8_linear_gated_residual_reference(rows, scale[:, None], weight, weight_scale, bias_values,
                                                           gate, residual.double()).float()
    assert out.shape == residual.shape and out.dtype == torch.bfloat16
    assert rel_l2(out.float(), exact) <= 4e-3  # bf16's rounding of the sum (2**-9 relative), with margin
    # Each batch's gate applies to its own rows: batch 0's gate on every row would be far off.
    if batch > 1:
        wrong = int8_gemm.int8_linear_gated_residual_reference(rows, scale[:, None], weight, weight_scale, bias_values,
                                                               gate[:1].expand_as(gate), residual.double()).float()
        assert rel_l2(wrong, exact) > 0.05


def test_the_gated_residual_elsewhere_rounds_the_product_then_adds():
    # Without the Hopper kernel (here: the CPU) the product is rounded to residual's dtype and added after it,
    # exactly as an unfused block computes residual + gate * linear.
    torch.manual_seed(3)
    data, scale, weight, weight_scale = _operands(2 * 21, 40, 96, "cpu")
    residual = torch.randn(2, 21, 40, dtype=torch.bfloat16)
    gate = torch.randn(2, 1, 40, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    rows = data.view(2, 21, 96)
    out = int8_gemm.int8_linear_gated_residual(rows, scale[:, None], weight, weight_scale, bias, gate, residual)
    product = int8_gemm.int8_linear_reference(rows, scale[:, None], weight, weight_scale, bias, torch.bfloat16)
    assert torch.equal(out, residual + gate * product)


def _pair_operands(rows: tuple[int, int], N: int, K: int, bias: bool, residual: bool, batch: int = 1):
    """Two products of the same N and K with their own weights, as int8_linear(_gated_residual) takes them."""
    products = []
    for length in rows:
        data, scale, weight, weight_scale = _operands(batch * length, N, K, "cuda")
        bias_values = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
        if residual:
            gate = torch.randn(batch, 1, 2 * N, device="cuda", dtype=torch.bfloat16)[..., N:]
            products.append((data.view(batch, length, K), scale[:, None], weight, weight_scale, bias_values, gate,
                             torch.randn(batch, length, N, device="cuda", dtype=torch.bfloat16)))
        else:
            products.append((data, scale[:, None], weight, weight_scale, bias_values))
    return products


@hopper_gpu
@pytest.mark.parametrize("rows, N, K", [((512, 8192), 3072, 384), ((77, 300), 520, 208), ((128, 1000), 9216, 256),
                                        ((300, 128), 256, 3072)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "gated-residual"])
def test_a_paired_launch_equals_two_launches(rows, N, K, bias, residual, monkeypatch):
    # The paired launch computes each product exactly as its own launch does (the same tiles, the same epilogue),
    # so the outputs are equal bit for bit; and both match the float64 product. Row counts that fill no tile, a
    # first product larger than the second, a tile list whose split falls inside a program's turn.
    monkeypatch.setattr(int8_gemm, "PAIR_STREAMS", True)
    torch.manual_seed(sum(rows) + N + K)
    first, second = _pair_operands(rows, N, K, bias, residual)
    before = launches["int8_linear_pair"]
    if residual:
        paired = int8_gemm.int8_linear_gated_residual_pair(first, second)
        apart = [int8_gemm.int8_linear_gated_residual(*operands) for operands in (first, second)]
        exact = [int8_gemm.int8_linear_gated_residual_reference(*operands[:6], operands[6].double()).float()
                 for operands in (first, second)]
    else:
        paired = int8_gemm.int8_linear_pair(first, second, torch.bfloat16)
        apart = [int8_gemm.int8_linear(*operands, torch.bfloat16) for operands in (first, second)]
        exact = [int8_gemm.int8_linear_reference(*operands, torch.float32) for operands in (first, second)]
    assert launches["int8_linear_pair"] == before + 1  # one launch for both
    for out, alone, reference in zip(paired, apart, exact):
        assert out.shape == alone.shape and torch.equal(out, alone)
        assert rel_l2(out.float(), reference) < 1e-2


@hopper_gpu
def test_pairs_that_do_not_fit_take_two_launches(monkeypatch):
    # Different N: no shared tile list. Several batches with a gated residual: the paired epilogue would spill.
    monkeypatch.setattr(int8_gemm, "PAIR_STREAMS", True)
    torch.manual_seed(5)
    first, _ = _pair_operands((256, 256), 512, 256, True, False)
    _, second = _pair_operands((256, 256), 384, 256, True, False)
    before = launches["int8_linear_pair"]
    outs = int8_gemm.int8_linear_pair(first, second, torch.bfloat16)
    assert [out.shape[-1] for out in outs] == [512, 384]
    first, second = _pair_operands((256, 512), 256, 256, True, True, batch=2)
    outs = int8_gemm.int8_linear_gated_residual_pair(first, second)
    assert launches["int8_linear_pair"] == before
    for out, operands in zip(outs, (first, second)):
        exact = int8_gemm.int8_linear_gated_residual_reference(*operands[:6], operands[6].double()).float()
        assert rel_l2(out.float(), exact) <= 4e-3


def test_a_pair_elsewhere_is_two_products():
    # Without the Hopper kernel (the CPU here) a pair is each product on its own.
    torch.manual_seed(6)
    data, scale, weight, weight_scale = _operands(40, 24, 64, "cpu")
    other_data, other_scale, other_weight, other_weight_scale = _operands(9, 24, 64, "cpu")
    first = (data, scale[:, None], weight, weight_scale, None)
    second = (other_data, other_scale[:, None], other_weight, other_weight_scale, None)
    outs = int8_gemm.int8_linear_pair(first, second, torch.bfloat16)
    for out, operands in zip(outs, (first, second)):
        assert torch.equal(out, int8_gemm.int8_linear_reference(*operands, torch.bfloat16))


def test_a_plan_asked_for_wins_and_a_gated_residual_keeps_ping_pong():
    hopper = int8_gemm_hopper
    defaults = (hopper.GROUP_M, hopper.SCHEDULES[hopper.SCHEDULE])
    cooperative, pingpong = hopper.SCHEDULES["cooperative"], hopper.SCHEDULES["pingpong"]
    assert hopper._group_and_schedule(False, None, None) == defaults
    assert hopper._group_and_schedule(False, 4, None) == (4, hopper.SCHEDULES[hopper.SCHEDULE])
    assert hopper._group_and_schedule(False, 0, "cooperative") == (0, cooperative)  # GROUP_M 0 is asked for, not unset
    assert hopper._group_and_schedule(True, None, "cooperative") == (hopper.GROUP_M, pingpong)


class _TimedCandidates:
    """Stands in for the GPU: each candidate's launches take the given milliseconds, but for any slower ones
    given first (drift, outliers); every launch outside the timing is logged as the Plan it ran."""

    def __init__(self, monkeypatch, per_launch: dict, first_launches: dict | None = None):
        self.per_launch, self.first_launches = per_launch, first_launches or {}
        self.launched, self.timed_turns, self.capturing = [], [], False
        hopper = int8_gemm_hopper
        monkeypatch.setattr(hopper, "_run", lambda products, outs, schedule, group_m, stages:
                            self.launched.append(self._plan(schedule, group_m, stages)))
        monkeypatch.setattr(hopper, "_launch_times", self._times)
        monkeypatch.setattr(hopper, "_tunings", {})
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    @staticmethod
    def _plan(schedule, group_m, stages):
        name = next(name for name, known in int8_gemm_hopper.SCHEDULES.items() if known is schedule)
        return int8_gemm_hopper.Plan(name, group_m, stages)

    def _times(self, runs, turns):
        self.timed_turns.append(turns)
        times = []
        for run in runs:
            candidate = self._plan(*run.args[2:5])
            slow = self.first_launches.get(candidate, [])[:turns]
            times.append(slow + [self.per_launch[candidate]] * (turns - len(slow)))
        return times


def test_launch_times_take_turns_in_rotated_order_and_time_each_launch(monkeypatch):
    # Stand-in events on a clock that each launch advances by its run's duration: every run launches once a turn,
    # the first of each turn rotating, and each launch's time comes back under its own run.
    log, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock[0]

        def elapsed_time(self, end):
            return end.at - self.at

    durations = {"a": 1.0, "b": 2.0, "c": 4.0}

    def launcher(name):
        def run():
            log.append(name)
            clock[0] += durations[name] + len(log) / 1000  # drift: each launch a little slower than the last
        return run

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(synchronize=lambda: None))
    times = int8_gemm_hopper._launch_times([launcher(name) for name in "abc"], 3)
    assert log == list("abc" "bca" "cab")
    for name, run_times in zip("abc", times):
        positions = [index + 1 for index, launched in enumerate(log) if launched == name]
        assert run_times == pytest.approx([durations[name] + position / 1000 for position in positions])


def _plain_products(M: int, N: int, K: int, bias: bool = True, count: int = 1):
    torch.manual_seed(11)
    data, scale, weight, weight_scale = _operands(M, N, K, "cpu")
    product = int8_gemm_hopper.Product(data, scale, weight, weight_scale, torch.randn(N) if bias else None)
    return [product] * count


def test_tuning_takes_the_fastest_candidate_once_per_shape(monkeypatch):
    hopper = int8_gemm_hopper
    monkeypatch.setattr(hopper, "TUNE_PLANS", True)
    pingpong, pingpong5, cooperative16, cooperative32 = hopper.PLAN_CANDIDATES
    assert pingpong5 == ("pingpong", 8, 5) and cooperative32 == ("cooperative", 32, None)
    # cooperative 32 is slow in some launches (drift, outliers), the fastest in most: the median decides.
    outliers = [9.0] * (hopper.TUNING_LAUNCHES // 2)
    medians = {pingpong: 4.0, pingpong5: 4.1, cooperative16: 4.2, cooperative32: 3.9}
    fake = _TimedCandidates(monkeypatch, medians, first_launches={cooperative32: outliers})
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, None)
    expected_launches = len(hopper.PLAN_CANDIDATES) + 1  # each candidate built once, then the chosen one
    assert fake.launched == [*hopper.PLAN_CANDIDATES, cooperative32]
    assert fake.timed_turns == [hopper.TUNING_WARMUP, hopper.TUNING_LAUNCHES]
    assert list(hopper.tunings().values()) == [(cooperative32, medians)]
    # Slow in most launches: the median is slow, and ping-pong wins that shape; a deeper ring wins another.
    fake.first_launches = {cooperative32: outliers + [9.0]}
    hopper._launch(_plain_products(300, 64, 160), torch.bfloat16, None, None, None)
    assert fake.launched[-1] == pingpong
    fake.per_launch = medians | {pingpong5: 3.0}
    hopper._launch(_plain_products(300, 64, 192), torch.bfloat16, None, None, None)
    assert fake.launched[-1] == pingpong5
    # The same shape bucket again (300 and 400 rows both round up to 512): no timing, the kept plan.
    hopper._launch(_plain_products(400, 64, 96), torch.bfloat16, None, None, None)
    assert len(fake.launched) == 3 * expected_launches + 1 and fake.launched[-1] == cooperative32
    # Another bucket, another K, no bias, or a paired launch: a shape of its own, timed again.
    for products in (_plain_products(600, 64, 96), _plain_products(300, 64, 128), _plain_products(300, 64, 96, False),
                     _plain_products(300, 64, 96, count=2)):
        hopper._launch(products, torch.bfloat16, None, None, None)
    assert len(hopper.tunings()) == 7


def test_tuning_stands_aside_when_asked_off_named_gated_or_captured(monkeypatch):
    hopper = int8_gemm_hopper
    cooperative16 = hopper.Plan("cooperative", 16)
    fake = _TimedCandidates(monkeypatch, dict.fromkeys(hopper.PLAN_CANDIDATES, 1.0) | {cooperative16: 0.5})
    defaults = hopper.Plan(hopper.SCHEDULE, hopper.GROUP_M)
    monkeypatch.setattr(hopper, "TUNE_PLANS", False)
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, None)
    assert fake.launched == [defaults]
    monkeypatch.setattr(hopper, "TUNE_PLANS", True)
    fake.launched.clear()
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, 4, None)  # the caller's GROUP_M
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, "pingpong")  # the caller's schedule
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, 5, None, None)  # the caller's ring depth
    assert fake.launched == [(hopper.SCHEDULE, 4, None), ("pingpong", hopper.GROUP_M, None),
                             (hopper.SCHEDULE, hopper.GROUP_M, 5)]
    fake.launched.clear()
    data, scale, weight, weight_scale = _operands(256, 64, 96, "cpu")
    gated = hopper.Product(data, scale, weight, weight_scale, None, torch.randn(256, 64), torch.randn(1, 64))
    hopper._launch([gated], torch.bfloat16, None, None, None)
    assert fake.launched == [("pingpong", hopper.GROUP_M, None)]
    # In CUDA graph capture an untimed shape takes the defaults and stays untimed; a timed one keeps its plan.
    fake.launched.clear()
    fake.capturing = True
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, None)
    assert fake.launched == [defaults] and not hopper.tunings()
    fake.capturing = False
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, None)
    fake.capturing = True
    hopper._launch(_plain_products(300, 64, 96), torch.bfloat16, None, None, None)
    assert fake.launched[-1] == cooperative16
    assert [tuning.plan for tuning in hopper.tunings().values()] == [cooperative16]


@hopper_gpu
@pytest.mark.parametrize("paired", [False, True], ids=["one", "paired"])
def test_every_plan_candidate_and_the_tuned_launch_give_the_default_launchs_product(monkeypatch, paired):
    # Another schedule and tile order, the same int32 sums and epilogue: equal bit for bit, at linear1's shape.
    hopper = int8_gemm_hopper
    N, K = 21504, 3072
    torch.manual_seed(7)
    data, scale, weight, weight_scale = _operands(1000, N, K, "cuda")
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    first = hopper.Product(data, scale, weight, weight_scale, bias)
    products = [first, hopper.Product(data[:300], scale[:300], weight, weight_scale, bias)][:1 + paired]
    monkeypatch.setattr(hopper, "TUNE_PLANS", False)
    default = hopper._launch(products, torch.bfloat16, None, None, None)
    for plan in hopper.PLAN_CANDIDATES:
        planned = hopper._launch(products, torch.bfloat16, plan.stages, plan.group_m, plan.schedule)
        assert all(torch.equal(a, b) for a, b in zip(planned, default)), plan
    monkeypatch.setattr(hopper, "TUNE_PLANS", True)
    monkeypatch.setattr(hopper, "_tunings", {})
    tuned = hopper._launch(products, torch.bfloat16, None, None, None)
    assert all(torch.equal(a, b) for a, b in zip(tuned, default))
    assert [tuning.plan for tuning in hopper.tunings().values()][0] in hopper.PLAN_CANDIDATES
