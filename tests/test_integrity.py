"""Damaged, truncated, hostile and foreign files: a TallpackError, never a crash or a hang."""

import json
import os

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.sources import DictSource
from tallpack.container import FOOTER, HEADER
from tallpack.errors import FormatError, IntegrityError, TallpackError, UnsupportedVersionError
from conftest import save_in_order
from test_fuzz import with_manifest


@pytest.fixture(params=[True, False], ids=["grouped", "single"])
def archive(small_family, tmp_path, request):
    """The small family, with its small tensors grouped (format 1.12, the default) and not."""
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out, chunk_elements=256, group=request.param)
    return out


@pytest.fixture
def single_archive(small_family, tmp_path):
    """The small family, every tensor an entry of its own (tests that edit one by name)."""
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out, chunk_elements=256, group=False)
    return out


def data_chunks(path):
    with tallpack.open(path) as fam:
        return [(e.name, key, c) for e in fam.manifest.tensors for key, ref in e.all_arrays() for c in ref.chunks]


def test_any_changed_byte_of_a_data_section_is_caught(archive):
    raw = archive.read_bytes()
    chunks = data_chunks(archive)
    assert len(chunks) > 10
    for name, key, c in chunks:
        for pos in {c.offset, c.offset + c.nbytes // 2, c.offset + c.nbytes - 1}:
            damaged = bytearray(raw)
            damaged[pos] ^= 0x40
            archive.write_bytes(bytes(damaged))
            with tallpack.open(archive) as fam:
                problems = fam.verify()
            assert len(problems) == 1 and repr(name) in problems[0] and "checksum" in problems[0]
    archive.write_bytes(raw)
    with tallpack.open(archive) as fam:
        assert fam.verify() == []


def test_damaged_chunk_raises_when_read(single_archive):
    name, key, c = next(x for x in data_chunks(single_archive) if x[0] == "body.w" and "mask" in x[1])
    raw = bytearray(single_archive.read_bytes())
    raw[c.offset] ^= 1
    single_archive.write_bytes(bytes(raw))
    task = key.split("/")[0]
    with tallpack.open(single_archive) as fam:
        with pytest.raises(IntegrityError, match=f"task '{task}', tensor 'body.w'"):
            fam.get_tensor(task, "body.w")
        fam.get_tensor(task, "head.w")  # the rest of the single_archive still reads


@pytest.mark.parametrize("cut", [1, 16, 31, 32, 100, 1000])
def test_truncated_archives(archive, cut):
    raw = archive.read_bytes()
    archive.write_bytes(raw[:-cut])
    with pytest.raises(FormatError):
        tallpack.open(archive)


def test_every_prefix_fails_cleanly(archive):
    raw = archive.read_bytes()
    for n in range(0, len(raw), max(1, len(raw) // 200)):
        archive.write_bytes(raw[:n])
        with pytest.raises(TallpackError):
            tallpack.open(archive)


def test_manifest_damage_is_caught(archive):
    raw = bytearray(archive.read_bytes())
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    raw[m_off + m_len // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="manifest checksum"):
        tallpack.open(archive)


@pytest.mark.parametrize("content", [b"", b"hello", b"\0" * 100, b"PK\x03\x04" + b"x" * 200])
def test_foreign_files_are_not_tallpacks(tmp_path, content):
    p = tmp_path / "x.tallpack"
    p.write_bytes(content)
    with pytest.raises(FormatError, match="not a tallpack archive"):
        tallpack.open(p)


def test_a_safetensors_file_is_not_a_tallpack(small_family):
    with pytest.raises(FormatError, match="not a tallpack"):
        tallpack.open(small_family["base_path"])


def test_a_newer_major_version_is_refused(archive):
    raw = bytearray(archive.read_bytes())
    raw[: HEADER.size] = HEADER.pack(b"TALLPACK", 2, 0, 0)
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        tallpack.open(archive)


def test_offsets_outside_the_file_are_refused(archive):
    raw = bytearray(archive.read_bytes())
    m_off, m_len, crc, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    raw[-FOOTER.size:] = FOOTER.pack(m_off, 2**62, crc, flags, end)
    archive.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="do not match the file size"):
        tallpack.open(archive)


def rewrite_manifest(path, edit):
    """Re-write an archive's manifest through ``edit`` (a hostile writer), with a valid checksum."""
    import json
    import zlib

    import zstandard

    raw = bytearray(path.read_bytes())
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))
    edit(manifest)
    stored = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    path.write_bytes(bytes(raw[:m_off]) + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end))


