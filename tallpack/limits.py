"""The limits a reader enforces before it allocates or loops over anything a file declares (spec §7).

All of them in one place. Each bounds the work and memory of opening an archive by the file's
size, or by a constant stated in the spec; writers check the same limits, so an archive that
tallpack writes is never refused by them.
"""

from __future__ import annotations

#: Stored manifest bytes, and decoded (decompressed) manifest bytes, at most.
MAX_MANIFEST_BYTES = 256 << 20
#: The decoded manifest is at most ``MANIFEST_BASE + MANIFEST_PER_FILE_BYTE * file size`` bytes:
#: its cost is bounded by the file's size. A writer whose manifest would compress better than
#: that stores it uncompressed (ratio 1), which always satisfies the bound.
MANIFEST_BASE = 64 << 10
MANIFEST_PER_FILE_BYTE = 4
#: Nesting of JSON arrays and objects in the manifest (the reference writer uses 8 at most, plus
#: whatever nesting the user's metadata has).
MAX_DEPTH = 64
#: Characters of a name: task names, tensor names, ``keys`` entries, dtype, kind, encoding, codec ids.
MAX_NAME_CHARS = 4096
#: Dimensions of a shape; the product of a shape's nonzero dimensions is at most ``MAX_INT``.
MAX_DIMS = 32
#: Codecs in one chain.
MAX_CHAIN = 4
#: Tasks in one archive.
MAX_TASKS = 1 << 16
#: The largest size, offset or count: 2**63 - 1.
MAX_INT = (1 << 63) - 1
#: Any JSON integer of the manifest lies in [-2**63, 2**64) (int64, or uint64 for checksums).
MIN_JSON_INT, MAX_JSON_INT = -(1 << 63), (1 << 64) - 1
#: Digits of a JSON number the parser looks at; longer ones are refused unparsed.
MAX_NUMBER_CHARS = 32
#: The largest decoded chunk (bytes).
MAX_CHUNK_BYTES = 1 << 30
#: zstd decodes at most 128 KiB per block, and a block takes at least 4 bytes (an RLE block): no
#: zstd frame decodes to more than 32768 times its own size. A chunk whose chain ends in zstd
#: therefore declares at most ``ZSTD_MAX_RATIO * nbytes`` bytes for zstd's output.
ZSTD_MAX_RATIO = 32768


def max_manifest_bytes(file_size: int) -> int:
    """The most decoded manifest bytes a file of ``file_size`` bytes may hold."""
    return min(MAX_MANIFEST_BYTES, MANIFEST_BASE + MANIFEST_PER_FILE_BYTE * file_size)
