"""The run's parts from its config: device, AMP dtype, network, CPU threads, compile setting.

Each function turns a config value into the object it names and raises :class:`train.config.ConfigError` with the
fix when the machine cannot honour it (``--device cuda`` without a GPU, fp16 on the CPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from train import distributed
from train.config import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, env: distributed.DistributedEnv) -> torch.device:
    """``auto`` -> CUDA when present; ``cuda`` without a GPU is a clear error. One GPU per local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA GPU is visible to PyTorch; use --device cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, off on CPU (CPU bf16 autocast is slower without AMX); fp16 needs CUDA."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("training.amp=fp16 needs CUDA (its GradScaler is for GPUs); use bf16 or off on CPU")
    return AMP_DTYPES.get(amp)


def amp_name(dtype: torch.dtype | None) -> str:
    """The summary's name of an AMP dtype: bf16, fp16 or off."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")


def network_shape(dataset: str, config: dict[str, Any]) -> dict[str, int]:
    """``{"num_classes", "layout"}`` of the run's network: ``layout`` is ``create_model``'s ``image_size``
    (32 = the small-input layout for inputs up to 64 px, else 224). Recorded in config.json's ``run`` section so
    ``models.load_pretrained`` can rebuild the network without knowing the data sets."""
    from loaders.datasets import dataset_info

    image_size = input_size(dataset, config)
    return {"num_classes": dataset_info(dataset).num_classes, "layout": 32 if image_size <= 64 else 224}


def input_size(dataset: str, config: dict[str, Any]) -> int:
    """The side of the training images: ``data.image_size``, or the data set's own."""
    from loaders.datasets import dataset_info

    return int(config["data"]["image_size"] or dataset_info(dataset).image_size)


def check_input_size(net: nn.Module, model: str, image_size: int) -> None:
    """A :class:`ConfigError` where ``image_size`` is too small for ``model`` (a pooling layer would get less than
    one pixel), found before anything is written: one forward pass of a CPU copy at batch 1, eval mode (no RNG, no
    BatchNorm statistics touched). Only the small-input layout (up to 64 px) is probed; it costs ~0.1 s there."""
    if image_size > 64:
        return
    import copy

    probe = copy.deepcopy(net).to("cpu").eval()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as error:
        if "too small" in str(error) or "greater than actual input size" in str(error):
            raise ConfigError(
                f"data.image_size={image_size} is too small for {model}: {str(error).splitlines()[0]}"
            ) from None
        raise


def build_network(dataset: str, model: str, config: dict[str, Any]) -> nn.Module:
    """``models.create_model`` with the config's model section (imported here: train depends on models)."""
    import models

    shape = network_shape(dataset, config)
    try:
        return models.create_model(
            model,
            num_classes=shape["num_classes"],
            model_config=config["model"],
            image_size=shape["layout"],
        )
    except (KeyError, ValueError) as error:
        raise ConfigError(f"model config: {error}") from None


def split_cpu_threads(env: distributed.DistributedEnv) -> None:
    """Split the CPU cores between the processes of this node (torchrun sets LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size if env.enabled else 1))
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