def _first_merged(m):
    return next(t for t in m["tensors"] if t["kind"] == "merged")


def _last_mask(m):
    last = [t for t in m["tensors"] if t["kind"] == "merged"][-1]
    return list(last["tasks"].values())[-1]["mask"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: _first_merged(m)["merged"]["chunks"][0].__setitem__(0, 3), "overlaps"),
    (lambda m: _first_merged(m)["merged"]["chunks"].pop(), "chunks cannot hold"),
    (lambda m: _first_merged(m)["merged"].__setitem__("shape", [10**12]), "array shape|chunks cannot hold"),
    (lambda m: _first_merged(m)["merged"].__setitem__("chunk_elements", 2**40), "chunks larger|chunks cannot"),
    (lambda m: _first_merged(m)["merged"].__setitem__("dtype", "complex256"), "unknown dtype"),
    (lambda m: _first_merged(m)["merged"]["chunks"][0].__setitem__(1, -5), "non-negative"),
    # values equal to valid ones as Python compares them (3.0 == True == 1), in a header that
    # the masks read before it share with the valid value: the parsed headers are cached, by type too
    (lambda m: _last_mask(m)["codecs"][1].__setitem__("level", 3.0), "bad level 3.0"),
    (lambda m: _last_mask(m)["codecs"][1].__setitem__("level", True), "bad level True"),
    (lambda m: _last_mask(m).__setitem__("chunk_elements", 256.0), "multiple of 8"),
    (lambda m: _last_mask(m).__setitem__("shape", [True] * len(_last_mask(m)["shape"])), "non-negative integers"),
    (lambda m: m["tasks"][0].__setitem__("keys", ["nope"]), "listed but not stored"),
    (lambda m: m.__setitem__("tasks", "x"), "malformed|missing"),
    (lambda m: m.pop("tensors"), "missing"),
    (lambda m: m.__setitem__("format", "zip"), "format: tallpack"),
])
def test_hostile_manifests_are_refused(archive, edit, message):
    rewrite_manifest(archive, edit)
    with pytest.raises(FormatError, match=message):
        tallpack.open(archive)


def test_an_unknown_encoding_fails_only_where_used(single_archive):
    def edit(m):
        _first_merged(m)["tasks"]["a"]["encoding"] = "future-codec"
    rewrite_manifest(single_archive, edit)
    with tallpack.open(single_archive) as fam:
        name = next(e.name for e in fam.manifest.tensors if e.kind == "merged")
        with pytest.raises(UnsupportedVersionError, match="upgrade"):
            fam.get_tensor("a", name)
        fam.state_dict("b")


def test_unknown_keys_are_ignored(archive):
    rewrite_manifest(archive, lambda m: m.update(future_key={"x": 1}))
    with tallpack.open(archive) as fam:
        fam.state_dict("a")


def test_failed_pack_leaves_nothing_behind(small_family, tmp_path):
    bad = dict(small_family["tasks"]["a"])
    bad["body.w"] = torch.zeros(3, 3)  # one tensor of another shape: becomes task-own, fine
    good_out = tmp_path / "ok.tallpack"
    tallpack.pack(small_family["base"], {"a": bad, "b": small_family["tasks"]["b"]}, good_out)

    class Exploding(DictSource):  # a source whose disk fails half-way through the pack
        def _load(self, name):
            if name == "body.b":
                raise RuntimeError("disk on fire")
            return super()._load(name)

    out = tmp_path / "f.tallpack"
    out.write_bytes(b"previous archive")
    tasks = {"a": Exploding("task 'a'", small_family["tasks"]["a"]), "b": small_family["tasks"]["b"]}
    with pytest.raises(TallpackError, match="task 'a'.*'body.b'.*disk on fire"):
        tallpack.pack(small_family["base"], tasks, out, overwrite=True)
    assert out.read_bytes() == b"previous archive"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_strict_manifest_json(archive):
    rewrite_manifest(archive, lambda m: m.update(deep=[[[[[[[[[[]]]]]]]]]]))
    tallpack.open(archive).close()  # plain nesting is fine
    raw = archive.read_bytes()
    import json as _json
    import zlib

    import zstandard
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    for text in ('{"a": 1, "a": 2}', '{"x": NaN}', "[" * 100000 + "]" * 100000):
        stored = zstandard.ZstdCompressor().compress(text.encode())
        archive.write_bytes(raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end))
        with pytest.raises(FormatError):
            tallpack.open(archive)
    assert _json  # the module is the one the reader uses


