"""The trainer: ``python -m train <dataset> <model> <exp> [key=value ...]`` (see :mod:`train.__main__`).

Modules: :mod:`train.config` (JSON configs, overrides, validation), :mod:`train.data` (loader choice and specs),
:mod:`train.loop` (one epoch, evaluation), :mod:`train.schedule` (optimizer, learning-rate schedule),
:mod:`train.checkpoint` (atomic checkpoints, RNG state), :mod:`train.distributed` (torchrun/DDP),
:mod:`train.metrics` (device-side sums, metrics.jsonl), :mod:`train.run` (one run end to end).
"""
