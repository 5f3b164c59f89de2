"""The Python API as downstream code uses it: merged models of their own, numbers from numpy,
lazy mappings that answer cheaply, archives sent to DataLoader workers, messages that say what to
do next."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tallpack
from tallpack.errors import InvalidArgumentError


def _family() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base and two tasks: tensors the tasks change (float32, bfloat16, float16), and tensors
    they leave as they were (a large one, an integer one, a small one stored in a group)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g), "h": torch.randn(32, 16, generator=g).bfloat16(),
            "f16": torch.randn(40, generator=g).half(), "frozen": torch.randn(96, 96, generator=g),
            "ids": torch.arange(50), "small_frozen": torch.randn(10, generator=g)}
    tasks = {}
    for i, t in enumerate(("a", "b")):
        sd = {k: v.clone() for k, v in base.items()}
        for k in ("w", "h", "f16"):
            sd[k] = (base[k].float() + 0.01 * (i + 1) * torch.randn(base[k].shape, generator=g)).to(base[k].dtype)
        tasks[t] = sd
    return base, tasks


@pytest.fixture(scope="module")
def fam_path(tmp_path_factory):
    base, tasks = _family()
    out = tmp_path_factory.mktemp("api") / "fam.tallpack"
    tallpack.pack(base, tasks, out)
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- merged models ---------------------------------------------------------------------------

def test_each_merged_model_has_tensors_of_its_own(fam_path) -> None:
    """Changing one model of a MergeParts in place (as an evaluator that prunes or fuses does)
    changes neither the next model nor the archive's merged()."""
    with tallpack.open(fam_path) as fam:
        want = {a: fam.merged("ta", alpha=a) for a in (0.1, 0.7)}
        parts = fam.merge_parts("ta")
        first = parts.state_dict(0.1)
        for v in first.values():
            v.logical_not_() if v.dtype == torch.bool else v.add_(1)
        for a in (0.1, 0.7):
            got = parts.state_dict(a)
            assert [k for k in got if _bits(got[k]) != _bits(want[a][k])] == []
            assert all(got[k].data_ptr() != first[k].data_ptr() for k in got)


def test_select_alpha_gives_each_evaluation_an_untouched_model(fam_path) -> None:
    seen: list[float] = []

    def evaluate(task: str, sd) -> float:
        seen.append(float(sd["frozen"].sum()))
        sd["frozen"].mul_(0)  # an evaluator that changes the model in place
        return 1.0

    with tallpack.open(fam_path) as fam:
        expected = float(fam.merged("ta", alpha=0.3)["frozen"].sum())
        tallpack.select_alpha(fam, "ta", evaluate=evaluate, grid=[0.1, 0.5, 0.9], reference={"a": 1.0, "b": 1.0})
    assert seen == [expected] * 6


@pytest.mark.parametrize("alpha", [1e39, -1e39, pytest.param(10**40, id="10**40"), float("inf"), float("nan"),
                                   pytest.param(10**400, id="10**400"), True, "0.5", None])
def test_alpha_must_be_finite_in_float32(fam_path, tmp_path, alpha) -> None:
    """1e39 is a finite Python float but inf in float32, which would make every merged weight inf."""
    with tallpack.open(fam_path) as fam:
        if alpha is None:  # the data-free default
            assert set(fam.merged("ta", alpha=alpha)) >= {"w", "frozen"}
            return
        with pytest.raises(InvalidArgumentError, match="alpha must be a number finite in float32") as e:
            fam.merged("ta", alpha=alpha)
        assert "\n" not in str(e.value)
        with pytest.raises(InvalidArgumentError, match="alpha"):
            fam.merge_parts("consensus-ta").state_dict(alpha)
        with pytest.raises(InvalidArgumentError, match="alpha"):
            tallpack.write_merged(fam, tmp_path / "m", "ta", alpha=alpha)
        assert not (tmp_path / "m").exists()
        with pytest.raises(InvalidArgumentError, match="alpha"):
            tallpack.select_alpha(fam, "ta", evaluate=lambda t, sd: 1.0, grid=[0.5, alpha],
                                  reference={"a": 1.0, "b": 1.0})


