"""Golden archives of formats 1.0 to 1.14: the current reader, the JSON schema, and a reader written from
``spec/FORMAT.md`` alone must all agree with the expected state dicts, bit for bit.

The golden files are made by ``tests/golden/make_golden.py`` (run it only when the format changes).
"""

from __future__ import annotations

import importlib.util
import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors import safe_open

import tallpack
import xxhash
from tallpack.errors import FormatError, UnsupportedVersionError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
SCHEMA = ROOT / "spec" / "manifest.schema.json"
NAMES = ["v1_0_ta", "v1_0_ties_raw", "v1_1_ta_zstd", "v1_2_exact", "v1_3_planes", "v1_4_files", "v1_5_correction",
         "v1_6_derived", "v1_7_qtau", "v1_8_derived_merged", "v1_9_bitsplit", "v1_11_planes_exp",
         "v1_12_groups", "v1_12_groups_ties_raw", "v1_13_shared_base", "v1_13_shared_base_ties", "v1_14_aliases",
         "v1_14_aliases_exact"]
#: The goldens with tensor groups (format 1.12, spec §3.7).
GROUPED = ["v1_12_groups", "v1_12_groups_ties_raw"]
#: The goldens whose ``shared`` entries hold ``base`` (format 1.13, spec §6.1.3).
SHARED_BASE = ["v1_13_shared_base", "v1_13_shared_base_ties"]


def _version(name: str) -> tuple[int, int]:
    major, minor = name[1:].split("_")[:2]
    return int(major), int(minor)


