"""The reader: open an archive, rebuild one task's tensors on demand.

Only the chunks a call needs are read (pages of a memory-mapped file locally, range reads
remotely), and each chunk's checksum is checked before it is decoded. How a tensor is rebuilt is
its encoding's business (:mod:`tallpack.encodings`); the reader only dispatches.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import numbers
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from concurrent.futures import thread as _futures_thread
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, cast, overload

import numpy as np

from ._torch import cpu_default, torch
from . import kernels
from .arrays import ArrayRef
from .cache import DEFAULT_CACHE_BYTES, ByteLRU
from .container import FOOTER, PLANAR_DTYPES, PREFETCH_BYTES, ContainerReader, reading_threads
from .dtypes import SAFETENSORS_DTYPES, bytes_to_tensor, torch_dtype, view_tensor
from .elements import numel
from .encodings import Encoding, TaskTensor, TensorEntry, Use, encoding_for, iter_arrays
from .encodings.base import split_parts
from .encodings.derived import DERIVED_MERGED, DerivedMerged, rebuild_in_runs, rows_of
from .encodings.derived_merged import rebuild_merged, task_in_runs, task_rows
from .encodings.exact import DERIVED_ENCODINGS, TALL_ENCODINGS, _reference_refs, in_runs, original_rows, rebuild_exact
from .errors import (ArchiveClosedError, ArchiveNotFoundError, ExactTierMissingError, FormatError, IntegrityError,
                     InvalidArgumentError, OutOfMemoryError, RemoteError, TallpackError, TaskNotFoundError,
                     TensorNotFoundError, UnsupportedVersionError, memory_detail, memory_named, out_of_memory, quoted)
from .memory import ThreadBuffers, release_thread_buffers
from .manifest import Manifest, TaskInfo
from .folders import read_blob
from .groups import Member
from .merged import MergeParts, default_model
from .merging import METHODS, integer
from .originals import verify_originals
from .progress import ProgressLike, track
from .report import show_name, summarize
from .storage import is_url, open_bytes
from .tall import Bits, Planar

log = logging.getLogger(__name__)


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads, and a lock some other parent thread held
    stays held: each archive open at the fork starts a fresh pool (and locks) when next it reads,
    rather than waiting forever on workers that do not exist (a DataLoader's forked workers). With
    an archive open, torch runs on one thread in the child, as DataLoader's workers do: torch's
    OpenMP pool, which the parent's reads started, does not survive a fork, and the child's next
    parallel operation would wait for it forever (``multiprocessing``'s fork pools)."""
    archives = list(_OPEN)
    if archives and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    for archive in archives:
        archive._pool, archive._pool_lock = None, threading.Lock()
        # a state_dict another parent thread was in does not go on in the child: its count would
        # keep the child's cache from ever pushing anything out, and its lock may be held
        archive._scans, archive._scans_lock = 0, threading.Lock()
        archive._cache.after_fork()
    for lazy in list(_LAZY.values()):  # one another parent thread was reading at the fork: its lock stays held
        lazy._lock = threading.Lock()


#: Every open archive, and every lazy state dict, for ``_after_fork_in_child``.
_OPEN: "weakref.WeakSet[Archive]" = weakref.WeakSet()
_LAZY: "weakref.WeakValueDictionary[int, LazyStateDict]" = weakref.WeakValueDictionary()  # (a Mapping: unhashable)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_T = TypeVar("_T")


def _collected(container: ContainerReader, name: str, warn: bool) -> None:
    """An archive garbage-collected open (``Archive._finalizer``): its file closed. One the caller
    opened is named in a ResourceWarning (as an unclosed file is, which would name only a
    descriptor); one opened implicitly (a lazy state dict or slice deep-copied or unpickled:
    ``_reopen``) is closed quietly, as nothing else could close it."""
    container.close()
    if warn:
        warnings.warn(f"unclosed tallpack archive {name!r}: close it (fam.close(), or open it in a with block)",
                      ResourceWarning)