def test_manifest_frame_without_a_size_is_refused(archive):
    import zlib

    import zstandard
    raw = archive.read_bytes()
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(b"{}" + b" " * 10**6)
    archive.write_bytes(raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end))
    with pytest.raises(FormatError, match="no size"):
        tallpack.open(archive)


def test_unknown_flags_and_reserved_bits_are_refused(archive):
    raw = bytearray(archive.read_bytes())
    m_off, m_len, crc, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    archive.write_bytes(bytes(raw[:-FOOTER.size]) + FOOTER.pack(m_off, m_len, crc, flags | 4, end))
    with pytest.raises(UnsupportedVersionError, match="flags"):
        tallpack.open(archive)


def test_later_tasks_with_other_shapes_are_refused(single_archive):
    def edit(m):
        e = _first_merged(m)
        t = list(e["tasks"])[-1]
        e["tasks"][t]["shape"] = [1]
        e["tasks"][t]["mask"]["shape"] = [1]
        e["tasks"][t]["mask"]["chunks"] = e["tasks"][t]["mask"]["chunks"][:1]
        e["tasks"][t]["ones"] = 1
    rewrite_manifest(single_archive, edit)
    with pytest.raises(FormatError, match="shape differs from the base"):
        tallpack.open(single_archive)


def test_non_finite_weights_are_kept_exactly(small_family, tmp_path):
    base = dict(small_family["base"])
    tasks = {t: dict(sd) for t, sd in small_family["tasks"].items()}
    base["body.b"] = base["body.b"].clone()
    base["body.b"][0] = float("-inf")
    for sd in tasks.values():
        sd["body.b"] = sd["body.b"].clone()
        sd["body.b"][0] = float("-inf")
    out = tmp_path / "inf.tallpack"
    tallpack.pack(base, tasks, out)
    with tallpack.open(out) as fam:
        for t, sd in tasks.items():
            assert torch.equal(fam.get_tensor(t, "body.b"), sd["body.b"])


