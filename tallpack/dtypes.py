"""torch dtypes for the spec's element types, and conversions between tensors and little-endian bytes."""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ._torch import torch
from .elements import ELEMENTS, numel
from .errors import FormatError, UnsupportedVersionError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("tallpack needs a little-endian machine")

#: spec names this module maps to torch dtypes (those of ``_OPTIONAL`` only where torch has them).
#: The spec names are torch's names without the ``torch.`` prefix.
_NAMED = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_OPTIONAL = ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
assert set(_NAMED + _OPTIONAL) <= set(ELEMENTS)


#: The unsigned element types torch has only since 2.3, and the signed ones of their width that hold
#: their bits in an archive's own arrays (exact residuals, sparse correction indices) on an older torch.
_STAND_INS = {"uint16": "int16", "uint32": "int32", "uint64": "int64"}


@functools.cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """spec name -> torch dtype, and back; built on first use, so importing this module does not import torch."""
    dtypes = {name: getattr(torch, name) for name in (*_NAMED, *_OPTIONAL) if hasattr(torch, name)}
    return dtypes, {v: k for k, v in dtypes.items()}


def array_dtype(name: str) -> torch.dtype:
    """The torch dtype that holds the elements of an archive's own array of spec dtype ``name``:
    ``torch_dtype(name)``, or on a torch before 2.3 (no uint16/32/64) the signed dtype of the same
    width, whose bits are the same (:func:`as_numpy` gives them back as the unsigned type).

    >>> array_dtype("uint32")  # torch 2.1 or 2.2
    torch.int32
    """
    dtypes = _tables()[0]
    if name not in dtypes and name in _STAND_INS:
        return dtypes[_STAND_INS[name]]
    return torch_dtype(name)


def as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """A CPU tensor read as an array of spec dtype ``name`` (:func:`array_dtype`), as numpy's
    ``name``: an unsigned array torch holds as a signed one is viewed back, its bits unchanged.

    >>> as_numpy(torch.tensor([-1], dtype=torch.int32), "uint32")
    array([4294967295], dtype=uint32)
    """
    a = t.numpy()
    if name in _STAND_INS and a.dtype != np.dtype(name):
        return a.view(np.dtype(name))
    return a


#: safetensors' dtype codes -> spec names.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
    "U64": "uint64",
}


#: float8_e4m3fn's largest finite value. A float32 past it casts to it (saturates: infinities too,
#: NaN stays NaN), as PyTorch casts since 2.13; earlier releases gave NaN. :func:`narrow` clamps
#: first, so every torch gives the spec's bits (§6.1.1).
E4M3_MAX = 448.0


def narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 ``x`` cast to ``dtype`` as the spec's ``cast_d``: PyTorch's ``Tensor.to``, with a
    float8_e4m3fn past its range saturating to +-448 whatever torch's own cast does.

    >>> narrow(torch.tensor([500.0, -float("inf")]), torch.float8_e4m3fn).float()
    tensor([ 448., -448.])
    """
    if dtype == getattr(torch, "float8_e4m3fn", None) and x.dtype != dtype:
        x = x.clamp(-E4M3_MAX, E4M3_MAX)
    return x.to(dtype)


def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of tensors of one dtype, float8 ones too (by their bytes: torch 2.1 and 2.2
    cannot concatenate float8 tensors).

    >>> cat([torch.zeros(2, dtype=torch.float8_e4m3fn), torch.ones(1, dtype=torch.float8_e4m3fn)]).float()
    tensor([0., 0., 1.])
    """
    if tensors[0].is_floating_point() and tensors[0].element_size() == 1:
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(tensors[0].dtype)
    return torch.cat(tensors)


