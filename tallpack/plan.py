"""The plan: align tensor names across the base and the tasks, and classify each tensor.

Pure functions over names, shapes and dtypes: no tensor data is read here. Whether a tensor is
``shared`` (equal in every task) is decided later, when its data is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import FLOATING
from .errors import IncompatibleCheckpointsError
from .sources import Source


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # "merged" (masked), "task-own" (stored per task), or "base-only"
    tasks: tuple[str, ...]  # the tasks that have this tensor, in task order
    in_base: bool


@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    tensors: tuple[TensorPlan, ...]

    def count(self, kind: str) -> int:
        return sum(t.kind == kind for t in self.tensors)


def make_plan(base: Source, tasks: dict[str, Source], *, allow_mismatch: bool = False) -> Plan:
    """Classify every tensor name of the family.

    A tensor is ``merged`` when it is floating, in the base and in every task with the base's
    shape; ``task-own`` when only some tasks have it or shapes differ; ``base-only`` when no task
    has it. Raises IncompatibleCheckpointsError when a task does not look fine-tuned from the base
    (unless ``allow_mismatch``).
    """
    if not tasks:
        raise IncompatibleCheckpointsError("a family needs at least one task")
    names: dict[str, None] = dict.fromkeys(base.keys())
    for src in tasks.values():
        names.update(dict.fromkeys(src.keys()))
    if not allow_mismatch:
        for task, src in tasks.items():
            _check_task(base, task, src)
    out = []
    for name in names:
        have = tuple(t for t, src in tasks.items() if name in src)
        in_base = name in base
        if not have:
            kind = "base-only"
        elif in_base and len(have) == len(tasks) and _maskable(base, name, tasks.values()):
            kind = "merged"
        else:
            kind = "task-own"
        out.append(TensorPlan(name, kind, have, in_base))
    return Plan(tuple(tasks), tuple(out))


def _maskable(base: Source, name: str, tasks) -> bool:
    b = base.info(name)
    return b.dtype in FLOATING and all(
        s.info(name).shape == b.shape and s.info(name).dtype in FLOATING for s in tasks
    )


def _check_task(base: Source, task: str, src: Source) -> None:
    common = [n for n in src.keys() if n in base]
    differ = [n for n in common if src.info(n).shape != base.info(n).shape]
    if not common or len(differ) * 2 > len(common):
        examples = ", ".join(
            f"{n!r} {tuple(src.info(n).shape)} vs base {tuple(base.info(n).shape)}" for n in differ[:3]
        )
        what = (f"{len(differ)} of its {len(common)} tensors named as in the base differ in shape ({examples})"
                if common else "it shares no tensor name with the base")
        raise IncompatibleCheckpointsError(
            f"task {task!r} ({src.label}) does not look fine-tuned from the base: {what}; "
            "check the paths, or pass allow_mismatch=True (--allow-mismatch) to store such tensors per task"
        )
