"""Parity with safetensors for downstream loading code: the types a typed caller sees
(``mypy --strict`` on the README's patterns), archives opened behind the caller's back (a copied
or unpickled lazy state dict or slice), and reads under a default device other than the CPU."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tallpack

ROOT = Path(tallpack.__file__).resolve().parents[1]


def _family() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base and two tasks: a float32 tensor large enough to be rebuilt from byte planes, a
    smaller one, a bfloat16 one, small ones stored in a group, and tensors the tasks share."""
    g = torch.Generator().manual_seed(0)
    base = {"big": torch.randn(128, 64, generator=g), "w": torch.randn(32, 24, generator=g),
            "h": torch.randn(16, 8, generator=g).bfloat16(), "b": torch.randn(24, generator=g),
            "norm": torch.randn(8, generator=g), "ids": torch.arange(20), "frozen": torch.randn(30, generator=g)}
    tasks = {}
    for i, t in enumerate(("a", "b")):
        sd = {k: v.clone() for k, v in base.items()}
        for k in ("big", "w", "h", "b", "norm"):
            sd[k] = (base[k].float() + 0.05 * (i + 1) * torch.randn(base[k].shape, generator=g)).to(base[k].dtype)
        tasks[t] = sd
    return base, tasks


@pytest.fixture(scope="module")
def fam_path(tmp_path_factory) -> Path:
    base, tasks = _family()
    out = tmp_path_factory.mktemp("parity") / "fam.tallpack"
    tallpack.pack(base, tasks, out, exact=True, chunk_elements=1024)
    return out


# -- F1-F3: what a type checker sees ---------------------------------------------------------

DOWNSTREAM = '''
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save_file

import tallpack

X, Y = torch.randn(10, 4), torch.randint(0, 2, (10,))


def plain(path: str, task: str, dest: str) -> dict[str, torch.Tensor]:
    with tallpack.open(path) as fam:
        sd = fam.state_dict(task)                # not lazy: the dict it is
        sd["extra"] = torch.zeros(1)
        save_file(sd, dest)
        return sd


def lazy(path: str, task: str, flag: bool) -> torch.Tensor:
    with tallpack.open(path) as fam:
        sd: tallpack.LazyStateDict = fam.state_dict(task, lazy=True)
        either = fam.state_dict(task, lazy=flag)  # a bool known at run time only: either
        total = torch.zeros(())
        for name, v in sd.items():
            total = total + v.sum() + len(name)
        part: tallpack.TensorSlice = fam.get_slice(task, "w")
        rows: torch.Tensor = part[0:2]
        got = sd.get("w")
        if got is not None:
            total = total + got.sum() + rows.sum() + len(either)
        return sd.get("w", torch.zeros(1)) + total


def accuracy(task: str, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:  # the README's: as it is
    pred = (X @ sd["fc.weight"].T).argmax(1)
    return (pred == Y).float().mean()


def per_example(task: str, sd: Mapping[str, torch.Tensor]) -> npt.NDArray[np.float64]:
    pred = (X @ sd["fc.weight"].T).argmax(1)
    return (pred == Y).numpy().astype(np.float64)


def choose(fam: tallpack.Archive, finetuned: dict[str, dict[str, torch.Tensor]]) -> float:
    a = tallpack.select_alpha(fam, "consensus-ta", evaluate=accuracy)
    b = tallpack.select_alpha(fam, "consensus-ta", evaluate=per_example,
                              reference={t: accuracy(t, finetuned[t]) for t in fam.tasks})
    c = tallpack.select_alpha(fam, "consensus-ta", evaluate=lambda t, sd: [1.0, 0.0])
    return a.alpha + b.alpha + c.alpha
'''


# --strict's per-module flags, for the caller's module only: tallpack's modules and torch's are
# checked with the project's own settings, as test_layers' mypy run checks them, so the two runs
# share one cache (torch's stubs, most of the time, analysed once a run: 55-94 s on CI before).
STRICT = ("# mypy: disallow-any-generics, disallow-subclassing-any, disallow-untyped-calls, "
          "disallow-untyped-defs, disallow-incomplete-defs, check-untyped-defs, disallow-untyped-decorators, "
          "warn-return-any, no-implicit-reexport, strict-equality, extra-checks\n")


