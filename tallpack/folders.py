"""Folder files: the non-weight files of a model folder (config, generation config, tokenizer
files, model card, chat template, ...), stored in the archive and written back on unpack.

Each distinct content is stored once across the family, as a ``uint8`` array keyed by its SHA-256
(manifest ``files``, spec §3.6); each task (and the base) maps relative names to those keys.
Names are checked when written and when read: relative, ``/``-separated, no empty, ``.`` or
``..`` component, no backslash, NUL or other control character, no component over 255 bytes and
no name over 4096 (file systems' limits: such a name could never be written), none in a ``.git``
or ``.hg`` folder (a repository's, whose files run commands). Writing back never
leaves the output folder: a target whose folder resolves elsewhere (a link planted in the output)
is refused, and so is a set of names where one is another's folder (``config.json`` and
``config.json/x``), before anything is written.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from pathlib import Path
from typing import TYPE_CHECKING

from .arrays import ArrayRef
from .codecs import Chain, Zstd
from .errors import CheckpointError, FormatError, IntegrityError, OutputError
from .fsutil import atomic_write, check_inside, make_folder

if TYPE_CHECKING:
    from .container import ArrayBuilder, ContainerWriter

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: What a file name may not hold (spec §3.6): controls (Unicode Cc), format characters (Cf: soft
#: hyphen, zero-width and direction marks, BOM, tags...), and line, paragraph and space separators
#: other than U+0020 (Zl, Zp, Zs), as of Unicode 15.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u1680"
                        "\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb"
                        "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
                        "\U000e0001\U000e0020-\U000e007f]")
#: The folders of a version control repository, whose files its tool runs commands from (Git's
#: ``config``: ``core.fsmonitor``, hooks; Mercurial's ``hgrc`` hooks): a folder file in one made the
#: output folder a repository that ran the archive's command at the next ``git status`` (which a
#: shell prompt runs on ``cd``). Compared as a file system that folds case or drops trailing dots
#: and spaces (macOS, Windows) names them, NTFS's short names (``GIT~1``) and streams
#: (``.git::$INDEX_ALLOCATION``, which Windows writes into as ``.git``) too: :func:`vcs_folder`.
VCS_FOLDERS = frozenset({".git", "git~1", ".hg", "hg~1"})
#: the longest file name component and path file systems take (NAME_MAX, PATH_MAX), in UTF-8 bytes
NAME_MAX, PATH_MAX = 255, 4096
#: Reads one stored array's decoded bytes (``read(ref, where)``).
ReadBytes = Callable[[ArrayRef, str], "bytes | bytearray | memoryview"]
#: Reads the decoded bytes of elements ``[start, stop)`` of one stored array (``read(ref, where, start, stop)``).
ReadRange = Callable[[ArrayRef, str, int, int], "bytes | bytearray | memoryview"]


#: The stem of diffusers' weight files (a pipeline component's ``unet/diffusion_pytorch_model.safetensors``),
#: which diffusers names as transformers names ``model``/``pytorch_model``: the same suffixes, variants and shards.
DIFFUSERS = "diffusion_pytorch_model"
#: transformers' weight-set names with a variant, as ``save_pretrained(variant="fp16")`` writes them
#: and ``from_pretrained(variant="fp16")`` reads them (transformers' ``_add_variant``), in the order it
#: looks for them: ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json`` (naming
#: ``model.fp16-00001-of-00002.safetensors``, ...), ``pytorch_model.fp16.bin``,
#: ``pytorch_model.bin.index.fp16.json``; then diffusers' same names of ``diffusion_pytorch_model``;
#: each with its kind and whether it is a shard index. Weight files, not folder files: read by the
#: sources, removed by an output written over them.
VARIANT_SETS = tuple((re.compile(re.escape(a) + r"\.(?P<v>[^/]+?)\." + re.escape(b)), kind, indexed)
                     for (a, b), kind, indexed in ((("model", "safetensors"), "safetensors", False),
                                                   (("model.safetensors.index", "json"), "safetensors", True),
                                                   (("pytorch_model", "bin"), "torch", False),
                                                   (("pytorch_model.bin.index", "json"), "torch", True),
                                                   ((DIFFUSERS, "safetensors"), "safetensors", False),
                                                   ((f"{DIFFUSERS}.safetensors.index", "json"), "safetensors", True),
                                                   ((DIFFUSERS, "bin"), "torch", False),
                                                   ((f"{DIFFUSERS}.bin.index", "json"), "torch", True)))
#: A shard's name (``model-00001-of-00002``), which is no variant.
SHARD = re.compile(r".*-\d+-of-\d+")


def weight_variant(name: str) -> tuple[str, int] | None:
    """The variant of one of transformers' weight-set names and the set's place in
    ``VARIANT_SETS``; None for any other name (a plain one, a shard's).

    >>> weight_variant("model.safetensors.index.fp16.json"), weight_variant("model-00001-of-00002.safetensors")
    (('fp16', 1), None)
    """
    for order, (pattern, _, _) in enumerate(VARIANT_SETS):
        m = pattern.fullmatch(name)
        if m and not SHARD.fullmatch(m["v"]):
            return m["v"], order
    return None


def listed_components(doc: object) -> list[str]:
    """The components a parsed diffusers ``model_index.json`` lists, in its order: its keys whose
    value is a ``[library, class]`` pair of strings (``"unet": ["diffusers", "UNet2DConditionModel"]``;
    not ``[null, null]``, nor ``_class_name`` and the pipeline's options); none for a non-object."""
    if not isinstance(doc, dict):
        return []
    return [k for k, v in doc.items() if isinstance(k, str) and not k.startswith(("_", ".")) and isinstance(v, list)
            and len(v) == 2 and all(isinstance(x, str) for x in v)]


#: The file that makes a folder a sentence-transformers model: its modules, in order, each
#: ``{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}``.
MODULES = "modules.json"


def listed_modules(doc: object) -> list[str]:
    """The module folders a parsed sentence-transformers ``modules.json`` lists, in its order: each
    entry's ``path`` that is a non-empty string (``""`` is the model folder itself, the
    transformer's); none for anything but a list. The paths are not checked here.

    >>> listed_modules([{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense"}, "x"])
    ['1_Pooling', '2_Dense']
    """
    if not isinstance(doc, list):
        return []
    return [e["path"] for e in doc if isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]]


def component_of(name: str, components: Iterable[str]) -> str:
    """The component (of ``components``: folder paths, ``unet``, ``2_Dense``, a sentence-transformers
    Router's ``2_Router/query_0_Dense``) a tensor name ``COMPONENT/NAME`` is of: the longest one
    it starts with and ``/``; ``""`` for a name of none (a sentence-transformers transformer's).

    >>> component_of("2_Router/query_0_Dense/linear.weight", ["2_Router/query_0_Dense", "2_Dense"])
    '2_Router/query_0_Dense'
    """
    best = ""
    for c in components:
        if c and len(c) > len(best) and name.startswith(c) and name[len(c):len(c) + 1] == "/":
            best = c
    return best


def plain_name(name: str) -> str:
    """A weight file's name without its variant: the name a folder is loaded by without ``variant=``.

    >>> plain_name("diffusion_pytorch_model.fp16.safetensors"), plain_name("model-00001-of-00002.safetensors")
    ('diffusion_pytorch_model.safetensors', 'model-00001-of-00002.safetensors')
    """
    w = weight_variant(name)
    if w is None:
        return name
    return name.replace(f".index.{w[0]}.json", ".index.json") if VARIANT_SETS[w[1]][2] else \
        name.replace(f".{w[0]}.", ".", 1)


def vcs_folder(part: str) -> bool:
    """Whether a name component is one of VCS_FOLDERS as NTFS, macOS or Windows would read it (any
    case, an NTFS stream's ``:...`` and trailing dots and spaces dropped)."""
    return part.lower().partition(":")[0].rstrip(". ") in VCS_FOLDERS


def check_file_name(name: object) -> str:
    """A stored file's name: a plain relative path with ``/`` separators that stays in the folder
    and that a file system can hold."""
    why = None
    if not isinstance(name, str) or not name:
        why = "is not a non-empty string"
    elif "\\" in name:
        why = "holds a backslash"
    elif any("\ud800" <= c <= "\udfff" for c in name):  # bytes that are not UTF-8, as os.fsdecode keeps them
        raise FormatError(f"file name {name!r:.200} is not valid UTF-8, which an archive's names are (spec §3)")
    elif (bad := _INVISIBLE.search(name)) is not None:  # a fixed list (spec §3.6), not Python's Unicode tables
        raise FormatError(f"file name {name!r:.200} holds U+{ord(bad.group()):04X}, a control or invisible "
                          "format character (spec §3.6)")
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        why = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "has an empty, '.' or '..' component"
    if why:
        raise FormatError(f"file name {name!r:.200} {why}; files must stay inside the folder")
    assert isinstance(name, str)  # (else ``why`` says so)
    vcs = next((part for part in name.split("/") if vcs_folder(part)), None)
    if vcs is not None:
        raise FormatError(f"file name {name!r:.200} is in a {vcs!r} folder, a repository's, whose files run "
                          "commands (Git's hooks and core.fsmonitor); no model folder holds one (spec §3.6)")
    if len(name.encode()) > PATH_MAX:
        why = f"is longer than {PATH_MAX} bytes"
    elif any(len(part.encode()) > NAME_MAX for part in name.split("/")):
        why = f"has a component longer than {NAME_MAX} bytes"
    if why:
        raise FormatError(f"file name {name!r:.100}... {why}; no file system can hold it")
    return name


def check_no_clash(names: Iterable[str], where: str) -> None:
    """FormatError when one of an output's file names is the folder of another (``config.json``
    and ``config.json/x``, ``model.safetensors.index.json/x`` beside the weights): a file system
    can hold only one of them.

    >>> check_no_clash(["zz", "zz/y"], "fam.tallpack: task 'cars'")
    Traceback (most recent call last):
    FormatError: fam.tallpack: task 'cars': files 'zz' and 'zz/y' cannot both be written ...
    """
    # in component order a name's first follower is inside it, if anything is
    parts = sorted({tuple(name.split("/")) for name in names})
    for a, b in zip(parts, parts[1:]):
        if b[:len(a)] == a:
            raise FormatError(f"{where}: files {'/'.join(a)!r} and {'/'.join(b)!r} cannot both be written: "
                              "the first would have to be the second's folder")


def check_digest(key: object) -> str:
    if not isinstance(key, str) or not _SHA256.fullmatch(key):
        raise FormatError(f"file key {str(key)[:80]!r} is not a lowercase hex SHA-256")
    return key


def check_file_map(files: object, where: str, stored: Mapping[str, ArrayRef]) -> dict[str, str]:
    """A task's (or the base's) ``files``: names checked, every digest stored in the archive."""
    if not isinstance(files, Mapping):
        raise FormatError(f"{where}: files must be an object")
    for name, digest in files.items():
        try:
            check_file_name(name)
            check_digest(digest)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        if digest not in stored:
            raise FormatError(f"{where}: file {name!r} refers to content {digest[:12]}... that is not stored")
    return dict(files)


def check_blob(digest: str, ref: ArrayRef) -> None:
    check_digest(digest)
    if ref.dtype != "uint8" or len(ref.shape) != 1:
        raise FormatError(f"file content {digest[:12]}...: must be a 1-d uint8 array")


#: How many chunks of a folder file are read, and encoded in parallel, at a time.
_BATCH = 4


class FileStore:
    """Pack time: write each distinct file content once; ``add`` returns a source's name map."""

    def __init__(self, writer: "ContainerWriter", level: int, chunk_elements: int):
        self._writer, self._chunk_elements = writer, chunk_elements
        self._chain = Chain([Zstd(level)])
        self.blobs: dict[str, ArrayRef] = {}

    def add(self, files: Mapping[str, Path], label: str) -> dict[str, str]:
        """Store each file's content (unless stored already) and return ``name -> SHA-256``. A file
        is read twice, a chunk at a time (to hash it, then to store it if it is new): never whole
        in memory, whatever its size."""
        out: dict[str, str] = {}
        for name, path in files.items():
            check_file_name(name)
            digest = self._read(path, None)
            if digest not in self.blobs:
                builder = self._writer.begin_array("uint8", (os.stat(path).st_size,), self._chain,
                                                   self._chunk_elements)
                if self._read(path, builder) != digest:
                    raise CheckpointError(f"{path}: changed while it was packed; pack it again once it is complete")
                self.blobs[digest] = builder.finish()
            out[name] = digest
        if out:
            log.info("%s: %d folder files kept (%d distinct contents so far)", label, len(out), len(self.blobs))
        return out

    def _read(self, path: Path, builder: "ArrayBuilder | None") -> str:
        """The file's SHA-256, read a few chunks at a time; with ``builder``, each chunk encoded (in
        parallel) and added to it."""
        h = hashlib.sha256()
        step = self._chunk_elements
        try:
            with open(path, "rb") as f:
                while batch := [p for p in (f.read(step) for _ in range(_BATCH)) if p]:
                    for piece in batch:
                        h.update(piece)
                    if builder is not None:
                        for encoded in self._writer.encode([(self._chain, memoryview(p)) for p in batch]):
                            builder.add(encoded)
        except OSError as e:
            raise OutputError(f"{path}: cannot read ({e.strerror or e})") from None
        return h.hexdigest()


def read_blob(read: ReadBytes, digest: str, ref: ArrayRef, where: str) -> bytes:
    """One stored file's bytes, checked against its SHA-256."""
    data = read(ref, where)
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{where}: content does not match its SHA-256 (damaged archive)")
    return bytes(data)


def blob_pieces(read: ReadRange, digest: str, ref: ArrayRef, where: str) -> Iterator[memoryview]:
    """One stored file's bytes a chunk at a time (one decoded chunk in memory, not the file),
    checked against its SHA-256 once the last has been taken."""
    h = hashlib.sha256()
    for start in range(0, ref.numel, ref.chunk_elements):
        piece = memoryview(read(ref, where, start, min(start + ref.chunk_elements, ref.numel))).cast("B")
        h.update(piece)
        yield piece
    if h.hexdigest() != digest:
        raise IntegrityError(f"{where}: content does not match its SHA-256 (damaged archive)")


def safe_target(outdir: Path, name: str) -> Path:
    """Where file ``name`` goes in ``outdir``, its folder made; refuses a name or a folder that
    leads outside (through a link in ``outdir``), before any folder is made through it."""
    check_file_name(name)
    target = outdir.joinpath(*name.split("/"))
    check_inside(outdir, target)
    make_folder(target.parent)
    check_inside(outdir, target)  # again: a link put there meanwhile
    return target


def write_files(outdir: str | os.PathLike, files: Mapping[str, str], blobs: Mapping[str, ArrayRef],
                read: ReadRange, *, skip: Set[str] = frozenset(), owner: str = "") -> list[Path]:
    """Write a task's (or the base's) files into ``outdir``, each atomically; returns the paths.
    ``owner`` (``task 'cars'``, ``the base``) is named in errors: tasks keep files of one name.

    Each content is decoded once, a chunk at a time, straight into the first file that holds it;
    the other names that hold it get a copy of that file.
    """
    out = Path(outdir)
    written = []
    first: dict[str, tuple[Path, list[Path]]] = {}  # digest -> the first file of it, and that one's temporary
    for name, digest in files.items():
        if name in skip:
            continue
        target = safe_target(out, name)
        if digest in first:
            earlier, temp = first[digest]
            # in a transaction the earlier file is still its temporary; alone, it is in place
            source = temp[0] if temp and temp[0].exists() else earlier
            written.append(atomic_write(target, functools.partial(shutil.copyfile, source)))
        else:
            first[digest] = (target, [])
            where = f"file {name!r} of {owner}" if owner else f"file {name!r}"
            write = functools.partial(_decode_into, read, digest, blobs[digest], where, first[digest][1])
            written.append(atomic_write(target, write))
    return written


def _decode_into(read: ReadRange, digest: str, ref: ArrayRef, where: str, temp: list[Path], path: Path) -> None:
    temp.append(path)
    with open(path, "wb") as f:
        for piece in blob_pieces(read, digest, ref, where):
            f.write(piece)
