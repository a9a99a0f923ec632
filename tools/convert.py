"""Convert a data set into FFCV ``.beton`` files and / or DALI-readable shards: parallel, resumable, verifiable.

    python tools/convert.py imagenet --src /data/imagenet --out /data/converted --format both
    python tools/convert.py cifar100 --src data --download --out data/cifar100-conv --format ffcv
    python tools/convert.py synthetic --out /tmp/synth --format dali --verify
    python tools/convert.py imagenet --out /data/converted --verify-only

Output layout (what ``loaders/`` reads): ``OUT/ffcv/<split>.beton`` and ``OUT/dali/<split>/shard-NNNNN.tar`` +
``.idx`` (ImageNet) or ``OUT/dali/<split>/images.npy`` + ``labels.npy`` (CIFAR-100, synthetic), one
``manifest.json`` per format folder, written last (runs of one split each add theirs to it: see
docs/convert.md); ``OUT/.lock`` keeps a second conversion into ``OUT`` out (it stops at once, naming the first
one's pid). Every file appears under a ``.tmp`` name first; rerunning the same command after an interruption keeps
every finished shard whose checksum still matches and writes the rest.
See ``tools/_convert/`` for the parts: image rules in ``images.py``, shard format in ``dali_writer.py``, the
watched FFCV writer in ``ffcv_writer.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from loaders.datasets import SPLITS
from tools._convert import TOOL_VERSION, files
from tools._convert.dali_writer import SplitResult, write_array_split, write_webdataset_split
from tools._convert.ffcv_writer import current_record, import_writer, result_from_record, write_ffcv_split
from tools._convert.images import stored_pixels
from tools._convert.pool import decode_files
from tools._convert.sources import ConvertError, SplitSource, load_sources
from tools._convert.verify import verify_format
from train.files import OutputLockedError, exclusive_lock

FFCV_DEFAULT_MAX_RES = 512
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``1GiB``, ``256MiB``, ``500kB`` or ``1000000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; examples: 1GiB, 256MiB, 500kB, 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])  # 0: check_options says so


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/convert.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("dataset", choices=["imagenet", "cifar100", "synthetic"])
    parser.add_argument("--src", type=Path, help="ImageNet: folder with train/<wnid>/ and val/<wnid>/; "
                        "CIFAR-100: folder holding cifar-100-python/ (default: data)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets ffcv/ and / or dali/)")
    parser.add_argument("--format", choices=["ffcv", "dali", "both"], help="default: both")
    parser.add_argument("--split", default="all", help="train | val | test | all (default: all)")
    parser.add_argument("--max-res", type=int, help="shrink the long side to this many pixels (0: never); "
                        f"default: {FFCV_DEFAULT_MAX_RES} for FFCV, original size for DALI")  # fmt: skip
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs (default 90)")
    parser.add_argument("--compress-prob", type=float, default=0.5, help="FFCV proportion mode (default 0.5)")
    parser.add_argument("--write-mode", choices=["raw", "jpg", "proportion"], default="proportion",
                        help="FFCV image storage (default proportion); CIFAR / synthetic are always raw")  # fmt: skip
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("1GiB"), help="DALI tar size (1GiB)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--subset", type=int, help="only the first N source samples of each split")
    parser.add_argument("--strict", action="store_true", help="stop at the first unusable image instead of skipping")
    parser.add_argument("--verify", action="store_true", help="read everything back after converting")
    parser.add_argument("--verify-only", action="store_true", help="only check an existing output (no --src)")
    parser.add_argument("--download", action="store_true", help="CIFAR-100: download into --src first")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="--verify: stop FFCV's reader after this many seconds without progress (120)")  # fmt: skip
    return parser


def check_options(args: argparse.Namespace) -> None:
    """ConvertError (one line) naming every numeric option out of its range."""
    problems = []
    if args.workers < 1:
        problems.append(f"--workers must be >= 1 (got {args.workers})")
    if args.subset is not None and args.subset < 1:
        problems.append(f"--subset must be >= 1 (got {args.subset})")
    if args.max_res is not None and args.max_res < 0:
        problems.append(f"--max-res must be >= 0 (0: never shrink; got {args.max_res})")
    if not 1 <= args.jpeg_quality <= 100:
        problems.append(f"--jpeg-quality must be within 1..100 (got {args.jpeg_quality})")
    if not 0 <= args.compress_prob <= 1:  # NaN fails this too
        problems.append(f"--compress-prob must be within 0..1 (got {args.compress_prob})")
    if args.shard_size < 1:
        problems.append(f"--shard-size must be > 0 (got {args.shard_size})")
    if not args.stall_timeout > 0:
        problems.append(f"--stall-timeout must be > 0 seconds (got {args.stall_timeout})")
    if problems:
        raise ConvertError("; ".join(problems))


def check_out_is_folder(out: Path) -> None:
    """ConvertError when ``--out`` (or the first of its parents that exists) is not a folder."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file, not a folder; pass a folder (it is created when missing)")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConvertError(f"--out {out}: {parent} is a file, not a folder")
            return


