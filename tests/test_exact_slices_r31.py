"""Rows of an exact original read alone (``get_slice(task, name, exact=True)[rows]``,
``exact.original_rows``): only the chunks that hold them, the same bits as the whole original's
rows, each chunk checked; a lossy read of an entry that also has an exact residual by rows too."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import tallpack
from tallpack import reader
from tallpack.container import FOOTER
from tallpack.encodings import derived, exact
from tallpack.errors import IntegrityError
from test_integrity import with_manifest

ROWS, COLS, CHUNK = 3000, 64, 4096  # the embedding: 192,000 elements in 47 chunks


def _family(root: Path, dtype: torch.dtype, share: float = 0.2) -> tuple[str, dict[str, str]]:
    """Base and three tasks, each changing ``share`` of the weights (1: all, where the exact tier
    derives masks from the originals and stores residuals against the base)."""
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(ROWS, COLS, generator=g).to(dtype), "w": torch.randn(64, 64, generator=g).to(dtype)}
    save_file(base, root / "base.safetensors")
    tasks = {}
    for t in range(3):
        sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < share)
                  ).to(dtype) for k, v in base.items()}
        save_file(sd, root / f"t{t}.safetensors")
        tasks[f"t{t}"] = str(root / f"t{t}.safetensors")
    return str(root / "base.safetensors"), tasks


@pytest.fixture(scope="module", params=[
    ("float32", 0.2, {}, "tall-derived-merged"), ("bfloat16", 0.2, {}, "tall-derived-merged"),
    ("float32", 0.2, {"derive_masks": False}, "tall"), ("bfloat16", 0.2, {"derive_masks": False}, "tall"),
    ("float32", 1.0, {"derive_merged": False}, "tall-derived"), ("bfloat16", 1.0, {}, "tall-derived-merged")],
    ids=["f32-derived-merged", "bf16-derived-merged", "f32-stored-masks", "bf16-stored-masks", "f32-derived-masks",
         "bf16-dense-derived-merged"])
def packed(request, tmp_path_factory) -> Path:
    dtype, share, opts, encoding = request.param
    root = tmp_path_factory.mktemp("fam")
    base, tasks = _family(root, getattr(torch, dtype), share)
    out = root / "x.tallpack"
    tallpack.pack(base, tasks, str(out), exact=True, chunk_elements=CHUNK, **opts)
    with tallpack.open(out) as fam:
        assert {tt.encoding for tt in fam._tensors["emb"].tasks.values()} == {encoding}
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The names of the tensors rebuilt whole: an exact read, or a lossy one of a derived entry."""
    calls: list[str] = []
    whole, lossy, derived_whole = reader.rebuild_exact, derived.TallDerived.rebuild.__func__, reader.rebuild_in_runs

    def counting(read, entry, tt, where):
        calls.append(entry.name)
        return whole(read, entry, tt, where)

    def counting_lossy(cls, arrays, entry, tt):
        calls.append(entry.name)
        return lossy(cls, arrays, entry, tt)

    def counting_runs(read, entry, tt, where):
        calls.append(entry.name)
        return derived_whole(read, entry, tt, where)
    monkeypatch.setattr(reader, "rebuild_exact", counting)
    monkeypatch.setattr(reader, "rebuild_in_runs", counting_runs)
    monkeypatch.setattr(derived.TallDerived, "rebuild", classmethod(counting_lossy))
    return calls


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_exact_rows_are_the_originals_rows_without_the_whole(packed, counted, cache_bytes):
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    rng = random.Random(1)
    with tallpack.open(packed, **kw) as fam:
        assert fam.manifest.tensors[0].tasks["t0"].extras.get("exact") is not None
        for t in fam.tasks:
            whole = fam.get_tensor(t, "emb", exact=True)
            lossy = fam.get_tensor(t, "emb")
            counted.clear()
            cuts = [(0, 1), (ROWS - 1, ROWS), (63, 64 + 64), (5, 5)] + [
                tuple(sorted(rng.sample(range(ROWS + 1), 2))) for _ in range(12)]
            for a, b in cuts:
                got = fam.get_slice(t, "emb", exact=True)[a:b]
                assert got.shape == (b - a, COLS) and got.dtype == whole.dtype
                assert torch.equal(_bits(got), _bits(whole[a:b])), (t, a, b)
                assert torch.equal(fam.get_slice(t, "emb")[a:b], lossy[a:b]), (t, a, b)
            assert torch.equal(_bits(fam.get_slice(t, "emb", exact=True)[17]), _bits(whole[17]))
            assert torch.equal(_bits(fam.get_slice(t, "emb", exact=True)[-1]), _bits(whole[-1]))
            assert torch.equal(_bits(fam.get_slice(t, "emb", exact=True)[10:20, 3:9]), _bits(whole[10:20, 3:9]))
            assert counted == [], counted  # no row read, exact or lossy, rebuilt the whole tensor
            assert torch.equal(_bits(fam.get_slice(t, "emb", exact=True)[:]), _bits(whole))  # all rows: get_tensor


def test_exact_rows_match_the_files_packed(tmp_path):
    """Against the originals themselves, not only the archive's whole rebuild."""
    from safetensors.torch import load_file

    base, tasks = _family(tmp_path, torch.bfloat16)
    out = tmp_path / "x.tallpack"
    tallpack.pack(base, tasks, str(out), exact=True, chunk_elements=CHUNK)
    with tallpack.open(out, cache_bytes=0) as fam:
        for t, path in tasks.items():
            want = load_file(path)["emb"]
            part = fam.get_slice(t, "emb", exact=True)[1234:2345]
            assert torch.equal(_bits(part), _bits(want[1234:2345]))


