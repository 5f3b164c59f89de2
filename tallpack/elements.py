"""Element types as the spec names them: item sizes and which are floating. numpy only.

The byte layer needs no more than this; torch conversions live in :mod:`tallpack.dtypes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FormatError, UnsupportedVersionError


@dataclass(frozen=True)
class Element:
    itemsize: int
    floating: bool


#: spec name -> element type (spec §4). Every name here is known to the byte layer whatever torch
#: is installed; a tensor of a dtype the installed torch lacks fails when it is read.
ELEMENTS: dict[str, Element] = {
    "float64": Element(8, True), "float32": Element(4, True), "float16": Element(2, True),
    "bfloat16": Element(2, True), "float8_e4m3fn": Element(1, True), "float8_e5m2": Element(1, True),
    "int64": Element(8, False), "int32": Element(4, False), "int16": Element(2, False),
    "int8": Element(1, False), "uint64": Element(8, False), "uint32": Element(4, False),
    "uint16": Element(2, False), "uint8": Element(1, False), "bool": Element(1, False),
}
FLOATING = frozenset(k for k, v in ELEMENTS.items() if v.floating)

#: each floating type's exponent and fraction bits
FLOAT_BITS: dict[str, tuple[int, int]] = {
    "float64": (11, 52), "float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7),
    "float8_e4m3fn": (4, 3), "float8_e5m2": (5, 2),
}


def holds(wide: str, narrow: str) -> bool:
    """Whether floating type ``wide`` holds every value of ``narrow`` (a cast from ``narrow`` is
    exact): as many exponent and fraction bits or more. bfloat16 and float16 widen to float32;
    neither holds the other.

    >>> holds("float32", "bfloat16"), holds("float16", "bfloat16")
    (True, False)
    """
    (we, wf), (ne, nf) = FLOAT_BITS[wide], FLOAT_BITS[narrow]
    return we >= ne and wf >= nf


def element(name: object) -> Element:
    """The element type of a spec name; a FormatError for anything else."""
    if not isinstance(name, str):
        raise FormatError(f"dtype {name!r} is not a name")
    if name not in ELEMENTS:
        raise UnsupportedVersionError(f"unknown dtype {name!r}; a newer tallpack may read it")
    return ELEMENTS[name]


def itemsize(name: str) -> int:
    return element(name).itemsize


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