def check_source_and_out(args: argparse.Namespace) -> None:
    """ConvertError when an ImageNet ``--src`` tree and ``--out`` overlap: the scan would read the output (its
    folders as classes, its files as images) and a later run would read it again."""
    if args.dataset != "imagenet" or args.src is None:
        return
    src, out = args.src.resolve(), args.out.resolve()
    if out == src:
        raise ConvertError(f"--out {args.out} is the --src folder {args.src}: pass an --out outside the source tree")
    if src in out.parents:
        raise ConvertError(f"--out {args.out} is inside --src {args.src}: pass an --out outside the source tree")
    if out in src.parents:
        raise ConvertError(f"--src {args.src} is inside --out {args.out}: pass an --out outside the source tree")


def _bar(total: int, desc: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5,
                disable=None)  # fmt: skip


def dali_settings(args: argparse.Namespace, source: SplitSource) -> dict:
    if source.images is not None:
        return {"tool_version": TOOL_VERSION, "dataset": args.dataset, "layout": "arrays"}
    return {
        "tool_version": TOOL_VERSION,
        "dataset": args.dataset,
        "layout": "webdataset",
        "max_res": args.max_res or None,  # default: DALI keeps the original resolution
        "jpeg_quality": args.jpeg_quality,
        "shard_size": args.shard_size,
    }


def ffcv_settings(args: argparse.Namespace, source: SplitSource) -> dict:
    arrays = source.images is not None
    max_res = FFCV_DEFAULT_MAX_RES if args.max_res is None else (args.max_res or None)
    return {
        "tool_version": TOOL_VERSION,
        "dataset": args.dataset,
        "max_res": None if arrays else max_res,
        "write_mode": "raw" if arrays else args.write_mode,
        "jpeg_quality": args.jpeg_quality,
        "compress_prob": args.compress_prob,
    }


def largest_stored(source: SplitSource, args: argparse.Namespace) -> int:
    """FFCV without a max resolution: decode every file once to find the largest picture (it sizes the pages)."""
    largest = 0
    with _bar(len(source), f"size {source.split}") as bar:
        for item in decode_files(source.paths, source.labels, 0, args.workers, None):
            bar.update(1)
            if item.reason is None:
                largest = max(largest, stored_pixels(item.width, item.height))
    return largest


def convert_split(source: SplitSource, args: argparse.Namespace, formats: list[str]) -> dict[str, SplitResult]:
    results: dict[str, SplitResult] = {}
    started = time.monotonic()
    if "dali" in formats:
        folder = args.out / "dali"
        if source.images is not None:
            results["dali"] = write_array_split(source, folder, dali_settings(args, source))
        else:
            with _bar(len(source), f"dali {source.split}") as bar:
                results["dali"] = write_webdataset_split(
                    source, folder, dali_settings(args, source), workers=args.workers,
                    shard_size=args.shard_size, strict=args.strict, progress=bar.update,
                )  # fmt: skip
        results["dali"].seconds = time.monotonic() - started
    if "ffcv" in formats:
        started = time.monotonic()
        folder, settings = args.out / "ffcv", ffcv_settings(args, source)
        record = current_record(source, folder, settings)
        if record is not None:
            results["ffcv"] = result_from_record(record, source.split)
        else:
            if source.images is not None or settings["max_res"]:
                max_pixels = 0  # the max resolution bounds the pictures (in-memory sets: 32 px)
            elif "dali" in results:
                max_pixels = results["dali"].max_pixels
            else:
                max_pixels = largest_stored(source, args)
            with _bar(len(source), f"ffcv {source.split}") as bar:
                results["ffcv"] = write_ffcv_split(
                    source, folder, settings, max_pixels=max_pixels, workers=args.workers, strict=args.strict,
                    progress=bar.update,
                )  # fmt: skip
        results["ffcv"].seconds = time.monotonic() - started  # includes a size pass when there is no max_res
    return results


