"""The fidelity dial's second pass (``Dial.write_tensor``) works each task's part of a merged tensor
(its figures, quantized task vector, residual) on up to ``threads`` threads, as many at once as
``_observe`` measures (``in_flight``: half the free memory), and writes its arrays in task order:
the archive is the same bytes for any thread count, with a merged vector dropped, corrections of
every kind, a budget's rewrites and an evaluator. And the first pass's errors, taken in one float64
buffer without a float64 copy of the original, are the plain formula's floats."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest
import torch
from safetensors.torch import load_file

import tallpack
from tallpack import dial as dial_module
from tallpack.dial import _Errors
from tallpack.dtypes import narrow
from tallpack.tall import Fidelity
from test_dial_threads import dial_threads, family

ALL = ("sparse", "quant4", "quant8", "qtau", "exact")


@pytest.fixture
def second_pass(monkeypatch):
    """The threads the second pass's per-task work ran on: ``Fidelity.add`` (every task of a
    tensor with a qtau task) and ``residual`` (every sparse or quant correction), as (what, tensor
    size, thread name)."""
    seen: list[tuple[str, int, str]] = []
    add, residual = Fidelity.add, dial_module.residual

    def watched_add(self, tau_t, mask, tau_mtl, *args, **kw):
        seen.append(("figures", tau_t.numel(), threading.current_thread().name))
        return add(self, tau_t, mask, tau_mtl, *args, **kw)

    def watched_residual(theta, *args):
        seen.append(("residual", theta.numel(), threading.current_thread().name))
        return residual(theta, *args)

    monkeypatch.setattr(Fidelity, "add", watched_add)
    monkeypatch.setattr(dial_module, "residual", watched_residual)
    return seen


def on_threads(seen: list[tuple[str, int, str]], what: str) -> bool:
    return any(w == what and who.startswith("tallpack-dial") for w, _, who in seen)


def pack_both(tmp_path, base, tasks, **options) -> tuple[bytes, bytes, dict]:
    """The archive at threads=1 and threads=2, and the second's dial record."""
    got = {}
    for j in (1, 2):
        m = tallpack.pack(base, tasks, tmp_path / f"j{j}.tallpack", threads=j, **options)
        got[j] = (tmp_path / f"j{j}.tallpack").read_bytes()
        assert not dial_threads()
    return got[1], got[2], m.stats["dial"]


def stored(record: dict) -> set[str]:
    return {label for t in record["tasks"].values() for label in t["stored"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{"fidelity": 0.99}, {"fidelity": 0.999}, {"budget": 2.5}],
                         ids=["f0.99", "f0.999", "budget2.5"])
def test_the_second_pass_on_two_threads_writes_one_threads_bytes(tmp_path, dtype, options, second_pass):
    base, tasks = family(tmp_path / "fam", dtype)
    one, two, record = pack_both(tmp_path, base, tasks, **options)
    assert one == two
    if options == {"fidelity": 0.99}:  # qtau tasks in every tensor: their figures and quantization on threads
        assert on_threads(second_pass, "figures")
    # the small tensor (c.bias, 300 elements) stays on the calling thread, as in the first pass
    assert not any(n < dial_module.THREADS_FROM and who.startswith("tallpack-dial") for _, n, who in second_pass)


def test_a_dropped_merged_vector_sums_the_tasks_in_order_on_threads(tmp_path, second_pass):
    """Every task qtau and the merged vector dropped: each qtau mask is counted against the sum of
    the deQ, made in task order while the tasks are quantized on threads."""
    base, tasks = family(tmp_path / "fam", torch.bfloat16)
    one, two, record = pack_both(tmp_path, base, tasks, fidelity=0.99)
    assert record["merged_dropped"] >= 2 and one == two
    assert on_threads(second_pass, "figures")
    with tallpack.open(tmp_path / "j2.tallpack") as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "a.weight")
        assert "merged" not in entry.arrays
        assert all(tt.encoding == "qtau" and tt.params["ones"] > 0 for tt in entry.tasks.values())


@pytest.mark.parametrize("corrections", [("sparse",), ("quant4", "quant8"), ALL], ids=["sparse", "quant", "all"])
def test_corrections_encoded_on_threads_are_written_in_task_order(tmp_path, corrections, second_pass):
    base, tasks = family(tmp_path / "fam", torch.float32)
    one, two, record = pack_both(tmp_path, base, tasks, fidelity=0.9999, corrections=corrections)
    assert one == two
    assert on_threads(second_pass, "residual")
    kinds = stored(record)
    assert kinds & {"sparse", "quant4", "quant8"}
    assert kinds <= {"tall", *corrections, *(f"qtau{b}" for b in dial_module.QTAU_BITS)}


