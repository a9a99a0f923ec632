"""Configuration: load ``configs/defaults.json`` + ``configs/<dataset>/<model>.json``, apply overrides, validate.

The schema is the defaults file itself: every valid key appears there, and its default's type is the expected
type (ints are accepted where floats are expected; keys whose default is ``null`` take the type listed in
:data:`NULLABLE_TYPES`). Overrides use the original syntax ``model-divnorm_specs-type=ours`` or the dotted form
``model.divnorm_specs.type=ours``, at any depth; values parse as JSON (``1``, ``0.5``, ``true``, ``null``,
``[0.08, 1.0]``), with ``True``/``False``/``None`` also accepted and anything else kept as a string. An unknown
key is an error naming the nearest valid keys; a value of the wrong type is an error naming the expected type.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS_FILE = "defaults.json"
DATASETS = ("synthetic", "cifar100", "imagenet")
MODELS = ("alexnet", "vgg16", "resnet18", "resnet50")

# Keys whose default is null: the type a non-null value must have.
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "data.path": (str,),
    "data.eval_batch_size": (int,),
    "data.subset": (int,),
    "data.synthetic_size": (int,),
    "data.image_size": (int,),
    "data.dali_threads": (int,),
    "data.tuned_path": (str,),
    "training.grad_clip": (float, int),
}

# Keys that take more than their default's type.
UNION_TYPES: dict[str, tuple[type, ...]] = {
    "model.std": (float, int, str),  # a number or "input_size"
    "model.divnorm_specs.eps": (float, int),
    "model.divnorm_specs.power": (int, float),
    "optimizer.dampening": (float, int),
    "training.compile": (str, bool),  # auto | true | false
    "training.cuda_graphs": (str, bool),  # auto | true | false
    "training.compile_dynamic": (str, bool),  # auto | true | false
    "model.divnorm_specs.fuse_bn": (str, bool),  # auto | true | false
}

# Keys with a fixed set of values.
CHOICES: dict[str, tuple[Any, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "data.loader": ("torch", "dali", "ffcv", "gpu", "auto"),
    "data.augment": ("standard", "original", "none"),
    "data.dali_device": ("auto", "cpu", "gpu"),
    "data.dali_decode": ("auto", "mixed", "cpu"),
    "data.loader_priority": ("same", "low"),  # train.streams.PRIORITY_CHOICES
    "data.order": ("auto", "quasi_random", "random"),
    "training.amp": ("auto", "bf16", "fp16", "off"),
    "training.compile": ("auto", True, False),
    "training.cuda_graphs": ("auto", True, False),
    "training.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "training.compile_dynamic": ("auto", True, False),  # train.compiled.DYNAMIC_CHOICES
    "training.criterion": ("cross_entropy",),
    "optimizer.name": ("sgd", "adam", "adamw"),
    "lr_scheduler.name": ("steplr", "plateau", "cosine", "onecycle", "none"),
    "logging.progress_bar": ("auto", "on", "off"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "model.divnorm_specs.kernel": ("auto", "triton", "torch"),  # divnorm.ops.KERNEL_CHOICES
    "model.divnorm_specs.fuse_bn": ("auto", True, False),  # divnorm.fused_bn.FUSE_CHOICES
}

# Numeric keys with a valid range (low, high), both inclusive, None = unbounded: a value outside is a ConfigError,
# not a traceback from inside torch (SGD's "Invalid learning rate", cross_entropy's label_smoothing check) or a
# silent misuse. Every number must also be finite (JSON overrides accept NaN and Infinity).
# [low, high] ranges of random crops: 0 < low <= high (every loader samples in them)
ORDERED_PAIRS = ("data.crop_scale", "data.crop_ratio")

RANGES: dict[str, tuple[float | None, float | None]] = {
    "runs": (1, None),
    "data.batch_size": (1, None),
    "data.eval_batch_size": (1, None),
    "data.workers": (0, None),
    "data.subset": (1, None),
    "data.image_size": (1, None),
    "data.val_resize": (1, None),
    "data.prefetch": (1, None),
    "data.dali_threads": (1, None),
    "data.hw_decoder_load": (0, 1),
    "data.batches_ahead": (1, None),
    "data.ffcv_timeout": (0, None),
    "data.progressive_start_res": (1, None),
    "data.progressive_end_res": (1, None),
    "data.progressive_start_epoch": (0, None),
    "data.progressive_end_epoch": (0, None),
    "training.epochs": (1, None),  # 0 trained nothing and reported nan (train.evaluate evaluates)
    "training.patience": (0, None),
    "training.label_smoothing": (0, 1),
    "training.grad_clip": (0, None),
    "training.eval_every": (1, None),
    "optimizer.lr": (0, None),
    "optimizer.momentum": (0, None),
    "optimizer.dampening": (0, None),
    "optimizer.weight_decay": (0, None),
    "optimizer.beta1": (0, 1),  # below 1: see BELOW_HIGH
    "optimizer.beta2": (0, 1),
    "optimizer.eps": (0, None),
    "lr_scheduler.step_size": (1, None),
    "lr_scheduler.gamma": (0, None),
    "lr_scheduler.patience": (0, None),
    "lr_scheduler.factor": (0, None),
    "lr_scheduler.t_max": (0, None),
    "lr_scheduler.min_lr": (0, None),
    "lr_scheduler.pct_start": (0, 1),
    "lr_scheduler.warmup_epochs": (0, None),
    "lr_scheduler.warmup_start_factor": (0, None),
    "logging.refresh_steps": (1, None),
    "distributed.base_batch_size": (1, None),
}

# Keys whose range excludes its upper end (Adam's betas must stay below 1).
BELOW_HIGH = frozenset({"optimizer.beta1", "optimizer.beta2"})

# The original code's names for keys this project renamed (and old value spellings): still accepted.
KEY_ALIASES = {"data.bz": "data.batch_size", "data.num_workers": "data.workers"}
VALUE_ALIASES = {"lr_scheduler.name": {"cosinelr": "cosine"}}


class ConfigError(ValueError):
    """A user mistake in a config file or override: the message says what is wrong and how to fix it."""


def config_path(dataset: str, model: str) -> Path:
    """Path of the JSON file for ``dataset`` x ``model`` (errors name the valid choices)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    return CONFIG_DIR / dataset / f"{model}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def defaults() -> dict[str, Any]:
    """The shared defaults: every valid key with its default value (this is the schema)."""
    return _read_json(CONFIG_DIR / DEFAULTS_FILE)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values, not sections)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _sections(schema: Mapping[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in schema.items():
        if isinstance(value, Mapping):
            names.add(prefix + key)
            names |= _sections(value, prefix + key + ".")
    return names


def _unknown_key_error(key: str, schema: Mapping[str, Any], source: str) -> ConfigError:
    valid = sorted(flatten(schema)) + sorted(_sections(schema))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # a typo in the last part only: match on it within the whole key list
        leaf = key.rsplit(".", 1)[-1]
        leaves = {name: name.rsplit(".", 1)[-1] for name in valid}
        close = [name for name in valid if leaves[name] in difflib.get_close_matches(leaf, leaves.values(), n=3)][:3]
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see configs/defaults.json for the valid keys"
    return ConfigError(f"unknown config key {key!r} ({source}){hint}")


def _type_name(types: Iterable[type]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_value(key: str, value: Any, default: Any, source: str = "override") -> Any:
    """``value`` converted to the type of ``default`` for ``key``; :class:`ConfigError` naming the type if not."""
    value = VALUE_ALIASES.get(key, {}).get(value, value) if isinstance(value, str) else value
    if value is None and "none" in CHOICES.get(key, ()):
        value = "none"  # a bare none on the command line parses as null; here it is the choice "none"
    if value is None:
        if default is None or key in NULLABLE_TYPES:
            return None
        raise ConfigError(f"{key} cannot be null ({source}); expected {_type_name([type(default)])}")
    if key in UNION_TYPES:
        expected = UNION_TYPES[key]
    elif default is None:
        expected = NULLABLE_TYPES.get(key)
        if expected is None:  # a null default without a declared type takes any JSON value
            return value
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, float):
        expected = (float, int)
    else:
        expected = (type(default),)
    # bool is an int in Python; "epochs=true" must still fail
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
    if not ok:
        raise ConfigError(f"{key}={json.dumps(value)} ({source}) has the wrong type: expected {_type_name(expected)}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, list) and isinstance(default, list) and default:
        element = type(default[0])
        numeric = (int, float) if element in (int, float) else (element,)
        if len(value) != len(default) or not all(isinstance(v, numeric) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}={json.dumps(value)} ({source}): expected a list of {len(default)} numbers")
    if key in CHOICES and value not in CHOICES[key]:
        choices = ", ".join(c if isinstance(c, str) else json.dumps(c) for c in CHOICES[key])
        raise ConfigError(f"{key}={value!r} ({source}) is not valid; choose one of: {choices}")
    _check_range(key, value, source)
    return value


def _check_range(key: str, value: Any, source: str) -> None:
    """Numbers are finite and within :data:`RANGES` (lists: every element finite)."""
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{key}={json.dumps(value)} ({source}) is not a finite number")
        # JSON integers are unbounded; torch's C++ side takes 64-bit ones (found by the config fuzz: dampening=1e30
        # as an integer overflowed inside SGD)
        if isinstance(number, int) and not isinstance(number, bool) and abs(number) >= 2**63:
            raise ConfigError(f"{key}={json.dumps(value)} ({source}) is too large: integers must fit in 64 bits")
    if key in ORDERED_PAIRS and isinstance(value, list) and len(value) == 2:
        first, second = value
        if not 0 < first <= second or (key == "data.crop_scale" and second > 1):
            upper = " <= 1 (fractions of the image area)" if key == "data.crop_scale" else ""
            raise ConfigError(f"{key}={json.dumps(value)} ({source}): expected [low, high] with 0 < low <= high{upper}")
    low, high = RANGES.get(key, (None, None))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    below = key in BELOW_HIGH
    if (low is not None and value < low) or (high is not None and (value >= high if below else value > high)):
        if high is None:
            wanted = f">= {low}"
        elif below:
            wanted = f">= {low} and < {high}"
        else:
            wanted = f"within {low}..{high}"
        raise ConfigError(f"{key}={json.dumps(value)} ({source}) is out of range: expected a value {wanted}")


def _set(config: dict[str, Any], schema: Mapping[str, Any], key: str, value: Any, source: str) -> None:
    key = KEY_ALIASES.get(key, key)
    parts = key.split(".")
    node, node_schema = config, schema
    for depth, part in enumerate(parts):
        if not isinstance(node_schema, Mapping) or part not in node_schema:
            raise _unknown_key_error(key, schema, source)
        if depth == len(parts) - 1:
            default = node_schema[part]
            if isinstance(default, Mapping):  # a whole section: merge its keys one by one
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{key} is a section ({source}); set its keys, e.g. {key}.{next(iter(default))}")
                for sub, sub_value in value.items():
                    _set(config, schema, f"{key}.{sub}", sub_value, source)
            else:
                node[part] = check_value(key, value, default, source)
            return
        node = node.setdefault(part, {})
        node_schema = node_schema[part]


def merge(config: dict[str, Any], update: Mapping[str, Any], schema: Mapping[str, Any], source: str) -> None:
    """Apply a nested ``update`` (a config file or fragment) to ``config`` in place, validating every key."""
    for key, value in flatten(update).items():
        _set(config, schema, key, value, source)
    # an explicitly empty section in the update ({"model": {}}) is fine: nothing to set


def parse_value(text: str) -> Any:
    """A command-line value: JSON (numbers, true/false, null, lists, quoted strings), else the plain string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """``"model-divnorm_specs-type=ours"`` or ``"model.divnorm_specs.type=ours"`` -> (dotted key, value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. model-relu=false or optimizer.lr=0.1)")
    key, text = item.split("=", 1)
    key = key.strip().replace("-", ".")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    return key, parse_value(text)


def option_overrides(
    *, loader: str | None = None, data_dir: str | None = None, device: str | None = None, epochs: int | None = None
) -> list[str]:
    """The ``key=value`` overrides that the command-line options ``--loader``, ``--data-dir``, ``--device`` and
    ``--epochs`` stand for (shared by ``python -m train`` and ``python -m train.study``)."""
    items = []
    if loader:
        items.append(f"data.loader={loader}")
    if data_dir:
        items.append(f"data.path={json.dumps(data_dir)}")
    if device:
        items.append(f"device={device}")
    if epochs is not None:
        items.append(f"training.epochs={epochs}")
    return items


def apply_overrides(config: dict[str, Any], overrides: Iterable[str], schema: Mapping[str, Any] | None = None) -> None:
    """Apply ``key=value`` strings to ``config`` in place."""
    schema = schema if schema is not None else defaults()
    for item in overrides:
        key, value = parse_override(item)
        _set(config, schema, key, value, f"override {item!r}")


def load_config(dataset: str, model: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved config of ``dataset`` x ``model``: defaults <- per-model file <- overrides."""
    schema = defaults()
    config = copy.deepcopy(schema)
    path = config_path(dataset, model)
    merge(config, _read_json(path), schema, f"from {path.relative_to(CONFIG_DIR.parent)}")
    apply_overrides(config, overrides, schema)
    return config
