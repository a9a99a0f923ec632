"""The loaders' user-facing error, in a module without torch: the conversion tool and the data-set definitions
raise it too, and they should not pay torch's ~2 s import for an exception class."""

from __future__ import annotations


class LoaderError(RuntimeError):
    """A user-facing loader problem (missing data set, backend not installed, no GPU): one clear message."""
