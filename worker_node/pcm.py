"""What every stream processor does alike with 16-bit PCM: check it, delay it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Int16Array = npt.NDArray[np.int16]


def checked(frames: Int16Array) -> Int16Array:
    """The chunk as a 1-D int16 array, or TypeError saying how to decode it."""
    samples = np.asarray(frames)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise TypeError(
            f"expected a 1-D int16 array, got dtype={samples.dtype} ndim={samples.ndim}; "
            "decode PCM with np.frombuffer(data, dtype='<i2')"
        )
    return samples


def delayed(line: Int16Array, samples: Int16Array) -> tuple[Int16Array, Int16Array]:
    """Pass `samples` through a delay line: (as many samples out, the new line)."""
    joined = np.concatenate((line, samples))
    count = samples.shape[0]
    return joined[:count].copy(), joined[count:]
