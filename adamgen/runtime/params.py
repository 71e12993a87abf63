"""Parameters an in-place optimizer updates: viewed without copying, checked, aligned buffers.

Shared by :mod:`adamgen.runtime.optimizer` (NumPy arrays and torch tensors through DLPack): what
a parameter must be for a kernel to update it in place (float32/float64, contiguous, writable,
element-aligned: C reads elements through typed pointers), and the errors that name it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ArgumentTypeError, ArgumentValueError
from . import validate
from .follow import storage_problem, torch_of

ALIGNMENT = 64
SUPPORTED_DTYPES = "float16, float32 and float64"
_LARGEST_STEP = int(np.finfo(np.float64).max)


def aligned_empty(size: int, dtype: np.dtype) -> np.ndarray:
    """A 1-d array of ``size`` elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + size * itemsize].view(dtype)


def as_parameter(name: str, value: Any, role: str = "parameter",
                 owner: str = "the optimizer") -> np.ndarray:
    """A writable NumPy view of a parameter, without copying (torch tensors via DLPack);
    ``owner`` names the optimizer in errors."""
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "__dlpack__"):
        dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
        if dtype == "bfloat16":
            raise ArgumentTypeError(
                f"{role} {name} is a bfloat16 tensor, which NumPy cannot view; {owner} updates "
                f"{SUPPORTED_DTYPES} {role}s in place (adamgen.torch.Adam/AdamW update bfloat16 "
                "parameters, with torch's rounding, master weights or stochastic rounding)")
        problem = storage_problem(value) if torch_of(value) is not None else None
        if problem:
            raise ArgumentValueError(f"{role} {name}: {problem}")
        source = value.detach() if hasattr(value, "detach") else value
        try:
            array = np.from_dlpack(source)
        except Exception as error:  # noqa: BLE001 (foreign objects raise anything)
            raise ArgumentTypeError(f"{role} {name} ({dtype or type(value).__name__}): cannot "
                                    f"view it without a copy through DLPack ({error}); "
                                    f"{owner} updates CPU tensors of {SUPPORTED_DTYPES}") from None
        if not array.flags.writeable:  # NumPy marks DLPack imports read-only; memory is ours
            array.flags.writeable = True
    else:
        raise ArgumentTypeError(f"{role} {name} is a {type(value).__name__}; expected a "
                                "float array or a CPU tensor with __dlpack__")
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise ArgumentTypeError(f"{role} {name} has dtype {array.dtype}; {owner} updates "
                                f"{SUPPORTED_DTYPES} {role}s in place")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise ArgumentValueError(f"{role} {name} is not contiguous (shape {array.shape}, "
                                 f"strides {array.strides} in bytes); pass a contiguous array "
                                 "to update in place")
    if not array.flags.writeable:
        raise ArgumentValueError(f"{role} {name} is read-only")
    if not array.flags.aligned:  # C reads elements through typed pointers: UB when misaligned
        raise ArgumentValueError(f"{role} {name} starts at an address that is not a multiple "
                                 f"of its {array.dtype.itemsize}-byte element; pass an aligned "
                                 "array (np.array(p) makes one) to update in place")
    return array


def is_fortran(array: np.ndarray) -> bool:
    return array.flags.f_contiguous and not array.flags.c_contiguous


def shared_memory_error(first: str, second: str) -> ArgumentValueError:
    return ArgumentValueError(
        f"{first} and {second} share memory (the same array twice, or overlapping views of "
        "one buffer); each parameter must own its memory: one step over both would update the "
        "shared elements twice, or race between threads (torch.optim only warns for [p, p] "
        "and updates p twice; adamgen refuses)")



def checked_step(name: str, value: Any) -> int:
    """A step counter: a whole number >= 0 (``2.0`` is 2; ``2.7``, NaN and inf are errors,
    never truncated) small enough that ``float(step + 1)`` exists."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} is a bool; expected a whole number >= 0")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != math.floor(value):
            raise ArgumentValueError(f"{name} must be a whole number >= 0, got {value!r}")
        number = int(value)
    else:
        raise ArgumentTypeError(f"{name} is a {type(value).__name__}; expected a whole number "
                                ">= 0")
    if number < 0:
        raise ArgumentValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if number + 1 > _LARGEST_STEP:  # the next step computes float(step + 1)
        raise ArgumentValueError(f"{name}={validate.shown(value)} is beyond the range of a "
                                 "float")
    return number
