"""Hostile archives, generated: whatever the bytes or the manifest say, reading either works or
raises a TallpackError; never another exception, a hang or a huge allocation."""

import json
import zlib

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from conftest import read_everything
from tallpack.container import FOOTER

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["float32", "bool", "tall", "dense", "shared", "zstd", "merged"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory):
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(20, 9, generator=g), "n": torch.tensor([3]), "h": torch.randn(4, generator=g).bfloat16()}
    tasks = {t: {"w": base["w"] + 0.1 * torch.randn(20, 9, generator=g), "n": base["n"],
                 "h": torch.randn(4, generator=g).bfloat16(), f"head{t}": torch.randn(i + 1, generator=g)}
             for i, t in enumerate("abc")}
    out = tmp_path_factory.mktemp("fuzz") / "f.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=64, merge="ties")
    return out.read_bytes()


def edit(data, root, where: list, values) -> None:
    """One to three random edits of a parsed manifest ``root``: at a path drawn from ``where``, a
    key removed or a value drawn from ``values`` put in (edits that no longer fit are skipped)."""
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(where))
        target = root
        try:
            for key in path[:-1]:
                target = target[key]
            if data.draw(st.booleans()) and isinstance(target, dict):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = data.draw(values)
        except (KeyError, IndexError, TypeError):
            continue


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def manifest_of(raw: bytes) -> dict:
    """An archive's manifest (stored zstd-compressed, as the writer stores it here)."""
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    return json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))


def read_mutated(tmp_path, raw: bytes, manifest, *args, **kwargs) -> None:
    """Write ``raw`` with ``manifest`` in place of its own and read everything from it: any failure
    must be a TallpackError (``read_everything``'s ``args`` and ``kwargs``)."""
    p = tmp_path / "m.tallpack"
    p.write_bytes(with_manifest(raw, manifest))
    try:
        read_everything(p, *args, **kwargs)
    except tallpack.TallpackError:
        pass


def with_manifest(raw: bytes, manifest) -> bytes:
    m_off, _, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    stored = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    return raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end)


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_manifests_raise_only_tallpack_errors(archive_bytes, tmp_path, data):
    manifest = manifest_of(archive_bytes)
    edit(data, manifest, [p for p in paths(manifest) if p], json_values)
    read_mutated(tmp_path, archive_bytes, manifest, stats=False)


@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 200))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_bytes_raise_only_tallpack_errors(archive_bytes, tmp_path, edits, cut):
    raw = bytearray(archive_bytes)
    for pos, value in edits:
        raw[pos % len(raw)] = value
    p = tmp_path / "b.tallpack"
    p.write_bytes(bytes(raw[:len(raw) - cut]))
    try:
        read_everything(p, stats=False)
    except tallpack.TallpackError:
        pass


@pytest.mark.parametrize("name, kind", [("n", "merged"), ("n", "base-only"), ("n", "nonsense"),
                                        ("w", "shared"), ("w", "task-own"), ("h", "merged")])
def test_merged_models_follow_the_encodings_not_the_kind(archive_bytes, tmp_path, name, kind):
    """An entry's ``kind`` is informative (spec §3.3): what is stored follows its tasks' encodings.
    The fuzzer found ``merged`` models reading a base that a shared tensor edited to kind "merged"
    does not have (a KeyError); with any kind the merged models are the unedited archive's."""
    import torch

    manifest = manifest_of(archive_bytes)
    next(e for e in manifest["tensors"] if e["name"] == name)["kind"] = kind
    (tmp_path / "a.tallpack").write_bytes(archive_bytes)
    (tmp_path / "b.tallpack").write_bytes(with_manifest(archive_bytes, manifest))
    with tallpack.open(tmp_path / "a.tallpack") as a, tallpack.open(tmp_path / "b.tallpack") as b:
        for model in ("ties", "consensus-ties"):
            kw = {"k": 1} if model.startswith("consensus") else {}  # k only for consensus
            want, got = a.merged(model, **kw), b.merged(model, **kw)
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)
