"""The declared minimum versions (pyproject.toml) hold, checked in the newest environment: a call
that only a newer torch accepts, or a bound below what the code or the tests use, fails here and not
only on an old install. Found by running the suite on the minimums (torch 2.1.2, numpy 1.24.4,
safetensors 0.4.0, click 8.1.0, ... on Python 3.10)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import tallpack
from tallpack.encodings import exact

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def declared(package: str) -> tuple[int, ...]:
    """The lower bound pyproject.toml gives ``package`` (its first ``>=``)."""
    found = re.search(rf'"{re.escape(package)}(?:\[[\w,]+\])?>=([\d.]+)"', PYPROJECT)
    assert found, f"no lower bound for {package} in pyproject.toml"
    return tuple(int(p) for p in found.group(1).split("."))


def test_a_pt_checkpoint_given_as_a_path_loads_as_torch_2_1_loads_it(tmp_path, monkeypatch):
    """torch 2.1's ``torch.load(..., mmap=True)`` takes a str only ("f must be a string filename in
    order to use mmap argument"; 2.2 takes a Path too): tallpack passes one, so a ``.pt`` task given
    as a ``Path`` packs there."""
    real = torch.load

    def load_as_2_1(f, *args, **kwargs):
        if kwargs.get("mmap") and not isinstance(f, str):
            raise ValueError("f must be a string filename in order to use mmap argument")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_as_2_1)
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(32, 8, generator=g)}
    torch.save(base, tmp_path / "base.pt")
    tasks = {}
    for i in range(2):
        tasks[f"t{i}"] = tmp_path / f"t{i}.pt"
        torch.save({"w": base["w"] + 0.01 * torch.randn(32, 8, generator=g)}, tasks[f"t{i}"])
    tallpack.pack(tmp_path / "base.pt", tasks, tmp_path / "f.tallpack", exact=True)
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert torch.equal(fam.state_dict("t1", exact=True)["w"], real(tasks["t1"], weights_only=True)["w"])


def test_every_mapped_torch_load_is_given_a_str():
    """Each ``torch.load(..., mmap=True)`` in the package gets ``str(...)`` or a file's ``.name``."""
    calls = []
    for path in sorted((ROOT / "tallpack").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and any(k.arg == "mmap" for k in node.keywords)):
                arg = node.args[0]
                ok = ((isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "str")
                      or (isinstance(arg, ast.Attribute) and arg.attr == "name"))
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), calls


