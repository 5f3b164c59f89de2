"""tallpack: store a base model and its fine-tunes as one compressed, lazily readable archive.

>>> import tallpack
>>> tallpack.pack("base/", {"cars": "ft/cars", "dtd": "ft/dtd"}, "family.tallpack")
>>> with tallpack.open("family.tallpack") as fam:
...     sd = fam.state_dict("cars")
"""


def _command_first() -> None:
    """``python -m tallpack``: the command's signal handling and OpenMP policy before torch loads
    (``tallpack_cli.begin``), as the ``tallpack`` script has them; a program's import of tallpack,
    or the command line not installed, sets nothing."""
    import sys

    if sys.argv[:1] != ["-m"]:  # a module being located by ``python -m``, this one or another that imports it
        return
    try:
        import tallpack_cli
    except ImportError:
        return
    if tallpack_cli.as_module():
        tallpack_cli.begin()


_command_first()
del _command_first

from ._version import __version__  # noqa: E402
from .errors import (
    ArchiveClosedError,
    ArchiveNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CodecError,
    ExactTierMissingError,
    FormatError,
    IncompatibleCheckpointsError,
    IntegrityError,
    InvalidArgumentError,
    OutputError,
    OutputExistsError,
    RemoteError,
    TallpackError,
    TaskNotFoundError,
    TensorNotFoundError,
    UnsafeCheckpointError,
    UnsupportedVersionError,
)
from .merging import ALPHA_GRID
from .options import PackOptions
from .outputs import write_merged, write_task, write_tasks
from .packer import pack
from .reader import Archive, LazyStateDict, TensorSlice, open  # noqa: A004
from .selection import select_alpha
from .tall import DEFAULT_LAMBDA, LAMBDA_GRID
from . import sensitivity  # tallpack.sensitivity.input_moments / save / load: the dial's data-aware weights
from . import stats  # tallpack.stats.compute / plot: how tasks share the weights

__all__ = [
    "__version__", "pack", "open", "select_alpha", "Archive", "LazyStateDict", "TensorSlice", "PackOptions",
    "sensitivity", "stats",
    "write_task", "write_tasks", "write_merged", "DEFAULT_LAMBDA", "LAMBDA_GRID", "ALPHA_GRID",
    "TallpackError", "FormatError", "IntegrityError", "UnsupportedVersionError", "CodecError",
    "CheckpointError", "CheckpointNotFoundError", "UnsafeCheckpointError", "InvalidArgumentError",
    "ArchiveNotFoundError", "ExactTierMissingError", "IncompatibleCheckpointsError", "TaskNotFoundError", "TensorNotFoundError",
    "OutputError", "OutputExistsError", "ArchiveClosedError", "RemoteError",
]


def __dir__() -> list[str]:
    """What ``dir(tallpack)`` and a prompt's Tab offer: the public API and the modules README names
    (``tallpack.merged.left_out``, ``tallpack.progress.Bar``, ...), not every internal module."""
    return sorted([*__all__, "errors", "merged", "options", "progress"])
