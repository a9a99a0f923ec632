"""Sweep the fused ``ours`` kernel's launch shape (``divnorm.triton_ours.TUNING``) at the ResNet-50 stage shapes.

The H200 measured the kernel at 2.08x its memory floor at (256, 256, 56, 56) bf16 channels-last, with the tile
sizes and warp counts of its first version (issue 18; docs/divnorm-kernel.md). This sweeps them: for each stage
shape and each setting of ``tile_elements`` x ``elements_per_warp`` (x ``backward_programs_per_sm`` for the
backward), the forward and the backward are timed apart with CUDA events (``triton.testing.do_bench``: median,
after warm-up) and checked against the torch path. Each pass has its own floor at the device-to-device copy
bandwidth measured here: forward 2 passes over the tensor (read x, write y), backward 3 (read x and dy, write dx).

``--kernel fused_bn`` sweeps the same ``TUNING`` for the fused ReLU -> ours -> BatchNorm kernels
(``divnorm.triton_fused_bn``, ``divnorm_specs.fuse_bn``) instead, against the torch function
``divnorm.fused_bn.ReluDivNormBatchNormFunction``: forward = statistics + output kernels (floor 3 passes: read x
twice, write out), backward = statistics + input kernels (floor 5: read x and dout twice, write dx).

results.json / results.md: every setting's times and ratios to the floor, the best setting per shape and pass, and
the one setting with the least forward + backward time summed over the shapes: the candidate for the kernel's
default ``TUNING`` (commit it there once measured). A setting that launches at a shape exactly what an earlier one
launched there (warps are capped at 16, a tile at the tensor's rows; tools/compile_kernels.py --sweep lists the
launches) is not timed again: its rows copy the earlier one's, marked ``same_launch_as``. Items stop being started
when ``--time-cap`` is spent; the files are rewritten after each shape.

    python benchmarks/tune_divnorm_kernel.py --out DIR [--time-cap 150] [--kernel dn|fused_bn]
    python benchmarks/tune_divnorm_kernel.py --out DIR --dry-run   # CPU: Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

STAGE_SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
DRY_SHAPES = [(2, 64, 4, 4), (2, 256, 2, 2)]
GRID = {"tile_elements": [2048, 4096, 8192, 16384], "elements_per_warp": [256, 512, 1024]}
BACKWARD_PROGRAMS = [4, 8, 16]
DRY_GRID = {"tile_elements": [1024, 4096, 8192], "elements_per_warp": [512]}  # 8192: the same launch as 4096
DRY_BACKWARD_PROGRAMS = [8]
P, POWER, EPS = 0.5, 2.0, 0.0  # the trainer's defaults for ``ours``
BN_EPS = 1e-5  # nn.BatchNorm2d's
KERNEL_TITLES = {"dn": "the fused `ours` kernel", "fused_bn": "the fused ReLU -> ours -> BatchNorm kernels"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter: tiny shapes, 2 settings")
    p.add_argument("--time-cap", type=float, default=150.0, help="seconds; settings after it are not started")
    p.add_argument("--channels-first", action="store_true", help="NCHW instead of channels-last (dn only)")
    p.add_argument(
        "--kernel",
        choices=("dn", "fused_bn"),
        default="dn",
        help="dn: the ours kernel; fused_bn: the ReLU -> ours -> BatchNorm kernels (channels-last)",
    )
    args = p.parse_args(argv)
    if args.kernel == "fused_bn" and args.channels_first:
        p.error("--kernel fused_bn takes channels-last tensors only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes interpreted or compiled mode when triton.language is first imported: a child decides it
        command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode

    import torch

    from divnorm import pool_size, triton_fused_bn, triton_ours
    from divnorm.fused_bn import ReluDivNormBatchNormFunction
    from divnorm.grouped import GroupedDivNormFunction

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("tune_divnorm_kernel: no CUDA GPU here; use --dry-run to check the script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = DRY_SHAPES if args.dry_run else STAGE_SHAPES
    grid = DRY_GRID if args.dry_run else GRID
    programs = DRY_BACKWARD_PROGRAMS if args.dry_run else BACKWARD_PROGRAMS
    deadline = time.monotonic() + args.time_cap
    default = dict(triton_ours.TUNING)
    args.out.mkdir(parents=True, exist_ok=True)

    def timed(fn) -> float:
        """Milliseconds per call: CUDA events (do_bench's median) on a GPU, the host clock under the interpreter."""
        if cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1000)
        return statistics.median(runs)

    bandwidth = None
    if cuda:  # bytes read + written per second of a big device-to-device copy
        src = torch.empty(2**30, dtype=torch.bfloat16, device=device).fill_(1)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() * 2 / (timed(lambda: dst.copy_(src)) / 1000)
        del src, dst

    result: dict[str, Any] = {
        "benchmark": "tune_divnorm_kernel",
        "kernel": args.kernel,
        "dry_run": args.dry_run,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "dtype": str(dtype).replace("torch.", ""),
        "memory_format": "channels_first" if args.channels_first else "channels_last",
        "divnorm": {"p": P, "power": POWER, "eps": EPS},
        "default_tuning": default,
        "copy_gb_per_second": round(bandwidth / 1e9, 1) if bandwidth else None,
        "shapes": [],
    }
    try:
        for shape in shapes:
            channels = shape[1]
            pool = pool_size(channels, P)
            generator = torch.Generator(device=device).manual_seed(0)
            memory_format = torch.contiguous_format if args.channels_first else torch.channels_last
            x = torch.randn(shape, device=device, generator=generator).to(dtype, memory_format=memory_format)
            dy = torch.randn(shape, device=device, generator=generator).to(dtype, memory_format=memory_format)
            gamma = torch.zeros(channels // pool, device=device)
            sigma = torch.ones(channels // pool, device=device)
            weight = torch.ones(channels, device=device)
            bias = torch.zeros(channels, device=device)
            # the reference: the torch path in fp32, forward and backward by hand
            xr = x.float().requires_grad_(True)
            if args.kernel == "dn":
                yr = GroupedDivNormFunction.apply(xr, gamma, sigma, pool, POWER, EPS)
                forward_fn = functools.partial(triton_ours.forward, x, gamma, sigma, pool, POWER, EPS)
                backward_fn = functools.partial(
                    triton_ours.backward, dy, x, gamma, sigma, pool, POWER, EPS, True, True, True
                )
                passes = (2, 3)
            else:
                bn_args = (pool, POWER, EPS, BN_EPS, True)
                yr = ReluDivNormBatchNormFunction.apply(xr, gamma, sigma, weight, bias, *bn_args)[0]
                forward_fn = functools.partial(triton_fused_bn.forward, x, gamma, sigma, weight, bias, *bn_args)
                _, mean, _, rstd = forward_fn()
                backward_fn = functools.partial(
                    triton_fused_bn.backward, dy, x, gamma, sigma, weight, mean, rstd, pool, POWER, EPS, True
                )
                passes = (3, 5)
            yr.backward(dy.float())
            element = x.element_size()
            moved = [n * x.numel() * element for n in passes]
            entry: dict[str, Any] = {
                "shape": list(shape),
                "pool": pool,
                "floor_forward_ms": round(moved[0] / bandwidth * 1000, 4) if bandwidth else None,
                "floor_backward_ms": round(moved[1] / bandwidth * 1000, 4) if bandwidth else None,
                "settings": [],
            }
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
            launches: dict[Any, tuple[int, int]] = {}  # the launch (tile shape, warps) -> the setting timed with it
            for tile, per_warp in itertools.product(grid["tile_elements"], grid["elements_per_warp"]):
                if time.monotonic() > deadline:
                    entry["stopped"] = "time cap"
                    break
                triton_ours.TUNING.update(tile_elements=tile, elements_per_warp=per_warp)
                launch = triton_ours._blocks(triton_ours._layout(x), channels // pool, pool)
                if launch in launches:  # 16 warps at most, tiles capped at the tensor's rows: timed already
                    first = launches[launch]
                    entry["settings"].extend(
                        {**row, "tile_elements": tile, "elements_per_warp": per_warp, "same_launch_as": list(first)}
                        for row in list(entry["settings"])
                        if (row["tile_elements"], row["elements_per_warp"]) == first
                    )
                    continue
                launches[launch] = (tile, per_warp)
                y = forward_fn()
                y = y[0] if isinstance(y, tuple) else y
                ok = bool(torch.allclose(y.float(), yr.detach(), rtol=tol, atol=tol))
                row = {"tile_elements": tile, "elements_per_warp": per_warp}
                row["forward_ms"] = round(timed(forward_fn), 4)
                for per_sm in programs:
                    triton_ours.TUNING["backward_programs_per_sm"] = per_sm
                    backward = backward_fn
                    ok_b = bool(torch.allclose(backward()[0].float(), xr.grad, rtol=tol, atol=tol))
                    entry["settings"].append(
                        {
                            **row,
                            "backward_programs_per_sm": per_sm,
                            "backward_ms": round(timed(backward), 4),
                            "matches_torch_path": ok and ok_b,
                        }  # fmt: skip
                    )
            _summarize(entry)
            result["shapes"].append(entry)
            _write(result, args.out)
    finally:
        triton_ours.TUNING.clear()
        triton_ours.TUNING.update(default)
        result["tuning_after"] = dict(triton_ours.TUNING)  # what the sweep left: the default again
        result["best_overall"] = _best_overall(result["shapes"])
        result["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        _write(result, args.out)
    best = result["best_overall"]
    print(f"tune_divnorm_kernel: best over the shapes {best}; default {default}")
    print(f"tune_divnorm_kernel: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


def _key(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["tile_elements"], row["elements_per_warp"], row["backward_programs_per_sm"]


def _summarize(entry: dict[str, Any]) -> None:
    """The fastest correct setting per pass at this shape, with its ratio to the pass's floor."""
    good = [row for row in entry["settings"] if row["matches_torch_path"]]
    for name in ("forward", "backward"):
        if not good:
            entry[f"best_{name}"] = None
            continue
        row = min(good, key=lambda r: r[f"{name}_ms"])
        floor = entry[f"floor_{name}_ms"]
        entry[f"best_{name}"] = {**row, "vs_floor": round(row[f"{name}_ms"] / floor, 2) if floor else None}


def _best_overall(shapes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting with the least forward + backward time summed over every shape it was measured correct at."""
    totals: dict[tuple[int, int, int], list[float]] = {}
    for entry in shapes:
        for row in entry["settings"]:
            if row["matches_torch_path"]:
                totals.setdefault(_key(row), []).append(row["forward_ms"] + row["backward_ms"])
    complete = {key: sum(ms) for key, ms in totals.items() if len(ms) == len(shapes)}
    if not complete:
        return None
    key = min(complete, key=complete.get)
    return {"tile_elements": key[0], "elements_per_warp": key[1], "backward_programs_per_sm": key[2],
            "forward_plus_backward_ms_summed": round(complete[key], 4)}  # fmt: skip


def _write(result: dict[str, Any], out: Path) -> None:
    from train.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "results.md", _markdown(result))


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# The launch shape of {KERNEL_TITLES[result.get('kernel', 'dn')]}",
        "",
        f"- {result['device_name']}; torch {result['torch']}, Triton {result['triton']}; {result['started']} UTC",
        f"- {result['dtype']}, {result['memory_format']}; copy bandwidth {result['copy_gb_per_second']} GB/s",
        f"- default TUNING: {result['default_tuning']}; best over the shapes: {result.get('best_overall')}",
        "",
        "| shape | pool | floor fwd / bwd ms | best fwd ms (x floor) | its tile / per warp | best bwd ms (x floor) | "
        "its tile / per warp / programs per SM | default fwd / bwd ms |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    default = result["default_tuning"]
    for entry in result["shapes"]:
        fwd, bwd = entry.get("best_forward"), entry.get("best_backward")
        base = next((r for r in entry["settings"] if _key(r) == tuple(default.values())), None)
        lines.append(
            f"| {tuple(entry['shape'])} | {entry['pool']} | {entry['floor_forward_ms']} / {entry['floor_backward_ms']} "
            f"| {fwd and fwd['forward_ms']} ({fwd and fwd['vs_floor']}) "
            f"| {fwd and (fwd['tile_elements'], fwd['elements_per_warp'])} "
            f"| {bwd and bwd['backward_ms']} ({bwd and bwd['vs_floor']}) "
            f"| {bwd and (bwd['tile_elements'], bwd['elements_per_warp'], bwd['backward_programs_per_sm'])} "
            f"| {base and base['forward_ms']} / {base and base['backward_ms']} |"
        )
    bad = sum(not row["matches_torch_path"] for entry in result["shapes"] for row in entry["settings"])
    lines += ["", f"Settings that did not match the torch path: {bad}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