def manifest(args, fmt: str, sources: list[SplitSource], results: list[SplitResult], classes) -> dict:
    """The format folder's manifest.json (no timestamps: equal inputs give an identical manifest)."""
    settings = dali_settings(args, sources[0]) if fmt == "dali" else ffcv_settings(args, sources[0])
    settings = {**settings, "subset": args.subset, "splits": [s.split for s in sources]}
    skipped = []
    for source, result in zip(sources, results):
        skipped += [{"split": source.split, "path": s["path"], "reason": s["reason"]} for s in result.skipped]
        skipped += [{"split": source.split, **s} for s in source.ignored]
    value = {
        "tool_version": TOOL_VERSION,
        "dataset": args.dataset,
        "format": fmt,
        "layout": settings.get("layout", "beton") if fmt == "dali" else "beton",
        "source": str(args.src.resolve()) if args.src else f"built-in {args.dataset} generator",
        "settings": settings,
        "counts": {s.split: r.count for s, r in zip(sources, results)},
        "per_class": {s.split: {str(k): v for k, v in sorted(r.per_class.items())} for s, r in zip(sources, results)},
        "classes": classes,
        "files": sorted((f for r in results for f in r.files), key=lambda f: f["path"]),
        "skipped": skipped,
    }
    if fmt == "dali":
        value["reencoded"] = {s.split: r.reencoded for s, r in zip(sources, results)}
    return value


# Splits converted by separate runs (--split train, then --split val) share one manifest per format folder: a run
# keeps the earlier runs' splits it does not rewrite when they were made with the same tool version, data set,
# source, settings and class map, and refuses to run otherwise (a rewrite would leave their files unlisted).
_SAME_KEYS = ("tool_version", "dataset", "format", "layout", "source", "classes")


def _file_split(path: str) -> str:
    """The split of a manifest ``files`` entry (``train/shard-00000.tar``, ``val/images.npy``, ``val.beton``)."""
    return path.split("/")[0].removesuffix(".beton")


def _identity(value: dict) -> dict:
    settings = {k: v for k, v in (value.get("settings") or {}).items() if k != "splits"}
    return {**{k: value.get(k) for k in _SAME_KEYS}, "settings": settings}


def restrict_manifest(value: dict, splits: list[str]) -> dict:
    """``value`` listing only ``splits`` (counts, per-class counts, files, skipped files, re-encoded counts)."""
    value = dict(value)
    value["settings"] = {**value["settings"], "splits": [s for s in SPLITS if s in splits]}
    for key in ("counts", "per_class", "reencoded"):
        if key in value:
            value[key] = {s: v for s, v in value[key].items() if s in splits}
    value["files"] = [f for f in value["files"] if _file_split(f["path"]) in splits]
    value["skipped"] = [e for e in value["skipped"] if e.get("split") in splits]
    return value


def merge_manifests(new: dict, earlier: dict | None) -> dict:
    """``new`` plus the splits of ``earlier`` (already restricted to splits ``new`` lacks), in split order: equal to
    the manifest of one run converting all of them."""
    if not earlier or not earlier["counts"]:
        return new
    splits = [s for s in SPLITS if s in new["counts"] or s in earlier["counts"]]
    merged = {**new, "settings": {**new["settings"], "splits": splits}}
    for key in ("counts", "per_class", "reencoded"):
        if key in new:
            both = {**earlier.get(key, {}), **new[key]}
            merged[key] = {s: both[s] for s in splits if s in both}
    merged["files"] = sorted(new["files"] + earlier["files"], key=lambda f: f["path"])
    merged["skipped"] = sorted(new["skipped"] + earlier["skipped"], key=lambda e: splits.index(e["split"]))
    return merged


def earlier_manifest(args: argparse.Namespace, fmt: str, sources: list[SplitSource], classes) -> dict | None:
    """The existing manifest of ``fmt`` cut to the splits this run does not write (None: there are none), or a
    ConvertError when those splits were converted differently (they would end up unlisted)."""
    folder = args.out / fmt
    old = files.read_json(folder / "manifest.json")
    if not isinstance(old, dict) or not isinstance(old.get("counts"), dict):
        return None
    others = [s for s in old["counts"] if s not in {source.split for source in sources}]
    if not others:
        return None
    want, held = _identity(manifest(args, fmt, sources, [SplitResult() for _ in sources], classes)), _identity(old)
    if held != want:
        diffs = [k for k in _SAME_KEYS if held[k] != want[k] and k != "classes"]
        diffs += [f"{k} {held['settings'].get(k)!r} -> {want['settings'].get(k)!r}"
                  for k in sorted(set(held["settings"]) | set(want["settings"]))
                  if held["settings"].get(k) != want["settings"].get(k)]  # fmt: skip
        diffs += ["the class list"] if held["classes"] != want["classes"] else []
        raise ConvertError(
            f"{folder} already holds split(s) {', '.join(sorted(others))} converted with other settings or source "
            f"({'; '.join(diffs)}); convert every split with these settings (--split all), rerun with the earlier "
            "ones, or write to another --out"
        )
    return restrict_manifest(old, others)