class Archive:
    """An open ``.tallpack`` archive. Use :func:`tallpack.open`.

    One sent to another process (a DataLoader's spawn or forkserver workers, ``pickle``) is opened
    there again from its path or URL (``__reduce__``); so are its lazy state dicts and slices.

    >>> with tallpack.open("family.tallpack") as fam:
    ...     fam.tasks, fam.keys("cars")[:3]
    ...     w = fam.get_tensor("cars", "encoder.layer.3.weight")
    """

    def __init__(self, container: ContainerReader, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 threads: int | None = None):
        self._c = container
        self._cache = ByteLRU(cache_bytes)
        #: views of whole raw arrays of a mapped file, read before (checked: ``check_once``), by
        #: ``_cache_key``: no memory of their own, so outside the cache's budget; each with the end
        #: of its last byte in the file, checked at every use as a read is (``_view``)
        self._views: dict[tuple, tuple[torch.Tensor, int]] = {}
        self.threads = threads or kernels.default_threads()
        self._pool: Executor | None = None
        self._pool_lock = threading.Lock()
        self._slots = ThreadBuffers()  # read_array's reused buffers, per thread
        self._plans: dict[tuple[str, str, bool], _Plan] = {}  # _rebuild's, per (task, tensor or group name, group)
        #: whole tensors whose inputs are all kept views of raw arrays (``_views``) or stored bits,
        #: by ``_plans``' key: rebuilt without the general path's lookups (``_rebuild_direct``)
        self._direct: dict[tuple[str, str, bool], _Direct] = {}
        self._closed = False
        #: ``state_dict`` calls in progress: while one runs, the cache keeps what fits beside what it
        #: holds and pushes nothing out (``_keep``)
        self._scans = 0
        self._scans_lock = threading.Lock()
        #: how :func:`open` opened it, for another process to open it again (``__reduce__``)
        self._opened: _Opened | None = None
        _OPEN.add(self)
        self.name = container.name
        raw = container.take_manifest()
        try:
            self.manifest = Manifest.from_dict(raw)
        except FormatError as e:  # the manifest's checks name the tensor and task; this, the file
            raise type(e)(f"{self.name}: {e}") from None
        if tuple(self.manifest.format_version) != tuple(container.version):  # spec §3.1: minor too
            raise FormatError(f"{self.name}: header says format {container.version[0]}.{container.version[1]}, "
                              f"manifest says {self.manifest.format_version[0]}.{self.manifest.format_version[1]} "
                              "(they must be equal)")
        self._tensors: dict[str, TensorEntry] = {t.name: t for t in self.manifest.tensors if not t.members}
        #: groups (format 1.12): by the group's name, and each member by its name
        self._groups: dict[str, TensorEntry] = {t.name: t for t in self.manifest.tensors if t.members}
        self._members: dict[str, tuple[TensorEntry, Member]] = {
            m.name: (g, m) for g in self._groups.values() for m in g.members}
        self._tasks: dict[str, TaskInfo] = {t.name: t for t in self.manifest.tasks}
        #: (format 1.14, spec §3.8) names that are another stored tensor, and the tasks that list each
        self._aliases: dict[str, str] = dict(self.manifest.aliases)
        self._alias_tasks: dict[str, frozenset[str]] = {
            a: frozenset(t.name for t in self.manifest.tasks if a in t.keys) for a in self._aliases}
        for name, key, ref in iter_arrays(self.manifest.tensors):
            container.register(ref, (name, key))
        for digest, ref in self.manifest.files.items():
            container.register(ref, f"file content {digest[:12]}")
        container.check_layout()
        #: closes the file when the archive is garbage-collected open (``_collected``); made last, as
        #: an archive that fails to open is closed by ``open``
        self._finalizer = weakref.finalize(self, _collected, container, self.name, True)
        self._finalizer.atexit = False  # at exit the process closes it: no warning for an archive still in use

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer.detach()
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        # what a read still running on another thread makes from here on is not kept: its buffers,
        # what it decodes (put into the empty cache, or the old one dropped here) and its views
        self._slots.close()
        cache, self._cache = self._cache, ByteLRU(0)
        cache.clear()
        self._views.clear()
        self._direct.clear()
        self._c.close()
        if not any(not a._closed for a in list(_OPEN)):
            release_thread_buffers()  # the decoding buffers the caller's threads kept for the next read

    def _require_open(self) -> None:
        """ArchiveClosedError when the archive is closed (a read of it would say the same)."""
        if self._closed:
            raise ArchiveClosedError(f"{self.name}: the archive is closed")

    def _workers(self) -> Executor | None:
        """The archive's share of the process's reading threads (decoding releases the GIL), which
        every open archive shares (``container.reading_threads``), taken on first use; None for one
        thread."""
        if self.threads <= 1:
            return None
        with self._pool_lock:
            self._require_open()
            if self._pool is None:
                self._pool = reading_threads(self.threads).share()
            return self._pool

    def __repr__(self) -> str:
        return f"<tallpack.Archive {self.name!r}: {len(self.tasks)} tasks{' (closed)' if self._closed else ''}>"

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process (a spawn or forkserver DataLoader worker, ``pickle``,
        ``copy.deepcopy``), an archive is opened there again from its path or URL, with the same
        options, and checked as any open is, and to be the same file (its size and footer)."""
        if self._closed:
            raise ArchiveClosedError(f"{self.name}: the archive is closed; a closed archive cannot be sent to another "
                                     "process: open it there (tallpack.open(path))")
        if self._opened is None:
            raise TypeError(f"{self.name}: this tallpack.Archive was not opened by tallpack.open(path) and cannot be "
                            "sent to another process: open the archive in each worker")
        return _reopen, (self._opened, self._identity())

    def _identity(self) -> bytes:
        """What tells this archive from another file under its name: its size and its footer (the
        manifest's offset, length and checksum)."""
        size = self._c.source.size
        return size.to_bytes(8, "little") + bytes(self._c.source.read(size - FOOTER.size, FOOTER.size))

    # -- what is inside ----------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in pack order."""
        return tuple(self._tasks)

    @property
    def format_version(self) -> tuple[int, int]:
        return self._c.version

    @property
    def source(self) -> Any:
        """Where the bytes come from: a memory-mapped file, or a remote one whose ``requests`` and
        ``fetched`` count its range reads."""
        return self._c.source

    @property
    def size(self) -> int:
        """The archive's size in bytes."""
        return self._c.source.size

    def task_info(self, task: str) -> TaskInfo:
        """A task's lambda, mask density, fidelity figures and source."""
        try:
            return self._tasks[task]
        except (KeyError, TypeError):
            names = self.tasks
            shown = [show_name(n) for n in names[:LISTED_TASKS]]  # the archive's names: control characters escaped
            listed = (f"tasks are {', '.join(shown)}" if len(names) <= LISTED_TASKS
                      else f"it has {len(names)} tasks: {', '.join(shown)}, ...")
            raise TaskNotFoundError(f"{self.name}: no task {task!r}{_near(task, names)}; {listed}") from None

    def keys(self, task: str) -> list[str]:
        """The task's tensor names, in its checkpoint's order."""
        return list(self.task_info(task).keys)

    def _resolve(self, task: str, name: str) -> str:
        """The stored tensor a task's tensor name reads: an alias's target (format 1.14), else the name."""
        target = self._aliases.get(name) if isinstance(name, str) else None
        return target if target is not None and task in self._alias_tasks[name] else name

    def _member(self, task: str, name: object) -> tuple[TensorEntry, Member] | None:
        """The group and member record of ``name`` when it is a group's member that ``task`` has
        (format 1.12), else None."""
        member = self._members.get(name) if isinstance(name, str) else None
        return member if member is not None and task in member[0].tasks else None

    def _entry(self, task: str, name: str, group: bool = False) -> tuple[TensorEntry, TaskTensor]:
        """A tensor's entry and the task's entry in it (``group``: a group's, by its name)."""
        self.task_info(task)
        entry = (self._groups if group else self._tensors).get(name) if isinstance(name, str) else None
        if entry is None or task not in entry.tasks:
            hint = _tied(self._tasks[task], name) or (
                _near(name, self._tasks[task].keys, prefixes=True) if isinstance(name, str) else (
                    f" (tensor names are strings, not {type(name).__name__})"))
            raise TensorNotFoundError(f"{self.name}: task {task!r} has no tensor {name!r}{hint}")
        return entry, entry.tasks[task]

    # -- reading -----------------------------------------------------------------------------
    def _submit(self, pool: Executor, fn, *args):
        try:
            return pool.submit(fn, *args)
        except RuntimeError as e:
            if self._closed:  # the pool was shut down: another thread closed the archive
                raise ArchiveClosedError(f"{self.name}: the archive was closed while it was read") from None
            if out_of_memory(e):  # a thread that could not start: memory, or the process's thread limit
                raise OutOfMemoryError(f"{self.name}: cannot start a reading thread ({quoted(e)}): out of memory or "
                                       "at the thread limit (the archive is not damaged; free memory, or read with "
                                       "fewer threads)") from None
            if "interpreter shutdown" not in str(e) and not getattr(_futures_thread, "_shutdown", False):
                raise
            # the interpreter is shutting down (a read from a thread still running, or an atexit
            # handler): concurrent.futures takes no more work, so the calling thread does it (a
            # pool that had run work was also marked shut down by its workers as they ended)
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as err:
                done.set_exception(err)
            return done

    def _out_of_memory(self, where: str, nbytes: int) -> OutOfMemoryError:
        """The error of a read that could not have its memory: not the archive's fault."""
        said = where if where.startswith(f"{self.name}: ") else f"{self.name}: {where}"
        return OutOfMemoryError(f"{said}: out of memory: could not allocate {nbytes} bytes to decode it "
                                "(the archive is not damaged)")

    def read_array(self, ref: ArrayRef | DerivedMerged, where: str, use: Use = Use.OUTPUT, *,
                   device: torch.device | str | None = None, start: int = 0, stop: int | None = None,
                   _slot: str | None = None) -> torch.Tensor:
        """One stored array, decoded, as a tensor of its dtype and shape (or, with ``start``/
        ``stop``, the flat elements ``[start, stop)``, reading only the chunks that hold them).

        With ``Use.OUTPUT`` (the default) the tensor is the caller's own. The other uses promise
        that the tensor is only read: it may then be a read-only view of the file (raw chunks),
        and for ``Use.SHARED_INPUT`` a decoded copy kept in the archive's cache (one per device).
        A derived merged vector (:class:`DerivedMerged`, format 1.8) is computed from every task's
        original of its tensor and cached like a shared input.

        ``_slot`` (internal, ``_rebuild``): an input the cache will not keep is decoded into this
        thread's buffer of that name, which the next read of the same name overwrites.
        """
        if isinstance(ref, DerivedMerged):
            return self._derived_merged(ref, where, use, device)
        stop = ref.numel if stop is None else stop
        whole = (start, stop) == (0, ref.numel)
        dev = torch.device(device) if device is not None else None
        key = None
        if use is Use.SHARED_INPUT and whole and ref.chunks:
            key = _cache_key(ref, dev)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        if dev is not None and dev.type != "cpu":  # decoded on the CPU, moved once
            t = self.read_array(ref, where, Use.OUTPUT if use is Use.OUTPUT else Use.INPUT, start=start, stop=stop)
            t = t.to(dev)
            if key is not None:
                self._keep(key, t, ref.nbytes)
            return t
        view = (use is not Use.OUTPUT and whole and dev is None and not ref.chain.codecs and ref.chunks
                and getattr(self._c.source, "check_once", False) and getattr(self._c.source, "mapped", False))
        if view:  # a raw array read before: its view again, without reading its chunks anew
            got = self._view(_cache_key(ref, None))
            if got is not None:
                return got
        slot = (_slot is not None and use is not Use.OUTPUT and whole and bool(ref.chain.codecs)
                and (key is None or ref.nbytes > self._room()))
        into = None
        try:
            if slot:
                assert _slot is not None
                into = self._slots.get(_slot, ref.nbytes).data
            buf = self._c.read_array(ref, where, start, stop, into)
        except MemoryError:
            raise self._out_of_memory(where, ref.nbytes) from None
        shape = ref.shape if whole else (stop - start,)
        if ref.dtype == "bool" and "bitpack" not in ref.chain.ids() and len(buf) and int(np.max(np.frombuffer(buf, np.uint8))) > 1:
            raise FormatError(f"{self.name}: {where}: a bool array holds bytes other than 0 and 1 (spec §4)")
        try:
            if use is Use.OUTPUT:
                return bytes_to_tensor(buf, ref.dtype, shape)
            t = view_tensor(buf, ref.dtype, shape)
        except FormatError as e:
            raise type(e)(f"{self.name}: {where}: {e}") from None
        if key is not None and into is None and not memoryview(buf).readonly:  # decoded, not a view of the file
            self._keep(key, t, ref.nbytes)
        elif view and memoryview(buf).readonly:
            self._views[_cache_key(ref, None)] = (t, max(c.offset + c.nbytes for c in ref.chunks))
            if self._closed:  # closed meanwhile by another thread: it keeps no view of the file
                self._views.clear()
        return t

    def _view(self, key: tuple) -> torch.Tensor | None:
        """The kept view of a raw array (``_views``), once the file is checked as a read of its
        last byte checks it (open, not shrunk: a view past the end would fault); None if none."""
        got = self._views.get(key)
        if got is None:
            return None
        self._c.source.read(got[1] - 1, 1)  # ArchiveClosedError, or IntegrityError for a shrunk file
        return got[0]

    def _derived_merged(self, ref: DerivedMerged, where: str, use: Use, device: torch.device | str | None
                        ) -> torch.Tensor:
        """A derived merged vector (or merge-method array) of a ``tall-derived-merged`` tensor,
        from the cache (keyed by the tensor's name: a string first, never an array's offset)."""
        dev = torch.device(device) if device is not None else None
        where_dev = None if dev is None or dev.type == "cpu" else str(dev)
        key = ("derived-merged", ref.entry.name, ref.key, where_dev)
        hit = self._cache.get(key)
        if hit is None:
            derived = self._derive(rebuild_merged, ref.entry, where)
            if ref.key not in derived:
                raise FormatError(f"{self.name}: {where}: no derived {ref.key} array")
            for k, v in derived.items():
                v = v if where_dev is None else v.to(dev)
                self._keep(key[:2] + (k, where_dev), v, v.numel() * v.element_size())
                if k == ref.key:
                    hit = v
        assert hit is not None
        return hit.clone() if use is Use.OUTPUT else hit

    def _derive(self, fn: Callable[..., _T], entry: TensorEntry, where: str) -> _T:
        """``fn(read, entry, order, method, "tensor 'name'")`` of a ``tall-derived-merged`` tensor
        (``derived_merged``): the archive's merge method, its tasks in the manifest's order; errors
        named with the archive."""
        method = METHODS.get(self.manifest.merge.get("method", ""))
        if method is None:
            named = where if where.startswith(f"{self.name}: ") else f"{self.name}: {where}"  # (verify's names it)
            raise UnsupportedVersionError(f"{named}: merge method "
                                          f"{self.manifest.merge.get('method')!r} is unknown to this tallpack")
        order = [t for t in self.tasks if t in entry.tasks]
        try:
            return fn(self.read_array, entry, order, method.from_params(self.manifest.merge), f"tensor {entry.name!r}")
        except TallpackError as e:  # reads name the archive already; the rest, here
            if str(e).startswith(f"{self.name}: "):
                raise
            raise type(e)(f"{self.name}: {e}") from None

    def _merged_unkept(self, entry: TensorEntry, tt: TaskTensor) -> bool:
        """Whether a lossy read of a large ``tall-derived-merged`` entry derives tau_MTL a run at a
        time beside its output (``derived_merged.task_in_runs``): the cache holds it not, and would
        not keep it whole (its float32 bytes over the cache's room: ``cache_bytes=0``, the CLI's)."""
        return (tt.encoding == DERIVED_MERGED and in_runs(self.read_array, entry, [tt])
                and ("derived-merged", entry.name, "merged", None) not in self._cache
                and 4 * entry.arrays["base"].numel > self._room())

    def _derived_rows(self, task: str, entry: TensorEntry, tt: TaskTensor, where: str, rows: tuple[int, int]
                      ) -> torch.Tensor | None:
        """Rows ``[r0, r1)`` of the lossy rebuild of a ``tall-derived`` or ``tall-derived-merged``
        entry from the chunks that hold them (``derived.rows_of``; ``derived_merged.task_rows``,
        tau_MTL derived from every task's rows, unless the cache keeps it whole); None where they
        are not read by ranges."""
        row = numel(tt.shape[1:]) if tt.shape else 1
        start, stop = rows[0] * row, rows[1] * row
        try:
            with memory_named(f"{self.name}: {where}"):  # a run's buffers (numpy's, torch's allocator)
                kept = (self._cache.peek(("derived-merged", entry.name, "merged", None))
                        if tt.encoding == DERIVED_MERGED else None)
                if tt.encoding == DERIVED_MERGED and kept is None:
                    held = self._cache.get(("derived-merged-rows", entry.name))
                    ce = tt.extras["exact"].residual.chunk_elements  # the runs are whole chunks of it
                    if held is not None and held.holds(start // ce * ce, min(entry.arrays["base"].numel,
                                                                             -(-stop // ce) * ce)):
                        kept = held.flat  # every run of these rows derived by an earlier slice
                if tt.encoding == DERIVED_MERGED and kept is None:
                    keep = partial(self._keep_rows, entry, [held])
                    derive = partial(task_rows, task=task, start=start, stop=stop, keep=keep)
                    out = self._derive(derive, entry, where + " (merged)")
                else:
                    out = rows_of(self.read_array, entry, tt, where, start, stop,
                                  None if kept is None else kept.reshape(-1))
        except IntegrityError as e:  # say which archive
            text = str(e)
            raise IntegrityError(text if text.startswith(f"{self.name}:") else f"{self.name}: {text}") from None
        return None if out is None else out.reshape(rows[1] - rows[0], *tt.shape[1:])

    def _keep_rows(self, entry: TensorEntry, holder: "list[_MergedRows | None]", a: int, b: int,
                   merged: torch.Tensor) -> None:
        """Keep run ``[a, b)`` of a ``tall-derived-merged`` tensor's tau_MTL, derived for a slice
        (``task_rows``), in the cache: the rows other tasks' slices of those rows need (each would
        derive them again from every task's rows), within the cache's budget: counted as the
        whole vector's bytes from its first run (only the runs written have pages). Covering it
        whole, the runs stay under their own key: a whole read derives the vector again, checking
        every task's original against its hash (spec §6.1.9: partial reads leave that check to
        whole reads), which no slice did."""
        n, held = entry.arrays["base"].numel, holder[0]
        whole = n * merged.element_size()
        if held is None or held.flat.dtype != merged.dtype:
            if whole > self._room():
                return
            held = holder[0] = _MergedRows(torch.empty(n, dtype=merged.dtype))  # (this slice's next runs too)
        held.flat[a:b] = merged
        held.add(a, b)
        self._keep(("derived-merged-rows", entry.name), held, whole)

    def _rebuild(self, task: str, name: str, pool: Executor | None, exact: bool = False,
                 device: torch.device | str | None = None, rows: tuple[int, int] | None = None,
                 prefetch: bool = True, parts: list[Member] | None = None) -> Any:
        """One tensor (with ``rows``, rows ``[r0, r1)`` of its first dimension) of one task;
        ``prefetch=False`` when the caller already fetched its chunks (``state_dict``'s batches).
        With ``parts``, ``name`` is a group's (format 1.12), and the result a list: those members."""
        if not isinstance(task, str) or not isinstance(name, str):  # (unhashable ones too)
            self._entry(task, name)  # raises: no such task or tensor
        key = (task, name, parts is not None)
        whole = rows is None and parts is None and device is None and not exact
        direct = self._direct.get(key) if whole else None
        if direct is not None:
            return self._rebuild_direct(task, direct)
        plan = self._plans.get(key) if not exact and device is None else None
        if plan is None:
            entry, tt = self._entry(task, name, group=parts is not None)
            if exact:
                self.require_exact(task)
            where = f"task {task!r}, " + (_group_where(entry, parts) if parts is not None else f"tensor {name!r}")
            encoding = encoding_for(tt.encoding)
            if encoding is None:
                raise UnsupportedVersionError(
                    f"{self.name}: {where} is stored as {tt.encoding!r}, which this tallpack cannot read; upgrade it"
                )
            if exact and tt.encoding in TALL_ENCODINGS:
                if "exact" not in tt.extras:
                    raise ExactTierMissingError(f"{self.name}: {where} has no exact residual (damaged manifest)")
                row = numel(tt.shape[1:]) if tt.shape else 1
                try:
                    with memory_named(f"{self.name}: {where}"):  # its output or a run's (numpy's, torch's allocator)
                        out = None if rows is None else original_rows(self.read_array, entry, tt, where,
                                                                      rows[0] * row, rows[1] * row)
                        if out is None:
                            out = rebuild_exact(self.read_array, entry, tt, where)
                except IntegrityError as e:  # a hash that does not match: say which archive
                    text = str(e)
                    raise IntegrityError(text if text.startswith(f"{self.name}:") else f"{self.name}: {text}") from None
                if rows is not None:  # rows of it (get_slice): only the chunks that hold them, or the whole's
                    if out.numel() != (rows[1] - rows[0]) * row:  # rebuilt whole: its rows, not a view of it
                        out = out.reshape(-1)[rows[0] * row : rows[1] * row].clone()
                    out = out.reshape(rows[1] - rows[0], *tt.shape[1:])
                out = out if device is None else out.to(device)
                return out if parts is None else split_parts(out, parts)
            needed = encoding.inputs(entry, tt)
            on_cpu = device is None or torch.device(device).type == "cpu"
            planar = self._planar_keys(encoding, entry, tt, needed) if on_cpu else ()
            bits = self._bit_keys(encoding, entry, tt, needed) if on_cpu else ()
            plan = _Plan(entry, tt, encoding, where, needed, planar, bits, _needs(entry, tt, encoding))
            if not exact and device is None:
                self._plans[key] = plan
        entry, tt, encoding, where, needed, planar, bits, refs = plan
        if not exact and rows is not None and parts is None and device is None and tt.encoding in DERIVED_ENCODINGS:
            part = self._derived_rows(task, entry, tt, where, rows)  # get_slice: the chunks of those rows
            if part is None:  # not read by ranges (tasks' residuals chunked unlike): the whole's rows
                part = self._rebuild(task, name, pool, prefetch=prefetch)[rows[0] : rows[1]].clone()
            return part
        if not exact and rows is None and parts is None and device is None and tt.encoding in DERIVED_ENCODINGS:
            try:  # a large tall-derived entry: its base and residual a run at a time (derived.rebuild_in_runs)
                with memory_named(f"{self.name}: {where}"):  # its output or a run's buffers (torch's allocator)
                    rebuilt = None
                    if self._merged_unkept(entry, tt):  # tau_MTL derived beside it a run at a time, never whole
                        derive = partial(task_in_runs, task=task, task_where=where)
                        rebuilt = self._derive(derive, entry, where + " (merged)")
                    if rebuilt is None:
                        rebuilt = rebuild_in_runs(self.read_array, entry, tt, where)
            except IntegrityError as e:  # a hash or a mask's set bits: say which archive
                text = str(e)
                raise IntegrityError(text if text.startswith(f"{self.name}:") else f"{self.name}: {text}") from None
            if rebuilt is not None:
                return rebuilt
        if parts is not None:  # the plan is shared by the group's reads: a member read alone is named here
            where = f"task {task!r}, " + _group_where(entry, parts)
        row = numel(tt.shape[1:]) if tt.shape else 1
        start, stop = (0, None) if rows is None else (rows[0] * row, rows[1] * row)
        # rows (get_slice) of a tensor whose inputs are all byte planes and bits: rebuilt as one run
        # of the tensor's elements, by the loops a whole tensor's rebuild uses, from the chunks that
        # hold those rows (the cache's planes where it keeps them; a slice does not fill it)
        run: list[Member] | None = None
        if rows is not None:
            if planar and bits and set(needed) == {*planar, *bits} and start % 8 == 0:
                run = [Member(name, start, (rows[1] - rows[0], *tt.shape[1:]))]
            else:
                planar = bits = ()
        if rows is None and prefetch:
            if self._merged_kept(entry, device):  # derived for an earlier task: only this task's residual
                refs = _needs(entry, tt, encoding, merged_kept=True)
            self._c.prefetch(self._uncached(refs, device), where)  # remote: one coalesced fetch

        # some of a group's members (get_tensor of one, format 1.12): the task's mask of the whole
        # group is kept in the cache, so that reading its members one by one decodes it once
        keep_bits = parts is not None and len(parts) < len(entry.members)

        # a remote source reads the planar inputs' chunks ahead side by side, as the rebuild joins them
        # (those the cache holds whole left out: their chunks are not read)
        beside = (tuple(self._uncached([r for k in planar if isinstance(r := needed[k][0], ArrayRef)], device))
                  if planar and self._c.remote else ())

        def read(k: str, ref: ArrayRef | DerivedMerged, use: Use, slot: str | None = None
                 ) -> torch.Tensor | Planar | Bits:
            if k in planar:
                assert isinstance(ref, ArrayRef)  # (_planar_keys)
                ahead = (ref, *(r for r in beside if r is not ref)) if beside else ()
                return self._read_planar(ref, f"{where} ({k})", use, k, fill=run is None, ahead=ahead)
            if k in bits:
                assert isinstance(ref, ArrayRef)  # (_bit_keys)
                if run is not None:  # only the chunks that hold the rows
                    ce, (_, lo, shape) = ref.chunk_elements, run[0]
                    return self._read_bits(ref, f"{where} ({k})", slot,
                                           chunks=range(lo // ce, -(-(lo + numel(shape)) // ce)))
                return self._read_bits(ref, f"{where} ({k})", None if keep_bits else slot, keep_bits)
            return self.read_array(ref, f"{where} ({k})", use, device=device, start=start, stop=stop, _slot=slot)

        slots = device is None and encoding.fresh_output(tt)
        if pool is not None and run is None and self._worth_threads(needed, device, rows is None, planar):
            futures: dict[str, Future] = {}
            try:
                for k, (ref, use) in needed.items():
                    futures[k] = self._submit(pool, read, k, ref, use)
                arrays = {k: f.result() for k, f in futures.items()}
            except BaseException:  # (a damaged input, Ctrl-C): the others end before the caller
                for f in futures.values():  # hears of it, not while it closes the archive or reads on
                    f.cancel()
                wait(futures.values())
                raise
        else:  # read here, and dropped before this thread reads again: uncached inputs may reuse buffers
            arrays = {k: read(k, ref, use, k if slots else None) for k, (ref, use) in needed.items()}
        if whole and not planar and len(bits) <= 1 and tt.encoding not in DERIVED_ENCODINGS:
            self._remember_direct(key, plan, arrays, slots)  # (two bit inputs are read on threads)
        if parts is not None:
            return self._rebuilt(task, where, plan, arrays, parts)
        if run is not None:
            return self._rebuilt(task, where, plan, arrays, run)[0]
        out = self._rebuilt(task, where, plan, arrays)
        return out if rows is None else out.reshape(rows[1] - rows[0], *tt.shape[1:])

    def _rebuilt(self, task: str, where: str, plan: "_Plan", arrays: dict[str, Any], parts: list[Member] | None = None
                 ) -> Any:
        """``plan``'s encoding's rebuild of ``arrays`` (of ``parts``: a list, else the tensor), its
        errors named."""
        try:
            if parts is not None:
                return plan.encoding.rebuild_parts(arrays, plan.entry, plan.tt, parts)
            return plan.encoding.rebuild(arrays, plan.entry, plan.tt)
        except IntegrityError as e:  # a derived mask's original (format 1.6): say which archive and task
            said = f"{self.name}: task {task!r}, "
            raise IntegrityError(str(e) if str(e).startswith(said) else said + str(e)) from None
        except (MemoryError, RuntimeError) as e:  # torch's allocator says so in a RuntimeError
            if isinstance(e, TallpackError) or not out_of_memory(e):
                raise
            raise OutOfMemoryError(f"{self.name}: {where}: out of memory while rebuilding it ({memory_detail(e)}; "
                                   "the archive is not damaged)") from None

    def _remember_direct(self, key: tuple[str, str, bool], plan: "_Plan", arrays: Mapping[str, Any],
                         slots: bool) -> None:
        """Keep ``_rebuild_direct``'s recipe for a whole tensor whose inputs came back as kept views
        of raw arrays (``_views``: read and checked before) and stored bits (read on each use)."""
        views: dict[str, torch.Tensor] = {}
        bits: list[tuple[str, ArrayRef, str, str | None]] = []
        end = 0
        for k, (ref, _) in plan.needed.items():
            got = arrays[k]
            if k in plan.bits and isinstance(got, Bits):
                bits.append((k, ref, f"{plan.where} ({k})", k if slots else None))
                continue
            kept = self._views.get(_cache_key(ref, None)) if isinstance(ref, ArrayRef) and ref.chunks else None
            if kept is None or kept[0] is not got:
                return  # decoded, cached or derived: the general path
            views[k] = got
            end = max(end, kept[1])
        if views:
            self._direct[key] = _Direct(plan, views, tuple(bits), end)
            if self._closed:  # (as ``_views``)
                self._direct.clear()

    def _rebuild_direct(self, task: str, d: "_Direct") -> torch.Tensor:
        """A whole tensor from its kept views and its bits, read anew (``_remember_direct``): the
        file checked once, as each view's use checks it (``_view``: open, not shrunk)."""
        self._c.source.read(d.end - 1, 1)
        arrays: dict[str, Any] = dict(d.views)
        for k, ref, where, slot in d.bits:
            arrays[k] = self._read_bits(ref, where, slot)
        return self._rebuilt(task, d.plan.where, d.plan, arrays)

    def _merged_kept(self, entry: TensorEntry, device: torch.device | str | None) -> bool:
        """Whether the cache holds ``entry``'s derived merged vector (``_derived_merged``): a read of
        it then fetches no other task's residual."""
        dev = None if device is None or torch.device(device).type == "cpu" else str(torch.device(device))
        return ("derived-merged", entry.name, "merged", dev) in self._cache

    def _uncached(self, refs: list[ArrayRef], device: torch.device | str | None) -> list[ArrayRef]:
        """For a remote source's prefetch: ``refs`` less the arrays the cache holds decoded (a
        second task fetches only its masks)."""
        if getattr(self._c.source, "prefetch", None) is None or not len(self._cache):
            return refs
        dev = torch.device(device) if device is not None else None
        def held(r: ArrayRef) -> bool:
            planar = self._cache.peek(("planar",) + _cache_key(r, None))
            if planar is not None:
                return planar.cut == len(r.chunks)  # else the chunks past the cut are read again
            return ("bits",) + _cache_key(r, None) in self._cache or _cache_key(r, dev) in self._cache

        return [r for r in refs if not (r.chunks and held(r))]

    @staticmethod
    def _planar_keys(encoding: type[Encoding], entry: TensorEntry, tt: TaskTensor,
                     needed: Mapping[str, tuple[Any, Use]]) -> tuple[str, ...]:
        """The inputs to hand ``rebuild`` as byte planes (``Encoding.planar_inputs``): all it
        names, when each is a float32, bfloat16 or float16 array of byte planes and all have the same
        chunks (and the compiled loop that joins them is there), else none."""
        keys = encoding.planar_inputs(entry, tt)
        if not keys or not kernels.COMPILED or not all(k in needed for k in keys):
            return ()
        refs = [needed[k][0] for k in keys]
        if not all(isinstance(r, ArrayRef) and r.chunks and PLANAR_DTYPES.get(r.dtype) == r.chain.planar_itemsize
                   and r.numel >= PLANAR_MIN_ELEMENTS for r in refs):
            return ()
        return keys if len({(r.numel, r.chunk_elements) for r in refs}) == 1 else ()

    @staticmethod
    def _bit_keys(encoding: type[Encoding], entry: TensorEntry, tt: TaskTensor,
                  needed: Mapping[str, tuple[Any, Use]]) -> tuple[str, ...]:
        """The inputs to hand ``rebuild`` as their stored bits (``Encoding.bit_inputs``): all it
        names, when each is a bool array stored bit-packed (and the compiled loops are there), else
        none. Every chunk but the last holds a multiple of 8 elements (spec §3.5), so the chunks'
        bits laid end to end are the array's, and a chunk's elements start at a whole byte."""
        keys = encoding.bit_inputs(entry, tt)
        if not keys or not kernels.COMPILED or not all(k in needed for k in keys):
            return ()
        ok = all(isinstance(r, ArrayRef) and r.dtype == "bool" and r.chain.bits_chain is not None
                 for r in (needed[k][0] for k in keys))
        return keys if ok else ()

    def _read_bits(self, ref: ArrayRef, where: str, slot: str | None, keep: bool = False,
                   chunks: range | None = None) -> Bits:
        """A bit-packed bool array decoded to its bits only (into this thread's buffer ``slot``,
        which the next read of that name overwrites; None: a fresh one); ``keep``: from the cache,
        and kept there (only read by the rebuilds); ``chunks``: only those chunks' bits are decoded
        (the others' bytes are left as they were: rows of a tensor, ``_rebuild``)."""
        key = ("bits",) + _cache_key(ref, None) if keep and ref.chunks else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        size = (ref.numel + 7) // 8
        try:
            buf = self._slots.get(slot, size) if slot is not None else np.empty(size, np.uint8)
        except MemoryError:
            raise self._out_of_memory(where, size) from None
        self._c.read_bits(ref, where, buf.data, chunks)
        out = Bits(buf, ref.numel, ref.shape)
        if key is not None:
            self._cache.put(key, out, size)
        return out

    def _read_planar(self, ref: ArrayRef, where: str, use: Use, slot: str, fill: bool = True,
                     ahead: Sequence[ArrayRef] = ()) -> Planar:
        """An array as the byte planes of its chunks (``Encoding.planar_inputs``). A shared input
        keeps, in the cache, only the planes it had to decode (the ones zstd coded: for float32
        weights in ``planes-exp``, often one in four), except, until its KEEP_CHEAP_FROM_USE-th use,
        nearly empty ones (``Planes.CHEAP``: decoded again into this thread's buffers, they cost a
        task less than the fresh memory that keeps them); its verbatim planes are views
        of the mapped file, read again on each use through the same checks as any read (the file
        has not shrunk, the chunk's checksum was checked). Otherwise its chunks are decoded when
        the rebuild asks for them, into this thread's buffers named after ``slot``. Without ``fill``
        (rows of a tensor), what the cache keeps is used, and nothing is added to it. ``ahead``:
        ``ref`` and the arrays whose chunks the rebuild reads beside its own, for a remote source's
        read-ahead (``ContainerReader.read_ahead``; empty for a local one)."""
        known = None
        if use is Use.SHARED_INPUT:
            key = ("planar",) + _cache_key(ref, None)
            kept = self._cache.get(key)
            if fill and kept is not None and kept.partial and kept.uses + 1 < KEEP_CHEAP_FROM_USE:
                self._cache.put(key, kept._replace(uses=kept.uses + 1), kept.nbytes)
            elif fill and (kept is None or kept.partial) and self._cache.budget > 0:
                # a first use leaves nearly empty planes out; the KEEP_CHEAP_FROM_USE-th keeps them too
                room = self._cache.room + (kept.nbytes if kept is not None else 0)
                fuller = self._decode_planar(ref, where, room if self._scans else self._cache.budget, kept, room)
                if fuller is not None:
                    self._keep(key, fuller, fuller.nbytes)
                    kept = fuller
                elif kept is not None:  # the whole would not fit: keep what is kept, and stop trying
                    self._cache.put(key, kept._replace(partial=False), kept.nbytes)
            known = kept.chunks if kept is not None else None
        # (rows of a tensor: only the chunks that hold them are read, not ahead)
        read = partial(self._c.read_planar, ahead=ahead) if ahead and fill else self._c.read_planar
        if known is None:
            return Planar(ref.numel, ref.chunk_elements, lambda i: _whole(read(ref, i, where, f"{slot}.plane")),
                          self._each)

        def chunk(i: int) -> tuple[list[np.ndarray], int]:
            planes, r = known[i]
            if all(p is not None for p in planes):
                return _whole((planes, r))
            # views of the mapped file, checked; nearly empty planes decoded into this thread's buffers
            return _whole(read(ref, i, where, f"{slot}.plane", known=planes))
        return Planar(ref.numel, ref.chunk_elements, chunk, self._each)

    def _decode_planar(self, ref: ArrayRef, where: str, budget: int, kept: "_KeptPlanes | None" = None,
                       room: int | None = None) -> "_KeptPlanes | None":
        """Each chunk's decoded planes, for the cache (None where a plane is a view of a mapped
        file, read again when used); from a remote source, every plane, copied out of the fetched
        bytes. Without ``kept`` (a first use), nearly empty planes are left out too (``partial``);
        with it, those are decoded and the others taken from it.

        Only the chunks that fit in ``budget`` bytes, from the first (``cut`` of them; what a
        chunk keeps is known from its plane lengths before it is decoded): an array larger than
        the cache keeps those, and the rebuild decodes the others chunk by chunk as it goes, in
        memory bounded by a chunk. (An embedding of 500M elements with a float32 merged vector
        passes the default 1 GiB; before, such an array was decoded up to the budget, dropped,
        and decoded again for every task.) When its first chunk says it will not fit whole (that
        chunk's size times the chunk count passes ``budget``), it keeps only what fits in
        ``room`` (the cache's free bytes), so that it does not push out arrays the cache holds
        whole. None when not even the first chunk fits, or when growing ``kept`` would keep
        fewer chunks than it has."""
        mapped = bool(getattr(self._c.source, "mapped", False))
        # a remote source reads ahead this array's chunks only (the others' wait their turn)
        read = partial(self._c.read_planar, ahead=(ref,)) if self._c.remote else self._c.read_planar
        cheap = mapped and kept is None
        n = len(ref.chunks)
        known = [kept.chunks[i][0] if kept else None for i in range(n)]
        cut = held = 0
        for i in range(n):
            size = (self._c.planar_kept(ref, i, where, known[i], cheap) if mapped  # its checksum: when decoded
                    else ref.chunk_numel(i) * ref.itemsize)  # every plane, copied
            if i == 0 and room is not None and size * n > budget:
                budget = min(budget, room)  # it will not fit whole: only the room there is
            if held + size > budget:
                break
            held, cut = held + size, i + 1
        if cut == 0 or (kept is not None and cut < kept.cut):  # growing must not lose chunks kept
            return None

        def chunk(i: int) -> tuple[list[np.ndarray | None], int, bool]:
            planes, r = read(ref, i, where, known=known[i], cheap=cheap)
            keep = [p if p is None or p.flags.owndata else (None if mapped else p.copy()) for p in planes]
            return keep, r, any(p is None for p in planes)  # nearly empty planes left out

        got = self._each(cut, chunk)
        out = [(keep, r) for keep, r, _ in got]
        held = sum(p.nbytes for keep, _ in out for p in keep if p is not None)
        some_left = any(left for _, _, left in got)
        # the chunks that did not fit: every plane decoded again on each use (``_read_planar``'s ``chunk``)
        out += [([None] * len(out[0][0]), 0) for _ in range(n - cut)]
        return _KeptPlanes(out, held, some_left, 1, cut)

    def _each(self, n: int, fn: Callable[[int], Any]) -> list[Any]:
        """``[fn(i) for i in range(n)]``, this thread and the archive's idle ones together
        (``_together``): the chunks of one large array (decoded for the cache, or rebuilt:
        ``Planar.each``), so that its work does not wait on one core while the others have
        nothing left to do (a state dict whose largest tensor is most of it). The pool's threads
        join when they are free; busy with other tensors, they do not."""
        pool = self._pool if n > 1 else None
        if pool is None:
            return [fn(i) for i in range(n)]
        return self._together(pool, n, fn, min(self.threads, n) - 1)

    def _worth_threads(self, needed: Mapping[str, tuple[Any, Use]], device, whole: bool,
                       planar: tuple[str, ...] = ()) -> bool:
        """Whether a tensor's inputs are worth reading on the archive's threads: at least two that
        decode (compressed, not in the cache) and PARALLEL_BYTES of them. Views of raw chunks and
        cached arrays cost less than handing them to a thread (a 4 MB raw ``get_tensor``: 1.0
        against 0.75 ms)."""
        dev = torch.device(device) if device is not None else None

        def cached(k: str, ref: ArrayRef) -> bool:
            key = ("planar",) + _cache_key(ref, None) if k in planar else _cache_key(ref, dev)
            return key in self._cache

        heavy = [ref for k, (ref, use) in needed.items() if not isinstance(ref, ArrayRef) or (
            ref.chain.codecs and not (use is Use.SHARED_INPUT and whole and ref.chunks and cached(k, ref)))]
        return len(heavy) > 1 and sum(getattr(r, "nbytes", PARALLEL_BYTES) for r in heavy) >= PARALLEL_BYTES

    @cpu_default
    def get_tensor(self, task: str, name: str, *, exact: bool = False,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor of one task, reading only the chunks it needs (its arrays decoded in parallel).

        With ``exact=True``, the original bits (archives packed with the exact tier). With
        ``device`` (e.g. ``"cuda"``), the tensor is rebuilt there: base and merged vector are moved
        once and kept in the cache on that device, so other tasks send only their masks.
        """
        device = _usable(device)
        if device is not None and device.type == "meta":  # shapes and dtypes only: nothing to read
            if exact:
                self.require_exact(task)
            dtype, shape = self.tensor_spec(task, name)
            return torch.empty(shape, dtype=torch_dtype(dtype), device=device)
        name = self._resolve(task, name)  # an alias reads its target (the tensor torch.load ties to it)
        member = self._member(task, name)
        if member is not None:
            return self._rebuild(task, member[0].name, self._workers(), exact, device, parts=[member[1]])[0]
        return self._rebuild(task, name, self._workers(), exact, device)

    def tensor_spec(self, task: str, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype (spec name, e.g. ``"float32"``) and shape of one task's tensor, from the
        manifest alone."""
        name = self._resolve(task, name)
        member = self._member(task, name)
        if member is not None:
            return member[0].tasks[task].dtype, member[1].shape
        tt = self._entry(task, name)[1]
        return tt.dtype, tt.shape

    def get_slice(self, task: str, name: str, *, exact: bool = False) -> "TensorSlice":
        """A handle that reads parts of one tensor: ``fam.get_slice(t, name)[a:b]`` reads only the
        chunks that hold rows ``a:b`` (as safetensors' ``get_slice``, for tensor-parallel loading;
        ``get_shape()`` and ``get_dtype()`` as safetensors gives them: ``[768, 768]``, ``"BF16"``).

        With ``exact=True`` (archives packed with the exact tier), the original bits, also read
        from only the chunks that hold the rows (``exact.original_rows``): each chunk is checked
        against its checksum, but the original's XXH3-64, which covers every element, only by a
        whole read or ``verify``. So are the lossy rows of a tensor whose mask or merged vector
        the exact tier derives from the originals (``tall-derived``, ``tall-derived-merged``: from
        those rows of the originals, ``Archive._derived_rows``; the mask's set bits unchecked too).

        >>> fam.get_slice("cars", "embed.weight", exact=True)[0:1000]
        """
        self._require_open()  # (a handle of a closed archive could read nothing)
        if exact:
            self.require_exact(task)
        name = self._resolve(task, name)
        member = self._member(task, name)
        if member is not None:  # a group's member: small, read whole
            return TensorSlice(self, task, name, member[0].tasks[task], member[1].shape, exact=exact)
        entry, tt = self._entry(task, name)
        return TensorSlice(self, task, name, tt, exact=exact)

    def require_exact(self, task: str) -> None:
        """ExactTierMissingError unless ``task`` was packed with the exact tier."""
        if self.task_info(task).exact is None:
            raise ExactTierMissingError(
                f"{self.name}: packed without --exact; repack with --exact to get the original bits")

    @overload
    def state_dict(self, task: str, *, lazy: Literal[False] = False, exact: bool = False,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]: ...

    @overload
    def state_dict(self, task: str, *, lazy: Literal[True], exact: bool = False,
                   device: torch.device | str | None = None) -> "LazyStateDict": ...

    @overload
    def state_dict(self, task: str, *, lazy: bool, exact: bool = False,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor] | "LazyStateDict": ...

    @cpu_default
    def state_dict(self, task: str, *, lazy: bool = False, exact: bool = False,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor] | "LazyStateDict":
        """The task's whole state dict, with its original names, shapes and dtypes: the larger
        tensors rebuilt by the archive's threads and the calling one together (one tensor each at
        a time), the small ones by the calling thread.

        With ``lazy=True``, a read-only mapping that rebuilds each tensor when it is indexed
        (:class:`LazyStateDict`, a ``Mapping[str, torch.Tensor]``); with
        ``exact=True``, the original bits (archives packed with the exact tier); with ``device``,
        tensors rebuilt on that device (see :meth:`get_tensor`). From a remote archive, the
        chunks of a batch of tensors (up to 64 MiB stored) are fetched together.
        """
        if exact:
            self.require_exact(task)
        sd = LazyStateDict(self, task, exact=exact, device=_usable(device))
        if lazy:
            return sd
        if _is_meta(sd._device):  # a model's skeleton: nothing decoded
            return {name: self.get_tensor(task, name, exact=exact, device=sd._device) for name in sd}
        with _gc_paused(), self._scanning():  # see _gc_paused: a full pass would cost as much as the rebuild
            return self._whole(sd, task, exact, sd._device)

    @contextlib.contextmanager
    def _scanning(self) -> Iterator[None]:
        """A whole task is read: every shared array once, in the same order for every task. The
        base and merged vectors are the same for every task, so what the cache kept during an
        earlier task is as useful as what this one decodes, and a least-recently-used cache
        smaller than them would push out each array before the next task asks for it again
        (every task would decode everything, into fresh memory: slower than no cache at all).
        While a task is read, the cache keeps only what fits beside what it holds."""
        with self._scans_lock:
            self._scans += 1
        try:
            yield
        finally:
            with self._scans_lock:
                self._scans -= 1

    def _keep(self, key: tuple, value: Any, nbytes: int) -> None:
        """Put ``value`` in the cache; while a task is read whole (``_scanning``), only if it fits
        beside what the cache holds."""
        self._cache.put(key, value, nbytes, evict=not self._scans)

    def _room(self) -> int:
        """What the cache can take now: its budget, or, while a task is read whole, its free bytes."""
        return self._cache.room if self._scans else self._cache.budget

    def _whole(self, sd: "LazyStateDict", task: str, exact: bool, device: torch.device | str | None
               ) -> dict[str, torch.Tensor]:
        """``state_dict``'s work: every tensor of the task, in batches (see ``state_dict``)."""
        needs: list[tuple[tuple[str, list[Member] | None], list[ArrayRef]]] = []
        groups: dict[str, list[Member]] = {}  # a group's members this task reads, in one job
        for name in sd:
            if self._resolve(task, name) != name:  # an alias: its target's tensor, rebuilt once
                continue
            member = self._members.get(name)
            if member is not None:
                group, m = member
                if group.name in groups:
                    groups[group.name].append(m)
                    continue
                entry, tt = self._entry(task, group.name, group=True)
                groups[group.name] = parts = [m]
                job: tuple[str, list[Member] | None] = (group.name, parts)
            else:
                entry, tt = self._entry(task, name)
                job = (name, None)
            enc = encoding_for(tt.encoding)
            needs.append((job, _needs(entry, tt, enc, exact, self._merged_kept(entry, device)) if enc else []))
        pool = self._workers()
        got: dict[str, torch.Tensor] = {}

        def keep(job: tuple[str, list[Member] | None], result: Any) -> None:
            name, parts = job
            if parts is None:
                got[name] = result
            else:
                got.update(zip([m.name for m in parts], result))

        for batch in _batches(needs):
            self._c.prefetch(self._uncached([r for _, refs in batch for r in refs], device), f"task {task!r}")
            if pool is None:
                for (k, parts), _ in batch:
                    keep((k, parts), self._rebuild(task, k, None, exact, device, None, False, parts))
                continue
            sizes = [sum(r.nbytes for r in refs) for _, refs in batch]
            order = sorted(range(len(batch)), key=sizes.__getitem__, reverse=True)  # largest first
            results = self._share(pool, [partial(self._rebuild, task, batch[i][0][0], None, exact, device, None, False,
                                                 batch[i][0][1]) for i in order], [sizes[i] for i in order])
            for i, result in zip(order, results):
                keep(batch[i][0], result)
        return {k: got[self._resolve(task, k)] for k in sd}  # an alias: the same tensor as its target

    def _share(self, pool: Executor, jobs: list[Callable[[], Any]], sizes: list[int]) -> list[Any]:
        """Each job's result, run by this thread and the pool's together (``_together``). Jobs
        come largest first (``sizes``, decoded bytes); the pool's threads stop at the first under
        SHARE_BYTES, and this thread does those alone: threads that hand the GIL back and forth
        for small tensors are slower than one (BENCHMARKS.md, eighth round)."""
        shared = sum(1 for n in sizes if n >= SHARE_BYTES)
        return self._together(pool, len(jobs), lambda i: jobs[i](), min(self.threads, shared) - 1, sizes)

    def _together(self, pool: Executor, n: int, fn: Callable[[int], Any], helpers: int,
                  sizes: list[int] | None = None) -> list[Any]:
        """``[fn(i) for i in range(n)]`` by this thread and ``helpers`` of the pool's threads: each
        takes the next index when it finishes one. No future per item, so hundreds of small
        tensors cost little more than their work (a future and a wake-up each cost more than
        rebuilding a small tensor). With ``sizes``, the pool's threads stop at the first index
        whose size is under SHARE_BYTES. This thread takes every index no one else has, so it
        never waits on work no thread started (a helper still queued behind other work is
        cancelled). The first error stops the others from taking more, and is raised here."""
        results: list[Any] = [None] * n
        lock = threading.Lock()
        state: dict[str, Any] = {"next": 0, "error": None}

        def loop(smallest: int = 0) -> None:
            while True:
                with lock:
                    i = state["next"]
                    if i >= n or state["error"] is not None or (sizes is not None and sizes[i] < smallest):
                        return
                    state["next"] = i + 1
                try:
                    results[i] = fn(i)
                except BaseException as e:  # noqa: BLE001 (handed to the caller below)
                    with lock:
                        if state["error"] is None:
                            state["error"] = e
                    return

        futures = [self._submit(pool, loop, SHARE_BYTES) for _ in range(helpers)]
        try:
            with kernels.as_worker():  # side by side with the pool's threads: loops run unsplit
                loop()
        except BaseException as e:  # (a Ctrl-C between two items: the helpers take no more)
            with lock:
                if state["error"] is None:
                    state["error"] = e
            raise
        finally:
            for f in futures:
                if not f.cancel():
                    f.result()
        if state["error"] is not None:
            raise state["error"]
        return results

    def prefetch(self, names: list[str]) -> None:
        """Announce that every array of these tensors (all tasks) is read next: a remote archive
        fetches them in one coalesced request (up to 64 MiB); a local one needs nothing. For
        readers of whole tensors across tasks (``stats``)."""
        entries: dict[str, TensorEntry | None] = {}
        for n in names:  # a tensor, a group's member (its group's arrays), or a group by its name
            e = self._members[n][0] if n in self._members else self._tensors.get(n) or self._groups.get(n)
            entries[getattr(e, "name", n)] = e
        where = ", ".join(map(self._named, names[:2])) + (", ..." if len(names) > 2 else "")  # for a failed fetch
        self._c.prefetch([ref for e in entries.values() if e is not None for _, ref in e.all_arrays()], where)

    def _named(self, name: str) -> str:
        """A tensor, or a group (format 1.12) by its name with its first members, as messages name it."""
        group = self._groups.get(name)
        if group is None:
            return f"tensor {name!r}"
        members = ", ".join(repr(m.name) for m in group.members[:2]) + (", ..." if len(group.members) > 2 else "")
        return f"group {name!r} (tensors {members})"

    @cpu_default
    def base_tensor(self, name: str) -> torch.Tensor | None:
        """theta_0 of a tensor, when the archive holds it (merged and base-only tensors)."""
        name = self._aliases.get(name, name)
        member = self._members.get(name)
        if member is not None:  # a group's member (format 1.12): its run of the group's base
            group, m = member
            if "base" not in group.arrays:  # a group of shared tensors
                return None
            part = self.read_array(group.arrays["base"], f"tensor {name!r} (base, in group {group.name!r})",
                                   start=m.offset, stop=m.offset + m.numel)
            return part.view(m.shape)
        entry = self._tensors.get(name)
        if entry is None or "base" not in entry.arrays:
            return None
        return self.read_array(entry.arrays["base"], f"tensor {name!r} (base)")

    # -- merged models -----------------------------------------------------------------------
    @cpu_default
    def merge_parts(self, method: str, *, k: int | None = None, lazy: bool = False) -> MergeParts:
        """The pieces of a merged model that do not depend on alpha (base and direction per
        tensor), computed once; ``MergeParts.state_dict(alpha)`` then builds models quickly. With
        ``lazy=True``, nothing is read until a model is built: ``state_dict(alpha, lazy=True)``
        then reads each tensor's parts as it is indexed and keeps none (``write_merged``'s way)."""
        return MergeParts(self, method, k, lazy=lazy)

    @cpu_default
    def merged(self, method: str | None = None, *, k: int | None = None, alpha: float | None = None,
               task: str | None = None) -> dict[str, torch.Tensor]:
        """The multi-task model: ``theta_0 + alpha * d`` for every tensor all tasks share, plus the
        base-only tensors the archive keeps (``--keep-base-only``), at the base's value.

        ``method`` is ``ta``, ``ties``, ``consensus-ta`` or ``consensus-ties`` (the archive must
        have been packed with the matching ``merge``; by default, the consensus model of the
        archive's merge: ``tallpack.merged.default_model``). Tensors equal in every task come back as
        stored. With ``task``, the task's own tensors (its classification head) are added, in
        the task's order, so the result loads into that task's model. ``alpha`` defaults to the
        data-free :func:`tallpack.merging.default_alpha`.

        Tensors every task has but stores as its own (not in the base, another shape or dtype than
        the base's, integers that differ between tasks, NaN or inf in a task) have no base in the
        archive to merge onto: without ``task`` they are left out, with a warning that names them
        (:func:`tallpack.merged.left_out` lists them); with ``task``, that task's are taken.

        >>> sd = fam.merged("consensus-ta", k=2, alpha=0.4)
        """
        parts = self.merge_parts(default_model(self.manifest) if method is None else method, k=k, lazy=True)
        model = parts.state_dict(alpha, task=task, lazy=True)
        pool = self._workers()  # tensors built side by side on the archive's threads, largest first (as _whole)
        with _gc_paused():
            sd = model.whole(None if pool is None else partial(self._share, pool))
        model.warn_overflow()
        return sd

    # -- checking ----------------------------------------------------------------------------
    def chunk_count(self) -> int:
        """Number of stored chunks."""
        return sum(len(ref.chunks) for _, _, ref in iter_arrays(self.manifest.tensors))

    @cpu_default
    def verify(self, *, progress: ProgressLike = None) -> list[str]:
        """Check every chunk's checksum and decode it, every kept file's SHA-256, and that padding
        is zero; with the exact tier, rebuild every original tensor and file and check their
        hashes, and the masks derived from them (each original rebuilt once); and that the header's
        version is the manifest's. Returns the problems found (empty: intact)."""
        problems = self._c.verify_ends()  # the file damaged or cut in place since it was opened
        if problems:  # nothing else can be trusted (nor read: a cut file's chunks are past its end)
            return problems
        problems = self._c.verify_padding()
        if tuple(self.manifest.format_version) != self.format_version:  # the header's minor too
            problems.append(f"{self.name}: header says format {self.format_version[0]}.{self.format_version[1]}, "
                            f"manifest says {self.manifest.format_version[0]}.{self.manifest.format_version[1]}")
        named = self._file_names()
        checks = _ChunkChecks(self, named)
        for batch in track(_batches(checks.now()), progress, "verifying", unit="batch"):
            checks.check(batch)
        # the exact tier's arrays, an entry's just before its first rebuild (``_CheckedFirst``)
        reading = cast("Archive", _CheckedFirst(self, checks)) if checks.later else self
        later = verify_originals(reading, progress)  # the derived masks' set bits too
        checks.check_rest()  # (those no rebuild read: a task that failed before them)
        problems += [checks.found[i] for i in sorted(checks.found)] + checks.files
        # a damaged chunk is said once: the rebuilds that read it (every task's, where a merged
        # vector is derived from one task's original) fail on it again, and are not repeated
        said = {f"tensor {name!r}" for name, _, ref in iter_arrays(self.manifest.tensors) if id(ref) in checks.damaged}
        return problems + list(dict.fromkeys(p for p in later if not any(s in p for s in said)))

    def packed_bits(self, ref: ArrayRef, where: str) -> np.ndarray:
        """A bit-packed bool array's bits (element i in bit i % 8 of byte i // 8), checked and
        decoded without building a tensor (``inspect --tensors`` counts masks with it)."""
        self._require_open()
        out = bytearray((ref.numel + 7) // 8)
        self._c.read_bits(ref, f"{where}", memoryview(out))
        return np.frombuffer(out, dtype=np.uint8)

    # -- folder files ------------------------------------------------------------------------
    def _file_names(self) -> dict[str, str]:
        """How errors name each kept file content: by the files that hold it (``file 'config.json'
        of the base, task 'a', task 'b', ...``: at most three names, three holders each)."""
        owners: dict[str, dict[str, list[str]]] = {}
        for who, files in [("the base", self.files()), *((f"task {t!r}", self.files(t)) for t in self.tasks)]:
            for name, digest in files.items():
                owners.setdefault(digest, {}).setdefault(name, []).append(who)
        return {d: "; ".join(f"file {name!r} of " + ", ".join(w[:3]) + (", ..." if len(w) > 3 else "")
                             for name, w in list(by.items())[:3]) for d, by in owners.items()}

    def files(self, task: str | None = None) -> dict[str, str]:
        """The folder files kept for a task (None: the base), as relative name -> SHA-256; empty
        when it did not come from a folder (or the archive predates format 1.2)."""
        if task is None:
            return dict(self.manifest.base.get("files") or {})
        return dict(self.task_info(task).files)

    @cpu_default
    def read_file(self, name: str, task: str | None = None) -> bytes:
        """One kept folder file's bytes (``fam.read_file("tokenizer.json", "cars")``)."""
        digest = self.files(task).get(name)
        who = "the base" if task is None else f"task {task!r}"
        if digest is None:
            raise TallpackError(f"{self.name}: {who} has no file {name!r}")
        ref, where = self.manifest.files[digest], f"file {name!r} of {who}"
        try:
            return read_blob(self._c.read_array, digest, ref, where)
        except OutOfMemoryError:
            raise
        except MemoryError:
            raise self._out_of_memory(where, ref.nbytes) from None
        except TallpackError as e:  # the chunks' errors name the archive; the file's hash does not
            if str(e).startswith(f"{self.name}: "):
                raise
            raise type(e)(f"{self.name}: {e}") from None

    def summary(self) -> dict[str, Any]:
        """What ``tallpack inspect`` shows: tasks, sizes, ratios, densities, fidelity."""
        return summarize(self.manifest, path=self.name, archive_bytes=self.size,
                         format_version=self.format_version)


#: The use of a shared array read as planes from which the cache keeps its nearly empty planes too
#: (``Planes.CHEAP``). Before, each use decodes them again (a bfloat16 family's first task: 26 of
#: 130 MB of fresh memory saved); from then on, each use saves decoding them (BENCHMARKS.md, tenth
#: round). The third: a second task costs what it did, a third pays for the memory once.
KEEP_CHEAP_FROM_USE = 3
#: Decoded bytes of a tensor's inputs from which ``get_tensor`` decodes them on several threads.
PARALLEL_BYTES = 1 << 20
#: Elements from which a float32, bfloat16 or float16 tensor is rebuilt from byte planes (``_planar_keys``); smaller
#: ones (biases, norms) are joined and cached as floats, a few KB each, in fewer steps.
PLANAR_MIN_ELEMENTS = 4096
#: The most bytes of a group's members (format 1.12) that a lazy state dict holds until they are
#: indexed, over the groups it rebuilt last (at least the last one's): one group per dtype of a
#: mixed-precision checkpoint, each at most GROUP_ELEMENTS elements (4 MB of float32).
HELD_BYTES = 32 << 20
#: Decoded bytes of a tensor's inputs from which ``state_dict`` rebuilds it on the archive's
#: threads; smaller ones are rebuilt one after another on the calling thread (measured: 64 KB
#: to 256 KB gave the same times; threads that share tensors of a few KB are slower than one).
SHARE_BYTES = 1 << 18


class _Opened(NamedTuple):
    """The arguments :func:`open` was given (a local path made absolute), to open an archive again."""

    path: str
    storage_options: dict[str, Any] | None
    cache_bytes: int
    threads: int | None


def _reopen(opened: _Opened, identity: bytes) -> "Archive":
    """An archive sent to this process (``Archive.__reduce__``): opened again, and refused unless it
    is the file that was sent (not one that replaced it since)."""
    try:
        fam = open(opened.path, storage_options=opened.storage_options, cache_bytes=opened.cache_bytes,
                   threads=opened.threads)
    except ArchiveNotFoundError as e:  # said from inside unpickling (a spawn worker's start-up): say why it was opened
        raise ArchiveNotFoundError(f"{e}: the archive sent to this process (opened by another one) is not "
                                   "there now: removed or renamed since, or not visible from this process") from None
    if fam._identity() != identity:
        fam.close()
        raise TallpackError(f"{fam.name}: the archive was replaced since it was sent to this process; open it again")
    # no one holds it but what was sent (a lazy state dict, a slice): closed with the last of them, quietly
    fam._finalizer.detach()
    fam._finalizer = weakref.finalize(fam, _collected, fam._c, fam.name, False)
    fam._finalizer.atexit = False
    return fam


class _Plan(NamedTuple):
    """What ``_rebuild`` works out from the manifest alone for one task's tensor (kept per open
    archive for whole tensors on the CPU: the manifest does not change while it is open)."""

    entry: TensorEntry
    tt: TaskTensor
    encoding: type[Encoding]
    where: str
    needed: Mapping[str, tuple[Any, Use]]
    planar: tuple[str, ...]
    bits: tuple[str, ...]
    refs: list[ArrayRef]  # every array it reads (``_needs``), for a remote source's prefetch


class _Direct(NamedTuple):
    """``Archive._rebuild_direct``'s recipe for one whole tensor: its plan, the kept views of its
    raw inputs, its bit inputs (name, array, where, this thread's buffer or None), and the end of
    the views' last byte in the file."""

    plan: _Plan
    views: dict[str, torch.Tensor]
    bits: tuple[tuple[str, ArrayRef, str, str | None], ...]
    end: int


class _MergedRows:
    """Runs of a ``tall-derived-merged`` tensor's tau_MTL kept from slices (``Archive._keep_rows``):
    ``flat`` (the whole vector's length; only the elements in ``covered`` written, the others
    never touched: pages of their own only once written) and ``covered``, the element ranges
    written, sorted and apart. A range is added only after its elements are written; two threads
    adding at once may lose one's range (it is derived again), never claim one not written."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat
        self.covered: tuple[tuple[int, int], ...] = ()

    def holds(self, a: int, b: int) -> bool:
        return any(x <= a and b <= y for x, y in self.covered)

    def add(self, a: int, b: int) -> None:
        """Add ``[a, b)``."""
        merged: list[tuple[int, int]] = []
        for x, y in sorted((*self.covered, (a, b))):
            if merged and x <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], y))
            else:
                merged.append((x, y))
        self.covered = tuple(merged)


class _KeptPlanes(NamedTuple):
    """What the cache keeps of an array read as planes: each chunk's (planes, rotation), None for
    a plane read again on each use; ``partial``: nearly empty planes among those (left out until
    the KEEP_CHEAP_FROM_USE-th use); ``uses``: the reads so far, while partial; ``cut``: the chunks
    kept, from the first (the others did not fit in the cache: decoded on each use)."""

    chunks: list[tuple[list[np.ndarray | None], int]]
    nbytes: int
    partial: bool
    uses: int
    cut: int


def _whole(got: tuple[list[np.ndarray | None], int]) -> tuple[list[np.ndarray], int]:
    """A chunk's planes, every one there: all kept, or read without ``cheap`` (``Chain.planar``)."""
    return cast("tuple[list[np.ndarray], int]", got)


#: The most task names a "no task" message lists.
LISTED_TASKS = 10
#: The most names a "no task" or "no tensor" message compares with for a close match (difflib's
#: cost grows with them: about 0.2 ms a name): of those about as long, the ones that differ in
#: one dotted part first. A prefix added or removed is looked for among all.
COMPARED_NAMES = 200


#: The output embeddings that transformers ties to the input embeddings (``tie_word_embeddings``),
#: by the names its models give them, and the input embeddings' last parts.
_TIED_HEADS = ("lm_head.weight", "cls.predictions.decoder.weight")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


def _tied(info: TaskInfo, name: object) -> str:
    """The hint for a missing output embedding that the task's ``config.json`` ties to the input
    embeddings: the checkpoint holds that weight once, as ``save_pretrained`` writes it."""
    if not isinstance(name, str):
        return ""
    head = next((h for h in _TIED_HEADS if name == h or name.endswith("." + h)), None)
    if head is None:
        return ""
    config = info.metadata.get("config")
    if not isinstance(config, Mapping):
        return ""
    tie = config.get("tie_word_embeddings")
    text = config.get("text_config")
    if tie is None and isinstance(text, Mapping):  # a multimodal model's language part
        tie = text.get("tie_word_embeddings")
    if tie is not True:
        return ""
    found = [k for k in info.keys if any(k == e or k.endswith("." + e) for e in _EMBEDDINGS)]
    owner = name[: len(name) - len(head)]  # "language_model." of a multimodal model's head: its embeddings first
    found.sort(key=lambda k: not k.startswith(owner))
    what = f"the input embeddings {found[0]!r}" if found else "the input embeddings"
    return (f": its config ties it to {what} (tie_word_embeddings), so the checkpoint holds that weight once, as "
            "transformers' save_pretrained writes it; transformers loads such a state dict with "
            "model.load_state_dict(sd, strict=False), then model.tie_weights()")


def _near(name: object, names: Sequence[str], prefixes: bool = False) -> str:
    """A hint for a name not found: `` (did you mean 'x'?)`` with the closest of ``names``
    (difflib), or, with ``prefixes``, the name with its leading dotted parts removed, or with
    some added (``model.``: a wrapped model's names against the bare model's); else ``""``.

    >>> _near("model.l1.weight", ["l1.weight"], prefixes=True)
    " (did you mean 'l1.weight', without 'model.'?)"
    """
    if not isinstance(name, str) or not names:
        return ""
    if prefixes:
        parts = name.split(".")
        known = set(names)
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in known:
                rest = ".".join(parts[i:])
                return f" (did you mean {rest!r}, without {name[: len(name) - len(rest)]!r}?)"
        held = _in_modules(name, names)  # (first: the vae's encoder.conv_in.weight is no unet's conv_in.weight)
        if held:
            return f" (did you mean {' or '.join(map(repr, held[:3]))}?)"
        longer = next((n for n in names if n.endswith("." + name)), None)
        if longer is not None:
            return f" (did you mean {longer!r}, with {longer[: len(longer) - len(name)]!r}?)"
    alike = [n for n in names if abs(len(n) - len(name)) <= 2]
    parts = name.split(".")
    one_off = [n for n in alike if len(p := n.split(".")) == len(parts) and sum(a != b for a, b in zip(p, parts)) == 1]
    close = difflib.get_close_matches(name, (one_off or alike)[:COMPARED_NAMES], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _in_modules(name: str, names: Sequence[str]) -> list[str]:
    """The archive's names (``MODULE/NAME``: a pipeline's component, a sentence-transformers
    module) of a tensor asked by its module's own name (``conv_in.weight``), by the dotted path to
    it (``unet.conv_in.weight``), or as ``SentenceTransformer.state_dict()`` names a numbered
    module's (``2.linear.weight`` for ``2_Dense/linear.weight``)."""
    found = []
    for n in names:
        module, _, rest = n.rpartition("/")
        if not module:
            continue
        number = module.split("_", 1)[0]
        if name in (rest, f"{module.replace('/', '.')}.{rest}") or (number.isdigit() and name == f"{number}.{rest}"):
            found.append(n)
    return found


def _group_where(entry: TensorEntry, parts: Sequence[Member] = ()) -> str:
    """How errors name a group (format 1.12): by its name and its members' (the first few); a member
    read alone (``parts``: one), by its own name first."""
    if len(parts) == 1:
        return f"tensor {parts[0].name!r} (in group {entry.name!r})"
    names = ", ".join(repr(m.name) for m in entry.members[:4]) + (", ..." if len(entry.members) > 4 else "")
    return f"tensor group {entry.name!r} ({len(entry.members)} tensors: {names})"


def _is_meta(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _usable(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a torch.device this process can allocate on; None for the CPU, given or not
    (``"cpu"`` reads as the default does: a large tensor's run-wise paths, the reads' plans kept);
    InvalidArgumentError for a name torch does not know or a device it has not."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:  # torch's own, per backend
        raise InvalidArgumentError(f"device {device!r} cannot be used here ({quoted(e)})") from None
    return None if dev.type == "cpu" else dev


def _cache_key(ref: ArrayRef, dev: torch.device | None) -> tuple:
    """The cache's key of a whole decoded array (per device): its first chunk's offset says where."""
    return (ref.chunks[0].offset, ref.dtype, ref.shape, None if dev is None or dev.type == "cpu" else str(dev))


def _needs(entry: TensorEntry, tt: TaskTensor, encoding: type[Encoding], exact: bool = False,
           merged_kept: bool = False) -> list[ArrayRef]:
    """The arrays rebuilding one task's tensor reads (a derived merged vector: every task's, unless
    the cache holds it, ``merged_kept``); with ``exact``, its original's: the residual and its
    reference's arrays (never the other tasks')."""
    if exact and tt.encoding in TALL_ENCODINGS and "exact" in tt.extras:
        refs = [tt.extras["exact"].residual, *_reference_refs(entry, tt)]
        return [r for r in refs if isinstance(r, ArrayRef)]
    out: list[ArrayRef] = []
    for ref, _ in encoding.inputs(entry, tt).values():
        if isinstance(ref, DerivedMerged):
            if not merged_kept:
                out += [v.extras["exact"].residual for v in entry.tasks.values()]
        else:
            out.append(ref)
    return out


#: The share of what a remote source keeps after reading (its ``keep_bytes``: ``tallpack.remote.KEEP_READ``)
#: that ``verify`` checks together of the exact tier's entries, ahead of their rebuilds
#: (``_ChunkChecks.ahead``): still kept when the rebuilds come to them, and fetched in a few round
#: trips rather than one an entry.
AHEAD_SHARE = 0.25


class _ChunkChecks:
    """``verify``'s check of every stored chunk (its checksum, and decoded) and of every kept file's
    hash; the problems found by the manifest's order of arrays (``found``, ``files``).

    From a remote source, the arrays of the entries that the exact tier's rebuilds read (a task
    packed with it) are checked a few entries at a time just before the first rebuild that reads
    them (``ahead``), the others first (``now``): the source then still keeps what the check
    fetched when the rebuilds read it (``tallpack.remote.KEEP_READ``). Checked all first, a remote
    exact archive larger than that was fetched twice. A local file's are all checked first."""

    def __init__(self, archive: Archive, named: dict[str, str]):
        self.archive = archive
        #: (where, array, a kept file's digest or None), tensors' arrays in the manifest's order, then files'
        self.arrays: list[tuple[str, ArrayRef, str | None]] = [
            (f"tensor {name!r} ({key})", ref, None) for name, key, ref in iter_arrays(archive.manifest.tensors)]
        self.arrays += [(named.get(d, f"file content {d[:12]}"), ref, d) for d, ref in archive.manifest.files.items()]
        self.found: dict[int, str] = {}  # array's index -> its chunk's problem
        self.files: list[str] = []  # the kept files' hashes that do not match
        self.damaged: set[int] = set()  # id() of the arrays with a chunk that failed
        keep = getattr(archive._c.source, "keep_bytes", None)  # a remote source (a local file's pages stay cached)
        exact = {t for t in archive.tasks if archive.task_info(t).exact is not None} if keep else set()
        #: entry name -> its arrays' indices, not checked yet (entries a task packed exact has)
        self.later: dict[str, list[int]] = {}
        self.owner: dict[int, str] = {}  # id() of an array -> the name of its entry
        i = 0
        for e in archive.manifest.tensors:
            refs = e.all_arrays()
            if exact.intersection(e.tasks):
                self.later[e.name] = list(range(i, i + len(refs)))
                self.owner.update((id(ref), e.name) for _, ref in refs)
            i += len(refs)
        self._names = list(self.later)
        self._ahead_bytes = int(AHEAD_SHARE * (keep or 0))
        self._at = {name: k for k, name in enumerate(self._names)}
        self._lock = threading.Lock()

    def now(self) -> list[tuple[int, list[ArrayRef]]]:
        """The arrays checked first (as ``_batches`` items): those of no entry in ``later``."""
        deferred = {i for indices in self.later.values() for i in indices}
        return [(i, [a[1]]) for i, a in enumerate(self.arrays) if i not in deferred]

    def check(self, batch: list[tuple[int, list[ArrayRef]]]) -> None:
        """Check these arrays (fetched together), each chunk read anew, and each kept file's hash."""
        c = self.archive._c
        c.prefetch([self.arrays[i][1] for i, _ in batch if self.arrays[i][1].stored_nbytes <= PREFETCH_BYTES],
                   ", ".join(self.arrays[i][0] for i, _ in batch[:2]) + (", ..." if len(batch) > 2 else ""))
        for i, _ in batch:
            where, ref, digest = self.arrays[i]
            try:
                for k in range(len(ref.chunks)):
                    c.read_chunk(ref, k, where, recheck=True, ahead=True)  # even if read before
            except (OutOfMemoryError, RemoteError, ArchiveClosedError):  # not damage: verify cannot say, and fails
                raise
            except MemoryError:
                raise self.archive._out_of_memory(where, ref.nbytes) from None
            except TallpackError as e:
                self.found[i] = str(e)
                self.damaged.add(id(ref))
                continue
            if digest is None:
                continue
            try:  # (its chunks just read: still at hand)
                read_blob(c.read_array, digest, ref, where)
            except (OutOfMemoryError, RemoteError, ArchiveClosedError):
                raise
            except TallpackError as e:
                self.files.append(str(e))

    def ahead(self, entry: str) -> None:
        """Check ``entry``'s arrays now, unless checked already (another thread checking them: waits),
        and with them those of the entries after it not checked yet, to ``AHEAD_SHARE`` of what the source keeps (the
        rebuilds read the entries in their files' order, mostly the manifest's): fetched together."""
        if entry not in self.later:
            return
        with self._lock:
            if entry not in self.later:
                return
            names: list[str] = []
            size = 0
            for name in self._names[self._at[entry]:]:
                indices = self.later.get(name)
                if indices is None:
                    continue
                n = sum(self.arrays[i][1].stored_nbytes for i in indices)
                if names and size + n > self._ahead_bytes:
                    break
                names.append(name)
                size += n
            for batch in _batches([(i, [self.arrays[i][1]]) for name in names for i in self.later[name]]):
                self.check(batch)
            for name in names:
                del self.later[name]

    def check_rest(self) -> None:
        """Check the arrays no rebuild read (``ahead`` never asked for their entries)."""
        with self._lock:
            rest = [(i, [self.arrays[i][1]]) for indices in self.later.values() for i in indices]
            for batch in _batches(sorted(rest, key=lambda item: item[0])):
                self.check(batch)
            self.later.clear()


class _CheckedFirst:
    """The archive as ``verify``'s rebuild of the originals (``originals.verify_originals``) reads
    it: each entry's chunks are checked (``_ChunkChecks.ahead``) before a tensor or an array of it
    is first read; everything else is the archive's."""

    def __init__(self, archive: Archive, checks: _ChunkChecks):
        self._archive, self._checks = archive, checks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._archive, name)

    def get_tensor(self, task: str, name: str, **kwargs: Any) -> torch.Tensor:
        a = self._archive
        target = a._resolve(task, name)
        member = a._member(task, target)
        self._checks.ahead(member[0].name if member is not None else target)
        return a.get_tensor(task, name, **kwargs)

    def read_array(self, ref: ArrayRef | DerivedMerged, where: str, use: Use = Use.OUTPUT, *, start: int = 0,
                   stop: int | None = None, **kwargs: Any) -> torch.Tensor:
        """``Archive.read_array``, once ``ref``'s entry's chunks are checked. Its ``start``/``stop``
        are named: ``exact.in_runs`` asks a reader's signature for ``stop``, and without it every
        large tensor's originals were rebuilt whole, one task at a time, from a remote archive."""
        entry = ref.entry.name if isinstance(ref, DerivedMerged) else self._checks.owner.get(id(ref))
        if entry is not None:
            self._checks.ahead(entry)
        return self._archive.read_array(ref, where, use, start=start, stop=stop, **kwargs)


def _batches(items: list[tuple[Any, list[ArrayRef]]]) -> list[list[tuple[Any, list[ArrayRef]]]]:
    """Consecutive items grouped so that each group's arrays store at most PREFETCH_BYTES
    (an item larger than that is a group alone)."""
    out: list[list[tuple[Any, list[ArrayRef]]]] = []
    size = 0
    for item in items:
        n = sum(r.stored_nbytes for r in item[1])
        if not out or size + n > PREFETCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


if TYPE_CHECKING:  # a Mapping[str, Tensor] to type checkers; at run time, without importing torch
    _TensorMapping = Mapping[str, torch.Tensor]
else:
    _TensorMapping = Mapping


class LazyStateDict(_TensorMapping):
    """A read-only mapping over one task's tensors, each rebuilt when indexed; ``in``, ``len`` and
    iteration answer from the manifest's names, rebuilding nothing.

    A group's member (format 1.12) is rebuilt with the rest of its group, whose other members
    are held until indexed: the groups most recently read, up to HELD_BYTES of members not yet
    handed out. Reading the tensors in turn (``unpack``, ``load_state_dict``) rebuilds each group
    once, not once per member, also when the members of two groups alternate (a mixed-precision
    checkpoint: a bfloat16 weight, then a float32 norm, layer after layer).

    >>> sd = fam.state_dict("cars", lazy=True)
    >>> "classifier.weight" in sd, model.load_state_dict(sd)
    """

    def __init__(self, archive: Archive, task: str, *, exact: bool = False,
                 device: torch.device | str | None = None):
        self._archive = archive
        self._task = task
        self._keys = archive.keys(task)
        self._names = frozenset(self._keys)
        self._exact = exact
        self._device = device
        self._lock = threading.Lock()
        _LAZY[id(self)] = self
        #: by group name, the members not yet handed out, the least recently read group first
        self._held: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._held_bytes = 0
        #: (format 1.14) a tensor of several names (an alias and its target): all its names, and
        #: while some are not handed out yet, the tensor and those names (one tensor, as torch.load ties them)
        self._names_of: dict[str, list[str]] = {}
        for k in self._keys:
            target = archive._resolve(task, k)
            if target != k:
                self._names_of.setdefault(target, [target]).append(k)
        self._tied: dict[str, tuple[torch.Tensor, set[str]]] = {}

    def __repr__(self) -> str:  # (shown at a prompt: names only, nothing rebuilt)
        return (f"<tallpack.LazyStateDict {self._archive.name!r}, task {self._task!r}: {len(self._keys)} tensors"
                f"{', exact' if self._exact else ''}>")

    def _ipython_key_completions_(self) -> list[str]:
        """The names IPython and Jupyter offer at ``sd["<Tab>`` (they complete a dict's keys only)."""
        return list(self._keys)

    @cpu_default
    def __getitem__(self, name: str) -> torch.Tensor:
        if not self._names_of or not isinstance(name, str) or _is_meta(self._device):
            return self._get(name)
        target = self._archive._resolve(self._task, name)
        if target not in self._names_of:
            return self._get(name)
        got = self._take_tied(target, name)
        if got is None:  # rebuilt, as any read: the tensor its other names get next
            got = self._take_tied(target, name, self._get(target))
            assert got is not None  # (one built is handed out)
        return got

    def _take_tied(self, target: str, name: str, built: torch.Tensor | None = None) -> torch.Tensor | None:
        """The held tensor of ``target`` for ``name``, when ``name`` has not had it yet (let go once
        every name has); else ``built`` (None: not built yet), then held for the other names. A
        name read again gets a tensor of its own, not the one its caller may have changed."""
        with self._lock:
            held = self._tied.get(target)
            if held is not None and name in held[1]:  # (another thread's, of another name, meanwhile)
                held[1].discard(name)
                if not held[1]:
                    del self._tied[target]
                return held[0]
            if built is not None:
                self._tied[target] = (built, {n for n in self._names_of[target] if n != name})
            return built

    def _get(self, name: str) -> torch.Tensor:
        member = self._archive._member(self._task, name)
        if member is None or _is_meta(self._device):
            return self._archive.get_tensor(self._task, name, exact=self._exact, device=self._device)
        group = member[0]
        with self._lock:
            held = self._held.get(group.name)
            if held is None or name not in held:
                a = self._archive
                got = a._rebuild(self._task, group.name, a._workers(), self._exact, self._device,
                                 parts=list(group.members))
                self._drop(group.name)
                held = self._held[group.name] = dict(zip([m.name for m in group.members], got))
                self._held_bytes += sum(_nbytes(t) for t in held.values())
            self._held.move_to_end(group.name)
            out = held.pop(name)
            self._held_bytes -= _nbytes(out)
            if not held:
                del self._held[group.name]
            while self._held_bytes > HELD_BYTES and len(self._held) > 1:  # the oldest groups go first
                self._drop(next(iter(self._held)))
            return out

    def _drop(self, group: str) -> None:
        """Let go of a group's members not handed out (the next of them rebuilds the group)."""
        self._held_bytes -= sum(_nbytes(t) for t in self._held.pop(group, {}).values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names

    @overload
    def get(self, name: str, /) -> torch.Tensor | None: ...

    @overload
    def get(self, name: str, /, default: torch.Tensor | _T) -> torch.Tensor | _T: ...

    def get(self, name: str, default: Any = None) -> Any:
        """The tensor, rebuilt, or ``default`` when the task has none of that name (nothing rebuilt)."""
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process: the same mapping over the archive opened there (``Archive.__reduce__``)."""
        return _lazy_state_dict, (self._archive, self._task, self._exact, self._device)


def _lazy_state_dict(archive: Archive, task: str, exact: bool, device: torch.device | None) -> LazyStateDict:
    return LazyStateDict(archive, task, exact=exact, device=device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorSlice:
    """Part of one task's tensor, read on demand (:meth:`Archive.get_slice`).

    Indexing whose first item is an integer or a step-1 slice reads only the chunks that hold those
    rows (for encodings rebuilt element by element); any other index rebuilds the whole tensor
    first.
    """

    def __init__(self, archive: Archive, task: str, name: str, tt: TaskTensor,
                 member_shape: tuple[int, ...] | None = None, *, exact: bool = False):
        self._archive, self._task, self._name, self._tt = archive, task, name, tt
        self._member_shape = member_shape  # a group's member (format 1.12): rebuilt whole
        self._exact = exact

    def get_shape(self) -> list[int]:
        return list(self._tt.shape if self._member_shape is None else self._member_shape)

    def get_dtype(self) -> str:
        """The dtype as safetensors names it (``"F32"``, ``"BF16"``, ``"I64"``, ``"BOOL"``, ...)."""
        return _SAFETENSORS_CODES.get(self._tt.dtype, self._tt.dtype)

    def __repr__(self) -> str:
        return (f"<tallpack.TensorSlice {self._archive.name!r}, task {self._task!r}, {self._name!r}: "
                f"{self._tt.dtype} {tuple(self.get_shape())}{', exact' if self._exact else ''}>")

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to another process: the same slice of the archive opened there (``Archive.__reduce__``)."""
        return _slice, (self._archive, self._task, self._name, self._exact)

    @cpu_default
    def __getitem__(self, index: Any) -> torch.Tensor:
        idx = index if isinstance(index, tuple) else (index,)
        bad = next((i for i in idx if isinstance(i, (str, bytes, float))), None)
        if bad is not None:  # before anything is read (torch would warn, then fail the same way)
            raise TypeError(f"{self._name}: a tensor cannot be indexed with {bad!r}")
        shape, first = self._tt.shape, idx[0] if idx else slice(None)
        enc = encoding_for(self._tt.encoding)
        rows = None
        # rows read alone: entries rebuilt element by element (a lossy read of one with an exact
        # residual too), the exact originals of TALL entries (``exact.original_rows``) and the lossy
        # rebuilds of derived ones (``_derived_rows``)
        extras = set(self._tt.extras)
        by_rows = (enc is not None and enc.elementwise and extras <= {"exact"} and not (self._exact and extras)
                   or extras == {"exact"} and self._tt.encoding in (TALL_ENCODINGS if self._exact else DERIVED_ENCODINGS))
        if shape and by_rows and self._member_shape is None:
            row = _row(first)
            if row is not None:
                i = row + shape[0] if row < 0 else row
                if not 0 <= i < shape[0]:
                    raise IndexError(f"{self._name}: row {row} of {shape[0]}")
                rows, rest = (i, i + 1), (0, *idx[1:])
            elif isinstance(first, slice) and first.step in (None, 1):
                a, b, _ = first.indices(shape[0])
                rows, rest = (a, max(a, b)), (slice(None), *idx[1:])
        if rows is None or rows == (0, shape[0]):  # (all rows: as get_tensor)
            return _own(self._archive.get_tensor(self._task, self._name, exact=self._exact), index)
        if rows[0] == rows[1]:  # no rows (a rank whose share is empty): nothing to read
            self._archive._require_open()  # (as any other share's read says, and get_slice)
            empty = torch.empty((0, *shape[1:]), dtype=torch_dtype(self._tt.dtype))
            return _own(empty, rest) if rest != (slice(None),) else empty
        part = self._archive._rebuild(self._task, self._name, self._archive._workers(), self._exact, rows=rows)
        return _own(part, rest) if rest != (slice(None),) else part


def _row(index: Any) -> int | None:
    """``index`` as the one row torch takes it for: an int, a numpy integer or a 0-d integer tensor
    (a rank's or an expert's number as a program computes it), else None."""
    if isinstance(index, torch.Tensor):  # (torch takes a uint8 tensor for a mask, as a bool one)
        whole = not (index.is_floating_point() or index.is_complex() or index.dtype in (torch.bool, torch.uint8))
        return int(index) if index.ndim == 0 and whole else None
    return int(index) if isinstance(index, numbers.Integral) and not isinstance(index, bool) else None


def _slice(archive: Archive, task: str, name: str, exact: bool) -> TensorSlice:
    return archive.get_slice(task, name, exact=exact)


#: safetensors' dtype codes (``TensorSlice.get_dtype``), by spec name.
_SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}


def _own(t: torch.Tensor, index: Any) -> torch.Tensor:
    """``t[index]``, as a tensor of its own where that is a view of part of ``t``: a rank that
    takes a column slice of a weight keeps that slice, not the whole (as safetensors' slices)."""
    got = t[index]
    return got.clone() if got._base is not None and got.numel() < t.numel() else got


@contextlib.contextmanager
def _gc_paused():
    """Parsing a manifest, or rebuilding a state dict, makes many small objects; in a process that
    imported torch, the cyclic garbage collector's full passes over everything torch made cost
    more than the work (90 ms against 9 ms to parse a 450-array manifest; about 50 ms of a 120 ms
    state dict, measured). What is made here forms no cycles that need collecting meanwhile; the
    collector is as the caller had it again when the last of the calls in progress (in any
    thread) returns: counted, as each call saving and restoring it would turn it on under the
    others, or leave it off for good (one finding it off as another turns it on); one that returns
    while others go on collects the young generations (``_collect_young``)."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if not _gc_holders:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            others = bool(_gc_holders) and _gc_was_enabled
            if not _gc_holders and _gc_was_enabled:
                gc.enable()
        if others:
            _collect_young()


def _collect_young() -> None:
    """A call that returns while others (other threads') keep the collector paused: the young
    generations collected, when the collector would have by now. Threads that read all the time
    (a server) keep some call in progress at every moment: the collector would never run again,
    and the whole program's cyclic garbage would stay (four threads reading state dicts for
    8 s beside one making cycles: 1.9 GB of RSS, against 0.3 GB)."""
    first = gc.get_threshold()[0]
    if first and gc.get_count()[0] >= first:
        gc.collect(1)


_gc_lock = threading.Lock()
_gc_holders = 0  # calls in _gc_paused now
_gc_was_enabled = False  # the collector's state when the first of them came


def _gc_after_fork_in_child() -> None:
    """A child forked while another thread was in ``_gc_paused`` has not that thread: the
    collector is as it was before, and the lock (which that thread may have held) a fresh one."""
    global _gc_lock, _gc_holders
    _gc_lock = threading.Lock()
    if _gc_holders and _gc_was_enabled:
        gc.enable()
    _gc_holders = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_gc_after_fork_in_child)


def open(path: str | bytes | os.PathLike, *, storage_options: dict[str, Any] | None = None,  # noqa: A001
         cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None) -> Archive:
    """Open an archive for reading: a local path, or a URL that fsspec understands (each
    chunk is then one range request; ``storage_options`` go to fsspec).

    Decoded base and merged vectors, which every task shares, are kept in a cache of at most
    ``cache_bytes`` (default 1 GiB; 0 turns it off), so a second task reads only its masks. For
    float32 arrays stored as byte planes (the default codec), only the planes zstd coded are kept
    (about a quarter of the floats); the rest are read from the mapped file as the rebuild runs.
    ``threads`` rebuild tensors in parallel (default: the CPUs this process may run on, at most 8).

    >>> with tallpack.open("family.tallpack") as fam:
    ...     sd = fam.state_dict("cars")
    >>> tallpack.open("s3://models/family.tallpack", storage_options={"anon": True})
    """
    budget, workers = integer(cache_bytes), integer(threads)
    if budget is None or budget < 0:
        raise InvalidArgumentError(f"cache_bytes must be a non-negative integer, got {cache_bytes!r}")
    if threads is not None and (workers is None or workers < 1):
        raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidArgumentError(f"an archive's path or URL is a str or os.PathLike, got {type(path).__name__}")
    text = os.fsdecode(path)  # bytes paths too
    source = open_bytes(text, storage_options)
    try:
        with _gc_paused():
            fam = Archive(ContainerReader(source, getattr(source, "url", text)), cache_bytes=budget, threads=workers)
    except BaseException:
        source.close()
        raise
    fam._opened = _Opened(text if is_url(text) else os.path.abspath(text.removeprefix("file://")),
                          storage_options, budget, workers)
    return fam
