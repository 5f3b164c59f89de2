"""Progress reporting for long operations (pack, unpack, merge, verify), decided by the caller.

A library function takes ``progress``: ``None``/``False`` (silent), ``True`` (a tqdm bar on
stderr), or a callable ``fn(desc, done, total)`` called after each step (the command line passes
one that prints plain log lines when stderr is not a terminal).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar, Union

log = logging.getLogger(__name__)

T = TypeVar("T")
#: What a ``progress`` argument may be.
ProgressLike = Union[bool, None, Callable[[str, int, int], None], "Labelled"]


def track(items: Iterable[T], progress: ProgressLike, desc: str, total: int | None = None,
          unit: str = "tensor") -> Iterator[T]:
    """``items``, reporting each step to ``progress``.

    >>> for name in track(names, True, "unpacking", len(names)): ...
    """
    if not progress:
        yield from items
        return
    if isinstance(items, Sized) and not len(items):  # a step with nothing to do: no empty bar
        return
    if isinstance(progress, Labelled) and not isinstance(progress.progress, (LogLines, Bar)):
        desc, progress = f"{progress.label}: {desc}", progress.progress  # (LogLines, Bar: told the label apart)
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = 0
    if progress is True:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total or None, unit=unit)
        return
    assert callable(progress)
    done = 0
    for item in items:
        yield item
        done += 1
        progress(desc, done, total)


class Labelled:
    """A ``progress`` whose steps are shown under ``label`` (``"cars: writing"``): each task of a
    multi-task unpack.

    >>> write_task(fam, "cars", "out/cars", progress=Labelled(True, "cars"))
    """

    def __init__(self, progress: ProgressLike, label: str):
        self.progress, self.label = progress, label
        if isinstance(progress, (LogLines, Bar)):  # its place among the parts, though it reports no step
            progress.part(label)

    def __bool__(self) -> bool:
        return bool(self.progress)

    def __call__(self, desc: str, done: int, total: int) -> None:  # as a callable ``progress``
        if isinstance(self.progress, (LogLines, Bar)):
            self.progress(desc, done, total, label=self.label)
        elif callable(self.progress):
            self.progress(f"{self.label}: {desc}", done, total)


class LogLines:
    """A ``progress`` callable that emits one line per ~10% (and the last step) through ``emit``:
    for logs and pipes, where a bar would be noise. With ``parts``, the number of tasks a call
    works through one after another under their labels (:class:`Labelled`: a multi-task unpack),
    a line per ~10% of all of them, not of each.

    A line ``emit`` cannot write (an ``OSError``: a log's pipe whose reader is gone) ends the lines,
    not the work they report on.

    >>> tallpack.pack(base, tasks, out, progress=LogLines(print))
    >>> write_tasks(fam, None, "out", progress=LogLines(print, parts=len(fam.tasks)))
    """

    def __init__(self, emit: Callable[[str], None], steps: int = 10, *, parts: int = 1):
        self._emit: Callable[[str], None] | None = emit
        self._steps, self._parts = steps, parts
        self._last: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._labels: dict[str, int] = {}  # each label's place, as first seen
        self._whole = 0  # the last step of the whole call shown

    def part(self, label: str) -> int:
        """The place of the part ``label`` (from 0), the next one when it is new."""
        return self._labels.setdefault(label, len(self._labels))

    def __call__(self, desc: str, done: int, total: int, *, label: str | None = None) -> None:
        if label is not None and self._parts > 1:
            i = self.part(label)
            part = min(done / total, 1.0) if total else 0.0
            step = int(min((i + part) / self._parts, 1.0) * self._steps)
            if step > self._whole or (i + 1 >= self._parts and done == total):
                self._whole = step
                self._say(f"{label}: {desc}: {done}/{total} (task {min(i + 1, self._parts)} of {self._parts})"
                          if total else f"{label}: {desc}: {done} (task {min(i + 1, self._parts)} of {self._parts})")
            return
        if label is not None:
            desc = f"{label}: {desc}"
        if done <= self._done.get(desc, 0):  # a new run under the same name (the next task's writing)
            self._last.pop(desc, None)
        self._done[desc] = done
        step = done * self._steps // total if total else done
        if done == total or step > self._last.get(desc, 0 if total else -1):
            self._last[desc] = step
            self._say(f"{desc}: {done}/{total}" if total else f"{desc}: {done}")

    def _say(self, line: str) -> None:
        if self._emit is None:
            return
        try:
            self._emit(line)
        except OSError as e:  # nobody can read them: the work goes on without its lines
            self._emit = None
            log.debug("progress lines stopped: %s", e)


class Bar:
    """A ``progress`` callable that shows one tqdm bar on stderr for a call that works through
    ``parts`` one after another under their labels (:class:`Labelled`: the tasks of a multi-task
    unpack): the bar measures the whole call and its text names the part at work (``cars:
    writing (task 2 of 5)``), so that one line is left on the terminal, not one per part. It is
    closed when the last part's last step is done, or by :meth:`close` (a failure: where it got).

    >>> with Bar(parts=len(fam.tasks)) as bar:
    ...     write_tasks(fam, None, "out", progress=bar)
    """

    _STEPS = 1000  # the bar's own scale: parts' steps differ in number, each part is a share of it

    def __init__(self, parts: int = 1):
        self._parts = max(parts, 1)
        self._labels: dict[str, int] = {}
        self._bar: Any = None  # the tqdm bar, made at the first step
        self._lock = threading.Lock()  # steps may come from worker threads

    def part(self, label: str) -> int:
        """The place of the part ``label`` (from 0), the next one when it is new."""
        return self._labels.setdefault(label, len(self._labels))

    def __call__(self, desc: str, done: int, total: int, *, label: str | None = None) -> None:
        i = 0 if label is None else self.part(label)
        share = min(done / total, 1.0) if total else 1.0
        last = i + 1 >= self._parts and share >= 1.0
        text = desc if label is None else f"{label}: {desc}"
        if self._parts > 1:  # the whole call's line, once done
            text = f"{desc} ({self._parts} tasks)" if last else f"{text} (task {min(i + 1, self._parts)} of {self._parts})"
        with self._lock:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self._STEPS, desc=text,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            self._bar.set_description_str(text, refresh=False)
            self._bar.update(max(round(min((i + share) / self._parts, 1.0) * self._STEPS) - self._bar.n, 0))
            if last:
                self._close()

    def close(self) -> None:
        """Leave the bar as it stands, on its own line (the next output starts on a new one)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