def dtype_name(dtype: torch.dtype) -> str:
    """The spec name of a torch dtype, e.g. ``torch.bfloat16 -> "bfloat16"``."""
    try:
        return _tables()[1][dtype]
    except KeyError:
        raise FormatError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec name; a FormatError for names this reader does not know."""
    if not isinstance(name, str):
        raise FormatError(f"dtype {name!r} is not a name")
    try:
        return _tables()[0][name]
    except KeyError:
        if name in _STAND_INS:  # torch 2.1 or 2.2
            raise UnsupportedVersionError(
                f"dtype {name!r} needs torch>=2.3 (this is torch {torch.__version__})") from None
        raise UnsupportedVersionError(
            f"unknown dtype {name!r} in manifest; a newer tallpack (or torch) may read it") from None


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements in C order as little-endian bytes (no copy when already contiguous)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


#: Bytes ``all_equal`` compares first: fine-tuned tensors differ there, and the whole
#: comparison (a pass and a temporary as large as the tensor) is left for tensors that may be equal.
EQUAL_PREFIX = 1 << 14


def all_equal(tensors: list[torch.Tensor]) -> bool:
    """Whether the tensors have the same dtype, shape and bytes (NaNs and signed zeros count)."""
    first = tensors[0]
    fb = np.frombuffer(tensor_to_bytes(first), np.uint8)
    others = [t for t in tensors[1:] if t.dtype == first.dtype and t.shape == first.shape]
    if len(others) < len(tensors) - 1:
        return False
    views = [np.frombuffer(tensor_to_bytes(t), np.uint8) for t in others]
    return (all(np.array_equal(v[:EQUAL_PREFIX], fb[:EQUAL_PREFIX]) for v in views)
            and all(np.array_equal(v, fb) for v in views))


def view_tensor(buf: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` over ``buf`` without copying, also when ``buf`` is read-only
    (a view into the mapped file): for inputs that are only read, never handed to a caller (an
    unsigned array may come as its signed stand-in: :func:`array_dtype`)."""
    dt = array_dtype(dtype)
    if type(shape) is not tuple or not all(type(d) is int for d in shape):
        shape = tuple(int(d) for d in shape)
    n = numel(shape)
    mv = buf.data if isinstance(buf, np.ndarray) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if len(mv) != n * dt.itemsize:
        raise FormatError(f"buffer of {len(mv)} bytes does not hold {shape} {dtype}")
    if n == 0:
        return torch.empty(shape, dtype=dt)
    if not mv.readonly:  # two torch calls: a few microseconds less for each of a task's small arrays
        return torch.frombuffer(mv, dtype=dt).view(shape)
    with no_user_warnings():  # read-only memory: the tensor is never written
        return torch.frombuffer(mv, dtype=dt).view(shape)


@contextmanager
def no_user_warnings() -> Iterator[None]:
    """UserWarnings silenced in the block (torch's about read-only memory, or a pickle's protocol),
    one thread at a time: ``warnings.catch_warnings`` saves and restores the process's filters, so
    two threads' blocks that overlap leave one's ``ignore`` in them for good, silencing every
    UserWarning of the program after (a service reading archives from several threads).

    >>> with no_user_warnings():
    ...     t = torch.frombuffer(read_only_view, dtype=torch.uint8)
    """
    with _quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


_quiet = threading.RLock()  # (re-entered where one such block runs in another)


def _after_fork_in_child() -> None:
    """A fresh ``_quiet`` in a forked child: one another parent thread held at the fork (reading an
    archive's raw arrays) stays held there, and the child's first read-only view waited forever."""
    global _quiet
    _quiet = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def bytes_to_tensor(buf: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape) -> torch.Tensor:
    """A new tensor of ``dtype``/``shape`` holding a copy of ``buf``."""
    dt = torch_dtype(dtype)
    shape = tuple(int(d) for d in shape)
    n = numel(shape)
    if len((buf.data if isinstance(buf, np.ndarray) else memoryview(buf)).cast("B")) != n * dt.itemsize:
        raise FormatError(f"buffer of {len(buf)} bytes does not hold {shape} {dtype}")
    if n == 0:
        return torch.empty(shape, dtype=dt)
    arr = np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.writeable:  # bytes, or a view into the mapped file: take a private copy
        arr = arr.copy()
    return torch.from_numpy(arr).view(dt).reshape(shape)
