"""Chunk checksums, by the name the manifest records (``checksum``)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import xxhash

from .errors import UnsupportedVersionError


def crc32(buf) -> int:
    """ISO-HDLC CRC-32 (zlib's) of ``buf``."""
    return zlib.crc32(buf) & 0xFFFFFFFF


def xxh3_64(buf) -> int:
    """XXH3, 64-bit, seed 0, of ``buf`` (about ten times faster than CRC-32 here)."""
    return xxhash.xxh3_64_intdigest(buf)


#: name -> function of the stored bytes, returning an unsigned integer.
CHECKSUMS: dict[str, Callable[[object], int]] = {"crc32": crc32, "xxh3-64": xxh3_64}
#: The checksum new archives use.
DEFAULT_CHECKSUM = "xxh3-64"


def checksum_function(name: object) -> Callable[[object], int]:
    """The checksum a manifest names; UnsupportedVersionError for one this reader does not know."""
    if not isinstance(name, str) or name not in CHECKSUMS:
        raise UnsupportedVersionError(f"unknown checksum {name!r}; a newer tallpack may read it")
    return CHECKSUMS[name]