#: torch dtypes newer than some torch tallpack may declare: the release that first has each.
FIRST_TORCH = {"uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3)}


def test_the_dtypes_tallpack_writes_are_read_by_the_declared_torch():
    """The residuals of the exact tier (unsigned integers of the tensor's width) and a sparse
    correction's indices (uint32/uint64) are archive arrays of dtypes torch has only since 2.3:
    on an older declared torch each must have a signed stand-in of its width (``dtypes.array_dtype``),
    or that torch writes archives it cannot read ("unknown dtype 'uint32' in manifest")."""
    from tallpack import dtypes

    written = {name for _, name in exact._UINT.values()} | {"uint32", "uint64"}
    newer = {name for name in written if FIRST_TORCH.get(name, (0, 0)) > declared("torch")[:2]}
    assert newer <= set(dtypes._STAND_INS), newer
    for name in newer:
        assert torch.empty(0, dtype=dtypes.array_dtype(name)).element_size() == int(name[4:]) // 8


#: What the tests use that an older release of a test requirement lacks.
TEST_NEEDS = [
    ("pytest-xdist", (3, 1), "`pytest -n 0` beside addopts' --dist loadfile (README): 3.0 stops with "
                             "'MISSING test execution (tx) nodes'"),
    ("moto", (5, 0, 13), "ThreadedMotoServer.get_host_and_port (tests/test_remote.py and others)"),
    ("hypothesis", (6, 85), "st.characters(categories=...) (tests/test_sources_safety.py)"),
    ("import-linter", (2, 6), "the acyclic_siblings contract of [tool.importlinter] (tests/test_layers.py)"),
    ("diffusers", (0, 33), "from_pretrained of a sharded model folder without accelerate (0.32 fails in "
                           "model_loading_utils: TypeError ... not NoneType; tests/test_components.py)"),
    ("sentence-transformers", (5, 2), "models.Router (5.0; test_st_modules' router tests) beside transformers 5 "
                                      "(5.1 and earlier pin transformers<5); 3.0.0 saves 2_Dense/pytorch_model.bin"),
    ("transformers", (5, 12), "4.x honours safe_serialization=False (test_st_modules' pickled tests expect "
                              "safetensors); 5.0-5.3 fail test_a_bare_base_model_matches_fine_tunes_with_a_head"),
    ("mypy", (2, 4), "1.18 reports 7 errors in tallpack (weakref.finalize's atexit not in __slots__, ...)"),
]


@pytest.mark.parametrize("package, needed, why", TEST_NEEDS, ids=[p for p, _, _ in TEST_NEEDS])
def test_the_test_extra_declares_what_the_tests_use(package, needed, why):
    """(It was an xfail(strict) on ``declared < needed``, so a bound lowered below ``needed`` passed
    as an expected failure: the test could not fail.)"""
    assert declared(package) >= needed, f"{package} below {needed}: {why}"


@pytest.mark.parametrize("one_tree", [True, False], ids=["numpy-2.3", "numpy-before-2.3"])
def test_pairwise_sum_in_pieces_is_the_sum_numpy_makes(monkeypatch, one_tree):
    """numpy 2.3 and later sum a contiguous array as one pairwise tree; earlier ones (1.24 to 2.2)
    in blocks of ``np.getbufsize()`` elements, each a tree, the blocks' sums added in order. Summed
    a piece at a time, :class:`~tallpack.sums.PairwiseSum` gives the float of either (here the
    earlier numpy's figure is built from its blocks: that numpy itself ran the suite's
    ``test_pairwise_sum_in_pieces_is_numpys``)."""
    from tallpack import sums

    if one_tree and not sums.ONE_TREE:
        pytest.skip(f"numpy {np.__version__} sums in blocks")
    monkeypatch.setattr(sums, "ONE_TREE", one_tree)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(50_000) ** 2 * 10.0 ** rng.integers(-8, 8, 50_000)
    want = float(np.add.reduce(x))
    if not one_tree:
        want, block = 0.0, np.getbufsize()
        for a in range(0, x.size, block):
            want += float(np.add.reduce(x[a : a + block]))
        assert want != float(np.add.reduce(x)) or not sums.ONE_TREE  # (the two trees differ on this x)
    s = sums.PairwiseSum(x.size)
    for a in range(0, x.size, 3001):
        s.add(x[a : a + 3001])
    assert s.value == want


def test_an_unsafe_pickle_is_named_in_torch_2_3_words_too(tmp_path, monkeypatch):
    """torch 2.3 and earlier refuse a pickled class as "Unsupported class x.Y" (later ones
    "Unsupported global: GLOBAL x.Y"): the error names the class either way."""
    import pickle

    from tallpack.errors import UnsafeCheckpointError
    from tallpack.sources import open_source

    def load_as_2_3(f, *args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed, but it can result in arbitrary code execution."
                                     "Do it only if you get the file from a trusted source. WeightsUnpickler error: "
                                     "Unsupported class fractions.Fraction")

    torch.save({"w": torch.zeros(2)}, tmp_path / "odd.pt")
    monkeypatch.setattr(torch, "load", load_as_2_3)
    with pytest.raises(UnsafeCheckpointError, match=r"it pickles fractions\.Fraction, not only tensors"):
        open_source(tmp_path / "odd.pt")


def test_a_forked_child_drops_fsspecs_event_loop_as_later_fsspec_does(monkeypatch):
    """fsspec 2023.1 keeps its parent's event loop in a forked child, whose thread is not there: a
    remote read in a DataLoader's fork worker waited for ever. tallpack's fork hook drops it (the
    parent's loop and thread, and fsspec's lock) where a remote archive is open."""
    import weakref

    import fsspec.asyn

    from tallpack import remote

    class Opened:  # (a RemoteFile as the hook sees it: its lock and file system are replaced)
        _lock = _file_system = None

    held = Opened()
    monkeypatch.setattr(remote, "_OPEN", weakref.WeakSet([held]))
    monkeypatch.setattr(fsspec.asyn, "loop", ["the parent's loop"])
    monkeypatch.setattr(fsspec.asyn, "iothread", ["the parent's thread"])
    monkeypatch.setattr(fsspec.asyn, "_lock", fsspec.asyn._lock)
    remote._after_fork_in_child()
    assert fsspec.asyn.loop == [None] and fsspec.asyn.iothread == [None] and held._lock is not None


def test_a_safetensors_files_order_is_its_own_where_safetensors_lists_names_sorted(tmp_path, monkeypatch):
    """safetensors 0.4 has no ``offset_keys`` and lists a file's names sorted: the task's order is
    then the file's data offsets' (what ``load_file`` gives, and the exact tier writes back)."""
    from safetensors.torch import save_file

    from tallpack.sources import SafetensorsSource

    class Sorted:  # (safetensors 0.4's reader: keys() sorted, no offset_keys)
        def __init__(self, f):
            self._f = f

        def keys(self):
            return sorted(self._f.keys())

        def __getattr__(self, name):
            if name == "offset_keys":
                raise AttributeError(name)
            return getattr(self._f, name)

    real = SafetensorsSource._open
    monkeypatch.setattr(SafetensorsSource, "_open", lambda self, path: Sorted(real(self, path)))
    sd = {"a.weight": torch.zeros(4), "z.ids": torch.ones(2, dtype=torch.int64), "m.scale": torch.ones(3)}
    save_file(sd, tmp_path / "m.safetensors")  # (its bytes: the widest dtype first, z.ids)
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    want = sorted(sd, key=lambda k: header[k]["data_offsets"][0])
    src = SafetensorsSource("m", [tmp_path / "m.safetensors"])
    try:
        assert list(src.keys()) == want != sorted(want)
    finally:
        src.close()