def verify(out: Path, formats: list[str], workers: int, stall_timeout: float) -> int:
    """Print the one-line verdict; 0 when every check passed."""
    problems, summaries = [], []
    for fmt in formats:
        folder = out if (out / "manifest.json").is_file() and out.name == fmt else out / fmt
        with _bar(0, f"verify {fmt}") as bar:
            found, summary = verify_format(folder, fmt, workers, stall_timeout, bar.update)
        problems += found
        summaries.append(summary)
    if problems:
        print(f"verify: FAIL ({len(problems)} problem(s)): " + "; ".join(problems), flush=True)
        return 1
    print("verify: PASS: " + "; ".join(summaries), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    check_options(args)
    check_out_is_folder(args.out)
    if args.verify_only:
        if args.format:
            formats = ["ffcv", "dali"] if args.format == "both" else [args.format]
        elif (args.out / "manifest.json").is_file():
            formats = [files.read_json(args.out / "manifest.json")["format"]]
        else:
            formats = [f for f in ("ffcv", "dali") if (args.out / f / "manifest.json").is_file()]
        if not formats:
            raise ConvertError(f"no manifest.json under {args.out}: nothing converted there yet (drop --verify-only)")
        return verify(args.out, formats, args.workers, args.stall_timeout)
    formats = ["ffcv", "dali"] if args.format in (None, "both") else [args.format]
    check_source_and_out(args)
    # one writer per --out: a second conversion (a resubmitted job) would overwrite this one's .tmp files
    with exclusive_lock(args.out, f"conversion into {args.out}"):
        return _convert(args, formats)


def _convert(args: argparse.Namespace, formats: list[str]) -> int:
    """Convert every split into ``args.out`` (the caller holds its lock); then verify when asked."""
    if "ffcv" in formats:  # fail fast when FFCV is missing or broken; its import is start-up, not conversion
        begun = time.monotonic()
        import_writer()
        print(f"FFCV import {time.monotonic() - begun:.1f} s (start-up, before converting)", flush=True)
    started = time.monotonic()
    cpu_start = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    sources, classes = load_sources(args.dataset, args.src, args.split, args.subset, args.download)
    for source in sources:
        for note in source.notes:
            print(f"note: {note}", file=sys.stderr)
    earlier = {fmt: earlier_manifest(args, fmt, sources, classes) for fmt in formats}  # may refuse: before writing
    for fmt in formats:  # no manifest may describe files this run is about to rewrite: it keeps only other splits
        (args.out / fmt).mkdir(parents=True, exist_ok=True)
        if earlier[fmt]:
            files.write_json_atomic(args.out / fmt / "manifest.json", earlier[fmt])
        else:
            files.remove_quietly(args.out / fmt / "manifest.json")
    per_format: dict[str, list[SplitResult]] = {fmt: [] for fmt in formats}
    for source in sources:
        for fmt, result in convert_split(source, args, formats).items():
            per_format[fmt].append(result)
    for fmt in formats:
        value = merge_manifests(manifest(args, fmt, sources, per_format[fmt], classes), earlier[fmt])
        files.write_json_atomic(args.out / fmt / "manifest.json", value)
    seconds = time.monotonic() - started
    total = sum(len(s) for s in sources)
    megabytes = sum(s.source_bytes for s in sources) / 1e6
    first = per_format[formats[0]]
    counts = ", ".join(f"{s.split} {r.count}" for s, r in zip(sources, first))
    skipped = sum(len(r.skipped) + len(s.ignored) for s, r in zip(sources, first))
    phases = [f"{fmt} {s.split} {r.seconds:.1f} s" for fmt in formats for s, r in zip(sources, per_format[fmt])]
    own, children = (
        sum(getattr(now, f) - getattr(then, f) for f in ("ru_utime", "ru_stime"))
        for now, then in zip(
            [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)], cpu_start
        )
    )
    cpu = f"cpu: main process {own:.1f} s, worker processes {children:.1f} s"
    print(f"time per step: {'; '.join(phases)}; {cpu}", flush=True)
    print(
        f"converted {args.dataset} -> {args.out} ({'+'.join(formats)}): {counts} | skipped {skipped} | "
        f"{seconds:.1f} s | {total / seconds:.1f} images/s | {megabytes / seconds:.1f} MB/s",
        flush=True,
    )
    return verify(args.out, formats, args.workers, args.stall_timeout) if args.verify else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 verify failed, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the pool, the scratch files and FFCV's process group are cleaned up
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except (ConvertError, OutputLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permission denied, ...: one line, not a traceback
        print(f"error: {error}; fix it and rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # an in-process caller (tests, the benchmark) gets its own handler back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
