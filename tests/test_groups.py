"""Tensor groups (format 1.12): small merged tensors stored as one flat tensor, each member read
back as a tensor of its own, with the bits it has when stored alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tallpack
from tallpack import groups, kernels, stats
from tallpack.errors import FormatError, IntegrityError, TensorNotFoundError, UnsupportedVersionError
from tallpack_cli.main import main
from test_integrity import rewrite_manifest


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _family(seed: int, shapes: list[tuple[tuple[int, ...], torch.dtype]], tasks: int = 3, frozen: int = 0):
    """Fine-tuned tensors ``t00``, ``t01``, ... of these shapes and dtypes, and ``frozen``
    tensors ``f00``, ... that every task keeps as the base has them (stored shared; every third
    an int64 buffer)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i:02d}": torch.randn(s, generator=g).to(dt) for i, (s, dt) in enumerate(shapes)}
    fts = {}
    for j in range(tasks):
        fts[f"task{j}"] = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)
                               * (torch.rand(v.shape, generator=g) < 0.4)).to(v.dtype) for k, v in base.items()}
    for i in range(frozen):
        base[f"f{i:02d}"] = torch.randn(i + 2, generator=g) if i % 3 else torch.arange(i + 3)
        for sd in fts.values():
            sd[f"f{i:02d}"] = base[f"f{i:02d}"].clone()
    return base, fts


SHAPES = st.lists(st.tuples(st.lists(st.integers(0, 9), max_size=3).map(tuple),
                            st.sampled_from([torch.float32, torch.bfloat16, torch.float16])), min_size=2, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SHAPES, st.integers(0, 1000), st.sampled_from(["ta", "ties"]), st.sampled_from(["planes", "raw", "zstd"]),
       st.sampled_from([8, 24, 64, 1 << 22]), st.integers(1, 2), st.integers(0, 5))
def test_grouped_reads_give_the_bits_of_single_tensors(tmp_path: Path, shapes, seed, merge, codec, chunk, threads,
                                                       frozen):
    """Every way of reading a member (state dict, get_tensor, get_slice, lazy, base, merged
    models, stats) gives what the same tensor gives stored alone, merged and shared groups alike;
    densities agree exactly."""
    base, fts = _family(seed, shapes, frozen=frozen)
    one, grouped = tmp_path / "one.tallpack", tmp_path / "grouped.tallpack"
    kw = dict(merge=merge, codec=codec, chunk_elements=chunk, threads=1, overwrite=True)
    tallpack.pack(base, fts, one, group=False, **kw)
    tallpack.pack(base, fts, grouped, **kw)
    with tallpack.open(one) as a, tallpack.open(grouped, threads=threads) as b:
        for t in fts:
            sa, sb = a.state_dict(t), b.state_dict(t)
            assert list(sa) == list(sb) == list(fts[t])
            for k in sa:
                assert _same(sb[k], sa[k]), (t, k)
                assert _same(b.get_tensor(t, k), sa[k]), (t, k)
                assert b.get_slice(t, k).get_shape() == list(sa[k].shape)
                if sa[k].dim():
                    assert _same(b.get_slice(t, k)[1:3], sa[k][1:3]), (t, k)
            lazy = b.state_dict(t, lazy=True)
            assert all(_same(lazy[k], sa[k]) for k in reversed(list(sa)))
            assert a.task_info(t).density == b.task_info(t).density
            assert b.task_info(t).fidelity["rel_l2"] == pytest.approx(a.task_info(t).fidelity["rel_l2"], abs=1e-6)
        for k in base:
            x, y = a.base_tensor(k), b.base_tensor(k)  # None: equal in every task (shared)
            assert (x is None and y is None) or _same(y, x), k
        for method in ("consensus-ta", "ta") if merge == "ta" else ("consensus-ties", "ties"):
            ma, mb = a.merged(method, alpha=0.7), b.merged(method, alpha=0.7)
            assert list(ma) == list(mb) and all(_same(mb[k], ma[k]) for k in ma)
        assert stats.compute(a) == stats.compute(b)
        assert b.verify() == []


