"""Trained networks out of the trainer: :func:`load_pretrained` from an exported folder or a run folder.

An exported folder (``python -m train.export RUN --out DIR``) holds

* ``model.safetensors``: the weights (``state_dict`` names, plain tensors; the format model hubs use);
* ``config.json``: ``{"model", "num_classes", "layout", "model_config", ...}`` (:data:`CARD_KEYS`), plus
  what the network expects as input (``input_size``, ``mean``, ``std``) and where it came from (``source``).

A run folder (``runs/<exp>/``) holds the trainer's ``config.json`` and ``best.pt``; ``best.pt`` is read with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only. No path here runs
arbitrary pickled code. Only torch, safetensors and json: ``models`` knows nothing of the trainer or the loaders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import ModelConfigError
from models.registry import create_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_KEYS = ("model", "num_classes", "layout", "model_config")


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """A trainer checkpoint (``best.pt``, ``last.pt``) loaded with ``weights_only=True`` onto the CPU.

    A file holding more than tensors and plain containers (a planted pickle, or a ``last.pt`` of the trainer's
    first format with NumPy RNG states: ``python -m train.checkpoint upgrade`` converts those) is refused by torch;
    that becomes a :class:`ValueError` saying so in one line. (``models`` cannot import the trainer's
    :func:`train.checkpoint.load`, which converts the first format in memory.)
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises UnpicklingError (or RuntimeError) for non-tensor objects
        # torch's message is a page long; keep the part naming what was refused ("Unsupported global: ...")
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a refusal: the file itself is damaged (truncated, not a torch file)
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"{path} is not a readable checkpoint ({type(error).__name__}: {first[:160]}): truncated or "
                "damaged; use the other checkpoint (--checkpoint best|last)"
            ) from None
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (it holds {found.group(1)}, not only tensors "
            "and plain containers); use best.pt (--checkpoint best)"
        ) from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError(f"{path} is not a trainer checkpoint (no 'model' state dict)")
    return dict(checkpoint)


def load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``net.load_state_dict(state)``, or one :class:`ModelConfigError` saying how ``source``'s weights differ from
    the network (missing / unexpected parameters, shapes): the model options differ from those it was saved with."""
    try:
        net.load_state_dict(state)
    except RuntimeError:
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        parts = [
            f"{len(names)} {what} (e.g. {names[0]})"
            for names, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
            if names
        ]
        raise ModelConfigError(
            f"the weights in {source} do not fit this {type(net).__name__}: {', '.join(parts) or 'mismatch'}; "
            "the model options (model.* overrides, the data set's classes) differ from the ones it was saved with"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def run_card(run_config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The model card (:data:`CARD_KEYS`) of a run folder's ``config.json`` (its ``run`` section names the
    network; the trainer records ``num_classes`` and ``layout`` there)."""
    meta = run_config.get("run") or {}
    missing = [key for key in ("model", "num_classes", "layout") if key not in meta]
    if missing or "model" not in run_config:
        raise ValueError(
            f"{source} does not name the network ({', '.join(missing) or 'model section'} missing from its run "
            "section: a run written before these were recorded); export it with python -m train.export RUN --out DIR"
        )
    return {
        "model": meta["model"],
        "num_classes": int(meta["num_classes"]),
        "layout": int(meta["layout"]),
        "model_config": dict(run_config["model"]),
    }


def build_from_card(card: Mapping[str, Any]) -> nn.Module:
    """The untrained network a card describes, built without touching the caller's random number streams."""
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ModelConfigError(f"model card lacks {', '.join(missing)} (expected keys: {', '.join(CARD_KEYS)})")
    with torch.random.fork_rng(devices=[]):  # create_model initializes with the global RNG
        return create_model(
            card["model"],
            num_classes=int(card["num_classes"]),
            model_config=card["model_config"],
            image_size=int(card["layout"]),
        )


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card (:data:`CARD_KEYS`) of an exported folder or a run folder; :class:`FileNotFoundError`
    naming what is missing when ``path`` is neither."""
    folder = Path(path)
    if (folder / WEIGHTS_FILE).is_file():
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} has {WEIGHTS_FILE} but no {CONFIG_FILE}; export it again")
        return _read_json(folder / CONFIG_FILE)
    if (folder / CONFIG_FILE).is_file() and (folder / "best.pt").is_file():
        return run_card(_read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    if (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no best.pt (checkpoint.save_best off, or no validated epoch yet)")
    raise FileNotFoundError(
        f"{folder} is neither an exported model ({WEIGHTS_FILE} + {CONFIG_FILE}) nor a run folder "
        "(config.json + best.pt)"
    )


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained network in ``path``, in eval mode, ready for inference.

    ``path`` is an exported folder (``model.safetensors`` + ``config.json``) or a run folder (``config.json`` +
    ``best.pt``, read with ``weights_only=True``). Raises :class:`FileNotFoundError` naming what is missing.
    """
    folder = Path(path)
    card = read_card(folder)
    if (folder / WEIGHTS_FILE).is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {WEIGHTS_FILE} needs safetensors: pip install safetensors") from None
        state = load_file(folder / WEIGHTS_FILE)
    else:
        state = read_checkpoint_state(folder / "best.pt")["model"]
    net = build_from_card(card)
    load_weights(net, state, str(folder))
    return net.to(map_location).eval()