def _damage_residual(path: Path, task: str, chunk: int) -> tuple[int, int]:
    """A byte of ``task``'s residual chunk ``chunk`` of "emb" flipped; the rows it holds."""
    with tallpack.open(path) as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "emb")
        ref = entry.tasks[task].extras["exact"].residual
        c = ref.chunks[chunk]
    raw = bytearray(path.read_bytes())
    raw[c.offset + c.nbytes // 2] ^= 0x20
    path.write_bytes(bytes(raw))
    first = chunk * ref.chunk_elements
    return first // COLS, -(-(first + ref.chunk_elements) // COLS)


def test_a_damaged_chunk_fails_the_rows_it_holds_and_only_those(packed, tmp_path):
    path = tmp_path / "d.tallpack"
    shutil.copy(packed, path)
    with tallpack.open(path) as fam:
        whole = fam.get_tensor("t1", "emb", exact=True)
    lo, hi = _damage_residual(path, "t1", 20)
    with tallpack.open(path, cache_bytes=0) as fam:
        with pytest.raises(IntegrityError) as e:
            fam.get_slice("t1", "emb", exact=True)[lo - 3 : lo + 1]
        assert str(e.value).startswith(f"{path}:") and "'t1'" in str(e.value) and "'emb'" in str(e.value), e.value
        # rows whose chunks are intact read (the original's hash covers every row: verify and a whole read say it)
        assert torch.equal(_bits(fam.get_slice("t1", "emb", exact=True)[hi + 1 : hi + 500]), _bits(whole[hi + 1 : hi + 500]))
        with pytest.raises(IntegrityError):
            fam.get_tensor("t1", "emb", exact=True)
        assert any("'emb'" in p and "t1" in p for p in fam.verify())
        encoding = fam._tensors["emb"].tasks["t1"].encoding
        if encoding != "tall":  # a lossy read of a derived entry reads the original too: the same
            for t in (["t0", "t1", "t2"] if encoding == "tall-derived-merged" else ["t1"]):
                with pytest.raises(IntegrityError) as e:
                    fam.get_slice(t, "emb")[lo - 3 : lo + 1]
                assert str(e.value).startswith(f"{path}:") and "'t1'" in str(e.value), e.value


def test_a_wrong_original_hash_is_a_whole_reads_finding_not_a_slices(packed, tmp_path):
    """The original's XXH3-64 needs every element: a slice checks its chunks, not that (documented);
    a whole read and verify report a hash the manifest damaged."""
    raw = bytearray(packed.read_bytes())
    m_off, m_len, *_ = FOOTER.unpack(bytes(raw[-FOOTER.size:]))
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))
    tt = next(e for e in manifest["tensors"] if e["name"] == "emb")["tasks"]["t2"]
    tt["exact"]["xxh3"] ^= 1
    path = tmp_path / "h.tallpack"
    path.write_bytes(with_manifest(bytes(raw), manifest))
    with tallpack.open(path, cache_bytes=0) as fam:
        part = fam.get_slice("t2", "emb", exact=True)[100:200]
        assert part.shape == (100, COLS)
        with pytest.raises(IntegrityError, match="hash"):
            fam.get_tensor("t2", "emb", exact=True)
        assert any("'emb'" in p for p in fam.verify())


def test_exact_rows_over_http_fetch_only_their_chunks(http_server, packed):
    name = f"slices-{packed.parent.name}.tallpack"
    shutil.copy(packed, http_server.root / name)
    with tallpack.open(f"{http_server.url}/{name}", cache_bytes=0) as fam, tallpack.open(packed) as local:
        want = local.get_slice("t0", "emb", exact=True)[1000:1100]
        http_server.reset()
        got = fam.get_slice("t0", "emb", exact=True)[1000:1100]
        assert torch.equal(_bits(got), _bits(want))
        entry = next(e for e in fam.manifest.tensors if e.name == "emb")
        refs = [entry.tasks["t0"].extras["exact"].residual, *exact._reference_refs(entry, entry.tasks["t0"])]
        chunks = [c for r in refs for c in r.chunks[1000 * COLS // CHUNK : -(-1100 * COLS // CHUNK)]]
        need = sum(c.nbytes for c in chunks)
        # the chunks of those rows and the padding between, each once, not the tensor's (and holes
        # between them bridged for at most 1/8 more: remote.BRIDGE_SHARE)
        assert need <= http_server.served() <= need + need // 8 + 63 * len(chunks)
        assert http_server.gets() <= len(chunks)


def test_lossy_rows_over_http_fetch_a_few_chunks(http_server, packed):
    """A lossy slice of every kind of entry (a derived merged vector derived from every task's rows,
    with no cache) fetches about those rows' chunks, not the tensor's."""
    name = f"lossy-{packed.parent.name}.tallpack"
    shutil.copy(packed, http_server.root / name)
    with tallpack.open(f"{http_server.url}/{name}", cache_bytes=0) as fam, tallpack.open(packed) as local:
        for t in fam.tasks:
            want = local.get_tensor(t, "emb")[1000:1100]
            fam.source.forget()  # each slice alone (an earlier one's ranges stay kept: KEEP_READ)
            http_server.reset()
            assert torch.equal(_bits(fam.get_slice(t, "emb")[1000:1100]), _bits(want))
            assert 0 < http_server.served() < packed.stat().st_size / 8
