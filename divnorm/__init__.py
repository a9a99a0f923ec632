"""Divisive normalization layers (torch only, usable on their own).

- :class:`DivisiveNorm2d` (``type: ours``): grouped normalization over contiguous channel pools.
- :class:`LineDivisiveNorm2d` (``type: ken``): Miller et al. 2022, line topology over channels.
- :func:`build_divnorm`: the config's ``divnorm_specs`` dict -> a module (``nn.Identity`` for ``nonorm``).
- :func:`check_finite`: raise :class:`FloatingPointError` naming any DN parameter that diverged.
"""

from divnorm.common import DENOMINATOR_FLOOR, check_finite, divnorm_layers, nonfinite_parameters
from divnorm.factory import DIVNORM_TYPES, TYPE_DEFAULTS, build_divnorm, known_keys
from divnorm.grouped import DivisiveNorm2d, pool_size
from divnorm.ken import LineDivisiveNorm2d, ken_window

__all__ = [
    "DENOMINATOR_FLOOR",
    "DIVNORM_TYPES",
    "TYPE_DEFAULTS",
    "DivisiveNorm2d",
    "LineDivisiveNorm2d",
    "build_divnorm",
    "check_finite",
    "divnorm_layers",
    "ken_window",
    "known_keys",
    "nonfinite_parameters",
    "pool_size",
]
