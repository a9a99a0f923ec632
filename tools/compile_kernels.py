"""Compile the project's Triton kernels for an NVIDIA GPU on a machine without one, and report their resources.

Triton's own compiler and ``ptxas`` (both ship in the triton wheel) build each kernel variant the trainer would
launch, for a chosen architecture (default sm_90: H100 / H200); nothing runs. Per variant: warps, registers a
thread, spilled bytes (stack frame + local memory: the kernels call no functions, so only spills put anything
there), shared memory and the warps an SM can keep resident, read from the cubin with the
wheel's ``cuobjdump``, and the widths of the global loads and stores, read from the PTX. What this finds before a
GPU is lent: code that Triton's interpreter (the CPU tests) runs but its compiler rejects, launch shapes that
spill registers or starve the SMs of warps, and tensor traffic that is not vectorized (a bf16 tile read 16 bits
an instruction instead of 128 needs 8x the memory instructions for the same bytes).

Cases: ``stages`` launches every kernel (the ``ours`` forward and backward, both memory formats, and the four
fused ReLU -> ours -> BatchNorm kernels) at the ResNet-50 stage shapes, bf16, batch 16 (the tile shape depends on
C and the pool, not on the batch), under ``divnorm.triton_ours.TUNING`` or ``--tuning``; ``--sweep`` does it for
every setting the GPU tuning sweep (benchmarks/tune_divnorm_kernel.py) would time. ``options`` compiles every
option the kernels specialize on (power 1 / 2 / 3 / 0.5, fp32 / bf16 / fp16, both layouts, a global pool, single
gamma / sigma, the backward's need flags, ReLU on / off) on small tensors.

How: Triton asks its active driver only for the target and the current device and stream before it compiles, so
a stand-in driver answers those, and each launch is compiled (Triton's ``warmup``) instead of run. Everything is
put back afterwards, including the kernels' per-device caches.

    python tools/compile_kernels.py [--arch 90] [--cases stages,options] [--tuning tile_elements=8192 ...]
                                    [--sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_divnorm_kernel import BN_EPS, EPS, GRID, POWER, STAGE_SHAPES, P  # noqa: E402

BATCH = 16  # the stage shapes' batch here: the launch depends on C and the pool, not on the batch
# Per-SM limits: (registers, resident warps, resident blocks, shared bytes); the CUDA occupancy tables.
SM_LIMITS = {
    80: (65536, 64, 32, 167936),
    86: (65536, 48, 16, 102400),
    89: (65536, 48, 24, 102400),
    90: (65536, 64, 32, 233472),
    100: (65536, 64, 32, 233472),
    120: (65536, 48, 32, 102400),
}


@dataclass
class Compiled:
    """One kernel variant as compiled for the target."""

    kernel: str
    case: str
    num_warps: int
    registers: int
    spill_bytes: int  # stack frame + local memory a thread: where ptxas puts registers that do not fit
    shared_bytes: int
    resident_warps: int | None  # per SM, from registers / warps / shared memory; None for an arch not tabled
    compile_seconds: float
    load_bits: list[int]  # the widths of the PTX's global loads, each once, widest first (128: 8 bf16 a thread)
    store_bits: list[int]  # the same for its global stores


def resident_warps(arch: int, num_warps: int, registers: int, shared: int) -> int | None:
    """Warps an SM keeps resident for blocks of ``num_warps`` warps using ``registers`` each thread."""
    if arch not in SM_LIMITS:
        return None
    sm_registers, sm_warps, sm_blocks, sm_shared = SM_LIMITS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # registers are allocated 256 a warp at a time
    blocks = min(sm_blocks, sm_warps // num_warps, sm_registers // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, sm_shared // shared)
    return blocks * num_warps


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's one function, as ``cuobjdump -res-usage`` prints them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if not {"REG", "STACK", "SHARED", "LOCAL"} <= found.keys():
        raise RuntimeError(f"compile_kernels: cuobjdump printed no resource usage:\n{text}")
    return {key: int(value) for key, value in found.items()}


def global_access_bits(ptx: str) -> tuple[list[int], list[int]]:
    """The widths in bits of the global-memory loads and of the stores in ``ptx``, each width once, widest first
    (``ld.global.v4.b32`` is 128: 8 bf16 a thread an instruction; ``ld.global.b16`` is 16). Atomics are left out."""
    widths: dict[str, set[int]] = {"ld": set(), "st": set()}
    for op, suffixes in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        vector = re.search(r"\.v(\d)\b", suffixes)
        element = re.search(r"\.[bfsu](\d+)$", suffixes)
        if element is None:
            raise RuntimeError(f"compile_kernels: no element type in PTX instruction {op}.global{suffixes}")
        widths[op].add((int(vector.group(1)) if vector else 1) * int(element.group(1)))
    return sorted(widths["ld"], reverse=True), sorted(widths["st"], reverse=True)


class _TargetOnly:
    """What Triton asks its active driver before it compiles: the target, the current device and stream."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def compiling_for(arch: int) -> Iterator[list[tuple[Any, float]]]:
    """Within: every Triton launch compiles for sm_``arch`` and does not run; yields the (kernel, seconds) list."""
    import triton
    from triton.runtime.driver import driver

    from divnorm import triton_ours

    if triton_ours.INTERPRETED:
        raise RuntimeError("compile_kernels: start the process without TRITON_INTERPRET=1 (kernels are interpreted)")
    compiled: list[tuple[Any, float]] = []
    touched: set[Any] = set()
    run = triton.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        start = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((kernel, time.perf_counter() - start))
        return kernel

    active, check = driver._active, triton_ours.interpreter_enabled
    driver.set_active(_TargetOnly(arch))
    triton.JITFunction.run = compile_only
    triton_ours.interpreter_enabled = lambda: True  # the wrappers take CPU tensors only when not on a GPU
    try:
        yield compiled
    finally:
        triton.JITFunction.run = run
        triton_ours.interpreter_enabled = check
        driver._active = active
        for fn in touched:  # the per-device caches now hold this target's binaries: a real launch must not see them
            fn.device_caches.clear()


