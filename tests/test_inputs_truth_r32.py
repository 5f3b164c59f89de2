"""The packer stores a checkpoint's own bytes, whatever file holds them: every tensor an exact read
of the archive gives is, bit for bit, what ``torch.load(weights_only=True)`` or ``safe_open`` gives
for the file it was packed from (views, offsets, shared storages, wrappers, legacy files, shards,
tensors read a block at a time)."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tallpack
from tallpack import inputs


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in C order (NaN payloads and -0.0 kept)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()).reshape(-1).view(torch.uint8)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(_bits(got), _bits(want))


# -- found by hand -----------------------------------------------------------------------------------

def _alike_at_the_windows(w: torch.Tensor) -> torch.Tensor:
    """A copy of ``w`` that differs from it everywhere but its first, middle and last 64 bytes."""
    n = w.numel()
    other = w.clone()
    other[20:n // 2 - 20] += 1
    other[n // 2 + 20:n - 20] += 1
    return other


def test_a_copy_alike_at_its_first_middle_and_last_bytes_is_not_taken_for_the_weights(tmp_path):
    """A checkpoint that pickles a copy of the weights first, nested where it is not packed (an
    EMA's ``{"ema": {"state_dict": ...}}``), whose bytes are the weights' at the 64-byte windows
    compared but differ elsewhere, and whose record lies a page before the weights': the weights'
    own record is read (the copy's was, silently)."""
    paths = {}
    sds = {}
    for i, t in enumerate(("base", "a", "b")):
        w = torch.arange(1000, dtype=torch.float32) + i  # 4000 bytes: records a page apart
        sds[t] = {"w": w}
        torch.save({"ema": {"state_dict": {"w": _alike_at_the_windows(w)}}, "model": {"w": w}}, tmp_path / f"{t}.pt")
        paths[t] = str(tmp_path / f"{t}.pt")
    assert tallpack.sources.open_source(paths["a"]).get("w").equal(sds["a"]["w"])
    out = tmp_path / "fam.tallpack"
    tallpack.pack(paths["base"], {"a": paths["a"], "b": paths["b"]}, out, exact=True)
    with tallpack.open(out) as fam:
        for t in "ab":
            assert _same(fam.state_dict(t, exact=True)["w"], sds[t]["w"]), t



def _packs_exactly(tmp_path: Path, sds: dict, given: str) -> None:
    """Base and tasks "a", "b" of ``sds`` saved as zip PyTorch files (``given="zip"``) or given as
    dicts, packed exact: each task's exact state dict is its tensors' bits."""
    if given == "zip":
        for t, sd in sds.items():
            torch.save(sd, tmp_path / f"{t}.pt")
        base, tasks = str(tmp_path / "base.pt"), {t: str(tmp_path / f"{t}.pt") for t in "ab"}
    else:
        base, tasks = sds["base"], {t: sds[t] for t in "ab"}
    out = tmp_path / "fam.tallpack"
    tallpack.pack(base, tasks, out, exact=True)
    with tallpack.open(out) as fam:
        for t in "ab":
            got = fam.state_dict(t, exact=True)
            assert all(_same(got[k], v) for k, v in sds[t].items()), t


@pytest.mark.parametrize("given", ["zip", "dict"])
def test_a_one_element_view_with_a_stride_packs(tmp_path, given):
    """A column of a one-row weight (``w[:, 0]``: shape (1,), stride (6,)), which torch calls
    contiguous: packed and read back as it is (the packer failed on it with torch's 'stride(-1) must
    be 1 to view Float as Byte')."""
    g = torch.Generator().manual_seed(0)
    sds = {t: {"w": torch.randn(1, 6, generator=g)[:, 0], "b": torch.randn(4, generator=g)} for t in ("base", "a", "b")}
    assert sds["a"]["w"].stride() == (6,) and sds["a"]["w"].is_contiguous()
    _packs_exactly(tmp_path, sds, given)



@pytest.mark.parametrize("given", ["zip", "dict"])
def test_a_strided_view_every_task_left_unchanged_packs(tmp_path, given):
    """A 1-d view of every other element (``x[::2]``) that every task holds at one value, not the
    base's (stored once, shared, with the base): packed and read back (the packer failed viewing it
    as bytes: 'stride(-1) must be 1')."""
    g = torch.Generator().manual_seed(0)
    x0, x = torch.randn(8, generator=g), torch.randn(8, generator=g)
    sds = {t: {"w": (x0 if t == "base" else x)[::2], "b": torch.randn(4, generator=g)} for t in ("base", "a", "b")}
    _packs_exactly(tmp_path, sds, given)


def _rewritten(src: Path, dst: Path, *, order: list[int] | None = None, align: int = 64, pad: int = 0,
               big: dict[str, int] | None = None) -> None:
    """``src`` (a torch.save zip) written again with Python's zipfile: its records in ``order``, each
    record's data aligned to ``align`` bytes (0: not aligned) by an extra field of ``pad`` bytes and
    more, and, with ``big`` (each storage record's element size by its key), as a big-endian machine
    (s390x) writes it: ``byteorder`` says ``big`` and the elements are byte-swapped."""
    with zipfile.ZipFile(src) as zin, open(dst, "wb") as raw:
        infos = zin.infolist()
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zout:
            for info in ([infos[i] for i in order] if order is not None else infos):
                data = zin.read(info)
                key = info.filename.rsplit("/", 1)[-1]
                if big is not None and info.filename.endswith("/byteorder"):
                    data = b"big"
                elif big is not None and "/data/" in info.filename and big.get(key, 1) > 1:
                    data = np.frombuffer(data, dtype=f"u{big[key]}").byteswap().tobytes()
                zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                start = raw.tell() + 30 + len(info.filename.encode()) + 4 + pad  # (4: the extra field's head)
                n = pad + ((-start) % align if align else 0)
                zi.extra = struct.pack("<HH", 0xCAFE, n) + b"\0" * n
                zout.writestr(zi, data)


@pytest.mark.parametrize("n", [8, 1000, 1024])  # 1000 float32: the optimizer's record a page before the weights'
def test_a_big_endian_checkpoint_after_its_optimizer_packs_its_own_bytes(tmp_path, n):
    """A big-endian file (s390x) whose optimizer is pickled before its state dict, records aligned as
    torch.save aligns them: its weights' own record is read (the optimizer's was, where it lay a
    page before: the bytes were not compared for a big-endian file)."""
    g = torch.Generator().manual_seed(0)
    paths, sds = {}, {}
    for t in ("base", "a", "b"):
        w = torch.randn(n, generator=g)
        opt = {"state": {0: {"exp_avg": torch.randn(n, generator=g)}}, "param_groups": [{"params": [0]}]}
        torch.save({"optimizer": opt, "model": {"w": w}}, tmp_path / "le.pt")
        _rewritten(tmp_path / "le.pt", tmp_path / f"{t}.pt", big={"0": 4, "1": 4})
        assert _same(torch.load(tmp_path / f"{t}.pt", weights_only=True)["model"]["w"], w)
        paths[t], sds[t] = str(tmp_path / f"{t}.pt"), {"w": w}
    out = tmp_path / "fam.tallpack"
    tallpack.pack(paths["base"], {"a": paths["a"], "b": paths["b"]}, out, exact=True)
    with tallpack.open(out) as fam:
        assert _same(fam.base_tensor("w"), sds["base"]["w"])
        for t in "ab":
            assert _same(fam.state_dict(t, exact=True)["w"], sds[t]["w"]), t


# -- the property: every tensor read back is the file's own ----------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
#: How a checkpoint holds its state dict (``sd``; ``other``: an optimizer's or EMA's copy of the same shapes).
WRAPPERS = ["plain", "state_dict", "optimizer_first", "model_first", "module", "lightning_ema_first", "timm_ema",
            "nested_ema_first"]
FORMATS = ["zip", "legacy", "safetensors", "sharded", "sharded_bin"]


@st.composite
def _views(draw, n_groups: int = 3):
    """A state dict's layout: groups, each one storage of a dtype and several views of it (0-d, empty,
    permuted strides, every other element, at an offset, the storage larger than its views), some
    under two names (tied). Returns ``[(dtype, storage elements, [(names, shape, stride, offset)])]``."""
    groups = []
    for g in range(draw(st.integers(1, n_groups))):
        dtype = draw(st.sampled_from(DTYPES))
        views, end = [], 1
        for v in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):  # over the blocks of 8 elements: read a block at a time where it can be
                shape = tuple(draw(st.sampled_from([[st.integers(9, 30)], [st.integers(2, 4), st.integers(5, 8)]])))
                shape = tuple(draw(d) for d in shape)
                order, step = list(range(len(shape))), 1
            else:
                shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
                order = draw(st.permutations(range(len(shape))))
                step = draw(st.sampled_from([1, 1, 2]))
            stride, s = [0] * len(shape), step
            for d in reversed(order):  # C order of the permuted dims, every ``step``-th element
                stride[d] = s
                s *= max(shape[d], 1)
            extent = 1 + sum((n - 1) * k for n, k in zip(shape, stride)) if all(shape) else 0
            offset = draw(st.integers(0, 5))
            names = [f"g{g}.v{v}"] + ([f"g{g}.v{v}_tied"] if draw(st.integers(0, 4)) == 0 else [])
            views.append((names, shape, tuple(stride), offset))
            end = max(end, offset + extent)
        groups.append((dtype, end + draw(st.integers(0, 3)), views))
    return groups


def _random_bytes(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of ``dtype``: weights' values, or (one time in four, and for integers) random
    bits (NaN payloads, -0.0, infinities; bool 0 or 1)."""
    if dtype.is_floating_point and rng.integers(0, 4):
        return torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(dtype)
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, n, dtype=np.uint8)).view(torch.bool)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(rng.integers(0, 256, n * size, dtype=np.uint8)).view(dtype)


def _state_dict(layout, storages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"anchor": storages[-1]}  # (never all empty: a ZeRO-3 placeholder file is refused)
    for (dtype, _, views), root in zip(layout, storages):
        for names, shape, stride, offset in views:
            t = root.as_strided(shape, stride, offset)
            sd.update((n, t) for n in names)
    return sd


def _storages(layout, rng: np.random.Generator, like: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Each group's storage, random, or (a task) ``like``'s: the same, a byte changed, fine-tuned, or random."""
    out = []
    for i, (dtype, n, _) in enumerate(layout):
        how = rng.integers(0, 4) if like is not None else 2
        t = _random_bytes(rng, n, dtype) if how == 2 else like[i].clone()
        if how == 3 and dtype.is_floating_point:  # fine-tuned
            t = (t.float() + 0.01 * torch.from_numpy(rng.standard_normal(n, dtype=np.float32))).to(dtype)
        elif how == 1:
            t.view(torch.uint8)[rng.integers(0, t.view(torch.uint8).numel())] ^= 1 if dtype == torch.bool else 0x10
        out.append(t)
    out.append(_random_bytes(rng, 8, torch.float32) if like is None else like[-1] + 1)  # the anchor
    return out


def _wrapped(sd: dict, other: dict, how: str) -> dict:
    opt = {"state": {i: {"exp_avg": t, "exp_avg_sq": t} for i, t in enumerate(other.values())},
           "param_groups": [{"lr": 0.1, "params": list(range(len(other)))}]}
    return {"plain": lambda: sd, "state_dict": lambda: {"state_dict": sd, "epoch": 3},
            "optimizer_first": lambda: {"optimizer": opt, "model": sd, "iter_num": 7},
            "model_first": lambda: {"model": sd, "optimizer": opt},
            "module": lambda: {"module": sd, "global_steps": 10},
            "lightning_ema_first": lambda: {"current_model_state": other, "pytorch-lightning_version": "2.4.0",
                                            "state_dict": sd, "optimizer_states": [opt]},
            "timm_ema": lambda: {"state_dict_ema": other, "state_dict": sd},
            "nested_ema_first": lambda: {"ema": {"state_dict": other}, "model": sd}}[how]()


def _unwrapped(obj: dict, how: str) -> dict:
    key = {"plain": None, "module": "module", "optimizer_first": "model", "model_first": "model",
           "nested_ema_first": "model"}.get(how, "state_dict")
    return obj if key is None else obj[key]


def _save(sd: dict, other: dict, fmt: str, how: str, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``sd`` saved as ``fmt`` (wrapped as ``how``, for PyTorch files) at ``path``; the path to pack and
    what its own loader reads from it."""
    if fmt == "legacy" and any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in sd.values()):
        fmt = "zip"  # (torch.load cannot read the legacy file torch.save writes of float8: 'no attribute dtype')
    if fmt in ("zip", "legacy"):
        torch.save(_wrapped(sd, other, how), path.with_suffix(".pt"), _use_new_zipfile_serialization=fmt == "zip")
        return str(path.with_suffix(".pt")), _unwrapped(torch.load(path.with_suffix(".pt"), weights_only=True), how)
    if fmt == "sharded_bin":  # pytorch_model-0000N-of-00002.bin: each shard torch.save's, views and all
        path.mkdir()
        half = {k: f"pytorch_model-0000{1 + (i % 2)}-of-00002.bin" for i, k in enumerate(sd)}
        if any(len(s) > 1 and not any(sd[k].numel() for k in s) for s in ([k for k in sd if half[k] == f]
                                                                        for f in set(half.values()))):
            half = dict.fromkeys(sd, "pytorch_model-00001-of-00001.bin")  # (a shard of empty tensors: ZeRO-3's?)
        want = {}
        for f in sorted(set(half.values())):
            torch.save({k: v for k, v in sd.items() if half[k] == f}, path / f)
            want.update(torch.load(path / f, weights_only=True))
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
        return str(path), want
    flat = {k: v.contiguous().clone() for k, v in sd.items()}  # (safetensors holds no views)
    if fmt == "safetensors":
        save_file(flat, path.with_suffix(".safetensors"))
        files = [path.with_suffix(".safetensors")]
    else:
        path.mkdir()
        names = list(flat)
        half = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(names)}
        for f in sorted(set(half.values())):
            save_file({k: flat[k] for k in names if half[k] == f}, path / f)
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
        files = [path / f for f in sorted(set(half.values()))]
    want = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            want.update((k, h.get_tensor(k)) for k in h.keys())
    return str(path.with_suffix(".safetensors") if fmt == "safetensors" else path), want


@settings(max_examples=int(os.environ.get("TRUTH_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(layout=_views(), seed=st.integers(0, 2**32 - 1), formats=st.lists(st.sampled_from(FORMATS), min_size=3,
       max_size=3), wrappers=st.lists(st.sampled_from(WRAPPERS), min_size=3, max_size=3), streamed=st.booleans())
def test_every_tensor_read_back_is_the_files_own(tmp_path_factory, monkeypatch, layout, seed, formats, wrappers,
                                                  streamed):
    """A base and two tasks of random layouts (views, offsets, shared storages, tied names), each saved
    in a random format and wrapping: every tensor of every task's exact state dict (and the base's
    stored copy) is what the file's own loader gives, bit for bit; read whole, or (``streamed``) every
    tensor of more than 8 elements a block of 8 at a time."""
    tmp = tmp_path_factory.mktemp("truth")
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0 if streamed else 1 << 60)
    rng = np.random.default_rng(seed)
    first = None
    paths, wants = {}, {}
    for t, fmt, how in zip(("base", "a", "b"), formats, wrappers):
        mine = _storages(layout, rng, first)
        first = first or mine
        other = _state_dict(layout, _storages(layout, rng, mine))  # an optimizer's, an EMA's: alike, other bytes
        paths[t], wants[t] = _save(_state_dict(layout, mine), other, fmt, how, tmp / t)
    out = tmp / "fam.tallpack"
    tallpack.pack(paths["base"], {"a": paths["a"], "b": paths["b"]}, out, exact=True, chunk_elements=8)
    with tallpack.open(out) as fam:
        for t in "ab":
            got = fam.state_dict(t, exact=True)
            assert set(got) == set(wants[t]), t
            for name, want in wants[t].items():
                assert _same(got[name], want), (t, name, formats, wrappers)
        for name, want in wants["base"].items():
            held = fam.base_tensor(name)
            assert held is None or _same(held.view(want.shape) if want.dim() else held.reshape(()), want), name