def test_which_tensors_are_grouped(tmp_path: Path) -> None:
    """Merged and shared tensors under SMALL_ELEMENTS, per kind and dtype, up to GROUP_ELEMENTS a
    group; larger ones, lone ones, tensors holding inf (task-own), tensors whose tasks change the
    dtype and task-own tensors are stored alone."""
    big = groups.SMALL_ELEMENTS
    shapes = [((1000, 200), torch.float32)] * 6 + [((big,), torch.float32), ((3, 5), torch.bfloat16),
                                                    ((7,), torch.float16), ((5,), torch.float16)]
    base, fts = _family(0, shapes, frozen=4)
    base["inf"] = torch.tensor([float("inf"), 1.0, 2.0, 3.0])
    base["frozen"] = torch.ones(6)
    base["mixed"] = torch.randn(8)
    for j, sd in enumerate(fts.values()):
        sd["inf"], sd["frozen"] = base["inf"] + j, base["frozen"].clone()  # inf everywhere, the rest tuned
        sd["mixed"] = (base["mixed"] + j).to(torch.float16)
        sd["head"] = torch.randn(j + 1, 3)
    out = tmp_path / "g.tallpack"
    m = tallpack.pack(base, fts, out)
    assert m.requires == ("groups",) and m.format_version == (1, 12)
    members = {e.name: [x.name for x in e.members] for e in m.tensors if e.members}
    # 6 x 200,000 float32 elements: five fill one group of at most 1M, the sixth a second
    # with nothing else float32 to join it, so it is stored alone; the two float16 ones together;
    # the float32 shared tensors together, the int64 ones together
    assert members == {"tallpack.group.0": ["t00", "t01", "t02", "t03", "t04"], "tallpack.group.1": ["t08", "t09"],
                       "tallpack.group.2": ["f00", "f03"], "tallpack.group.3": ["f01", "f02", "frozen"]}
    assert [e.kind for e in m.tensors if e.members] == ["merged", "merged", "shared", "shared"]
    alone = {e.name: e.kind for e in m.tensors if not e.members}
    assert alone == {"t05": "merged", "t06": "merged", "t07": "merged", "inf": "task-own", "mixed": "merged",
                     "head": "task-own"}
    g0 = next(e for e in m.tensors if e.name == "tallpack.group.0")
    assert g0.tasks["task0"].shape == (1_000_000,) and [x.offset for x in g0.members] == [0, 200000, 400000,
                                                                                            600000, 800000]
    with tallpack.open(out) as fam:
        for t in fts:
            sd = fam.state_dict(t)
            assert list(sd) == list(fts[t]) and _same(sd["inf"], fts[t]["inf"])
    assert tallpack.pack(base, fts, tmp_path / "e.tallpack", exact=True).requires == ()  # the exact tier: per tensor


def test_members_are_tensors_of_their_own(tmp_path: Path) -> None:
    base, fts = _family(1, [((4, 4), torch.float32), ((3,), torch.float32), ((), torch.float32)])
    tallpack.pack(base, fts, tmp_path / "g.tallpack")
    with tallpack.open(tmp_path / "g.tallpack") as fam:
        sd = fam.state_dict("task0")
        ptrs = {v.untyped_storage().data_ptr() for v in sd.values()}
        assert len(ptrs) == 3 and all(v.untyped_storage().nbytes() == v.numel() * 4 for v in sd.values())
        sd["t00"].add_(1)  # writable, and no other tensor changes
        assert _same(sd["t01"], fam.get_tensor("task0", "t01"))
        assert fam.tensor_spec("task0", "t02") == ("float32", ())
        with pytest.raises(TensorNotFoundError):
            fam.get_tensor("task0", "tallpack.group.0")  # a group is not a tensor of the family
        assert "tallpack.group.0" not in fam.keys("task0")


def test_cli_pack_inspect_unpack_and_no_group(small_family, tmp_path: Path) -> None:
    def run(*args) -> str:
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    p = small_family["task_paths"]
    for flag, name in (("--group", "g"), ("--no-group", "n")):
        run("-q", "pack", "--base", small_family["base_path"], *(x for t in p for x in ("--task", f"{t}={p[t]}")),
            "-o", tmp_path / f"{name}.tallpack", flag)
        run("-q", "unpack", tmp_path / f"{name}.tallpack", "--all", "-o", tmp_path / name)
    for t in p:
        a, b = load_file(tmp_path / "g" / t / "model.safetensors"), load_file(tmp_path / "n" / t / "model.safetensors")
        assert list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    rows = {r["name"]: r for r in json.loads(run("inspect", tmp_path / "g.tallpack", "--json", "--tensors"))["tensors"]}
    assert rows["tallpack.group.0"]["members"] == ["body.b", "body.w"]
    assert rows["body.w"]["group"] == "tallpack.group.0" and rows["body.w"]["shape"] == [64, 48]
    with tallpack.open(tmp_path / "n.tallpack") as fam:
        want = {t: fam.task_info(t).density for t in fam.tasks}
    assert rows["tallpack.group.0"]["density"] == pytest.approx(want, abs=0)  # the gaps left out
    ungrouped = {r["name"]: r for r in json.loads(run("inspect", tmp_path / "n.tallpack", "--json", "--tensors"))["tensors"]}
    for name in rows["tallpack.group.0"]["members"]:  # each member's own, read from the group's masks
        assert rows[name]["density"] == ungrouped[name]["density"] and set(rows[name]["density"]) == set(p), name
    assert "tensors: 2 merged, 2 shared, 1 task-own, 0 base-only (2 of them in 1 group)" in run("inspect", tmp_path / "g.tallpack")
    table = run("inspect", tmp_path / "g.tallpack", "--tensors")
    assert "in tallpack.group.0" in table and "group" in table
    assert "ok:" in run("verify", tmp_path / "g.tallpack")
    with tallpack.open(tmp_path / "n.tallpack") as fam:
        assert fam.format_version == (1, 11)