def _launchers(shape: tuple[int, ...], dtype, channels_last: bool, options: dict[str, Any]) -> dict[str, Callable]:
    """The calls that launch each kernel family once on CPU tensors of ``shape``."""
    import torch

    from divnorm import pool_size, triton_fused_bn, triton_ours

    channels = shape[1]
    pool = pool_size(channels, options.get("p", P))
    power, relu = float(options.get("power", POWER)), bool(options.get("relu", True))
    params = 1 if options.get("single_params") else channels // pool
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(dtype, memory_format=memory_format)
    gamma, sigma = torch.zeros(params), torch.ones(params)
    weight, bias = torch.ones(channels), torch.zeros(channels)
    need = options.get("need", (True, True, True))

    def fused_bn() -> None:
        _, mean, _, rstd = triton_fused_bn.forward(x, gamma, sigma, weight, bias, pool, power, EPS, BN_EPS, relu)
        triton_fused_bn.backward(x, x, gamma, sigma, weight, mean, rstd, pool, power, EPS, relu)

    launchers = {
        "ours": lambda: (
            triton_ours.forward(x, gamma, sigma, pool, power, EPS),
            triton_ours.backward(x, x, gamma, sigma, pool, power, EPS, *need),
        )
    }
    if channels_last:
        launchers["fused_bn"] = fused_bn
    return launchers


def _option_cases() -> Iterator[tuple[str, tuple[int, ...], Any, bool, dict[str, Any]]]:
    """(label, shape, dtype, channels_last, options): every specialization of the kernels, each once."""
    import torch

    small = (2, 64, 4, 4)
    for power in (1.0, 2.0, 3.0, 0.5):
        yield f"power {power:g}", small, torch.bfloat16, True, {"power": power}
    for dtype in (torch.float32, torch.float16):
        yield f"{str(dtype)[6:]}", small, dtype, True, {}
    for channels_last in (False, True):
        layout = "channels-last" if channels_last else "NCHW"
        yield f"C=3 {layout}", (2, 3, 4, 4), torch.bfloat16, channels_last, {}
        yield f"global pool {layout}", small, torch.bfloat16, channels_last, {"p": 1.0}
        yield f"single gamma/sigma {layout}", small, torch.bfloat16, channels_last, {"single_params": True}
        yield f"power 3 {layout}", small, torch.float32, channels_last, {"power": 3.0}
    yield "no ReLU", small, torch.bfloat16, True, {"relu": False}
    yield "no ReLU, power 3", small, torch.bfloat16, True, {"relu": False, "power": 3.0}
    yield "backward: dx only", small, torch.bfloat16, False, {"need": (True, False, False)}
    yield "backward: parameters only", small, torch.bfloat16, False, {"need": (False, True, True)}


def _stage_cases() -> Iterator[tuple[str, tuple[int, ...], Any, bool, dict[str, Any]]]:
    import torch

    for (_, *rest), channels_last in itertools.product(STAGE_SHAPES, (True, False)):
        shape = (BATCH, *rest)
        layout = "channels-last" if channels_last else "NCHW"
        yield f"{'x'.join(map(str, shape))} {layout}", shape, torch.bfloat16, channels_last, {}


def case_list(cases: str) -> list[tuple[str, tuple[int, ...], Any, bool, dict[str, Any]]]:
    """The launches of ``cases`` (``stages`` or ``options``): (label, shape, dtype, channels_last, options)."""
    return list({"stages": _stage_cases, "options": _option_cases}[cases]())


