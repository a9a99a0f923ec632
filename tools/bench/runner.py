"""Run one benchmark setting in a fresh process: ``python -m tools.bench.runner SETTING.json RECORD.json``.

A process per setting keeps measurements apart (peak RSS, threads FFCV pins to one, DALI pipelines, CUDA
memory) and lets the parent kill a setting that hangs (FFCV hangs instead of failing when a worker errors).
The record is written atomically; a setting that cannot run here becomes ``skipped`` with the reason, an
unexpected error ``failed`` with the error and the end of its traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

# ``python -m tools.bench.runner`` from anywhere: the repository root must be importable
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench.settings import Setting, make_record  # noqa: E402
from train.files import write_json_atomic  # noqa: E402


def run_setting(setting: Setting) -> dict[str, Any]:
    """Measure ``setting``; never raises for a setting that cannot run (the record says why)."""
    from loaders.base import LoaderError
    from tools.bench.measure import measure

    try:
        return measure(setting)
    except (LoaderError, ImportError) as error:
        return make_record(setting, "skipped", f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 - a benchmark reports a broken setting and goes on
        tail = traceback.format_exc().strip().splitlines()[-12:]
        return make_record(setting, "failed", f"{type(error).__name__}: {error}", traceback=tail)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tools.bench.runner SETTING.json RECORD.json", file=sys.stderr)
        return 2
    setting = Setting.from_json(json.loads(Path(argv[0]).read_text()))
    record = run_setting(setting)
    write_json_atomic(argv[1], record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
