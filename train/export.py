"""``python -m train.export RUN --out DIR``: a run's trained network as a model file others can load.

Writes ``DIR/model.safetensors`` (the weights: plain tensors, no pickle) and ``DIR/config.json`` (the model
card: model name, ``num_classes``, ``layout``, the resolved ``model`` config section, the input the network
expects and where the weights came from). Load it with ``models.load_pretrained(DIR)`` or
``torch.hub.load(<repo>, "<model>", weights=DIR, source="local")``. Both files are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from train.config import ConfigError
from train.evaluate import CHECKPOINTS, checkpoint_weights, open_run


def model_card(run_config: dict[str, Any], meta: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The exported ``config.json``: what ``models.load_pretrained`` needs, plus input and provenance."""
    import models
    from loaders.datasets import dataset_info
    from train.build import network_shape

    dataset = meta["dataset"]
    data_info = dataset_info(dataset)
    return {
        "model": meta["model"],
        **network_shape(dataset, run_config),
        "model_config": models.resolve_model_config(run_config["model"]),
        # what the network saw in training: RGB in [0, 1], normalized per channel, at this size
        "input_size": run_config["data"]["image_size"] or data_info.image_size,
        "mean": list(data_info.mean),
        "std": list(data_info.std),
        "source": {"run": meta.get("exp"), "dataset": dataset, **info},
        "format": "divnorm-trainer model, safetensors weights (models.load_pretrained)",
    }


def _holds_a_run(folder: Path) -> bool:
    """True when ``folder`` is a trainer's run folder (a checkpoint, or metrics.jsonl beside config.json)."""
    return any((folder / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl"))


def export_run(folder: str | Path, out: str | Path, checkpoint: str = "best", log=print) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json`` from ``folder``'s ``best.pt`` (or ``last.pt``)."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ConfigError("export needs the safetensors package: pip install safetensors") from None
    from models.pretrained import CONFIG_FILE, WEIGHTS_FILE, build_from_card, load_weights
    from train.files import write_bytes_atomic, write_json_atomic

    run = open_run(folder)
    state, info = checkpoint_weights(run, checkpoint)
    card = model_card(run.config, run.meta, info)
    load_weights(build_from_card(card), state, str(run.folder / info["checkpoint"]))  # the card rebuilds this net
    out = Path(out)
    if out.resolve() == run.folder.resolve() or _holds_a_run(out):
        raise ConfigError(f"--out {out} holds a training run (its config.json would be replaced); export elsewhere")
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    write_bytes_atomic(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    write_json_atomic(out / CONFIG_FILE, card)
    log(f"exported {run.folder / info['checkpoint']} (epoch {info['epoch']}) -> {out / WEIGHTS_FILE}, {CONFIG_FILE}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Export a run's weights as safetensors + config.json (load with models.load_pretrained(DIR)).",
    )
    parser.add_argument("run", help="run folder written by python -m train (runs/<exp>)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write model.safetensors + config.json")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="weights (default: best.pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export_run(args.run, args.out, args.checkpoint)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