def compile_cases(cases: str, arch: int = 90, families: tuple[str, ...] = ("ours", "fused_bn")) -> list[Compiled]:
    """Compile every launch of ``cases`` (``stages`` or ``options``) for sm_``arch`` and return what was built."""
    import torch

    results: list[Compiled] = []
    with torch.no_grad(), compiling_for(arch) as compiled:
        for label, shape, dtype, channels_last, options in case_list(cases):
            for family, launch in _launchers(shape, dtype, channels_last, options).items():
                if family not in families:
                    continue
                first = len(compiled)
                try:
                    launch()
                except Exception as error:  # a compile error: name the variant, then re-raise
                    raise RuntimeError(f"compile_kernels: {family} {label} for sm_{arch}: {error}") from error
                for kernel, seconds in compiled[first:]:
                    usage = _resources(kernel.asm["cubin"])
                    warps = kernel.metadata.num_warps
                    shared = max(usage["SHARED"], kernel.metadata.shared)
                    load_bits, store_bits = global_access_bits(kernel.asm["ptx"])
                    results.append(
                        Compiled(
                            kernel=kernel.metadata.name,
                            case=f"{family} {label}",
                            num_warps=warps,
                            registers=usage["REG"],
                            spill_bytes=usage["STACK"] + usage["LOCAL"],
                            shared_bytes=shared,
                            resident_warps=resident_warps(arch, warps, usage["REG"], shared),
                            compile_seconds=round(seconds, 3),
                            load_bits=load_bits,
                            store_bits=store_bits,
                        )
                    )
    return results


def _parse_tuning(items: list[str]) -> dict[str, int]:
    from divnorm import triton_ours

    tuning = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in triton_ours.TUNING or not value.isdigit():
            raise SystemExit(f"compile_kernels: --tuning takes KEY=INT with KEY in {sorted(triton_ours.TUNING)}, "
                             f"got {item!r}")  # fmt: skip
        tuning[key] = int(value)
    return tuning


def _markdown(rows: list[dict[str, Any]], arch: int, triton_version: str, command: str) -> str:
    lines = [
        f"# The Triton kernels compiled for sm_{arch} (Triton {triton_version}, no GPU)",
        "",
        f"{len(rows)} variants, {sum(1 for r in rows if r['spill_bytes'])} of them spill registers. Tuning: "
        "tile_elements / elements_per_warp of `divnorm.triton_ours.TUNING`. Written by "
        f"`{command}`.",
        "",
        "Global load / store widths: the bits of the PTX's `ld.global` / `st.global` instructions, widest first "
        "(128 = 8 bf16 a thread an instruction).",
        "",
        "| tuning | case | kernel | warps | registers | spilled bytes | shared bytes | resident warps / SM "
        "| load bits | store bits |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tuning']} | {r['case']} | {r['kernel']} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {r['resident_warps']} | "
            f"{', '.join(map(str, r['load_bits']))} | {', '.join(map(str, r['store_bits']))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--cases", default="stages,options", help="stages, options or both, comma-separated")
    parser.add_argument("--tuning", nargs="*", default=[], help="KEY=INT entries over divnorm.triton_ours.TUNING")
    parser.add_argument("--sweep", action="store_true", help="stages at every setting of the GPU tuning sweep")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= {"stages", "options"}:
        parser.error(f"--cases takes stages and / or options, got {args.cases!r}")
    os.environ.pop("TRITON_INTERPRET", None)

    import triton

    from divnorm import triton_ours

    default = dict(triton_ours.TUNING)
    settings = [{**default, **_parse_tuning(args.tuning)}]
    if args.sweep:
        settings = [{**default, "tile_elements": t, "elements_per_warp": w}
                    for t, w in itertools.product(GRID["tile_elements"], GRID["elements_per_warp"])]  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        for setting in settings:
            triton_ours.TUNING.update(setting)
            tuning = f"{setting['tile_elements']}/{setting['elements_per_warp']}"
            for case in cases:
                if case == "options" and setting is not settings[0]:
                    continue  # the options do not depend on the launch shape: once is enough
                for row in compile_cases(case, args.arch):
                    rows.append({"tuning": tuning, **asdict(row)})
                    print(
                        f"{tuning:>10}  {row.case:<44} {row.kernel:<24} warps {row.num_warps:>2}  "
                        f"regs {row.registers:>3}  spill {row.spill_bytes:>4}  resident {row.resident_warps}  "
                        f"ld {'/'.join(map(str, row.load_bits))}  st {'/'.join(map(str, row.store_bits))}"
                    )
    finally:
        triton_ours.TUNING.clear()
        triton_ours.TUNING.update(default)
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"compile_kernels: {len(rows)} kernel variants compiled for sm_{args.arch}; {len(spilled)} of them spill")
    if args.out:
        from train.files import write_json_atomic, write_text_atomic

        command = " ".join(["python tools/compile_kernels.py", *(sys.argv[1:] if argv is None else argv)])
        result = {"arch": args.arch, "triton": triton.__version__, "command": command, "default_tuning": default,
                  "variants": rows}  # fmt: skip
        write_json_atomic(args.out / "results.json", result)
        write_text_atomic(args.out / "results.md", _markdown(rows, args.arch, triton.__version__, command))
        print(f"compile_kernels: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
