"""FFCV augmentations whose random draws are a function of the batch, not of a thread's RNG stream.

FFCV's own ``RandomTranslate``, ``RandomHorizontalFlip`` and ``RandomResizedCropRGBImageDecoder`` draw from numba's
per-thread NumPy generators, which are seeded from OS entropy and shared by whichever samples a thread happens to
process: two runs (or a run and its resumed continuation) crop and flip differently. The operations here draw
every sample's numbers from a key made of the batch (its sample ids, in order: fixed by the contract's seeded
per-epoch permutation, so different every epoch) and the sample's id. A resumed epoch that starts at batch ``k``
therefore augments batches ``k, k + 1, ...`` exactly as an uninterrupted epoch does, whatever the thread count.

* :class:`SeededTranslateFlip`: ``RandomTranslate(padding)`` (a uniform integer shift in ``[-padding, padding]``
  per axis, zero fill) and/or ``RandomHorizontalFlip()`` (probability 0.5), in one pass per sample; the draws
  are counter-based hashes (splitmix64), no generator state at all.
* :class:`SeededRandomResizedCropDecoder`: FFCV's RandomResizedCrop decoder, with numba's generator reseeded from
  the sample's key just before FFCV's ``get_random_crop`` (its crop distribution, unchanged, costs ~1 us per
  sample against milliseconds of JPEG decoding).

Import only after FFCV is known to be installed (:mod:`loaders.ffcv_pipeline` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(nogil=True)
def _mix(x):  # pragma: no cover - numba-compiled; splitmix64's finalizer (a bijection of uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True)
def batch_key(indices):  # pragma: no cover - numba-compiled
    """One uint64 for a batch: its sample ids in order (the same batch of the same epoch gets the same key)."""
    key = _GOLDEN
    for i in range(indices.shape[0]):
        key = _mix(key ^ np.uint64(indices[i]))
    return key


@numba.njit(nogil=True)
def sample_key(key, index):  # pragma: no cover - numba-compiled
    return _mix(key ^ _mix(np.uint64(index) + _GOLDEN))


@numba.njit(nogil=True)
def uniform(key, k):  # pragma: no cover - numba-compiled
    """The ``k``-th uniform number in [0, 1) of a sample's key (53 random bits)."""
    return np.float64(_mix(key + np.uint64(k + 1) * _GOLDEN) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


class SeededTranslateFlip(Operation):
    """Pad-``padding`` random translate (zero fill) and/or a horizontal flip, drawn per sample from its key."""

    def __init__(self, padding: int, flip: bool) -> None:
        super().__init__()
        self.padding, self.flip = int(padding), bool(flip)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad, flip = self.padding, self.flip
        shifts = 2 * pad + 1

        def translate_flip(images, dst, indices):  # pragma: no cover - numba-compiled
            n, h, w, _ = images.shape
            key = batch_key(indices)
            for i in my_range(n):
                mine = sample_key(key, indices[i])
                dy = min(int(uniform(mine, 0) * shifts), shifts - 1) - pad
                dx = min(int(uniform(mine, 1) * shifts), shifts - 1) - pad
                mirrored = flip and uniform(mine, 2) < 0.5
                for y in range(h):
                    source_y = y + dy
                    for x in range(w):
                        # the translated image at (y, x) is the source at (y + dy, x + dx); a flip reads it mirrored
                        source_x = (w - 1 - x if mirrored else x) + dx
                        if 0 <= source_y < h and 0 <= source_x < w:
                            for c in range(3):
                                dst[i, y, x, c] = images[i, source_y, source_x, c]
                        else:
                            for c in range(3):
                                dst[i, y, x, c] = 0
            return dst

        translate_flip.is_parallel = True
        translate_flip.with_indices = True
        return translate_flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SeededRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder (same crops' distribution) with each sample's crop drawn from its key."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)

        # FFCV 1.0.2's ResizedCropRGBImageDecoder.generate_code, plus the reseed before get_random_crop
        def decode(batch_indices, my_storage, metadata, storage_state):  # pragma: no cover - numba-compiled
            destination, temp_storage = my_storage
            key = batch_key(batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                # numba's generator is per thread: reseeding it here makes the draws below this sample's own
                np.random.seed(np.uint32(sample_key(key, source_ix) >> np.uint64(32)))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
