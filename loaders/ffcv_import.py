"""``import ffcv`` in a fifth of the time, without changing what FFCV does, and with torch's thread count kept.

FFCV 1.0.2's ``ffcv.fields.rgb_image`` builds, at import, a module-level ``numba.typed.Dict`` holding two
constants (``{'jpg': 0, 'raw': 1}``). Creating that typed dict makes numba compile its dictionary implementation:
about 4 s of one core in every process that imports FFCV (the training run, each conversion child), measured
here at 4.0-4.7 s of a 4.3-5.0 s import. FFCV only ever reads the dict from Python (``RGBImageField.encode`` and
the decoders' ``generate_code``, which copy the two ints into closures before compiling), so a plain ``dict``
with the same contents behaves identically. :func:`import_ffcv` imports FFCV with ``numba.typed.Dict`` bound to
``dict`` for the duration of the import and afterwards gives every other module that picked up the name during
that window the real class back, so only that one constant table changes type.

``import ffcv`` also sets torch's thread count to 1; the caller's count is restored.
"""

from __future__ import annotations

import sys

INSTALL_HINT = (
    "FFCV is not installed or cannot load its system libraries ({error}). Install it with `bash tools/setup.sh` "
    "(Debian: needs root for pkg-config g++ libopencv-dev libturbojpeg0-dev), or by hand: "
    "`sudo apt-get install pkg-config g++ libopencv-dev libturbojpeg0-dev && "
    ".venv/bin/pip install --no-deps -r requirements/lock-ffcv.txt`. Every other --loader works without it."
)


def import_ffcv():
    """Import and return the ``ffcv`` package (ImportError when it is not installed or cannot load)."""
    if "ffcv" in sys.modules:
        return sys.modules["ffcv"]
    import numba.typed
    import torch

    threads = torch.get_num_threads()
    typed_dict = numba.typed.Dict
    before = set(sys.modules)
    numba.typed.Dict = dict
    try:
        import ffcv
    finally:
        numba.typed.Dict = typed_dict
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if name != "ffcv.fields.rgb_image" and getattr(module, "Dict", None) is dict:
                module.Dict = typed_dict
        torch.set_num_threads(threads)
    return ffcv