def test_a_damaged_group_names_its_tensors(small_family, tmp_path: Path) -> None:
    out = tmp_path / "g.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out)
    with tallpack.open(out) as fam:
        ref = fam.manifest.tensors[0].tasks["b"].arrays["mask"] if fam.manifest.tensors[0].members else next(
            e for e in fam.manifest.tensors if e.members).tasks["b"].arrays["mask"]
    raw = bytearray(out.read_bytes())
    raw[ref.chunks[0].offset] ^= 1
    out.write_bytes(bytes(raw))
    with tallpack.open(out) as fam:
        with pytest.raises(IntegrityError, match=r"task 'b', tensor 'body.w' \(in group 'tallpack.group.0'\)") as e:
            fam.get_tensor("b", "body.w")
        assert str(e.value).count(str(out)) == 1, e.value  # the archive named once
        with pytest.raises(IntegrityError, match="tallpack.group.0"):
            fam.state_dict("b")
        fam.state_dict("a")  # the other tasks' masks are intact
        assert any("tallpack.group.0" in p for p in fam.verify())


def _group(m: dict) -> dict:
    return next(t for t in m["tensors"] if t.get("members"))


def _two_dims(g: dict) -> None:
    """Every shape of a group made [1, N]: consistent, but not flat."""
    for d in (g["base"], g["merged"], *g["tasks"].values(), *(tt["mask"] for tt in g["tasks"].values())):
        d["shape"] = [1, *d["shape"]]


@pytest.mark.parametrize("edit, error, message", [
    (lambda m: m.update(requires=["groups", "shards"]), UnsupportedVersionError, "requires 'shards'.*upgrade"),
    (lambda m: m.update(requires="groups"), FormatError, "requires must be a list"),
    (lambda m: m.pop("requires"), FormatError, "does not require 'groups'"),
    (lambda m: _group(m)["members"][1].__setitem__(1, 4), FormatError, "multiple of 8"),
    (lambda m: _group(m)["members"][1].__setitem__(1, 0), FormatError, "in order, apart"),
    (lambda m: _group(m)["members"][1].__setitem__(2, [10 ** 6]), FormatError, "within the group"),
    (lambda m: _group(m)["members"][1].__setitem__(0, "frozen"), FormatError, "appears twice"),
    (lambda m: _group(m)["members"][1].__setitem__(0, _group(m)["members"][0][0]), FormatError, "distinct"),
    (lambda m: _group(m)["members"].append("x"), FormatError, r"\[name, offset, shape\]"),
    (lambda m: _group(m).update(members=[]), FormatError, "non-empty"),
    (lambda m: _group(m).update(name="body.w"), FormatError, "name of a tensor"),
    (lambda m: m["tasks"][0]["keys"].append("tallpack.group.0"), FormatError, "listed but not stored"),
    (lambda m: _group(m)["tasks"]["a"].update(shape=[2, 3]), FormatError, "shape"),
    (lambda m: _two_dims(_group(m)), FormatError, "one flat tensor"),
])
def test_hostile_groups_are_refused(small_family, tmp_path: Path, edit, error, message) -> None:
    out = tmp_path / "g.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out)
    rewrite_manifest(out, edit)
    with pytest.raises(error, match=message):
        tallpack.open(out)


def test_a_member_over_http_reads_its_group_only(http_server, small_family) -> None:
    """A member's get_tensor fetches its group's base and merged vector and the task's mask, and
    nothing else; the next member of the group fetches only that task's mask."""
    local = http_server.root / "groups.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], local)
    with tallpack.open(f"{http_server.url}/groups.tallpack") as fam, tallpack.open(local) as ref:
        group = next(e for e in fam.manifest.tensors if e.members)
        before = fam.source.fetched
        assert _same(fam.get_tensor("b", "body.w"), ref.get_tensor("b", "body.w"))
        need = sum(r.stored_nbytes for r in (group.arrays["base"], group.arrays["merged"], group.tasks["b"].arrays["mask"]))
        got = fam.source.fetched - before
        assert need <= got <= need + 4096, (need, got)
        before = fam.source.fetched
        assert _same(fam.get_tensor("b", "body.b"), ref.get_tensor("b", "body.b"))
        assert fam.source.fetched - before <= group.tasks["b"].arrays["mask"].stored_nbytes + 4096


