"""Divisive normalization layers (torch only, usable on their own).

- :class:`DivisiveNorm2d` (``type: ours``): grouped normalization over contiguous channel pools (the paper's).
- :class:`LineDivisiveNorm2d` (``type: ken``): Miller, Chung & Miller 2022, line topology over channels.
- :class:`LocalResponseNorm2d` (``lrn``) and :class:`GDN2d` (``gdn``): baselines for comparison runs.
- :func:`build_divnorm`: the config's ``divnorm_specs`` dict -> a module (``nn.Identity`` for ``nonorm``).
- :func:`check_finite`: raise :class:`FloatingPointError` naming any DN parameter that diverged.

Every layer takes ``num_channels`` first (a drop-in for ``nn.BatchNorm2d``), works for any batch size and for
channels-last input, and computes in fp32 under autocast, casting the result back to the input's dtype.
"""

from divnorm.baselines import GDN2d, LocalResponseNorm2d
from divnorm.common import DENOMINATOR_FLOOR, check_finite, divnorm_layers, nonfinite_parameters
from divnorm.factory import DIVNORM_TYPES, TYPE_DEFAULTS, build_divnorm, known_keys
from divnorm.grouped import DivisiveNorm2d, pool_size
from divnorm.ken import LineDivisiveNorm2d, ken_window

__all__ = [
    "DENOMINATOR_FLOOR",
    "DIVNORM_TYPES",
    "TYPE_DEFAULTS",
    "DivisiveNorm2d",
    "GDN2d",
    "LineDivisiveNorm2d",
    "LocalResponseNorm2d",
    "build_divnorm",
    "check_finite",
    "divnorm_layers",
    "ken_window",
    "known_keys",
    "nonfinite_parameters",
    "pool_size",
]