def test_with_an_evaluator_the_same_bytes(tmp_path, second_pass):
    base, tasks = family(tmp_path / "fam", torch.float32)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    want = {t: (x @ load_file(p)["a.weight"].float().T).argmax(1) for t, p in tasks.items()}

    def examples(task, sd):  # per example: the reconstruction predicts what the fine-tune does
        return ((x @ sd["a.weight"].float().T).argmax(1) == want[task]).double().numpy()

    one, two, record = pack_both(tmp_path, base, tasks, fidelity=0.99, evaluate=examples, lambda_grid=[0.4])
    assert one == two and record["measure"] == "score"
    assert on_threads(second_pass, "figures") or on_threads(second_pass, "residual")


def test_no_free_memory_keeps_the_second_pass_on_one_thread(tmp_path, monkeypatch, second_pass):
    """``in_flight`` caps the second pass as it caps the first: with nothing free, one task at a
    time on the calling thread, whatever ``threads`` says; the same bytes."""
    base, tasks = family(tmp_path / "fam", torch.bfloat16)
    tallpack.pack(base, tasks, tmp_path / "free.tallpack", threads=2, fidelity=0.999)
    assert on_threads(second_pass, "residual")  # (the sparse corrections of a.weight and b.weight)
    second_pass.clear()
    monkeypatch.setattr(dial_module, "memory_free", lambda: 0)
    tallpack.pack(base, tasks, tmp_path / "none.tallpack", threads=2, fidelity=0.999)
    assert second_pass and not any(who.startswith("tallpack-dial") for _, _, who in second_pass)
    assert (tmp_path / "free.tallpack").read_bytes() == (tmp_path / "none.tallpack").read_bytes()


def test_an_error_in_a_tasks_correction_surfaces_and_leaves_no_thread(tmp_path, monkeypatch):
    base, tasks = family(tmp_path / "fam", torch.float32)
    residual = dial_module.residual

    def failing(theta, base32, mask, merged):
        if threading.current_thread().name.startswith("tallpack-dial"):
            raise MemoryError("injected in the second pass")
        return residual(theta, base32, mask, merged)

    monkeypatch.setattr(dial_module, "residual", failing)
    with pytest.raises(MemoryError, match="^injected in the second pass$"):
        tallpack.pack(base, tasks, tmp_path / "x.tallpack", threads=2, fidelity=0.9999, corrections=("sparse",))
    assert not dial_threads()
    assert not (tmp_path / "x.tallpack").exists()


def test_a_window_bounds_the_runs_handed_ahead_of_the_caller():
    """``_in_order(..., window=3)``: when the caller takes run i, no run past i + 2 has begun (their
    results would wait in memory); without a window every run is handed at once."""
    for window, bounded in ((3, True), (None, False)):
        began: list[int] = []
        ahead = []

        def run(i: int) -> int:
            began.append(i)
            return i

        with closing(dial_module._in_order(run, 12, 2, window)) as results:
            for i, got in enumerate(results):
                time.sleep(0.01)  # a slow caller: unbounded threads run far ahead of it
                ahead.append(max(began) - i)
                assert got() == i
        assert sorted(began) == list(range(12))
        assert (max(ahead) <= 2) == bounded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_errors_in_one_float64_buffer_are_the_plain_formulas_bits(dtype, weighted):
    """``_Errors`` keeps no float64 copy of the original and squares in the difference's own
    buffer (a bfloat16 or float8 original widened a piece at a time): the same floats, to the bit,
    as the whole-tensor formula, over several pieces, with +-inf and NaN rebuilt."""
    from test_fidelity import _plain_error

    n = 3 * dial_module._WIDEN_ELEMENTS + 5
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    a = b.float() + torch.randn(n, generator=g) * 1e-2
    a[7], a[n - 1] = float("inf"), float("nan")  # (float8_e4m3fn has no inf: narrow gives 448, finite)
    a = narrow(a, dtype)  # (set in float32: torch 2.1 cannot fill float8 elements)
    w = torch.rand(n, generator=g, dtype=torch.float64) if weighted else None
    errors = _Errors(b, w)
    for _ in range(2):  # the buffer is reused
        got, want = errors(a), _plain_error(a, b, w)
        assert got == want and got[3] == int(torch.count_nonzero(~torch.isfinite(a.float()))) >= 1
        assert errors(b) == _plain_error(b, b, w)
    assert errors.norm() == _plain_error(b, torch.zeros(1), w)[:2]