def test_the_largest_float32_alpha_is_taken(fam_path) -> None:
    with tallpack.open(fam_path) as fam:
        fam.merged("ta", alpha=float(np.finfo(np.float32).max))


# -- numbers from numpy ------------------------------------------------------------------------

def test_numpy_scalars_are_taken_as_numbers(fam_path, tmp_path) -> None:
    """Alphas, lambdas, k, threads and sizes often come out of numpy (a ``np.linspace`` grid, an
    argmax): taken as the Python numbers they equal."""
    from safetensors import safe_open

    with tallpack.open(fam_path, threads=np.int64(2), cache_bytes=np.uint32(1 << 20)) as fam:
        assert fam.threads == 2 and type(fam.threads) is int
        want = fam.merged("consensus-ta", k=1, alpha=0.25)
        got = fam.merged("consensus-ta", k=np.int64(1), alpha=np.float32(0.25))
        assert all(_bits(got[k]) == _bits(want[k]) for k in want)
        path, n = tallpack.write_merged(fam, tmp_path / "m", "consensus-ta", k=np.int64(1), alpha=np.float32(0.25))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert (meta["tallpack.k"], meta["tallpack.alpha"]) == ("1", "0.25")
        sel = tallpack.select_alpha(fam, "consensus-ta", evaluate=lambda t, sd: 1.0, k=np.int64(1),
                                    grid=np.linspace(0.1, 0.3, 3, dtype=np.float32), reference={"a": 1.0, "b": 1.0})
        assert type(sel.k) is int and all(type(a) is float for a in sel.scores)
    base, tasks = _family()
    out = tmp_path / "np.tallpack"
    tallpack.pack(base, tasks, out, lambdas={"a": np.float32(0.5), "b": np.float64(0.3)}, chunk_elements=np.int64(1024),
                  level=np.int32(3), threads=np.int64(2), merge={"method": "ties", "top_k": np.float32(0.5)})
    with tallpack.open(out) as fam:
        assert [fam.task_info(t).lam for t in ("a", "b")] == [float(np.float32(0.5)), 0.3]
        assert fam.manifest.merge["top_k"] == 0.5
    tallpack.pack(base, tasks, out, lambdas=np.float16(0.5), overwrite=True)


@pytest.mark.parametrize("call", [
    lambda fam, p: tallpack.open(p, threads=True),
    lambda fam, p: tallpack.open(p, cache_bytes=np.bool_(True)),
    lambda fam, p: tallpack.open(p, threads=np.float32(2)),
    lambda fam, p: fam.merged("consensus-ta", k=True),
    lambda fam, p: fam.merged("consensus-ta", k=np.float64(2)),
    lambda fam, p: fam.merged("ta", alpha=np.bool_(True)),
    lambda fam, p: tallpack.pack(*_family(), p.with_name("x.tallpack"), lambdas=True),
    lambda fam, p: tallpack.pack(*_family(), p.with_name("x.tallpack"), chunk_elements=np.bool_(True)),
    lambda fam, p: tallpack.pack(*_family(), p.with_name("x.tallpack"), threads=True),
], ids=["threads", "cache_bytes", "float threads", "k", "float k", "alpha", "lambdas", "chunk_elements", "pack threads"])
def test_bools_and_floats_are_still_refused_where_integers_are_asked(fam_path, call) -> None:
    with tallpack.open(fam_path) as fam:
        with pytest.raises(InvalidArgumentError):
            call(fam, fam_path)


# -- lazy state dicts --------------------------------------------------------------------------

def _counting(fam, monkeypatch) -> list[int]:
    """The number of rebuilds (tensors or groups) ``fam`` does from now on."""
    n = [0]
    rebuild = fam._rebuild

    def counted(*a, **k):
        n[0] += 1
        return rebuild(*a, **k)
    monkeypatch.setattr(fam, "_rebuild", counted)
    return n


