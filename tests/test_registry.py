"""Encodings and merge methods are registered objects: the reader dispatches through the registry,
so a new encoding needs no change elsewhere; errors are catchable as the matching built-ins."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tallpack
from tallpack import encodings, merging
from tallpack.encodings.dense import Dense
from tallpack.plan import Kind


def test_every_kind_has_a_writer_and_every_task_encoding_a_reader() -> None:
    assert set(encodings.BY_KIND) == {k.value for k in Kind}
    assert set(encodings.REGISTRY) == {"tall", "tall-derived", "tall-derived-merged", "dense", "shared",
                                       "qtau"}  # qtau: the dial's (1.7)
    for name, enc in encodings.REGISTRY.items():
        assert enc.name == name and enc.rebuild is not encodings.Encoding.rebuild


def test_a_new_encoding_is_one_registered_class(small_family, tmp_path, monkeypatch) -> None:
    """A toy encoding that stores task-own tensors negated is picked up by the packer through
    BY_KIND and by the reader through REGISTRY, with no change to either."""

    class Negated(Dense):
        name = "negated-dense"

        @classmethod
        def write(cls, ctx, item):
            entry = Dense.write(ctx, encodings.Item(item.name, item.planned, item.kind, item.tasks, item.base,
                                                    [-x for x in item.thetas]))
            for t in entry.tasks.values():
                object.__setattr__(t, "encoding", cls.name)
            return entry

        @classmethod
        def rebuild(cls, arrays, entry, tt):
            return -Dense.rebuild(arrays, entry, tt)

    monkeypatch.setitem(encodings.REGISTRY, Negated.name, Negated)
    monkeypatch.setitem(encodings.BY_KIND, "task-own", Negated)
    out = tmp_path / "neg.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=64)
    with tallpack.open(out) as fam:
        assert fam.manifest.tensors[[e.name for e in fam.manifest.tensors].index("head.w")].tasks["a"].encoding == Negated.name
        for t, sd in small_family["tasks"].items():
            assert torch.equal(fam.get_tensor(t, "head.w"), sd["head.w"])
    monkeypatch.undo()
    with tallpack.open(out) as fam:  # a reader without it fails on that tensor alone
        with pytest.raises(tallpack.UnsupportedVersionError, match="negated-dense"):
            fam.get_tensor("a", "head.w")
        fam.get_tensor("a", "body.w")


def test_merge_methods_come_from_the_registry() -> None:
    assert set(merging.METHODS) == {"ta", "ties"}
    assert merging.MERGED_MODELS == {"ta": "ta", "consensus-ta": "ta", "ties": "ties", "consensus-ties": "ties"}
    m = merging.get_method({"method": "ties", "top_k": 0.3})
    assert isinstance(m, merging.Ties) and m.top_k == 0.3
    assert merging.get_method(m) is m
    with pytest.raises(tallpack.InvalidArgumentError, match="no option"):
        merging.get_method("ta", top_k=0.3)
    with pytest.raises(ValueError, match="unknown merge method 'dare'"):
        merging.get_method("dare")
    assert merging.default_alpha("ties", 4) == 1.0 and merging.default_alpha("consensus-ties", 4) == 0.25


def test_pack_options_are_one_object(small_family, tmp_path) -> None:
    opts = tallpack.PackOptions(merge={"method": "ties", "top_k": 0.5}, codec="raw", chunk_elements=64)
    m = tallpack.pack(small_family["base_path"], small_family["task_paths"], tmp_path / "o.tallpack", opts)
    assert m.merge["method"] == "ties" and m.merge["top_k"] == 0.5
    with pytest.raises(tallpack.InvalidArgumentError, match="pack:.*unexpected keyword"):
        tallpack.pack(small_family["base_path"], small_family["task_paths"], tmp_path / "p.tallpack", no_such=1)


def test_errors_are_also_the_builtins(small_family, tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        tallpack.open(tmp_path / "missing.tallpack")
    with pytest.raises(tallpack.ArchiveNotFoundError, match="no such archive"):
        tallpack.open(tmp_path / "missing.tallpack")
    for bad in ({"codec": "lz5"}, {"lambdas": -1.0}, {"chunk_elements": 12}, {"merge": "dare"},
                {"merge": {"method": "ties", "top_k": 2.0}}, {"threads": 0}):
        with pytest.raises(tallpack.InvalidArgumentError):
            tallpack.pack(small_family["base_path"], small_family["task_paths"], tmp_path / "x.tallpack", **bad)
        assert not (tmp_path / "x.tallpack").exists()
    with pytest.raises(ValueError):
        tallpack.pack(small_family["base_path"], {"a/b": small_family["task_paths"]["a"]}, tmp_path / "y.tallpack")


def test_python_dash_m_runs_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "tallpack", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("tallpack, version"), r.stderr
