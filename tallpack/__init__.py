"""tallpack: store a base model and its fine-tunes as one compressed, lazily readable archive.

>>> import tallpack
>>> tallpack.pack("base/", {"cars": "ft/cars", "dtd": "ft/dtd"}, "family.tallpack")
>>> with tallpack.open("family.tallpack") as fam:
...     sd = fam.state_dict("cars")
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    CheckpointNotFoundError,
    CodecError,
    FormatError,
    IncompatibleCheckpointsError,
    IntegrityError,
    TallpackError,
    TaskNotFoundError,
    TensorNotFoundError,
    UnsafeCheckpointError,
    UnsupportedVersionError,
)
from .packer import pack  # noqa: E402
from .reader import Archive, open  # noqa: E402,A004
from .merging import ALPHA_GRID  # noqa: E402
from .selection import select_alpha  # noqa: E402
from .tall import DEFAULT_LAMBDA, LAMBDA_GRID  # noqa: E402

__all__ = [
    "pack", "open", "select_alpha", "Archive", "DEFAULT_LAMBDA", "LAMBDA_GRID", "ALPHA_GRID",
    "TallpackError", "FormatError", "IntegrityError", "UnsupportedVersionError", "CodecError",
    "CheckpointError", "CheckpointNotFoundError", "UnsafeCheckpointError",
    "IncompatibleCheckpointsError", "TaskNotFoundError", "TensorNotFoundError",
]