def _expected(name: str) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    with safe_open(str(GOLDEN / f"{name}.expected.safetensors"), "pt") as f:
        order = json.loads(f.metadata()["order"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return order, tensors


CHECKSUM = {"crc32": lambda b: zlib.crc32(b) & 0xFFFFFFFF, "xxh3-64": lambda b: xxhash.xxh3_64_intdigest(b)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# -- the current reader ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_reader_matches_expected(name: str) -> None:
    order, expected = _expected(name)
    seen = set()
    with tallpack.open(GOLDEN / f"{name}.tallpack") as fam:
        assert fam.format_version == _version(name)
        assert list(fam.tasks) == list(order)
        assert fam.verify() == []
        for task in fam.tasks:
            sd = fam.state_dict(task)
            assert list(sd) == order[task], task
            for k, v in sd.items():
                want = expected[f"{task}/{k}"]
                assert v.dtype == want.dtype and v.shape == want.shape, (task, k)
                assert torch.equal(v, want) and _same(v, want), (task, k)
                seen.add(f"{task}/{k}")
            lazy = fam.state_dict(task, lazy=True)
            k = order[task][0]
            assert _same(lazy[k], expected[f"{task}/{k}"])
    assert seen == set(expected)


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    return mg


def _pack_again(name: str, tmp_path: Path) -> Path:
    """The golden archive ``name`` packed again from its inputs, as ``make_golden.py`` does."""
    out = tmp_path / "again.tallpack"
    (tmp_path / "inputs").mkdir()
    _make_golden().pack_inputs(name, out, tmp_path / "inputs")
    return out


#: Goldens packed with the fidelity dial: its choices follow the codecs' compressed sizes.
DIAL = {"v1_5_correction", "v1_7_qtau"}


@pytest.mark.parametrize("name", NAMES)
def test_current_writer_reproduces_expected(name: str, tmp_path: Path) -> None:
    """Packing the same inputs again rebuilds the same bits (the writer's numerics are stable).
    For the dial's goldens, wherever the writer makes the same choice as the golden (codec work
    may move the dial's choices, which follow compressed sizes), and every task meets the target."""
    out = _pack_again(name, tmp_path)
    order, expected = _expected(name)
    golden = MiniArchive(GOLDEN / f"{name}.tallpack").manifest
    same = 0
    with tallpack.open(out) as fam:
        for task in fam.tasks:
            sd = fam.state_dict(task)
            assert list(sd) == order[task]
            for k, v in sd.items():
                if name in DIAL and _choice(fam.manifest.to_dict(), k, task) != _choice(golden, k, task):
                    continue
                assert _same(v, expected[f"{task}/{k}"]), (task, k)
                same += 1
            if name in DIAL:
                assert fam.task_info(task).fidelity["weight"] >= fam.manifest.stats["dial"]["target"]
    assert same >= len(expected) // 2


def _holder(manifest: dict, name: str) -> dict:
    """The tensor entry that holds tensor ``name``: its own, or (format 1.12) its group's."""
    for e in manifest["tensors"]:
        if e["name"] == name and "members" not in e or any(m[0] == name for m in e.get("members", ())):
            return e
    raise KeyError(name)


def _choice(manifest: dict, name: str, task: str) -> tuple:
    """What a dial archive stores for one task and tensor: encoding, bits, correction kind and bits."""
    tt = _holder(manifest, name)["tasks"][task]
    c = tt.get("correction", {})
    return tt["encoding"], tt.get("bits"), c.get("kind"), c.get("bits")


# -- the JSON schema -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", NAMES)
def test_manifest_matches_schema(name: str, validator) -> None:
    manifest = MiniArchive(GOLDEN / f"{name}.tallpack").manifest
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    with tallpack.open(GOLDEN / f"{name}.tallpack") as fam:
        assert fam.manifest.to_dict() == manifest  # the schema describes what to_dict writes


def test_schema_rejects_broken_manifests(validator) -> None:
    good = MiniArchive(GOLDEN / "v1_0_ta.tallpack").manifest

    def broken(edit) -> bool:
        m = json.loads(json.dumps(good))
        edit(m)
        return not validator.is_valid(m)

    assert validator.is_valid(good)
    assert broken(lambda m: m.pop("tensors"))
    assert broken(lambda m: m.update(format="other"))
    assert broken(lambda m: m["tensors"][0]["base"].update(chunk_elements=60))
    assert broken(lambda m: m["tensors"][0]["base"]["codecs"][1].update(window_log=20))
    assert broken(lambda m: m["tensors"][0]["base"]["chunks"][0].append(1))
    assert broken(lambda m: m["tensors"][0]["tasks"]["cars"].pop("mask"))
    assert broken(lambda m: m["tensors"][0]["merged"].update(dtype="bfloat16"))
    assert broken(lambda m: m["tasks"][0].update(keys="embed.weight"))
    q = MiniArchive(GOLDEN / "v1_7_qtau.tallpack").manifest
    dropped = next(i for i, e in enumerate(q["tensors"]) if e["kind"] == "merged" and "merged" not in e)

    def broken_q(edit) -> bool:
        m = json.loads(json.dumps(q))
        edit(m["tensors"][dropped])
        return not validator.is_valid(m)

    assert validator.is_valid(q)
    assert broken_q(lambda e: e["tasks"]["arc"].pop("codes"))
    assert broken_q(lambda e: e["tasks"]["arc"].update(bits=9))
    assert broken_q(lambda e: e["tasks"]["arc"]["scales"].update(dtype="bfloat16"))
    assert broken_q(lambda e: e["tasks"]["arc"].update(encoding="tall", mask={**e["base"], "dtype": "bool"}, ones=0))
    assert not broken_q(lambda e: e.update(merged={**e["base"], "dtype": "float32"}))  # with it, fine
    # unknown keys are allowed: minor versions add them
    assert not broken(lambda m: m.update(new_key={"x": 1}) or m["tasks"][0].update(extra=1))
    # 1.8: merged is absent exactly where every task entry is tall-derived-merged
    dm = MiniArchive(GOLDEN / "v1_8_derived_merged.tallpack").manifest
    assert validator.is_valid(dm)
    for edit in (lambda e: e.update(merged=e["base"]), lambda e: e.update(counts=e["base"]),
                 lambda e: e["tasks"]["cb"].update(encoding="tall-derived")):
        m = json.loads(json.dumps(dm))
        edit(m["tensors"][0])
        assert not validator.is_valid(m)


def _group_edits() -> dict[str, Callable[[dict], None]]:
    """Ways to break the 1.12 golden's first group (float32: members at 0, 120, 128, 176 of 200)."""
    def member(i: int, value) -> Callable[[dict], None]:
        return lambda m: m["tensors"][_first_group(m)]["members"].__setitem__(i, value)

    def group(edit: Callable[[dict], None]) -> Callable[[dict], None]:
        return lambda m: edit(m["tensors"][_first_group(m)])

    return {
        "offset not a multiple of 8": member(1, ["block.0.scale", 124, []]),
        "overlapping members": member(1, ["block.0.scale", 112, []]),
        "member not a list": member(1, {"name": "block.0.scale", "offset": 120, "shape": []}),
        "member of two values": member(1, ["block.0.scale", 120]),
        "negative offset": member(0, ["embed.weight", -8, [12, 10]]),
        "member past the group's end": member(3, ["block.2.norm", 184, [2, 3, 4]]),
        "members without requires": lambda m: m.pop("requires"),
        "group not flat": group(lambda g: _reshape(g, [10, 20])),
        "a key naming a group": lambda m: m["tasks"][0]["keys"].append(m["tensors"][_first_group(m)]["name"]),
        "a group named as a member": group(lambda g: g.update(name="block.0.bias")),
        "a member named as an entry": member(1, ["extra.bias", 120, []]),
    }


def _reshape(group: dict, shape: list[int]) -> None:
    """Give a group's task entries and arrays another shape of as many elements."""
    for tt in group["tasks"].values():
        tt.update(shape=shape)
        tt["mask"].update(shape=shape)
    for k in ("base", "merged"):
        group[k].update(shape=shape)


#: Edits of ``_group_edits`` that JSON Schema cannot see: they compare members with each other or
#: with N, or names across entries and tasks.
SCHEMA_BLIND = {"overlapping members", "member past the group's end", "a key naming a group",
                "a group named as a member", "a member named as an entry"}


def _first_group(m: dict) -> int:
    return next(i for i, e in enumerate(m["tensors"]) if "members" in e)


def test_schema_checks_groups(validator) -> None:
    """Format 1.12: a grouped manifest is valid; broken members, ``requires`` and flat shapes are not
    (overlaps and ends are for readers: a schema does not compare array items)."""
    good = MiniArchive(GOLDEN / "v1_12_groups.tallpack").manifest
    assert validator.is_valid(good)
    for what, edit in _group_edits().items():
        m = json.loads(json.dumps(good))
        edit(m)
        assert validator.is_valid(m) == (what in SCHEMA_BLIND), what
    for requires in ("groups", ["groups", "groups"], [1], []):
        assert not validator.is_valid({**good, "requires": requires}), requires
    assert validator.is_valid({**good, "requires": ["groups", "later"]})  # readers refuse it; the schema allows


# -- an independent reader, written from spec/FORMAT.md only ---------------------------------------
# It uses struct, zlib, json, zstandard and numpy; nothing from tallpack.

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8}
NP = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
      "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1",
      "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}  # bfloat16: raw bits
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
EXPONENT = {"float64": (11, 52), "float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7)}
#: The features of ``requires`` this reader implements (§3.1).
KNOWN_REQUIRES = {"groups", "aliases"}


class NeedsNewerReader(Exception):
    """The archive requires a feature this reader does not implement (§3.1)."""


class MiniArchive:
    def __init__(self, path: Path):
        self.buf = path.read_bytes()
        size = len(self.buf)
        assert size >= 48
        magic, major, minor, _reserved = struct.unpack_from("<8sHHI", self.buf, 0)
        assert magic == b"TALLPACK" and major == 1
        m_off, m_len, m_crc, flags, end = struct.unpack_from("<QQII8s", self.buf, size - 32)
        assert end == b"TALLPEND"
        assert 16 <= m_off and m_off + m_len <= size - 32 and m_len <= 256 << 20
        self.data_end = m_off
        stored = self.buf[m_off : m_off + m_len]
        assert zlib.crc32(stored) & 0xFFFFFFFF == m_crc
        if flags & 1:
            announced = zstandard.frame_content_size(stored)
            assert 0 <= announced <= 256 << 20
            raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=announced)
            assert len(raw) == announced
        else:
            raw = stored
        self.manifest = json.loads(raw.decode("utf-8"))
        assert self.manifest["format"] == "tallpack" and self.manifest["format_version"][0] == 1
        requires = self.manifest.get("requires", [])  # §3.1: checked before anything else is used
        assert isinstance(requires, list) and all(isinstance(r, str) and len(r) <= 4096 for r in requires)
        assert len(set(requires)) == len(requires)
        if set(requires) - KNOWN_REQUIRES:
            raise NeedsNewerReader(f"the archive requires {sorted(set(requires) - KNOWN_REQUIRES)}")
        self.tensors: dict[str, dict] = {}  # every entry by its name, groups included
        for t in self.manifest["tensors"]:
            assert t["name"] not in self.tensors
            self.tensors[t["name"]] = t
        #: §3.7: each group member's name -> (its group's name, offset, shape)
        self.members: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        for t in self.manifest["tensors"]:
            if "members" in t:
                assert "groups" in requires
                for m, offset, shape in _members(t):
                    assert m not in self.tensors and m not in self.members
                    self.members[m] = (t["name"], offset, shape)
        #: §3.8: each alias -> its target, a stored tensor (an entry without members, or a member)
        self.aliases: dict[str, str] = self.manifest.get("aliases", {})
        assert isinstance(self.aliases, dict)
        assert not self.aliases or "aliases" in requires
        for alias, target in self.aliases.items():
            assert isinstance(alias, str) and isinstance(target, str) and len(alias) <= 4096 and len(target) <= 4096
            assert alias != target and alias not in self.tensors and alias not in self.members
            assert target not in self.aliases
            assert target in self.members or (target in self.tensors and "members" not in self.tensors[target])
        for info in self.manifest["tasks"]:  # §3.2: a key names a plain entry or a member, never a group
            assert len(set(info["keys"])) == len(info["keys"])
            for k in info["keys"]:
                if k in self.aliases:  # §3.8: listed with its target, which the lines below check
                    assert self.aliases[k] in info["keys"]
                    continue
                assert k in self.members or "members" not in self.tensors[k]
                assert info["name"] in self.entry(k)["tasks"]
        spans = sorted((c[0], c[1]) for t in self.manifest["tensors"] for ref in self._refs(t) for c in ref["chunks"])
        end_prev = 16
        for off, n in spans:
            assert off >= end_prev and off + n <= self.data_end
            end_prev = off + n

    def entry(self, name: str) -> dict:
        """The tensor entry that holds tensor ``name``: its own, or its group's (§3.7); an alias's
        is its target's (§3.8)."""
        name = self.aliases.get(name, name)
        return self.tensors[self.members[name][0] if name in self.members else name]

    @staticmethod
    def _refs(t: dict) -> list[dict]:
        refs = [t[k] for k in ("base", "merged", "counts", "data") if k in t]
        for tt in t["tasks"].values():
            refs += [tt[k] for k in ("mask", "data", "codes", "scales") if k in tt]
            refs += [v for k, v in tt.get("correction", {}).items() if isinstance(v, dict)]
            if "exact" in tt:
                refs.append(tt["exact"]["residual"])
        return refs

    @staticmethod
    def _decode(stored: bytes, codecs: list[dict], size: int) -> bytes:
        sizes = [size]  # sizes[j]: the input size of codec j (the decoded size of chunk is sizes[0])
        for c in codecs[:-1]:
            if c["id"] == "bitpack":
                sizes.append(-(-sizes[-1] // 8))
            elif c["id"] == "bytegroup":
                sizes.append(sizes[-1])
            else:
                raise AssertionError(f"{c['id']} cannot precede another codec")
        out = stored
        for c, s in zip(reversed(codecs), reversed(sizes)):
            if c["id"] == "zstd":
                assert set(c) <= {"id", "level"}
                out = _frame(out, s)
            elif c["id"] == "bytegroup":
                k = c["itemsize"]
                assert len(out) == s and s % k == 0
                out = np.frombuffer(out, np.uint8).reshape(k, s // k).T.tobytes()
            elif c["id"] == "bitpack":
                assert len(out) == -(-s // 8)
                out = np.unpackbits(np.frombuffer(out, np.uint8), count=s, bitorder="little").tobytes()
            elif c["id"] in ("planes", "planes-exp"):  # k u32 lengths, then each plane verbatim (length n) or one zstd frame
                assert set(c) <= {"id", "itemsize", "level"}
                k = c["itemsize"]
                assert c["id"] == "planes" or k in (2, 4)
                n = s // k
                prefix = 4 if c["id"] == "planes-exp" else 0  # planes-exp: the rotation r, a u32
                lengths = struct.unpack_from(f"<{k}I", out, prefix)
                assert prefix + 4 * k + sum(lengths) == len(out)
                planes, pos = [], prefix + 4 * k
                for length in lengths:
                    piece = out[pos : pos + length]
                    planes.append(np.frombuffer(piece if length == n else _frame(piece, n), np.uint8))
                    pos += length
                if c["id"] == "planes-exp":  # §5: planes S and T of rotation r give the top two bytes
                    (r,) = struct.unpack_from("<I", out, 0)
                    assert 1 <= r <= 7
                    s_, t_ = planes[-2].astype(np.uint16), planes[-1].astype(np.uint16)
                    keep = 0xFF >> r
                    planes[-1] = ((s_ & (0xFF ^ keep)) | (t_ >> r)).astype(np.uint8)
                    planes[-2] = (((t_ << (8 - r)) & 0xFF) | (s_ & keep)).astype(np.uint8)
                out = np.stack(planes, axis=1).tobytes()
            elif c["id"] == "bitsplit":
                out = _bitsplit(out, c, s)
            else:
                raise AssertionError(f"unknown codec {c['id']}")
            assert len(out) == s
        return out

    def array(self, ref: dict) -> np.ndarray:
        """The array's elements as numpy (bfloat16 as uint16 bit patterns), in its shape."""
        shape, ce, isz = tuple(ref["shape"]), ref["chunk_elements"], ITEMSIZE[ref["dtype"]]
        numel = math.prod(shape)
        assert ce > 0 and ce % 8 == 0 and len(ref["chunks"]) == -(-numel // ce)
        parts = []
        for i, (off, n, crc) in enumerate(ref["chunks"]):
            stored = self.buf[off : off + n]
            assert CHECKSUM[self.manifest.get("checksum", "crc32")](stored) == crc, "checksum before decoding"
            chunk_numel = min(ce, numel - i * ce)
            parts.append(self._decode(stored, ref["codecs"], chunk_numel * isz))
        return np.frombuffer(b"".join(parts), NP[ref["dtype"]]).reshape(shape)

    def tensor(self, task: str, name: str) -> tuple[str, np.ndarray]:
        if name in self.aliases:  # §3.8: the target's tensor of that task
            return self.tensor(task, self.aliases[name])
        if name in self.members:  # §3.7: the member's run of its group rebuilt whole, in its shape
            group, offset, shape = self.members[name]
            dtype, flat = self.tensor(task, group)
            return dtype, flat.reshape(-1)[offset : offset + math.prod(shape)].reshape(shape)
        entry = self.tensors[name]
        tt = entry["tasks"][task]
        if tt["encoding"] == "dense":
            return tt["dtype"], self.array(tt["data"])
        if tt["encoding"] == "shared":
            return tt["dtype"], self.array(entry["data"])
        b32 = _to_f32(self.array(entry["base"]), entry["base"]["dtype"])
        if tt["encoding"] == "qtau":  # §6.1.8: f32(B) + deQ, deQ[i] = f32(u_i - 2^(bits-1)) * scale
            return tt["dtype"], _from_f32(b32 + _deq(self, tt).reshape(b32.shape), tt["dtype"])
        assert tt["encoding"] in ("tall", "tall-derived", "tall-derived-merged")
        if tt["encoding"] == "tall-derived-merged":  # §6.1.9: no stored merged vector
            assert "merged" not in entry and "counts" not in entry
            merged = self.derived_merged(name)["merged"]
        else:
            merged = self.array(entry["merged"])
        if tt["encoding"] == "tall":
            mask = self.array(tt["mask"])
        else:  # §6.1.7 (and §6.1.9): the mask from the original (hash checked first), in float32 op by op
            dtype, x = self.exact_tensor(task, name)
            assert xxhash.xxh3_64_intdigest(np.ascontiguousarray(x).tobytes()) == tt["exact"]["xxh3"]
            tau = _to_f32(x.view(NP[dtype]), dtype) - b32
            mask = np.abs(tau) > np.float32(tt["lambda"]) * np.abs(merged - tau)
            assert int(mask.sum()) == tt["ones"]
        out = b32 + mask.astype(np.float32) * merged  # float32, round to nearest even, op by op
        corr = tt.get("correction")
        if corr is not None:  # §6.1.6: a second rounding, that of adding C
            if corr["kind"] == "exact":
                dtype, bits = self.exact_tensor(task, name)
                return dtype, bits.view(NP[dtype]) if dtype != "bfloat16" else bits
            n = out.size
            c = np.zeros(n, np.float32)
            if corr["kind"] == "sparse":
                gaps = self.array(corr["indices"]).astype(np.uint64)
                assert (gaps[1:] > 0).all()
                idx = np.cumsum(gaps)
                assert idx.size == 0 or int(idx[-1]) < n
                c[idx.astype(np.int64)] = self.array(corr["values"]).astype(np.float32)
            else:
                assert corr["kind"] == "quant"
                codes, scales, block = self.array(corr["codes"]), self.array(corr["scales"]), corr["block"]
                if corr["bits"] == 8:
                    q = codes.astype(np.float32)
                else:
                    q = np.empty(2 * codes.size, np.float32)
                    q[0::2], q[1::2] = (codes & 0x0F).astype(np.float32) - 8, (codes >> 4).astype(np.float32) - 8
                    q = q[:n]
                c = q * np.repeat(scales, block)[:n]
            out = (out.reshape(-1) + c).reshape(out.shape)
        return tt["dtype"], _from_f32(out, tt["dtype"])


    def derived_merged(self, name: str) -> dict[str, np.ndarray]:
        """§6.1.9: tau_MTL (and TIES counts) from every task's original, the tasks in the manifest's
        order, element by element in float32, every sum left to right from +0.0."""
        entry = self.tensors[name]
        b32 = _to_f32(self.array(entry["base"]), entry["base"]["dtype"])
        order = [t["name"] for t in self.manifest["tasks"] if t["name"] in entry["tasks"]]
        taus = []
        for t in order:
            dtype, x = self.exact_tensor(t, name)
            assert xxhash.xxh3_64_intdigest(np.ascontiguousarray(x).tobytes()) == entry["tasks"][t]["exact"]["xxh3"]
            taus.append(_to_f32(x.view(NP[dtype]), dtype) - b32)
        return _merge_vectors(self.manifest, order, taus)

    def exact_tensor(self, task: str, name: str) -> tuple[str, np.ndarray]:
        """§6.1.5: the original bits, as unsigned integers of the dtype's itemsize."""
        name = self.aliases.get(name, name)
        entry = self.tensors[name]
        tt = entry["tasks"][task]
        dtype, u = tt["dtype"], UINT[ITEMSIZE[tt["dtype"]]]
        if "exact" not in tt:
            assert tt["encoding"] in ("dense", "shared")
            return self.tensor(task, name)[0], self.tensor(task, name)[1].view(u)
        ex = tt["exact"]
        if ex["reference"] == "tall":
            r = self.tensor(task, name)[1]
        elif ex["reference"] == "base":
            r = _from_f32(_to_f32(self.array(entry["base"]), entry["base"]["dtype"]), dtype)
        else:
            r = np.zeros(tt["shape"], u)
        r = np.ascontiguousarray(r).reshape(-1).view(u)
        stored = self.array(ex["residual"]).reshape(-1)
        assert stored.dtype == u
        # undo the per-chunk order: stable sort by the reference's exponent field
        z = np.empty_like(stored)
        e, m = EXPONENT[dtype]
        ce = ex["residual"]["chunk_elements"]
        for a in range(0, z.size, ce):
            key = (r[a : a + ce] >> m) & ((1 << e) - 1) if ex["order"] == "exponent" else np.zeros(len(r[a : a + ce]))
            perm = np.argsort(key, kind="stable")
            z[a : a + ce][perm] = stored[a : a + ce]
        n = 8 * z.dtype.itemsize
        one, top = u(1), u(n - 1)
        if ex["transform"] == "xor":
            x = z ^ r
        else:  # zigzag-decoded difference of the ordered integers, modulo 2**n
            flip = lambda v: v ^ ((v >> top) * u((1 << (n - 1)) - 1))
            d = (z >> one) ^ (u(0) - (z & one))
            x = flip(flip(r) + d)
        return dtype, x.reshape(tt["shape"])


def _merge_vectors(manifest: dict, order: list[str], taus: list[np.ndarray]) -> dict[str, np.ndarray]:
    """§6.1.9's tau_MTL (and TIES counts) of the task vectors ``taus`` of the tasks ``order`` (in
    the manifest's order), element by element in float32, every sum left to right from +0.0."""
    def total(vs):
        out = np.float32(0.0) + vs[0]  # +0.0 + v_1: a -0.0 becomes +0.0
        for v in vs[1:]:
            out = out + v
        return out

    merge = manifest["merge"]
    if merge["method"] == "ta":
        return {"merged": total(taus)}
    assert merge["method"] == "ties" and len(merge["thresholds"]) == len(manifest["tasks"])
    thr = {t["name"]: np.float32(v) for t, v in zip(manifest["tasks"], merge["thresholds"])}
    trimmed = [tau * (np.abs(tau) >= thr[t]).astype(np.float32) for t, tau in zip(order, taus)]
    s = np.sign(total(trimmed))
    s = np.where(s == 0, np.float32(merge["majority_sign"]), s)
    kept = [r * np.where(s > 0, r > 0, r < 0).astype(np.float32) for r in trimmed]
    counts = sum((k != 0).astype(np.uint8) for k in kept).astype(np.uint8)
    return {"merged": total(kept), "counts": counts}


def _members(t: dict) -> list[tuple[str, int, tuple[int, ...]]]:
    """A group's members, checked (§3.7): the group is one flat tensor of N elements in every task
    entry and array; each member ``[name, offset, shape]`` starts at a multiple of 8, at or after
    the previous one's end, and ends within N."""
    shapes = {tuple(tt["shape"]) for tt in t["tasks"].values()}
    shapes |= {tuple(t[k]["shape"]) for k in ("base", "merged", "counts", "data") if k in t}
    assert t["tasks"] and len(shapes) == 1 and len(next(iter(shapes))) == 1
    (n,) = shapes.pop()
    assert isinstance(t["members"], list) and t["members"]
    out, end = [], 0
    for m in t["members"]:
        assert isinstance(m, list) and len(m) == 3
        name, offset, shape = m
        assert isinstance(name, str) and len(name) <= 4096
        assert isinstance(shape, list) and len(shape) <= 32 and all(type(d) is int and d >= 0 for d in shape)
        assert type(offset) is int and offset % 8 == 0 and offset >= end
        end = offset + math.prod(shape)
        assert end <= n
        out.append((name, offset, tuple(shape)))
    assert len({m for m, _, _ in out}) == len(out)
    return out


def _frame(stored: bytes, size: int) -> bytes:
    """One zstd frame announcing ``size`` bytes, and nothing after it."""
    assert zstandard.frame_content_size(stored) == size
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(stored)
    assert d.eof and not d.unused_data
    return out


def _bitsplit(stored: bytes, c: dict, size: int) -> bytes:
    """§5 ``bitsplit``, one element at a time: per block, a u32 length and its head bytes
    (verbatim or one zstd frame), then every element's low bits as one little-endian bit stream."""
    assert set(c) == {"id", "itemsize", "block"} and c["itemsize"] in (1, 2, 4)
    k, block = c["itemsize"], c["block"]
    n = size // k
    nb = -(-n // block)
    lengths = struct.unpack_from(f"<{nb}I", stored, 0)
    pos, heads = 4 * nb, b""
    for j, length in enumerate(lengths):
        count = min(block, n - j * block)
        assert length <= count
        piece = stored[pos : pos + length]
        heads += piece if length == count else _frame(piece, count)
        pos += length
    stream = int.from_bytes(stored[pos:], "little")
    at, values = 0, []
    for h in heads:
        length, t = h >> 2, h & 3
        assert length <= 8 * k and (length >= 3 or t < max(1, 1 << length >> 1))
        if length < 3:
            values.append(0 if length == 0 else (1 << (length - 1)) + t)
            continue
        w = length - 3
        values.append(((4 + t) << w) | ((stream >> at) & ((1 << w) - 1)))
        at += w
    assert len(stored) - pos == -(-at // 8) and stream >> at == 0
    return np.array(values, UINT[k]).astype(f"<u{k}").tobytes()


def _deq(mini: MiniArchive, tt: dict) -> np.ndarray:
    """§6.1.7: up to 4 bits the codes are one little-endian bit stream, code i in bits
    [i*bits, (i+1)*bits); from 5 bits, one byte each."""
    bits, block, n = tt["bits"], tt["block"], math.prod(tt["shape"])
    codes = mini.array(tt["codes"])
    if bits > 4:
        assert codes.size == n
        u = codes.astype(np.int64)
    else:
        stream = np.unpackbits(codes, bitorder="little")
        assert stream.size >= n * bits
        u = (stream[: n * bits].reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    scales = mini.array(tt["scales"]).astype(np.float32)
    return (u - (1 << (bits - 1))).astype(np.float32) * np.repeat(scales, block)[:n]


def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # round to nearest even on the bit pattern (no NaN in the golden data)
        assert not np.isnan(x).any()
        bits = x.view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(NP[dtype])  # float16: IEEE round to nearest even; float32: exact


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_spec_reader_rebuilds_every_tensor(name: str) -> None:
    order, expected = _expected(name)
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    assert [t["name"] for t in mini.manifest["tasks"]] == list(order)
    encodings = set()
    for info in mini.manifest["tasks"]:
        task = info["name"]
        assert info["keys"] == order[task]
        for k in info["keys"]:
            want = expected[f"{task}/{k}"]
            dtype, got = mini.tensor(task, k)
            encodings.add((mini.entry(k)["tasks"][task]["encoding"], dtype))
            assert dtype == str(want.dtype).removeprefix("torch.")
            assert got.shape == tuple(want.shape), (task, k)
            assert got.reshape(-1).view(np.uint8).tobytes() == _bits(want).tobytes(), (task, k)
    # the golden files cover every encoding and the common dtypes
    masked = {"v1_6_derived": "tall-derived", "v1_7_qtau": "qtau",
              "v1_8_derived_merged": "tall-derived-merged", "v1_9_bitsplit": "tall-derived-merged",
              "v1_14_aliases_exact": "tall-derived-merged"}.get(name, "tall")
    # 1.8's, 1.9's and the exact 1.14's goldens: every merged vector derived
    plain = set() if name in ("v1_8_derived_merged", "v1_9_bitsplit", "v1_14_aliases_exact") else {"tall"}
    assert {e for e, _ in encodings} == {"dense", "shared"} | plain | {masked}
    assert {d for e, d in encodings if e == masked} >= {"float32", "bfloat16", "float16"}


def test_spec_reader_covers_the_dials_fields() -> None:
    """The 1.5 golden holds sparse and quantized corrections; the 1.7 one qtau entries with codes
    bit-packed (2, 3, 4 bits) and a byte each (6, 8 bits), float16 and float32 scales, and tensors
    without a merged vector."""
    entries = MiniArchive(GOLDEN / "v1_5_correction.tallpack").manifest["tensors"]
    kinds = {(c["kind"], c.get("bits")) for e in entries for tt in e["tasks"].values() if (c := tt.get("correction"))}
    assert {k for k, _ in kinds} == {"sparse", "quant"}
    m = MiniArchive(GOLDEN / "v1_7_qtau.tallpack").manifest
    q = [(tt["bits"], tt["scales"]["dtype"])
         for e in m["tensors"] for tt in e["tasks"].values() if tt["encoding"] == "qtau"]
    assert {b for b, _ in q} >= {2, 3, 4, 6, 8} and {d for _, d in q} == {"float16", "float32"}
    assert any(e["kind"] == "merged" and "merged" not in e for e in m["tensors"])


@pytest.mark.parametrize("name", ["v1_2_exact", "v1_6_derived", "v1_8_derived_merged", "v1_9_bitsplit",
                                  "v1_14_aliases_exact"])
def test_spec_reader_rebuilds_the_originals_bit_for_bit(name: str) -> None:
    """The exact tier (format 1.2; with derived masks, 1.6; and merged vectors, 1.8; residuals in
    ``bitsplit``, 1.9; tied weights' aliases, 1.14) read by the spec-only reader: every original
    tensor, bit for bit."""
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    assert mini.manifest["format_version"] == list(_version(name))
    with safe_open(str(GOLDEN / f"{name}.originals.safetensors"), "pt") as f:
        originals = {k: f.get_tensor(k) for k in f.keys()}
    seen, refs, codecs = set(), set(), set()
    for info in mini.manifest["tasks"]:
        # in-memory inputs: tensors only; a .pt file (1.14's tied weights) is recorded as a file
        assert [f["role"] for f in info["exact"]["files"]] == (["torch"] if info["name"] == "hellaswag" else [])
        for k in info["keys"]:
            dtype, got = mini.exact_tensor(info["name"], k)
            want = originals[f"{info['name']}/{k}"]
            assert dtype == str(want.dtype).removeprefix("torch.")
            assert got.reshape(-1).view(np.uint8).tobytes() == _bits(want).tobytes(), (info["name"], k)
            seen.add(f"{info['name']}/{k}")
            ex = mini.tensors[mini.aliases.get(k, k)]["tasks"][info["name"]].get("exact")
            if ex:
                refs.add((ex["reference"], ex["transform"]))
                codecs.add((ex["residual"]["codecs"][0]["id"], dtype))
    assert seen == set(originals)
    if name == "v1_9_bitsplit":  # every floating dtype's residual in bitsplit (heads zstd-coded), against the base
        assert {c for c, _ in codecs} == {"bitsplit"} and {d for _, d in codecs} == {"float32", "bfloat16", "float16"}
        assert {r for r, _ in refs} == {"base"}
    else:  # both references are exercised (1.8's derived merged vectors need base or zero)
        want = {"v1_8_derived_merged": {"base", "zero"}, "v1_14_aliases_exact": {"base"}}.get(name, {"tall", "base"})
        assert {r for r, _ in refs} >= want
    with tallpack.open(GOLDEN / f"{name}.tallpack") as fam:
        for key, want in originals.items():
            t, k = key.split("/", 1)
            assert _same(fam.get_tensor(t, k, exact=True), want), key


def test_spec_reader_one_tall_and_one_dense() -> None:
    """The brief's minimum, spelled out: a bfloat16 TALL tensor and a task-own head."""
    order, expected = _expected("v1_0_ta")
    mini = MiniArchive(GOLDEN / "v1_0_ta.tallpack")
    dtype, got = mini.tensor("dtd", "block.0.weight")
    assert dtype == "bfloat16" and mini.tensors["block.0.weight"]["tasks"]["dtd"]["encoding"] == "tall"
    assert np.array_equal(got, expected["dtd/block.0.weight"].view(torch.int16).numpy().view(np.uint16))
    dtype, got = mini.tensor("dtd", "head.weight")
    assert dtype == "float32" and got.shape == (5, 10)
    assert np.array_equal(got, expected["dtd/head.weight"].numpy())


def test_golden_files_are_small() -> None:
    for p in GOLDEN.iterdir():
        if p.suffix in (".tallpack", ".safetensors"):
            assert p.stat().st_size < 50_000, p


def test_spec_worked_example_matches_golden_footer() -> None:
    """The footer bytes quoted in spec/FORMAT.md are those of the golden archive."""
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    block = text.split("**Worked example**", 1)[1].split("```", 2)[1]
    quoted = bytes.fromhex("".join(line.split("  ")[0] for line in block.strip().splitlines()))
    data = (GOLDEN / "v1_0_ta.tallpack").read_bytes()
    assert quoted == data[-32:]
    assert f"({len(data)} bytes)" in text.split("**Worked example**", 1)[1][:200]


@pytest.mark.parametrize("name", ["v1_0_ta", "v1_0_ties_raw", "v1_1_ta_zstd", *GROUPED, *SHARED_BASE, "v1_14_aliases",
                                  "v1_14_aliases_exact"])
def test_current_writer_writes_the_same_bytes(name: str, tmp_path: Path) -> None:
    """Packing the golden inputs again gives the committed archive byte for byte (data area and
    manifest, the writer's version string aside): archives of this and earlier writers are
    interchangeable. The fidelity figures, which are reported, not read back, agree to 1e-5: the
    compiled mask pass sums them in its own order (``tall.tall_mask_with_fidelity``)."""
    out = _pack_again(name, tmp_path)

    def parts(raw: bytes) -> tuple[bytes, dict, list]:
        m_off, m_len, _, flags, _ = struct.unpack("<QQII8s", raw[-32:])
        stored = raw[m_off : m_off + m_len]
        manifest = json.loads(zstandard.ZstdDecompressor().decompress(stored) if flags & 1 else stored)
        manifest["writer"] = ""
        figures = [t.pop("fidelity") for t in manifest["tasks"]]
        return raw[:m_off], manifest, figures

    want, got = parts((GOLDEN / f"{name}.tallpack").read_bytes()), parts(out.read_bytes())
    assert got[0] == want[0]
    assert got[1] == want[1]
    for g, w in zip(got[2], want[2]):
        assert g.keys() == w.keys() and all(g[k] == pytest.approx(w[k], rel=1e-5) for k in w)


def test_spec_reader_reads_the_folder_files() -> None:
    """Folder files (format 1.4) read by the spec-only reader: each stored content once, under its
    SHA-256, and each task's names mapped to the files its folder held."""
    with safe_open(str(GOLDEN / "v1_4_files.expected.safetensors"), "pt") as f:
        want = json.loads(f.metadata()["files"])
    mini = MiniArchive(GOLDEN / "v1_4_files.tallpack")
    blobs = {}
    for digest, ref in mini.manifest["files"].items():
        data = mini.array(ref).tobytes()
        assert hashlib.sha256(data).hexdigest() == digest
        blobs[digest] = data
    for info in mini.manifest["tasks"]:
        got = {name: blobs[digest].decode() for name, digest in info["files"].items()}
        assert got == want[info["name"]]
    shared = {info["files"]["tokenizer.json"] for info in mini.manifest["tasks"]}
    assert len(shared) == 1 and len(blobs) == len(want) + 2  # one tokenizer, a config per task and the base's


def test_spec_reader_derives_the_merged_vectors_bit_for_bit() -> None:
    """Format 1.8 (§6.1.9): the spec-only reader's derived TIES merged vectors and counts are those the
    reference writer would have stored (the same inputs packed with ``derive_merged=False``), and
    the TIES and consensus merged models of the current reader agree on both archives."""
    mini = MiniArchive(GOLDEN / "v1_8_derived_merged.tallpack")
    derived = [n for n, e in mini.tensors.items()
               if any(tt["encoding"] == "tall-derived-merged" for tt in e["tasks"].values())]
    assert len(derived) == 5 and mini.manifest["merge"]["method"] == "ties"
    mg = _make_golden()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stored.tallpack"
        spec = mg.ARCHIVES["v1_8_derived_merged"]
        base, fts = mg.family(spec["seed"], spec["tasks"], spec["head_rows"])
        tallpack.pack(base, fts, out, chunk_elements=mg.CHUNK, threads=1, **spec["pack"], derive_merged=False)
        stored = MiniArchive(out)
        assert stored.manifest["merge"] == mini.manifest["merge"]
        for n in derived:
            got = mini.derived_merged(n)
            assert got["merged"].tobytes() == stored.array(stored.tensors[n]["merged"]).astype(np.float32).tobytes(), n
            assert got["counts"].tobytes() == stored.array(stored.tensors[n]["counts"]).tobytes(), n
        with tallpack.open(GOLDEN / "v1_8_derived_merged.tallpack") as d, tallpack.open(out) as s:
            for model in ("ties", "consensus-ties"):
                md, ms = d.merged(model), s.merged(model)
                assert md.keys() == ms.keys() and all(_same(md[k], ms[k]) for k in md)


# -- tensor groups (format 1.12) --------------------------------------------------------------------

@pytest.mark.parametrize("name", GROUPED)
def test_golden_groups_cover_the_layout(name: str) -> None:
    """The 1.12 goldens hold what they check: ``requires``, a group each of float32, bfloat16 and
    float16 merged tensors (one 0-d) over several chunks, members across chunk boundaries, a merged
    tensor stored alone beside them, a group of shared tensors; and gaps that are zero in every
    array, as writers must write them."""
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    assert mini.manifest["requires"] == ["groups"] and mini.manifest["format_version"] == [1, 12]
    groups = [e for e in mini.manifest["tensors"] if "members" in e and e["kind"] == "merged"]
    shared = [e for e in mini.manifest["tensors"] if "members" in e and e["kind"] == "shared"]
    assert [len(e["members"]) for e in shared] == [3]
    sizes, across = {}, 0
    for g in groups + shared:
        first = g.get("base", g.get("data"))
        ce, (n,) = first["chunk_elements"], first["shape"]
        gaps = np.ones(n, bool)
        for _, o, s in g["members"]:
            gaps[o : o + math.prod(s)] = False
        assert gaps.any() and not mini.array(first).reshape(-1)[gaps].any()
    for g in groups:
        sizes[next(iter(g["tasks"].values()))["dtype"]] = len(g["members"])
        ce, (n,) = g["base"]["chunk_elements"], g["base"]["shape"]
        assert len(g["base"]["chunks"]) >= 3
        across += sum(o // ce != (o + math.prod(s) - 1) // ce for _, o, s in g["members"])
        gaps = np.ones(n, bool)
        for _, o, s in g["members"]:
            gaps[o : o + math.prod(s)] = False
        assert gaps.any()
        arrays = [g[k] for k in ("base", "merged", "counts") if k in g] + [tt["mask"] for tt in g["tasks"].values()]
        assert all(not mini.array(ref).reshape(-1)[gaps].any() for ref in arrays)
    assert sizes.keys() == {"float32", "bfloat16", "float16"} and min(sizes.values()) >= 3
    assert across >= 3 and any(s == [] for g in groups for _, _, s in g["members"])
    assert any(e["kind"] == "merged" and "members" not in e for e in mini.manifest["tensors"])


@pytest.mark.parametrize("name", GROUPED)
def test_groups_rebuild_as_tensors_stored_alone(name: str, tmp_path: Path) -> None:
    """§3.7: each member has the bits of the same tensor stored alone (``group=False``, an archive of
    format 1.11 or less without ``requires``), and the tasks' densities count no gap."""
    mg = _make_golden()
    spec = mg.ARCHIVES[name]
    base, fts = mg.family(spec["seed"], spec["tasks"], spec["head_rows"], spec["blocks"])
    out = tmp_path / "alone.tallpack"
    tallpack.pack(base, fts, out, chunk_elements=mg.CHUNK, threads=1, **spec["pack"], group=False)
    order, expected = _expected(name)
    grouped = {t["name"]: t for t in MiniArchive(GOLDEN / f"{name}.tallpack").manifest["tasks"]}
    with tallpack.open(out) as fam:
        assert fam.format_version < (1, 12) and "requires" not in fam.manifest.to_dict()
        for task in fam.tasks:
            sd = fam.state_dict(task)
            assert list(sd) == order[task] and all(_same(v, expected[f"{task}/{k}"]) for k, v in sd.items())
            assert fam.task_info(task).density == grouped[task]["density"]


def _rewritten(name: str, edit: Callable[[dict], None], out: Path) -> Path:
    """Golden ``name`` with its manifest edited, stored uncompressed (§1: flag bit 0 clear)."""
    raw = (GOLDEN / f"{name}.tallpack").read_bytes()
    m_off = struct.unpack_from("<Q", raw, len(raw) - 32)[0]
    manifest = MiniArchive(GOLDEN / f"{name}.tallpack").manifest
    edit(manifest)
    text = json.dumps(manifest).encode()
    out.write_bytes(raw[:m_off] + text + struct.pack("<QQII8s", m_off, len(text), zlib.crc32(text), 0, b"TALLPEND"))
    return out


def test_readers_refuse_what_they_do_not_know(tmp_path: Path) -> None:
    """§3.1: both readers refuse an archive that requires a feature they do not know (the reference
    one says to upgrade), and read it as it was without that name."""
    path = _rewritten("v1_12_groups", lambda m: m["requires"].append("later"), tmp_path / "later.tallpack")
    with pytest.raises(NeedsNewerReader):
        MiniArchive(path)
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        tallpack.open(path)
    same = _rewritten("v1_12_groups", lambda m: None, tmp_path / "same.tallpack")
    assert MiniArchive(same).members
    with tallpack.open(same) as fam:
        assert _same(fam.get_tensor("wsc", "block.0.scale"), _expected("v1_12_groups")[1]["wsc/block.0.scale"])


@pytest.mark.parametrize("what", list(_group_edits()))
def test_readers_refuse_broken_groups(what: str, tmp_path: Path) -> None:
    """§3.7: both readers refuse, when they open the archive, each way of breaking a group."""
    path = _rewritten("v1_12_groups", _group_edits()[what], tmp_path / "broken.tallpack")
    with pytest.raises(AssertionError):
        MiniArchive(path)
    with pytest.raises(FormatError):
        tallpack.open(path).close()


def test_majority_sign_is_written_as_an_integer(tmp_path: Path) -> None:
    """§6.1.9: s₀ ∈ {−1, 0, 1} is an integer, so the writer writes a JSON integer (a reader that
    types it as one reads tallpack's archives); the goldens' `-1.0` still reads the same, and a
    boolean is refused (§3: a boolean is not an integer)."""
    out = _pack_again("v1_0_ties_raw", tmp_path)
    raw = out.read_bytes()
    m_off, m_len, _, flags, _ = struct.unpack("<QQII8s", raw[-32:])
    stored = raw[m_off : m_off + m_len]
    text = (zstandard.ZstdDecompressor().decompress(stored) if flags & 1 else stored).decode()
    sign = json.loads(text)["merge"]["majority_sign"]
    assert type(sign) is int and re.search(rf'"majority_sign":{sign}[,}}]', text)
    assert type(MiniArchive(GOLDEN / "v1_0_ties_raw.tallpack").manifest["merge"]["majority_sign"]) is float
    order, expected = _expected("v1_0_ties_raw")
    as_int = _rewritten("v1_0_ties_raw", lambda m: m["merge"].update(majority_sign=int(m["merge"]["majority_sign"])),
                        tmp_path / "int.tallpack")
    with tallpack.open(as_int) as fam:
        for task in fam.tasks:
            assert all(_same(v, expected[f"{task}/{k}"]) for k, v in fam.state_dict(task).items())
    as_bool = _rewritten("v1_0_ties_raw", lambda m: m["merge"].update(majority_sign=True), tmp_path / "bool.tallpack")
    with pytest.raises(FormatError, match="majority_sign must be -1, 0 or 1, got True"):
        tallpack.open(as_bool)


def test_missing_ties_parameters_are_named(tmp_path: Path) -> None:
    """§6.1.9: a tall-derived-merged TIES archive without majority_sign is a format error that
    says what is missing."""
    path = _rewritten("v1_8_derived_merged", lambda m: m["merge"].pop("majority_sign"), tmp_path / "m.tallpack")
    with tallpack.open(path) as fam:
        assert fam.manifest.merge["method"] == "ties"
        with pytest.raises(FormatError, match=r"tensor '.*': merge: TIES majority_sign is missing from the manifest"):
            fam.state_dict(fam.tasks[0])


def _relaid(name: str, tmp_path: Path, tensor: str, key: str, chain: list[dict], encode, label: str = "relaid") -> Path:
    """Golden ``name`` with one dense array's chunks stored again with ``chain`` (``encode``: a
    chunk's decoded bytes to its stored bytes), appended to the data area."""
    raw = (GOLDEN / f"{name}.tallpack").read_bytes()
    m_off = struct.unpack_from("<Q", raw, len(raw) - 32)[0]
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    manifest = mini.manifest
    entry = next(t for t in manifest["tensors"] if t["name"] == tensor)
    ref = entry[key]
    data = mini.array(ref).tobytes()
    step = ref["chunk_elements"] * np.dtype(ref["dtype"]).itemsize
    area = bytearray(raw[:m_off])
    chunks = []
    for i in range(0, len(data), step):
        area += b"\0" * (-len(area) % 64)
        stored = encode(data[i : i + step])
        chunks.append([len(area), len(stored), zlib.crc32(stored) if manifest.get("checksum", "crc32") == "crc32"
                       else xxhash.xxh3_64_intdigest(stored)])
        area += stored
    ref.update(codecs=chain, chunks=chunks)
    area += b"\0" * (-len(area) % 64)
    text = json.dumps(manifest).encode()
    out = tmp_path / f"{name}.{label}.tallpack"
    out.write_bytes(bytes(area) + text + struct.pack("<QQII8s", len(area), len(text), zlib.crc32(text), 0, b"TALLPEND"))
    return out


def _planes(data: bytes, k: int, zstd_plane: int | None) -> bytes:
    """``planes`` (§5) of ``data``: every plane verbatim, but ``zstd_plane`` as a zstd frame even
    when that is longer than the plane."""
    planes = [data[j::k] for j in range(k)]
    stored = [zstandard.ZstdCompressor().compress(p) if j == zstd_plane else p for j, p in enumerate(planes)]
    return struct.pack(f"<{k}I", *map(len, stored)) + b"".join(stored)


def test_planes_chunks_are_bounded_as_the_spec_says(tmp_path: Path) -> None:
    """§5/§7: a `planes` chunk stores at most 4k + s bytes (a plane's frame is shorter than the
    plane, else it is stored verbatim); readers refuse a longer chunk at open. Random mantissa
    bytes do not compress: their frame is longer than the plane."""
    chain = [{"id": "planes", "itemsize": 4, "level": 1}]
    ok = _relaid("v1_0_ta", tmp_path, "embed.weight", "base", chain, lambda d: _planes(d, 4, None))
    order, expected = _expected("v1_0_ta")
    with tallpack.open(ok) as fam:
        assert all(_same(fam.get_tensor(t, "embed.weight"), expected[f"{t}/embed.weight"]) for t in fam.tasks)
    long = _relaid("v1_0_ta", tmp_path, "embed.weight", "base", chain, lambda d: _planes(d, 4, 0), "long")
    with pytest.raises(FormatError, match=r"'embed.weight' \(base\): chunk 0 stores \d+ bytes, which cannot decode"):
        tallpack.open(long)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_bytegroup_must_use_the_arrays_itemsize(k: int, tmp_path: Path) -> None:
    """§5: `bytegroup`'s k MUST equal the array's itemsize; readers refuse another at open."""
    chain = [{"id": "bytegroup", "itemsize": k}, {"id": "zstd", "level": 3}]
    path = _relaid("v1_0_ta", tmp_path, "embed.weight", "base", chain,
                   lambda d: zstandard.ZstdCompressor().compress(np.frombuffer(d, np.uint8).reshape(-1, k).T.tobytes()))
    with pytest.raises(FormatError, match=f"bytegroup itemsize {k} for float32 elements"):
        tallpack.open(path)


# -- merged models (§6.2's last item) ---------------------------------------------------------------

def _spec_merged_model(mini: MiniArchive, model: str, alpha: float, k: int) -> dict[str, np.ndarray]:
    """A merged model as §6.2's last item, §6.1.3 and §3.8 define it, for archives whose merged
    tensors are all ``tall``: each tensor every task has (a group's members, each its run), and the
    base-only ones, as element arrays of its dtype (bfloat16 as bit patterns); the aliases of those
    at their targets' values. d is tau_MTL (TIES: over max(counts, 1); consensus: where at least k
    masks are set); a ``shared`` entry with ``base`` (1.13) has T equal task vectors
    ``f32(data) - f32(base)``, with tau_MTL, counts and masks by §6.2's formulas; one without
    ``base`` is its ``data``; a ``base-only`` entry is the base."""
    manifest = mini.manifest
    tasks = [t["name"] for t in manifest["tasks"]]
    lam = {t["name"]: np.float32(t["lambda"]) for t in manifest["tasks"]}
    out: dict[str, np.ndarray] = {}
    for ename, e in mini.tensors.items():
        encodings = {tt["encoding"] for tt in e["tasks"].values()}
        if not e["tasks"]:  # base-only: theta_0
            flat, dtype = mini.array(e["base"]).reshape(-1), None
        elif set(e["tasks"]) != set(tasks) or encodings == {"dense"}:
            continue  # in some tasks only, or stored per task: no base to merge onto
        elif encodings == {"shared"} and "base" not in e:
            flat = mini.array(e["data"]).reshape(-1)
        else:
            b32 = _to_f32(mini.array(e["base"]), e["base"]["dtype"]).reshape(-1)
            if encodings == {"shared"}:  # 1.13: T equal task vectors, merged as a merged tensor's
                assert "members" not in e and e["base"]["shape"] == e["data"]["shape"]
                tau = _to_f32(mini.array(e["data"]), e["data"]["dtype"]).reshape(-1) - b32
                arrays = _merge_vectors(manifest, tasks, [tau] * len(tasks))
                mtl, counts = arrays["merged"], arrays.get("counts")
                masks = [np.abs(tau) > lam[t] * np.abs(mtl - tau) for t in tasks]
            else:
                assert encodings == {"tall"}
                mtl = mini.array(e["merged"]).astype(np.float32).reshape(-1)
                counts = mini.array(e["counts"]).reshape(-1) if "counts" in e else None
                masks = [mini.array(tt["mask"]).reshape(-1) for tt in e["tasks"].values()]
            d = mtl
            if model == "ties":
                d = mtl / np.maximum(counts.astype(np.float32), np.float32(1))
            if model.startswith("consensus"):
                d = (sum(m.astype(np.int64) for m in masks) >= k).astype(np.float32) * mtl
            prod = np.float32(alpha) * d  # r32: rounded to float32 before the sum
            flat = _from_f32(b32 + prod, e["base"]["dtype"])
        for member, offset, shape in _members(e) if "members" in e else [(ename, 0, tuple(e.get("base", e.get("data"))["shape"]))]:
            out[member] = flat[offset : offset + math.prod(shape)].reshape(shape)
    out |= {a: out[t] for a, t in mini.aliases.items() if t in out}
    return out


@pytest.mark.parametrize("name,models", [("v1_0_ta", ("ta", "consensus-ta")),
                                         ("v1_0_ties_raw", ("ties", "consensus-ties")),
                                         ("v1_12_groups", ("ta", "consensus-ta")),
                                         ("v1_12_groups_ties_raw", ("ties", "consensus-ties")),
                                         ("v1_13_shared_base", ("ta", "consensus-ta")),
                                         ("v1_13_shared_base_ties", ("ties", "consensus-ties")),
                                         ("v1_14_aliases", ("ta", "consensus-ta"))])
def test_spec_reader_builds_the_merged_models_bit_for_bit(name: str, models: tuple[str, str]) -> None:
    """§6.2: a merged tensor is ``cast(f32(θ₀) + r32(f32(α) × d))``, d the merged vector (TIES: over
    max(counts, 1); consensus, for TA and TIES alike: τ_MTL where at least k masks are set); a 1.13
    ``shared`` entry with ``base`` is built the same way from its T equal task vectors (§6.1.3); a
    1.14 alias is its target's tensor, the same object (§3.8). The reference reader's merged models
    are that, bit for bit, tensor for tensor, groups' members included."""
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    alpha, k = 0.7, 2
    with tallpack.open(GOLDEN / f"{name}.tallpack") as fam:
        for model in models:
            got = fam.merged(model, alpha=alpha, **({"k": k} if model.startswith("consensus") else {}))
            want = _spec_merged_model(mini, model, alpha, k)
            assert set(got) == set(want), (name, model, set(got) ^ set(want))
            for n, w in want.items():
                assert tuple(got[n].shape) == w.shape and _bits(got[n]).tobytes() == w.tobytes(), (name, model, n)
            assert all(got[a] is got[t] for a, t in mini.aliases.items() if t in got), (name, model)
            shared_base = [n for n, e in mini.tensors.items() if e["kind"] == "shared" and "base" in e]
            if name in SHARED_BASE:  # built from the base: not the tasks' value (what a 1.12 reader gives)
                assert len(shared_base) == 4
                assert all(not np.array_equal(want[n], mini.array(mini.tensors[n]["data"])) for n in shared_base)
                assert str(got["shifted.mixed"].dtype) == "torch.float32"  # theta_0's dtype, not the tasks'
            else:
                assert not shared_base


def test_an_entry_in_no_task_without_its_base_is_refused(tmp_path: Path) -> None:
    """§3.3: a base-only entry (``tasks: {}``) without ``base`` holds nothing; it is refused at open,
    not left out of merged models unnoticed (as an archive whose base was dropped would be)."""
    def drop(m: dict) -> None:
        entry = next(e for e in m["tensors"] if not e["tasks"])
        del entry["base"]
    path = _rewritten("v1_0_ties_raw", drop, tmp_path / "nobase.tallpack")
    with pytest.raises(tallpack.FormatError, match="base_only.weight.*in no task and holds no base"):
        tallpack.open(path)
    with tallpack.open(_rewritten("v1_0_ties_raw", lambda m: None, tmp_path / "same.tallpack")) as fam:
        assert "base_only.weight" in fam.merged("ties")


# -- shared entries with a base (format 1.13) -------------------------------------------------------

@pytest.mark.parametrize("name", SHARED_BASE)
def test_golden_shared_base_covers_the_layout(name: str) -> None:
    """The 1.13 goldens hold what they check (§6.1.3): ``shared`` entries with ``base`` of each
    floating dtype, one whose base is float32 and data float16, none a group's; ``shared`` entries
    without it beside them (the tensors the tasks left at the base's value); no ``requires`` name
    of 1.13 (an earlier reader opens the archive). The tasks read the data, never the base."""
    mini = MiniArchive(GOLDEN / f"{name}.tallpack")
    assert mini.manifest["format_version"] == [1, 13] and mini.manifest["requires"] == ["groups"]
    with_base = {n: e for n, e in mini.tensors.items() if e["kind"] == "shared" and "base" in e}
    assert sorted(with_base) == sorted(_make_golden().SHIFTED)
    assert {(e["base"]["dtype"], e["data"]["dtype"]) for e in with_base.values()} == {
        ("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float16")}
    assert all("members" not in e and e["base"]["shape"] == e["data"]["shape"] for e in with_base.values())
    assert any(e["kind"] == "shared" and "base" not in e and "members" not in e for e in mini.tensors.values())
    order, expected = _expected(name)
    for n, e in with_base.items():
        data = mini.array(e["data"])
        assert not np.array_equal(mini.array(e["base"]).view(np.uint8), data.view(np.uint8))
        for task in e["tasks"]:
            assert mini.tensor(task, n)[1].tobytes() == data.tobytes() == _bits(expected[f"{task}/{n}"]).tobytes()


# -- aliases (format 1.14) ----------------------------------------------------------------------------

def test_golden_aliases_cover_the_layout() -> None:
    """The 1.14 golden holds what it checks (§3.8): ``requires`` with ``"aliases"``; aliases whose
    targets are a merged tensor stored alone, a merged group's member and a shared group's member;
    the pair only the first task ties stored as two tensors; the sizes counting a tied tensor once."""
    mg = _make_golden()
    mini = MiniArchive(GOLDEN / "v1_14_aliases.tallpack")
    m = mini.manifest
    assert m["format_version"] == [1, 14] and m["requires"] == ["groups", "aliases"]
    assert mini.aliases == mg.TIED
    assert "members" not in mini.tensors["mixed.weight"] and mini.tensors["mixed.weight"]["kind"] == "merged"
    assert mini.entry("lm_head.weight")["kind"] == "merged" and "embed.weight" in mini.members
    assert mini.entry("frozen.tied")["kind"] == "shared" and "frozen.weight" in mini.members
    copy, of = mg.TIED_FIRST
    assert copy not in mini.aliases and (copy in mini.members or copy in mini.tensors)
    assert all(copy in info["keys"] and set(mg.TIED) <= set(info["keys"]) for info in m["tasks"])
    assert [t["source"]["format"] for t in m["tasks"]] == ["torch", "dict", "dict"] and m["base"]["format"] == "torch"
    base, fts = mg.inputs("v1_14_aliases")
    stored = len(mini.members) + sum("members" not in e for e in mini.tensors.values())
    assert sum(m["stats"]["kinds"].values()) == stored == len(base) - 1 - len(mg.TIED) + 1  # base_only out, extra.bias in
    once = lambda sd: sum(v.numel() * v.element_size() for k, v in sd.items() if k not in mg.TIED)
    assert m["base"]["bytes"] == once(base) and [t["source"]["bytes"] for t in m["tasks"]] == [once(sd) for sd in fts.values()]


def test_aliases_read_as_their_targets() -> None:
    """§3.8: for a task whose keys list an alias, the tensor is the target's of that task; the reference
    reader returns the same tensor object (memory shared, as ``torch.load`` gives them), in the state
    dict and its lazy form, and the stored-apart pair as two tensors."""
    mg = _make_golden()
    order, expected = _expected("v1_14_aliases")
    mini = MiniArchive(GOLDEN / "v1_14_aliases.tallpack")
    with tallpack.open(GOLDEN / "v1_14_aliases.tallpack") as fam:
        for task in fam.tasks:
            sd = fam.state_dict(task)
            for alias, target in mg.TIED.items():
                assert sd[alias] is sd[target], (task, alias)
                assert _same(sd[alias], expected[f"{task}/{target}"]) and _same(expected[f"{task}/{alias}"], sd[target])
                assert mini.tensor(task, alias)[1].tobytes() == mini.tensor(task, target)[1].tobytes()
                assert _same(fam.get_tensor(task, alias), sd[target])
            assert sd[mg.TIED_FIRST[0]] is not sd[mg.TIED_FIRST[1]]
            lazy = fam.state_dict(task, lazy=True)
            assert all(_same(lazy[a], sd[a]) for a in mg.TIED)


def _alias_edits() -> dict[str, Callable[[dict], None]]:
    """Ways to break the 1.14 golden's aliases (§3.8), each a rule a reader checks at open."""
    def alias(name: str, target) -> Callable[[dict], None]:
        return lambda m: m["aliases"].__setitem__(name, target)

    def drop_key(m: dict) -> None:  # the first task lists lm_head.weight without embed.weight
        m["tasks"][0]["keys"].remove("embed.weight")

    return {
        "aliases without requires": lambda m: m["requires"].remove("aliases"),
        "aliases not an object": lambda m: m.update(aliases=[["lm_head.weight", "embed.weight"]]),
        "a target not a string": alias("lm_head.weight", 3),
        "an alias its own target": alias("lm_head.weight", "lm_head.weight"),
        "an alias named as an entry": alias("head.weight", "embed.weight"),
        "an alias named as a group": alias("tallpack.group.0", "embed.weight"),
        "an alias named as a member": alias("block.1.weight", "embed.weight"),
        "a target that is an alias": alias("wte.tied", "lm_head.weight"),
        "a target that is a group": alias("wte.tied", "tallpack.group.0"),
        "a target stored nowhere": alias("wte.tied", "wte.weight"),
        "a key listing an alias without its target": drop_key,
    }


#: Edits of ``_alias_edits`` that JSON Schema cannot see (names compared across the manifest).
ALIAS_SCHEMA_BLIND = {"an alias its own target", "an alias named as an entry", "an alias named as a group",
                      "an alias named as a member", "a target that is an alias", "a target that is a group",
                      "a target stored nowhere", "a key listing an alias without its target"}


@pytest.mark.parametrize("what", list(_alias_edits()))
def test_readers_refuse_broken_aliases(what: str, tmp_path: Path, validator) -> None:
    """§3.8: both readers refuse, when they open the archive, each way of breaking the aliases; the
    schema sees those that need no comparison of names."""
    assert "tallpack.group.0" in MiniArchive(GOLDEN / "v1_14_aliases.tallpack").tensors
    path = _rewritten("v1_14_aliases", _alias_edits()[what], tmp_path / "broken.tallpack")
    with pytest.raises(AssertionError):
        MiniArchive(path)
    with pytest.raises(FormatError):
        tallpack.open(path).close()
    manifest = MiniArchive(GOLDEN / "v1_14_aliases.tallpack").manifest
    _alias_edits()[what](manifest)
    assert validator.is_valid(manifest) == (what in ALIAS_SCHEMA_BLIND), what


def test_readers_before_aliases_refuse_them(tmp_path: Path, monkeypatch) -> None:
    """§3.1/§8: a reader that does not implement aliases (this one made a 1.13 reader) refuses the
    archive at open, before it reads a tensor; without aliases the same file is a 1.12 one that it reads."""
    monkeypatch.setattr(f"{__name__}.KNOWN_REQUIRES", {"groups"})
    with pytest.raises(NeedsNewerReader, match="aliases"):
        MiniArchive(GOLDEN / "v1_14_aliases.tallpack")
    assert MiniArchive(GOLDEN / "v1_12_groups.tallpack").members


def test_readers_refuse_a_shared_group_with_a_base(tmp_path: Path) -> None:
    """§6.1.3: a group of ``shared`` tensors holding ``base`` is refused at open by both readers
    (the reference reader's merged models ignored it: a group's members were taken as ``data``)."""
    def edit(m: dict) -> None:
        [g] = [e for e in m["tensors"] if e.get("members") and e["kind"] == "shared"][:1]
        g["base"] = dict(g["data"])

    path = _rewritten("v1_14_aliases", edit, tmp_path / "group_base.tallpack")
    with pytest.raises(AssertionError):
        MiniArchive(path)
    with pytest.raises(FormatError, match="group of shared tensors holds a base"):
        tallpack.open(path).close()