def test_archives_get_ordinary_permissions(archive):
    umask = os.umask(0)
    os.umask(umask)
    assert archive.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unpack_all_refuses_task_names_that_leave_the_folder(archive, tmp_path):
    from tallpack_cli.main import main
    from click.testing import CliRunner

    def edit(m):
        m["tasks"][0]["name"] = "../evil"
        for e in m["tensors"]:
            if "a" in e["tasks"]:
                e["tasks"]["../evil"] = e["tasks"].pop("a")
    rewrite_manifest(archive, edit)
    r = CliRunner().invoke(main, ["unpack", str(archive), "--all", "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "task '../evil' cannot be a folder of" in r.output
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()


def test_every_byte_of_the_file_is_covered(archive):
    """No hidden bytes: a change anywhere (header, chunk, padding, manifest, footer) is caught by
    opening or by verify. The file is cut into its regions (header, each data chunk, each gap
    between them, the manifest, the footer), which tile it: every byte of the header and footer,
    the first, middle and last byte of every other region (an off-by-one leaves an end unread) and
    a spread of about 300 positions over the whole file are changed, one at a time."""
    raw = archive.read_bytes()
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    ends = sorted({(0, HEADER.size), (m_off, m_off + m_len), (len(raw) - FOOTER.size, len(raw))}
                  | {(c.offset, c.offset + c.nbytes) for _, _, c in data_chunks(archive)})
    regions, at = [], 0
    for start, end in ends:
        assert start >= at, f"regions overlap at byte {start}"
        if start > at:
            regions.append((at, start))  # a gap: padding
        regions.append((start, end))
        at = end
    assert at == len(raw)
    positions = {*range(HEADER.size), *range(len(raw) - FOOTER.size, len(raw)),
                 *range(0, len(raw), max(1, len(raw) // 300))}
    for start, end in regions:
        positions |= {start, (start + end) // 2, end - 1}
    for pos in sorted(positions):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x01
        archive.write_bytes(bytes(damaged))
        try:
            with tallpack.open(archive) as fam:
                assert fam.verify(), f"a change at byte {pos} went unnoticed"
        except TallpackError:
            pass


def test_a_bool_array_with_other_bytes_is_refused(tmp_path) -> None:
    """Bool elements are bytes 0 or 1 (spec §4); the reader relies on it (masks are converted
    through their bytes), so a stored bool array holding a 2 is a FormatError, not a wrong tensor."""
    import tallpack
    from tallpack.errors import FormatError

    w = torch.randn(8, 8)
    flag = torch.tensor([0, 1, 0, 1], dtype=torch.uint8).view(torch.bool)
    bad = torch.tensor([0, 2, 0, 1], dtype=torch.uint8).view(torch.bool)
    from tallpack.errors import CheckpointError

    with pytest.raises(CheckpointError, match="task 'a'.*'flag' is bool but holds bytes other than 0 and 1"):
        tallpack.pack({"w": w, "flag": flag}, {"a": {"w": w + 0.1, "flag": bad}, "b": {"w": w - 0.1, "flag": flag}},
                      tmp_path / "x.tallpack")
    assert not (tmp_path / "x.tallpack").exists()
    # an archive holding such bytes anyway (written by another tool): the reader refuses them
    tallpack.pack({"w": w, "flag": flag}, {"a": {"w": w + 0.1, "flag": flag.clone()}, "b": {"w": w - 0.1, "flag": flag}},
                  tmp_path / "x.tallpack", codec="raw")
    with tallpack.open(tmp_path / "x.tallpack") as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "flag")
        ref = entry.tasks["a"].arrays["data"] if "data" in entry.tasks["a"].arrays else entry.arrays["data"]
        off = ref.chunks[0].offset
    import json

    import xxhash
    import zstandard
    from test_fuzz import FOOTER, with_manifest

    raw = bytearray((tmp_path / "x.tallpack").read_bytes())
    raw[off + 1] = 2
    m_off, m_len, *_ = FOOTER.unpack(bytes(raw[-FOOTER.size:]))
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))

    def resum(node):  # the damaged chunk's checksum recomputed, so only the bytes' meaning is wrong
        if isinstance(node, dict):
            if node.get("chunks") and node["chunks"][0][0] == off:
                c = node["chunks"][0]
                c[2] = xxhash.xxh3_64_intdigest(bytes(raw[c[0]:c[0] + c[1]]))
            for v in node.values():
                resum(v)
        elif isinstance(node, list):
            for v in node:
                resum(v)

    resum(manifest)
    (tmp_path / "x.tallpack").write_bytes(with_manifest(bytes(raw), manifest))
    with tallpack.open(tmp_path / "x.tallpack") as fam:
        fam.get_tensor("a", "w")  # the rest of the archive reads
        with pytest.raises(FormatError, match="'flag'.*other than 0 and 1"):
            fam.get_tensor("a", "flag")


def test_chunks_are_checked_once_per_open_local_archive(tmp_path) -> None:
    """A local archive's chunks are checked the first time they are read while it is open; a
    damaged chunk is caught on that first read, by a reopened archive, and by verify."""
    import tallpack
    from tallpack.errors import IntegrityError

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    path = tmp_path / "f.tallpack"
    tallpack.pack({"w": w}, {"a": {"w": w + 0.1}, "b": {"w": w - 0.1}}, path, codec="raw")
    with tallpack.open(path) as fam:
        first = fam.get_tensor("a", "w")
        ref = fam.manifest.tensors[0].arrays["base"]
        c = ref.chunks[0]
        fam._c.checksum = lambda b: (_ for _ in ()).throw(AssertionError("checked again"))
        assert torch.equal(fam.get_tensor("a", "w"), first)  # base and merged: not checked again
    good = path.read_bytes()
    data = bytearray(good)
    data[c.offset] ^= 1
    path.write_bytes(bytes(data))
    with tallpack.open(path) as fam:
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            fam.get_tensor("a", "w")
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            fam.get_tensor("a", "w")  # a failed check is not remembered
        assert fam.verify()
    with tallpack.open(path) as fam:  # read while intact, then changed in place: verify still sees it
        path.write_bytes(good)
        fam.get_tensor("b", "w")
        with open(path, "r+b") as f:
            f.seek(c.offset)
            f.write(bytes([good[c.offset] ^ 1]))
        assert any("checksum mismatch" in p for p in fam.verify())


def test_damaged_plane_lengths_read_as_a_damaged_chunk(tmp_path, monkeypatch):
    """The cache sizes a chunk of byte planes from its plane lengths before it is decoded (and
    before its checksum is checked, reader._decode_planar): lengths garbled by damage still raise
    the checksum's IntegrityError, naming the tensor and chunk, not a complaint about the lengths."""
    from tallpack import reader

    monkeypatch.setattr(reader, "PLANAR_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 128, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 128, generator=g)} for t in ("a", "b")}
    path = tmp_path / "p.tallpack"
    tallpack.pack(base, tasks, path, chunk_elements=4096)
    with tallpack.open(path) as fam:
        c = fam.manifest.tensors[0].arrays["base"].chunks[1]
    raw = bytearray(path.read_bytes())
    raw[c.offset + 6] ^= 0x10  # in the first plane's length (after the 4-byte rotation)
    path.write_bytes(bytes(raw))
    with tallpack.open(path) as fam:
        with pytest.raises(IntegrityError, match=r"tensor 'w' \(base\).*chunk 1"):
            fam.state_dict("a")


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_damage_is_reported_once_by_the_name_a_user_knows(hf_family, small_family, tmp_path):
    """A damaged kept file is named as the folder names it (config.json of which inputs), once;
    a damaged residual under a derived merged vector names the archive once."""
    out = tmp_path / "hf.tallpack"
    tallpack.pack(hf_family["base"], hf_family["tasks"], out)
    with tallpack.open(out) as fam:
        digest = fam.files("cars")["config.json"]
        _flip(out, fam.manifest.files[digest].chunks[0].offset + 3)
    with tallpack.open(out) as fam:
        problems = fam.verify()
    assert len(problems) == 1 and "file 'config.json' of the base, task 'cars'" in problems[0], problems
    assert problems[0].count(str(out)) == 1, problems
    ex = tmp_path / "ex.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], ex, exact=True, chunk_elements=64)
    with tallpack.open(ex) as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "body.w")
        assert entry.tasks["a"].encoding == "tall-derived-merged"
        _flip(ex, entry.tasks["a"].extras["exact"].residual.chunks[0].offset + 3)
    with tallpack.open(ex) as fam, pytest.raises(IntegrityError) as e:
        fam.get_tensor("b", "body.w")
    assert str(e.value).count(str(ex)) == 1 and "'body.w'" in str(e.value), str(e.value)


def _deep(n: int) -> object:
    x: object = 1
    for _ in range(n):
        x = {"a": x}
    return x


@pytest.mark.parametrize("value", [2**70, -(2**63) - 1, float("nan"), float("inf"), _deep(63), "x\udc80", b"\x00",
                                   "\ud800\udc00"],
                         ids=["big", "small", "nan", "inf", "deep", "surrogate", "bytes", "surrogate pair"])
def test_metadata_a_reader_would_refuse_is_refused_by_pack(small_family, tmp_path, value):
    """Spec §3, §7: an archive holds only JSON its readers take back; user metadata that breaks
    it is one error naming the key, and nothing is written. (A surrogate pair given as two code
    points was stored, and read back as one other character.)"""
    out = tmp_path / "m.tallpack"
    with pytest.raises(tallpack.errors.InvalidArgumentError, match=r"^metadata\['k'\]: ") as e:
        tallpack.pack(small_family["base"], {"a": small_family["tasks"]["a"]}, out, metadata={"k": value})
    assert "\n" not in str(e.value)
    assert not out.exists()
    tallpack.pack(small_family["base"], {"a": small_family["tasks"]["a"]}, out, metadata={"k": _deep(62)})
    with tallpack.open(out) as fam:  # the deepest that readers take
        assert fam.manifest.metadata == {"k": _deep(62)}


@pytest.mark.parametrize("text", ['{"x": 123456789012345678901234567890}', '{"x": NaN}', '{"x": Infinity}',
                                  '{"x": 1e999}', json.dumps(_deep(61)), "[" * 5000 + "]" * 5000],
                         ids=["big", "nan", "inf", "1e999", "deep", "very-deep"])
def test_a_config_json_readers_would_refuse_stays_a_folder_file(small_family, tmp_path, text, caplog):
    """A folder's config.json that the manifest cannot hold (spec §3) is kept only as a folder
    file, its bytes as they are, with a warning naming it: before, pack wrote an archive that no
    reader opened (or failed with an internal error on NaN)."""
    from safetensors.torch import save_file

    folder = tmp_path / "ft"
    folder.mkdir()
    save_file(small_family["tasks"]["a"], folder / "model.safetensors")
    (folder / "config.json").write_text(text)
    out = tmp_path / "c.tallpack"
    with caplog.at_level("WARNING", logger="tallpack"):
        tallpack.pack(small_family["base"], {"a": folder}, out, allow_mismatch=True)
    assert any("config.json: not kept in the archive's metadata" in r.getMessage() for r in caplog.records)
    with tallpack.open(out) as fam:
        assert "config" not in fam.task_info("a").metadata
        tallpack.write_task(fam, "a", tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_text() == text


def test_a_config_json_at_the_nesting_limit_stays_in_the_metadata(small_family, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "ft"
    folder.mkdir()
    save_file(small_family["tasks"]["a"], folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(_deep(60)))
    tallpack.pack(small_family["base"], {"a": folder}, tmp_path / "c.tallpack")
    with tallpack.open(tmp_path / "c.tallpack") as fam:
        assert fam.task_info("a").metadata["config"] == _deep(60)


@pytest.mark.parametrize("value", [2**64, float("nan"), _deep(70), "\udc80"])
def test_the_writer_never_renames_an_unreadable_archive_into_place(tmp_path, value):
    """The last guard (spec §7): the container writer parses its own manifest as readers do."""
    from tallpack.container import ContainerWriter
    from tallpack.errors import InvalidArgumentError

    out = tmp_path / "w.tallpack"
    with pytest.raises(InvalidArgumentError, match="w.tallpack"):
        with ContainerWriter(out) as w:
            w.finish({"format": "tallpack", "metadata": {"x": value}})
    assert list(tmp_path.iterdir()) == []


def test_the_writer_checks_its_manifest_as_the_reader_parses_it(tmp_path):
    """The writer's last guard runs the reader's parse of a manifest (``Manifest.from_dict``, given
    by the packer), so a value the manifest's rules refuse stops the rename too."""
    from tallpack.container import ContainerWriter
    from tallpack.errors import InvalidArgumentError
    from tallpack.manifest import Manifest

    out = tmp_path / "w.tallpack"
    with pytest.raises(InvalidArgumentError, match="w.tallpack: not written: readers would refuse its manifest"):
        with ContainerWriter(out) as w:
            w.finish({"format": "tallpack", "format_version": [1, 0], "tasks": [{"name": "a", "lambda": -1}]},
                     check=Manifest.from_dict)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("escape", ["\\udc80", "\\ud800", "\\uDBFF x", "\\ud83d\\u0041"])
def test_lone_surrogates_in_the_manifest_are_refused_at_open(archive, escape):
    """Spec §2: the manifest is UTF-8 JSON; a \\uD800-\\uDFFF escape not in a pair is no character,
    and a name holding one cannot be written to a safetensors header (one FormatError at open)."""
    import json as _json
    import zlib

    import zstandard

    raw = archive.read_bytes()
    m_off, m_len, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    text = zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]).decode()
    text = text.replace('"tasks":', f'"note":"a{escape}b","tasks":', 1)
    assert _json.loads(text)["note"]
    stored = zstandard.ZstdCompressor().compress(text.encode())
    archive.write_bytes(raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags, end))
    with pytest.raises(FormatError, match="lone surrogate") as e:
        tallpack.open(archive)
    assert "\n" not in str(e.value)


def test_surrogate_pairs_and_escaped_backslashes_are_fine(archive):
    rewrite_manifest(archive, lambda m: m["metadata"].update(emoji="\U0001F600", path="C:\\ud80"))
    with tallpack.open(archive) as fam:
        assert fam.manifest.metadata["emoji"] == "\U0001F600" and fam.manifest.metadata["path"] == "C:\\ud80"


@pytest.mark.parametrize("minor", [0, 11, 99])
def test_a_manifest_version_other_than_the_headers_is_refused(single_archive, minor):
    """Spec §3.1: format_version MUST equal the header's; open refuses what verify reported."""
    with tallpack.open(single_archive) as fam:
        major, header_minor = fam.format_version
    rewrite_manifest(single_archive, lambda m: m.update(format_version=[1, minor]))
    if minor == header_minor:
        tallpack.open(single_archive).close()
        return
    with pytest.raises(FormatError, match=rf"header says format 1\.{header_minor}, manifest says 1\.{minor}"):
        tallpack.open(single_archive)


def test_unknown_or_missing_codec_parameters_are_named(single_archive):
    """Spec §5: codec configs are closed; the error names the parameter and the codec."""
    def edit(m, params):
        _first_merged(m)["merged"]["codecs"] = [params]

    rewrite_manifest(single_archive, lambda m: edit(m, {"id": "planes-exp", "itemsize": 4, "level": 1, "window": 3}))
    with pytest.raises(FormatError, match=r"codec 'planes-exp': unknown parameter 'window'; it takes 'itemsize', 'level'$"):
        tallpack.open(single_archive)
    rewrite_manifest(single_archive, lambda m: edit(m, {"id": "planes-exp", "level": 1}))
    with pytest.raises(FormatError, match=r"codec 'planes-exp': parameter 'itemsize' missing$"):
        tallpack.open(single_archive)


@pytest.mark.parametrize("name", ["a\x85b.txt", "a\u2028b.txt", "a\u200bb.txt", "\ufeffa.txt", "a\u202eb.txt",
                                  "a\xa0b.txt", "a\U000e0041.txt", "a\x7f"])
def test_file_names_with_invisible_characters_are_refused_saying_so(archive, name):
    """Spec §3.6 lists the characters a folder file's name may not hold; the error says which, and
    no longer that the name leaves the folder."""
    with tallpack.open(archive) as fam:
        task = fam.tasks[0]
    rewrite_manifest(archive, lambda m: m["tasks"][0].__setitem__("files", {name: "0" * 64}))
    with pytest.raises(FormatError, match=rf"task '{task}': file name .* holds U\+{ord(name.strip('ab.tx')[0]):04X}, "
                                          r"a control or invisible format character \(spec §3\.6\)$"):
        tallpack.open(archive)


@pytest.mark.parametrize("name", ["caf\xe9.txt", "a b.txt", "a\ue000.txt", "\u4e2d\u6587/x.json", "ab:c.txt"])
def test_file_names_of_printable_characters_are_taken(name):
    from tallpack.folders import check_file_name

    assert check_file_name(name) == name


@pytest.mark.parametrize("how", ["cut 1", "cut 1000", "cut half", "manifest byte", "footer byte", "appended"])
def test_verify_of_an_open_archive_sees_its_ends_damaged_in_place(small_family, tmp_path, how):
    """A long-lived process that verifies its open archive (a health check) is told when the file
    was cut or its manifest or footer damaged since it opened it: a verify saying "intact" of a
    file no one can open again was wrong."""
    import shutil

    src = tmp_path / "src.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], src)
    p = tmp_path / "f.tallpack"
    shutil.copy(src, p)
    size = p.stat().st_size
    with tallpack.open(p) as fam:
        assert fam.verify() == []
        if how == "appended":
            with open(p, "ab") as f:
                f.write(b"\0" * 100)
        elif how.startswith("cut"):
            os.truncate(p, size // 2 if how == "cut half" else size - int(how.split()[1]))
        else:
            at = size - (300 if how == "manifest byte" else 10)
            with open(p, "r+b") as f:
                f.seek(at)
                b = f.read(1)
                f.seek(at)
                f.write(bytes([b[0] ^ 0xFF]))
        problems = fam.verify()
    assert len(problems) == 1 and str(p) in problems[0], problems
    with pytest.raises(tallpack.TallpackError):
        tallpack.open(p)


def test_a_damaged_chunk_read_without_the_cache_names_archive_and_task_once(tmp_path):
    """Single-task unpack reads with cache_bytes=0: a damaged group's error said "ARCHIVE: task
    'a', ARCHIVE: task 'a', ..."."""
    g = torch.Generator().manual_seed(0)
    base = {f"enc.{i}.w": torch.randn(64, 32, generator=g) for i in range(3)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    p = tmp_path / "f.tallpack"
    tallpack.pack(base, tasks, p)
    with tallpack.open(p) as fam:
        ref = next(e for e in fam.manifest.tensors if e.members).arrays["base"]
        at = ref.chunks[0].offset + ref.chunks[0].nbytes // 2
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0xFF
    p.write_bytes(bytes(raw))
    with tallpack.open(p, cache_bytes=0) as fam, pytest.raises(tallpack.IntegrityError) as e:
        fam.state_dict("a")
    assert str(e.value).count("task 'a'") == 1, str(e.value)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_of_an_exact_archive_finds_its_damage_whatever_order_the_files_list_tensors(small_family, tmp_path,
                                                                                          data):
    """verify checks each derived mask on the originals it rebuilds for their files' hashes, the
    tasks side by side; where the tasks' files list their tensors in other orders (or it may hold
    none of them waiting, ``WAITING_BYTES`` 0), the masks not checked on the way are derived again
    at the end: an intact archive is intact, a wrong set-bit count or a damaged residual is said
    once, naming its task and tensor."""
    from tallpack import originals
    from tallpack.encodings import exact

    paths = {}
    for t, sd in small_family["tasks"].items():
        paths[t] = tmp_path / f"{t}.ordered.safetensors"
        save_in_order(sd, paths[t], data.draw(st.permutations(list(sd)), label=f"order of {t}"))
    out = tmp_path / "o.tallpack"
    policy, exact.MASK_POLICY = exact.MASK_POLICY, "derive"  # every mask derived, none stored
    try:
        tallpack.pack(small_family["base_path"], paths, out, exact=True, chunk_elements=64, threads=1,
                      derive_merged=data.draw(st.booleans(), label="derive_merged"), overwrite=True)
    finally:
        exact.MASK_POLICY = policy
    with tallpack.open(out) as fam:
        derived = [(e.name, t, tt) for e in fam.manifest.tensors for t, tt in e.tasks.items()
                   if tt.encoding in ("tall-derived", "tall-derived-merged")]
        name, task, tt = data.draw(st.sampled_from(derived), label="damaged")
        chunk = tt.extras["exact"].residual.chunks[0]
    damage = data.draw(st.sampled_from(["none", "ones", "residual"]), label="damage")
    raw = bytearray(out.read_bytes())
    if damage == "ones":
        m_off, m_len, *_ = FOOTER.unpack(bytes(raw[-FOOTER.size:]))
        manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))
        next(e for e in manifest["tensors"] if e["name"] == name)["tasks"][task]["ones"] += 1
        raw = bytearray(with_manifest(bytes(raw), manifest))
    elif damage == "residual":
        raw[chunk.offset + chunk.nbytes // 2] ^= 0x10
    out.write_bytes(bytes(raw))
    old, originals.WAITING_BYTES = originals.WAITING_BYTES, data.draw(st.sampled_from([0, originals.WAITING_BYTES]))
    try:
        with tallpack.open(out) as fam:
            problems = fam.verify()
    finally:
        originals.WAITING_BYTES = old
    if damage == "none":
        assert problems == []
        return
    assert len(problems) == 1 and f"tensor {name!r}" in problems[0], problems
    if damage == "ones":
        assert f"task {task!r}, tensor {name!r}" in problems[0] and "set bits" in problems[0], problems
    else:
        assert "checksum mismatch" in problems[0], problems
