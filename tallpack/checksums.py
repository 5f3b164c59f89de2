"""Chunk checksums, by the name the manifest records (``checksum``)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from .errors import UnsupportedVersionError


def crc32(buf) -> int:
    """ISO-HDLC CRC-32 (zlib's) of ``buf``."""
    return zlib.crc32(buf) & 0xFFFFFFFF


#: name -> function of the stored bytes, returning an unsigned integer.
CHECKSUMS: dict[str, Callable[[object], int]] = {"crc32": crc32}


def checksum_function(name: object) -> Callable[[object], int]:
    """The checksum a manifest names; UnsupportedVersionError for one this reader does not know."""
    if not isinstance(name, str) or name not in CHECKSUMS:
        raise UnsupportedVersionError(f"unknown checksum {name!r}; a newer tallpack may read it")
    return CHECKSUMS[name]