def test_membership_of_a_lazy_state_dict_rebuilds_nothing(fam_path, monkeypatch) -> None:
    with tallpack.open(fam_path, cache_bytes=0) as fam:
        want = fam.state_dict("a")
        lazy = fam.state_dict("a", lazy=True)
        n = _counting(fam, monkeypatch)
        assert all(k in lazy for k in want) and "missing" not in lazy and ["w"] not in lazy and 3 not in lazy
        assert "w" in lazy.keys() and lazy.get("missing") is None and lazy.get("nope", 7) == 7
        assert n[0] == 0
        assert _bits(lazy.get("w")) == _bits(want["w"]) and n[0] == 1


def _mixed_precision() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Layer after layer, a bfloat16 weight then a float32 norm: two groups whose members alternate."""
    g = torch.Generator().manual_seed(1)
    base: dict[str, torch.Tensor] = {}
    for i in range(40):
        base[f"layers.{i}.weight"] = torch.randn(32, 32, generator=g).bfloat16()
        base[f"layers.{i}.norm"] = torch.randn(32, generator=g)
    tasks = {t: {k: (v.float() + 0.01 * (torch.rand(v.shape, generator=g) < 0.3)).to(v.dtype) for k, v in base.items()}
             for t in ("a", "b")}
    return base, tasks


def test_a_lazy_state_dict_read_in_order_rebuilds_each_group_once(tmp_path, monkeypatch) -> None:
    """As the eager state dict does, when the members of two groups alternate (load_state_dict
    reads in the checkpoint's order); with no room to hold members, each is still right."""
    out = tmp_path / "mixed.tallpack"
    tallpack.pack(*_mixed_precision(), out)
    with tallpack.open(out) as fam:
        groups = [e for e in fam.manifest.tensors if e.members]
        assert len(groups) == 2
        want = fam.state_dict("a")
        n = _counting(fam, monkeypatch)
        lazy = fam.state_dict("a", lazy=True)
        got = {k: lazy[k] for k in fam.keys("a")}  # as load_state_dict reads it
        assert n[0] == len(groups)
        assert all(_bits(got[k]) == _bits(want[k]) for k in want)
        monkeypatch.setattr(tallpack.reader, "HELD_BYTES", 0)  # only the group read last is held
        lazy = fam.state_dict("a", lazy=True)
        assert all(_bits(lazy[k]) == _bits(want[k]) for k in fam.keys("a"))
        assert len(lazy._held) <= 1


# -- tensors a merged model leaves out ---------------------------------------------------------

def _per_task_family() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Every task has 'nan' (a NaN in one task), 'steps' (integers that differ) and 'head' (not
    in the base): each task stores its own."""
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(64, 64, generator=g), "nan": torch.randn(64, 64, generator=g), "steps": torch.tensor(0)}
    tasks = {}
    for i, t in enumerate(("a", "b")):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "steps"}
        sd["steps"] = torch.tensor(100 * (i + 1))
        sd["head"] = torch.randn(4, generator=g)
        tasks[t] = sd
    tasks["a"]["nan"][3, 3] = float("nan")
    return base, tasks


def test_a_merged_model_says_which_tensors_every_task_has_it_leaves_out(tmp_path, caplog) -> None:
    import subprocess
    import sys

    import tallpack.merged

    base, tasks = _per_task_family()
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, tasks, out)
    with tallpack.open(out) as fam:
        assert sorted(tallpack.merged.left_out(fam.manifest)) == ["head", "nan", "steps"]
        with caplog.at_level("WARNING", logger="tallpack.merged"):
            parts = fam.merge_parts("ta")
            assert sorted(parts.state_dict(0.3)) == ["w"]
            parts.state_dict(0.5)  # said once per MergeParts
        [record] = [r for r in caplog.records if r.name == "tallpack.merged"]
        text = record.getMessage()
        assert "3 tensors that every task has are left out of the ta model" in text and "'nan'" in text and "'head'" in text
        assert "NaN" in text and "task=NAME (--task NAME)" in text and "\n" not in text
        caplog.clear()
        with caplog.at_level("WARNING", logger="tallpack.merged"):
            sd = fam.merged("ta", alpha=0.3, task="b")  # taken from task b, without a word
        assert not caplog.records
        assert set(sd) == set(tasks["b"]) and int(sd["steps"]) == 200
        assert torch.equal(sd["nan"], fam.get_tensor("b", "nan"))
    r = subprocess.run([sys.executable, "-m", "tallpack", "merge", str(out), "--method", "ta", "-o", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "3 tensors that every task has are left out of the ta model" in r.stderr, r.stderr


# -- archives sent to other processes ----------------------------------------------------------

class _Rows(torch.utils.data.Dataset):
    """A Dataset that holds an open archive, a lazy state dict and a slice (module level: a spawn
    worker imports it)."""

    def __init__(self, fam: tallpack.Archive) -> None:
        self.fam, self.lazy, self.rows = fam, fam.state_dict("b", lazy=True), fam.get_slice("a", "w")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fam.get_tensor("a", "w"), self.lazy["small_frozen"], self.rows[i : i + 2]


def test_an_open_archive_goes_to_spawn_dataloader_workers(fam_path) -> None:
    with tallpack.open(fam_path, threads=1) as fam:
        want = fam.get_tensor("a", "w"), fam.get_tensor("b", "small_frozen")
        loader = torch.utils.data.DataLoader(_Rows(fam), batch_size=None, num_workers=1,
                                             multiprocessing_context="spawn")
        for i, (w, small, rows) in enumerate(loader):
            assert _bits(w) == _bits(want[0]) and _bits(small) == _bits(want[1])
            assert _bits(rows) == _bits(want[0][i : i + 2])


def test_archives_and_their_handles_pickle_by_reopening(fam_path, tmp_path) -> None:
    import copy
    import pickle
    import shutil

    from tallpack.errors import ArchiveClosedError, TallpackError

    path = tmp_path / "f.tallpack"
    shutil.copy(fam_path, path)
    with tallpack.open(path, cache_bytes=1 << 20, threads=2) as fam:
        again = pickle.loads(pickle.dumps(fam))
        assert (again.name, again.threads, again._cache.budget) == (str(path), 2, 1 << 20)
        assert again is not fam and _bits(again.get_tensor("a", "w")) == _bits(fam.get_tensor("a", "w"))
        lazy = pickle.loads(pickle.dumps(fam.state_dict("a", lazy=True)))
        assert _bits(lazy["h"]) == _bits(fam.get_tensor("a", "h"))
        assert _bits(pickle.loads(pickle.dumps(fam.get_slice("b", "w")))[3:5]) == _bits(fam.get_tensor("b", "w")[3:5])
        parts = pickle.loads(pickle.dumps(fam.merge_parts("ta")))
        assert _bits(parts.state_dict(0.4)["w"]) == _bits(fam.merged("ta", alpha=0.4)["w"])
        assert _bits(copy.deepcopy(fam).get_tensor("b", "f16")) == _bits(fam.get_tensor("b", "f16"))
        sent = pickle.dumps(fam)
    with pytest.raises(ArchiveClosedError, match="open it there") as e:
        pickle.dumps(fam)
    assert "\n" not in str(e.value)
    base, tasks = _family()
    tallpack.pack(base, {"a": tasks["a"]}, path, overwrite=True)  # another archive under its name
    with pytest.raises(TallpackError, match="replaced since it was sent"):
        pickle.loads(sent)
    path.unlink()
    with pytest.raises(tallpack.ArchiveNotFoundError):
        pickle.loads(sent)


def test_an_archive_not_opened_from_a_path_says_to_open_it_in_each_worker(fam_path) -> None:
    import pickle

    from tallpack.container import ContainerReader
    from tallpack.storage import open_bytes

    fam = tallpack.Archive(ContainerReader(open_bytes(str(fam_path)), "in memory"))
    with pytest.raises(TypeError, match="open the archive in each worker"):
        pickle.dumps(fam)
    fam.close()


def test_bytes_paths_open(fam_path) -> None:
    with tallpack.open(bytes(fam_path)) as fam:
        assert fam.name == str(fam_path) and fam.tasks == ("a", "b")
    with pytest.raises(InvalidArgumentError, match="got int"):
        tallpack.open(3)


# -- slices ------------------------------------------------------------------------------------

def test_slices_give_safetensors_dtype_names(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, tasks = _family()
    base["on"], tasks["a"]["on"], tasks["b"]["on"] = (torch.rand(20, generator=torch.Generator().manual_seed(i)) > 0.5
                                                       for i in range(3))
    save_file(tasks["a"], tmp_path / "a.safetensors")
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam, safe_open(tmp_path / "a.safetensors", "pt") as st:
        got = {k: fam.get_slice("a", k).get_dtype() for k in st.keys()}
        assert got == {k: st.get_slice(k).get_dtype() for k in st.keys()}
        assert {got[k] for k in ("w", "h", "f16", "ids", "on")} == {"F32", "BF16", "F16", "I64", "BOOL"}


def test_exact_slices_give_the_original_rows(tmp_path, fam_path) -> None:
    import pickle

    base, tasks = _family()
    out = tmp_path / "exact.tallpack"
    tallpack.pack(base, tasks, out, exact=True)
    with tallpack.open(out) as fam:
        for name in ("w", "h", "ids"):
            original = tasks["b"][name]
            exact = fam.get_slice("b", name, exact=True)
            assert _bits(exact[3:7]) == _bits(original[3:7]) and _bits(exact[-1]) == _bits(original[-1])
            if original.dim() == 2:
                assert _bits(exact[:, 2:5]) == _bits(original[:, 2:5])
        assert _bits(fam.get_slice("b", "w")[3:7]) != _bits(tasks["b"]["w"][3:7])  # lossy, without exact
        again = pickle.loads(pickle.dumps(fam.get_slice("b", "w", exact=True)))
        assert _bits(again[0:2]) == _bits(tasks["b"]["w"][0:2])
    with tallpack.open(fam_path) as fam, pytest.raises(tallpack.ExactTierMissingError):
        fam.get_slice("a", "w", exact=True)


# -- messages that say what to do next ---------------------------------------------------------

def test_pack_says_what_tasks_and_out_must_be(tmp_path) -> None:
    from tallpack.errors import CheckpointError

    base, tasks = _family()
    out = tmp_path / "o.tallpack"
    with pytest.raises(InvalidArgumentError, match=r"tasks must be a mapping \{name: checkpoint\} or a list of "
                                                   r"checkpoints, got a str \(one task: \['ft/cars.safetensors'\]\)"):
        tallpack.pack(base, "ft/cars.safetensors", out)
    with pytest.raises(InvalidArgumentError, match="tasks maps 'w' to a tensor: for one task's state dict"):
        tallpack.pack(base, tasks["a"], out)
    with pytest.raises(InvalidArgumentError, match="out must be the archive's path or URL, got NoneType"):
        tallpack.pack(base, tasks, None)
    with pytest.raises(CheckpointError, match="^base: entry 1: tensor names must be strings, got int$"):
        tallpack.pack({1: torch.ones(2)}, {"a": {1: torch.ones(2)}}, out)
    assert not out.exists()


def test_outputs_take_an_open_archive(fam_path, tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"write_task: takes an open archive, not a path: pass tallpack.open\("):
        tallpack.write_task(str(fam_path), "a", tmp_path / "o")
    with pytest.raises(InvalidArgumentError, match="write_tasks: archive must be an open tallpack.Archive"):
        tallpack.write_tasks(None, None, tmp_path / "o")
    with tallpack.open(fam_path) as fam:
        with pytest.raises(InvalidArgumentError, match="write_task: outdir must be a folder's path or URL, got NoneType"):
            tallpack.write_task(fam, "a", None)
        with pytest.raises(InvalidArgumentError, match="write_merged: takes an open archive"):
            tallpack.write_merged(fam_path, tmp_path / "o", "ta", alpha=0.5)
    assert not (tmp_path / "o").exists()


def test_not_found_messages_are_one_bounded_line_with_a_hint(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tallpack.pack({"w": torch.zeros(16)}, {f"task_{i:03d}": {"w": torch.full((16,), float(i))} for i in range(40)},
                  "many.tallpack")
    names = [f"model.layers.{i}.mlp.weight" for i in range(30)] + ["classifier.weight"]
    sd = {n: torch.ones(4) for n in names}
    tallpack.pack({n: torch.zeros(4) for n in names}, {"cars": sd, "dtd": sd}, "names.tallpack")
    with tallpack.open("many.tallpack") as fam:
        with pytest.raises(tallpack.TaskNotFoundError) as e:
            fam.get_tensor("task_31", "w")
        text = str(e.value)
        assert text.startswith("many.tallpack: no task 'task_31' (did you mean 'task_031'?); it has 40 tasks: task_000, ")
        assert text.endswith(", task_009, ...") and len(text) < 300
    with tallpack.open("names.tallpack") as fam:
        lazy = fam.state_dict("cars", lazy=True)
        for ask, hint in [("layers.3.mlp.weight", "(did you mean 'model.layers.3.mlp.weight', with 'model.'?)"),
                          ("model.model.layers.3.mlp.weight", "(did you mean 'model.layers.3.mlp.weight', without 'model.'?)"),
                          ("classifer.weight", "(did you mean 'classifier.weight'?)"),
                          (["classifier.weight"], "(tensor names are strings, not list)")]:
            for read in (lambda: fam.get_tensor("cars", ask), lambda: lazy[ask], lambda: fam.get_slice("cars", ask)):
                with pytest.raises(tallpack.TensorNotFoundError) as e:
                    read()
                assert str(e.value) == f"names.tallpack: task 'cars' has no tensor {ask!r} {hint}"
        with pytest.raises(tallpack.TaskNotFoundError, match=r"no task 'crs' \(did you mean 'cars'\?\); tasks are cars, dtd$"):
            fam.keys("crs")


# -- choosing lambdas with an evaluator --------------------------------------------------------

@pytest.mark.parametrize("grid, match", [
    ([float("inf")], "lambda_grid: lambda must be a finite number >= 0, got inf"),
    ([0.3, float("nan")], "lambda_grid: lambda must be a finite number >= 0, got nan"),
    ([-2.0], "lambda_grid: lambda must be a finite number >= 0, got -2.0"),
    (["0.3"], "lambda_grid: lambda must be a finite number >= 0, got '0.3'"),
    ([], "lambda_grid is empty"),
    (0.3, "lambda_grid must be a sequence of numbers, got 0.3"),
])
def test_lambda_grid_is_checked_before_any_evaluation(tmp_path, grid, match) -> None:
    """A bad grid is refused up front (inf and NaN crashed writing the manifest after every
    evaluation; -2 was refused only after them, with a garbled message)."""
    calls: list[str] = []
    base, tasks = _family()
    with pytest.raises(InvalidArgumentError, match=match) as e:
        tallpack.pack(base, tasks, tmp_path / "g.tallpack", evaluate=lambda t, sd: calls.append(t) or 1.0,
                      lambda_grid=grid)
    assert calls == [] and "\n" not in str(e.value)
    assert not (tmp_path / "g.tallpack").exists()


def test_lambda_grid_without_evaluate_is_refused(tmp_path) -> None:
    base, tasks = _family()
    with pytest.raises(InvalidArgumentError, match="lambda_grid is searched with evaluate"):
        tallpack.pack(base, tasks, tmp_path / "g.tallpack", lambda_grid=[0.3])


def test_lambdas_with_evaluate_fix_the_tasks_they_name(tmp_path) -> None:
    """``lambdas`` was ignored when ``evaluate`` was given: a mapping now fixes those tasks (left
    unscored) and the others are chosen; one value for every task is refused before any scoring."""
    calls: list[str] = []
    base, tasks = _family()
    m = tallpack.pack(base, tasks, tmp_path / "g.tallpack", evaluate=lambda t, sd: calls.append(t) or 1.0,
                      lambdas={"a": 0.55}, lambda_grid=[0.3, 0.5])
    assert {t.name: t.lam for t in m.tasks} == {"a": 0.55, "b": 0.3}
    assert set(calls) == {"b"} and set(m.stats["selection"]["lambda"]["scores"]) == {"b"}
    calls.clear()
    with pytest.raises(InvalidArgumentError, match="lambdas and evaluate conflict"):
        tallpack.pack(base, tasks, tmp_path / "h.tallpack", evaluate=lambda t, sd: calls.append(t) or 1.0,
                      lambdas=0.4)
    assert calls == [] and not (tmp_path / "h.tallpack").exists()


@pytest.mark.parametrize("lam", [1e19, 3.4e38, 1e39])
def test_a_huge_lambda_writes_an_archive_that_opens(tmp_path, lam) -> None:
    """A lambda past 2**63 (any finite value is taken) wrote an archive that no reader opened
    ("lambda must be a finite number >= 0"): the manifest's bound on numbers was int64's."""
    base, tasks = _family()
    tallpack.pack(base, tasks, tmp_path / "l.tallpack", lambdas={"a": lam}, exact=True)
    with tallpack.open(tmp_path / "l.tallpack") as fam:
        assert fam.task_info("a").lam == lam and fam.verify() == []
        assert torch.equal(fam.get_tensor("a", "w"), base["w"])  # no element passes a huge lambda
    from click.testing import CliRunner
    from tallpack_cli.main import main

    # in this process: `inspect` in a process of its own is test_cli's (test_commands_that_need_no_tensors...)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "l.tallpack")], catch_exceptions=False)
    assert r.exit_code == 0 and f"{lam:.2g}" in r.stdout, r.output


def test_lambda_grid_from_numpy_is_taken(tmp_path) -> None:
    base, tasks = _family()
    m = tallpack.pack(base, tasks, tmp_path / "g.tallpack", evaluate=lambda t, sd: 1.0,
                      lambda_grid=np.array([0.5, 0.3], dtype=np.float32))
    assert {t.lam for t in m.tasks} == {float(np.float32(0.3))}


def test_pack_takes_an_evaluators_torch_scores(tmp_path) -> None:
    """A 0-d tensor (an accuracy) chooses lambdas, and per-example bool tensors set the dial; both
    crashed in numpy's mean."""
    base, tasks = _family()

    def accuracy(task: str, sd) -> torch.Tensor:  # the share of weights within 0.01 of the original
        return ((sd["w"] - tasks[task]["w"]).abs() < 0.01).float().mean()

    def correct(task: str, sd) -> torch.Tensor:  # per example: one row of "w" within 0.05 of the original
        return ((sd["w"] - tasks[task]["w"]).abs() < 0.05).all(dim=1)

    m = tallpack.pack(base, tasks, tmp_path / "a.tallpack", evaluate=accuracy, lambda_grid=[0.2, 0.6])
    assert set(m.stats["selection"]["lambda"]["chosen"]) == {"a", "b"}
    m = tallpack.pack(base, tasks, tmp_path / "d.tallpack", evaluate=correct, lambda_grid=[0.4], fidelity=0.5)
    with tallpack.open(tmp_path / "d.tallpack") as fam:
        assert all(fam.task_info(t).fidelity["score"] >= 0.5 for t in fam.tasks)


@pytest.mark.parametrize("exact", [False, True])
def test_device_meta_gives_the_skeleton_without_decoding(tmp_path, exact):
    """``device="meta"`` (a model built on the meta device, then loaded): every tensor of the right
    shape and dtype, read from the manifest alone, for any archive (the exact tier's derived masks
    failed with torch's NotImplementedError), eager, lazy, and one tensor."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "n": torch.randn(32, generator=g).bfloat16(), "i": torch.arange(4)}
    tasks = {t: {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point()
                 else v for k, v in base.items()} | {"head": torch.randn(3 + i, 2, generator=g)}
             for i, t in enumerate(("a", "b"))}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack", exact=exact)
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        ref = fam.state_dict("b")
        for sd in (fam.state_dict("b", device="meta"), fam.state_dict("b", device="meta", lazy=True)):
            assert list(sd) == list(ref)
            assert all(sd[k].is_meta and sd[k].shape == v.shape and sd[k].dtype == v.dtype for k, v in ref.items())
        assert fam.get_tensor("a", "head", device="meta", exact=exact).shape == (3, 2)