def test_downstream_loading_code_type_checks_strictly(tmp_path):
    """F1-F3: a plain state dict is a dict, a lazy one a Mapping[str, Tensor] (values and get
    typed, not Any), LazyStateDict and TensorSlice are importable from tallpack, and the README's
    evaluators (a tensor, per-example arrays, a list) are Evaluators, their scores references."""
    pytest.importorskip("mypy")
    script = tmp_path / "downstream.py"
    script.write_text(STRICT + textwrap.dedent(DOWNSTREAM))
    # cwd ROOT: pyproject's [tool.mypy] and test_layers' cache (.mypy_cache); the rest of --strict
    # is global only and does not touch the cache
    r = subprocess.run([sys.executable, "-m", "mypy", "--warn-redundant-casts",
                        "--no-error-summary", str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lazy_state_dict_and_slice_are_public(fam_path):
    """F2: the return types of state_dict(lazy=True) and get_slice, importable from tallpack."""
    assert {"LazyStateDict", "TensorSlice"} <= set(tallpack.__all__)
    # --strict's no-implicit-reexport, now the caller's setting only: every tallpack name the
    # downstream code uses is one tallpack exports
    assert set(re.findall(r"tallpack\.(\w+)", DOWNSTREAM)) <= set(tallpack.__all__)
    with tallpack.open(fam_path) as fam:
        assert isinstance(fam.state_dict("a", lazy=True), tallpack.LazyStateDict)
        assert isinstance(fam.get_slice("a", "w"), tallpack.TensorSlice)
        assert type(fam.state_dict("a")) is dict


# -- F4: archives opened behind the caller's back ------------------------------------------

def _open_fds(path: Path) -> int | None:
    """How many of this process's descriptors are open on ``path`` (others, such as an earlier
    test's sockets that a library's event loop closes whenever it does, are not counted)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(Path(path).resolve())
        except OSError:
            continue
    return n


def test_copies_of_lazy_dicts_and_slices_close_what_they_opened(fam_path):
    """F4: a deep copy or an unpickled lazy state dict or slice opens the archive again; that
    archive is its own and is closed when the last of them goes, without a ResourceWarning (the
    caller closed everything they opened)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with tallpack.open(fam_path) as fam:
            want = fam.get_tensor("a", "w")
            before = _open_fds(fam_path)
            lazy = copy.deepcopy(fam.state_dict("a", lazy=True))
            part = pickle.loads(pickle.dumps(fam.get_slice("a", "w")))
            both = pickle.loads(pickle.dumps([fam.state_dict("b", lazy=True), fam.get_slice("b", "w")]))
            assert lazy._archive is not fam and both[0]._archive is both[1]._archive  # one archive per pickle
            assert before is None or _open_fds(fam_path) > before  # the copies' archives hold the file open
            assert torch.equal(lazy["w"], want) and torch.equal(part[0:3], want[0:3])
            sources = [lazy._archive._c.source, part._archive._c.source, both[0]._archive._c.source]
            del both[0]
            gc.collect()
            assert not sources[2].closed  # the slice still reads from it
            assert both[0][0:1].shape == (1, 24)
            del lazy, part, both
            gc.collect()
            assert all(s.closed for s in sources)
            assert before is None or _open_fds(fam_path) == before
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_an_archive_dropped_open_is_named_in_its_warning(fam_path):
    """F4: one the caller opened and dropped without close(): closed, and the ResourceWarning
    names the archive, not a file descriptor."""
    fam = tallpack.open(fam_path)
    fam.get_tensor("a", "w")
    source = fam._c.source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del fam
        gc.collect()
    said = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert source.closed
    assert len(said) == 1 and "fam.tallpack" in said[0] and "close" in said[0], said


def test_a_closed_or_failed_archive_gives_no_warning(fam_path, tmp_path):
    bad = tmp_path / "bad.tallpack"
    bad.write_bytes(b"not an archive" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        tallpack.open(fam_path).close()
        with pytest.raises(tallpack.TallpackError):
            tallpack.open(bad)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


# -- F5: another default device --------------------------------------------------------------

def _every_read(fam: tallpack.Archive) -> dict[str, torch.Tensor]:
    """One tensor from each way of reading, with the archive's threads (``threads`` at open)."""
    lazy = fam.state_dict("a", lazy=True)
    sd = fam.state_dict("a")
    merged = fam.merged()
    return {"get big": fam.get_tensor("a", "big"), "get w": fam.get_tensor("a", "w"),
            "get h": fam.get_tensor("b", "h"), "get member": fam.get_tensor("a", "norm"),
            "get cpu": fam.get_tensor("a", "big", device="cpu"), "exact": fam.get_tensor("a", "big", exact=True),
            "state_dict": sd["big"], "state_dict member": sd["b"], "state_dict cpu": fam.state_dict("b", device="cpu")["w"],
            "lazy": lazy["big"], "lazy member": lazy["b"], "lazy h": lazy["h"],
            "slice": fam.get_slice("a", "big")[8:20], "slice cols": fam.get_slice("a", "w")[:, 1:3],
            "merged": merged["big"], "merged task": fam.merged(task="a")["w"],
            "merged alpha": fam.merged("ta", alpha=0.3)["big"], "consensus": fam.merged("consensus-ta", alpha=0.5)["big"],
            "alpha chosen": torch.tensor(tallpack.select_alpha(fam, "ta", lambda t, sd: float(sd["big"].sum()),
                                                               grid=[0.2, 0.4]).alpha, device="cpu"),
            "merge parts": fam.merge_parts("ta").state_dict(0.3)["big"], "base": fam.base_tensor("big"),
            "stats": torch.tensor(tallpack.stats.compute(fam).tasks_using, device="cpu")}


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("how", ["context", "set_default_device"])
def test_reads_give_cpu_tensors_whatever_the_default_device(fam_path, how, threads):
    """F5: under ``with torch.device("meta")`` (a model built as a skeleton and loaded in the same
    block) or ``torch.set_default_device("meta")``, every read gives the tensors on the CPU, equal
    to those read outside, as safetensors does."""
    with tallpack.open(fam_path, threads=threads) as fam:
        want = _every_read(fam)
        try:
            if how == "context":
                with torch.device("meta"):
                    got = _every_read(fam)
                    assert torch.empty(1).device.type == "meta"  # the caller's default is left as it was
                    assert fam.get_tensor("a", "w", device="meta").device.type == "meta"
                    assert fam.verify() == []
            else:
                torch.set_default_device("meta")
                got = _every_read(fam)
                assert torch.empty(1).device.type == "meta"
        finally:
            torch.set_default_device(None)
    assert torch.empty(1).device.type == "cpu"
    for what, t in got.items():
        assert t.device.type == "cpu", what
        assert torch.equal(t, want[what]), what


def test_a_model_built_on_meta_loads_in_the_same_block(fam_path, tmp_path):
    """F5, as users write it: the skeleton and the weights in one ``with torch.device("meta")``."""
    _, tasks = _family()
    save_file(tasks["a"], tmp_path / "a.safetensors")
    with tallpack.open(fam_path) as fam:
        want = fam.state_dict("a")
        try:
            with torch.device("meta"):
                model = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.empty(v.shape, dtype=v.dtype),
                                                                       requires_grad=False)
                                                for k, v in tasks["a"].items()})
                model.load_state_dict(fam.state_dict("a", lazy=True), assign=True)
                reference = load_file(tmp_path / "a.safetensors")  # safetensors gives CPU tensors here too
        finally:
            torch.set_default_device(None)
    assert {v.device.type for v in reference.values()} == {"cpu"}
    for k, v in model.items():
        assert v.device.type == "cpu" and torch.equal(v, want[k]), k