def test_group_sizes_shrink_with_many_tasks() -> None:
    """The packer's work on a group (every task's copy, as many task vectors) stays near
    GROUP_PACK_BYTES: groups of 1M elements up to 5 tasks, fewer beyond, never under SMALL_ELEMENTS."""
    sizes = [groups.group_elements(t) for t in (1, 5, 6, 16, 40, 1000)]
    assert sizes[:2] == [groups.GROUP_ELEMENTS] * 2 and sizes[-2:] == [groups.SMALL_ELEMENTS] * 2
    assert sizes[2] > sizes[3] > groups.SMALL_ELEMENTS and all(n % groups.ALIGN == 0 for n in sizes)
    assert 12 * 16 * sizes[3] <= groups.GROUP_PACK_BYTES


def test_layout_and_concat() -> None:
    offsets, total = groups.layout([(3,), (), (2, 4), (0,), (9,)])
    assert offsets == [0, 8, 16, 24, 24] and total == 40
    flat = groups.concat([torch.ones(3), torch.full((), 2.0), torch.full((2, 4), 3.0)], offsets[:3], 24)
    assert flat.tolist() == [1] * 3 + [0] * 5 + [2] + [0] * 7 + [3] * 8
    assert np.all(flat.numpy()[3:8] == 0)


def test_reading_a_lazy_state_dict_in_turn_rebuilds_each_group_once(tmp_path: Path, monkeypatch) -> None:
    """``unpack`` reads a lazy state dict tensor by tensor: each group is rebuilt once, with the
    same bits, however the members are indexed (again, or out of order)."""
    from tallpack import reader

    base, fts = _family(2, [((40,), torch.float32)] * 6 + [((3, 3), torch.bfloat16)] * 3)
    out = tmp_path / "g.tallpack"
    tallpack.pack(base, fts, out)
    calls = []
    rebuild = reader.Archive._rebuild
    monkeypatch.setattr(reader.Archive, "_rebuild", lambda self, task, name, *a, **k: calls.append(name) or
                        rebuild(self, task, name, *a, **k))
    with tallpack.open(out) as fam:
        want = fam.state_dict("task1")
        calls.clear()
        lazy = fam.state_dict("task1", lazy=True)
        got = {k: lazy[k] for k in lazy}
        assert calls == ["tallpack.group.0", "tallpack.group.1"]
        assert list(got) == list(want) and all(_same(got[k], want[k]) for k in want)
        assert _same(lazy["t01"], want["t01"]) and _same(lazy["t08"], want["t08"]) and _same(lazy["t00"], want["t00"])


def test_members_read_one_by_one_decode_the_groups_mask_once(tmp_path: Path, monkeypatch) -> None:
    """``get_tensor`` of one member after another decodes the task's mask of the group once (kept
    in the cache, so an archive opened with cache_bytes=0 decodes it each time), same bits."""
    from tallpack.container import ContainerReader

    base, fts = _family(3, [((10, 10), torch.float32)] * 5)
    tallpack.pack(base, fts, tmp_path / "g.tallpack")
    reads = []
    read_bits = ContainerReader.read_bits
    monkeypatch.setattr(ContainerReader, "read_bits", lambda self, ref, *a: reads.append(ref) or read_bits(self, ref, *a))
    with tallpack.open(tmp_path / "g.tallpack") as fam, tallpack.open(tmp_path / "g.tallpack", cache_bytes=0) as bare:
        want = fam.state_dict("task2")
        reads.clear()
        for k in want:
            assert _same(fam.get_tensor("task2", k), want[k])
        assert len(reads) == (1 if kernels.COMPILED else 0)  # without the compiled loops: masks read as bytes
        reads.clear()
        for k in want:
            assert _same(bare.get_tensor("task2", k), want[k])
        assert len(reads) == (len(want) if kernels.COMPILED else 0)


def test_inspect_tensors_of_a_damaged_group_mask_still_shows_the_table(small_family, tmp_path: Path, caplog) -> None:
    out = tmp_path / "g.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out)
    with tallpack.open(out) as fam:
        group = next(e for e in fam.manifest.tensors if e.members)
        c = group.tasks["b"].arrays["mask"].chunks[0]
    with open(out, "r+b") as f:
        f.seek(c.offset)
        byte = f.read(1)
        f.seek(c.offset)
        f.write(bytes([byte[0] ^ 1]))
    r = CliRunner().invoke(main, ["inspect", str(out), "--tensors", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.stdout)["tensors"]}
    member = group.members[0].name
    assert "b" not in rows[member]["density"] and "a" in rows[member]["density"]  # the damaged task's left out
    warning = [m for m in caplog.messages if "checksum mismatch" in m]
    assert len(warning) == 1 and warning[0].count(str(out)) == 1, caplog.messages
