"""A second reader of tallpack archives, written from spec/FORMAT.md and the schema alone.

It imports nothing from ``tallpack``: it exists to show that the specification is enough to read
an archive bit for bit (``tests/test_spec_reader_r32.py`` compares it with the reference reader).
"""

from .reader import SpecArchive, SpecError, open_archive

__all__ = ["SpecArchive", "SpecError", "open_archive"]
