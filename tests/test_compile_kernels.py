"""The Triton kernels compile for an H100 / H200 (sm_90) with Triton's real compiler and ptxas, on this CPU machine.

The interpreter tests (test_divnorm_kernel.py, test_fused_bn.py) check the kernels' numbers; this checks what only
the compiler sees: that every specialization the trainer can launch lowers to a cubin, and that the launch shapes of
the ResNet-50 stages keep every register on chip (no spills). It runs in the suite's own process (compiled mode:
TRITON_INTERPRET is not set here), and the tool puts Triton's driver and the kernels' caches back afterwards.
"""

from __future__ import annotations

import pytest

from divnorm import triton_fused_bn, triton_ours
from tools import compile_kernels

pytestmark = pytest.mark.skipif(triton_ours.INTERPRETED, reason="the compiler check needs Triton in compiled mode")

KERNELS = {
    "_ours_forward_kernel",
    "_ours_backward_kernel",
    "_forward_stats_kernel",
    "_forward_output_kernel",
    "_backward_stats_kernel",
    "_backward_input_kernel",
    "_parameter_gradients_kernel",
    "_forward_finalize_kernel",
    "_backward_finalize_kernel",
}
REDUCE_KERNELS = {"_parameter_gradients_kernel", "_forward_finalize_kernel", "_backward_finalize_kernel"}
TENSOR_WRITERS = {"_ours_forward_kernel", "_ours_backward_kernel", "_forward_output_kernel", "_backward_input_kernel"}


@pytest.mark.parametrize("cases", ["options", "stages"])
def test_every_kernel_variant_compiles_for_sm90_without_spilling(cases):
    from triton.runtime.driver import driver

    active = driver._active
    compiled = compile_kernels.compile_cases(cases, arch=90)
    assert {c.kernel for c in compiled} == KERNELS
    labels = {c.case for c in compiled}
    expected = len(compile_kernels.case_list(cases))
    assert len({label.split(" ", 1)[1] for label in labels}) == expected  # every case launched at least one kernel
    for c in compiled:
        assert c.num_warps in (1, 2, 4, 8, 16) and c.registers > 0, c
        assert c.spill_bytes == 0, f"{c.kernel} spills {c.spill_bytes} bytes a thread at {c.case}"
        assert c.resident_warps and c.resident_warps >= 8, c
    if cases == "stages":  # the real launch shapes: 8 warps a tile program at every stage (TUNING's 4096 / 512)
        assert {c.num_warps for c in compiled if c.kernel not in REDUCE_KERNELS} == {8}
        assert {c.num_warps for c in compiled if c.kernel in REDUCE_KERNELS} == {4}  # the small second reductions
        for c in compiled:  # tensor traffic 128 bits (8 bf16) a thread an instruction wherever rows of 8 are aligned
            _family, shape, layout = c.case.split(" ")
            height, width = map(int, shape.split("x")[2:])
            if c.kernel in REDUCE_KERNELS or (layout == "NCHW" and height * width % 8):
                continue  # NCHW at 14x14 / 7x7: a channel's row of 196 / 49 bf16 is not 16-byte aligned
            assert c.load_bits[0] == 128 and 16 not in c.load_bits, c
            assert c.store_bits[0] == 128 if c.kernel in TENSOR_WRITERS else 16 not in c.store_bits, c
    # put back: the driver, the wrappers' CPU check and the kernels' per-device caches
    assert driver._active is active
    assert triton_ours.interpreter_enabled() is False
    for kernel in (triton_ours._ours_forward_kernel, triton_fused_bn._backward_input_kernel):
        assert not kernel.device_caches
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        import torch

        triton_ours.forward(torch.ones(1, 4, 2, 2), torch.zeros(2), torch.ones(2), 2, 2.0, 0.0)


def test_global_access_widths_are_read_from_the_ptx():
    ptx = """
    @%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    ld.global.nc.v2.f32 { %f1, %f2 }, [ %rd3 + 0 ];
    @%p2 st.global.v4.b32 [ %rd4 + 0 ], { %r5, %r6, %r7, %r8 };
    st.global.b16 [ %rd5 + 0 ], %rs2;
    atom.global.add.f32 %f3, [ %rd6 + 0 ], %f4;
    ld.shared.v4.b32 { %r9, %r10, %r11, %r12 }, [ %r13 + 0 ];
    """
    assert compile_kernels.global_access_bits(ptx) == ([128, 64, 16], [128, 16])
    assert compile_kernels.global_access_bits("ret;") == ([], [])


def test_resident_warps_follow_the_sm90_occupancy_limits():
    assert compile_kernels.resident_warps(90, 8, 32, 0) == 64  # 8 blocks of 8 warps: the warp limit
    assert compile_kernels.resident_warps(90, 8, 64, 0) == 32  # 64 regs x 256 threads = 16 K: 4 blocks
    assert compile_kernels.resident_warps(90, 8, 99, 0) == 16  # 99 -> 104 regs a thread: 2 blocks of 8 warps
    assert compile_kernels.resident_warps(90, 1, 14, 0) == 32  # the block limit
    assert compile_kernels.resident_warps(90, 4, 32, 100_000) == 8  # shared memory: 2 blocks
    assert compile_kernels.resident_warps(75, 4, 32, 0) is None


def test_a_compile_error_names_the_variant(monkeypatch):
    # a tile of 2 M elements is past Triton's largest block (2 ** 20 elements): its compiler refuses it
    monkeypatch.setitem(triton_ours.TUNING, "tile_elements", 2**21)
    last_stage = list(compile_kernels._stage_cases())[-2]  # 16x2048x7x7, channels-last
    monkeypatch.setattr(compile_kernels, "_stage_cases", lambda: iter([last_stage]))
    expected = r"(?s)ours 16x2048x7x7 channels-last for sm_90: .*numel \(2097152\) exceeds"
    with pytest.raises(RuntimeError, match=expected):
        compile_kernels.compile_cases("stages", arch=90, families=("ours",))
