"""Tied weights (format 1.14, spec §3.8): a tensor that ``torch.save`` stores once under two names
(GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) is packed once, and read back as
``torch.load`` gives it: both names, one tensor."""

import json
import zlib

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tallpack
from conftest import expected_reconstruction
from tallpack.container import FOOTER
from tallpack.errors import FormatError, TallpackError, UnsupportedVersionError

transformers = pytest.importorskip("transformers")

TIED, TARGET = "lm_head.weight", "transformer.wte.weight"
TASKS = ("t0", "t1", "t2", "t3")


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=5000, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _fine_tuned(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``base`` with a tenth of every weight moved a little."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.1)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


def _tie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    out[TIED] = out[TARGET]  # one tensor under two names, as the tied model's state_dict() gives
    return out


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    """A tied GPT-2 base and four fine-tunes, each ``torch.save(model.state_dict())``; and the
    same tensors untied (every name its own storage), the archive's computation before 1.14."""
    d = tmp_path_factory.mktemp("gpt2")
    base = {k: v.clone() for k, v in _gpt2().state_dict().items() if k != TIED}
    sds = {"base": _tie(base), **{t: _tie(_fine_tuned(base, i + 1)) for i, t in enumerate(TASKS)}}
    paths, untied = {}, {}
    for name, sd in sds.items():
        paths[name] = d / f"{name}.pt"
        torch.save(sd, paths[name])
        untied[name] = d / f"{name}_untied.pt"
        torch.save({k: v.clone() for k, v in sd.items()}, untied[name])
    back = torch.load(paths["t0"], weights_only=True)
    assert back[TIED].data_ptr() == back[TARGET].data_ptr()  # the file holds them once
    return {"dir": d, "paths": paths, "untied": untied, "sds": sds}


def _pack(fam, out, *, untied_tasks=(), untied_base=False, **kw):
    paths, untied = fam["paths"], fam["untied"]
    tasks = {t: (untied if t in untied_tasks else paths)[t] for t in TASKS}
    tallpack.pack((untied if untied_base else paths)["base"], tasks, out, **kw)
    return out


@pytest.fixture(scope="module")
def packed(gpt2_family, tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    return {"tied": _pack(gpt2_family, d / "tied.tallpack"),
            "untied": _pack(gpt2_family, d / "untied.tallpack", untied_tasks=TASKS, untied_base=True)}


def test_tied_weight_stored_once(gpt2_family, packed):
    """The archive is smaller than the untied one by about what the tied tensor costs there (its
    base, merged vector and four masks); the manifest names the alias, which needs format 1.14."""
    with tallpack.open(packed["tied"]) as fam, tallpack.open(packed["untied"]) as untied:
        assert fam.manifest.aliases == {TIED: TARGET}
        assert "aliases" in fam.manifest.requires and fam.format_version == (1, 14)
        assert TIED not in {e.name for e in fam.manifest.tensors}
        head = next(e for e in untied.manifest.tensors if e.name == TIED)
        cost = sum(ref.stored_nbytes for _, ref in head.all_arrays())
        saved = untied.size - fam.size
        assert 0.9 * cost < saved < 1.1 * cost, (saved, cost)
        assert fam.summary()["kinds"]["merged"] == untied.summary()["kinds"]["merged"] - 1
        assert fam.summary()["aliases"] == {TIED: TARGET}
        # the source bytes as the files hold them: the tied tensor once
        one = sum(t.numel() * t.element_size() for k, t in gpt2_family["sds"]["t0"].items() if k != TIED)
        assert fam.task_info("t0").source["bytes"] == one
        assert not untied.manifest.aliases and "aliases" not in untied.manifest.requires


def test_state_dict_shares_the_tied_tensor(gpt2_family, packed):
    """Each task's state dict is the TALL formula on the untied computation, in the checkpoint's
    order, with the alias the very tensor of its target (as torch.load gives it)."""
    sds = gpt2_family["sds"]
    want = expected_reconstruction(sds["base"], {t: sds[t] for t in TASKS}, {t: 0.4 for t in TASKS})
    with tallpack.open(packed["tied"]) as fam, tallpack.open(packed["untied"]) as untied:
        for t in TASKS:
            sd, ref = fam.state_dict(t), untied.state_dict(t)
            assert list(sd) == list(sds[t]) == fam.keys(t)
            assert sd[TIED] is sd[TARGET] and sd[TIED].data_ptr() == sd[TARGET].data_ptr()
            for k in sd:
                assert torch.equal(sd[k], ref[k]), k
                assert torch.equal(sd[k], want[t][k]), k
            assert torch.equal(fam.get_tensor(t, TIED), want[t][TIED])
            assert torch.equal(fam.get_slice(t, TIED)[3:7], want[t][TIED][3:7])
            assert fam.get_slice(t, TIED).get_shape() == list(want[t][TIED].shape)
            assert fam.tensor_spec(t, TIED) == fam.tensor_spec(t, TARGET)
            lazy = fam.state_dict(t, lazy=True)
            assert TIED in lazy and len(lazy) == len(sd)
            first = lazy[TIED]
            assert lazy[TARGET] is first and torch.equal(first, want[t][TIED])
        assert fam.base_tensor(TIED) is not None


def test_tied_model_loads_and_stays_tied(packed):
    """A strict load of the tied model works; with ``assign=True`` the tie stays, as after torch.load."""
    model = _gpt2()
    with tallpack.open(packed["tied"]) as fam:
        sd = fam.state_dict("t2")
        model.load_state_dict(sd, strict=True)
        model.load_state_dict(fam.state_dict("t2"), strict=True, assign=True)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        lazy_model = _gpt2()
        lazy_model.load_state_dict(fam.state_dict("t2", lazy=True), strict=True, assign=True)
        assert lazy_model.lm_head.weight.data_ptr() == lazy_model.transformer.wte.weight.data_ptr()
        assert torch.equal(lazy_model.lm_head.weight, sd[TIED])


def test_merged_model_has_both_names(packed):
    with tallpack.open(packed["tied"]) as fam, tallpack.open(packed["untied"]) as untied:
        for method in ("ta", "consensus-ta"):
            mg, ref = fam.merged(method, alpha=0.3), untied.merged(method, alpha=0.3)
            assert list(mg) == list(ref) and mg[TIED] is mg[TARGET]
            for k in mg:
                assert torch.equal(mg[k], ref[k]), k
        with_task = fam.merged("ta", alpha=0.3, task="t1")
        assert list(with_task) == fam.keys("t1") and with_task[TIED] is with_task[TARGET]
        assert fam.verify() == []


def test_unpack_and_merge_write_both_names(packed, tmp_path):
    """safetensors refuses shared tensors: unpack writes both names, each a copy, so that a strict
    load of the tied model works (and model.tie_weights() ties them again)."""
    with tallpack.open(packed["tied"]) as fam:
        tallpack.write_task(fam, "t0", tmp_path / "t0")
        tallpack.write_merged(fam, tmp_path / "merged", "ta", alpha=0.3)
        sd = fam.state_dict("t0")
    for folder in ("t0", "merged"):
        files = load_file(tmp_path / folder / "model.safetensors")
        assert TIED in files and torch.equal(files[TIED], files[TARGET])
        _gpt2().load_state_dict(files, strict=True)
    written = load_file(tmp_path / "t0" / "model.safetensors")
    assert all(torch.equal(written[k], sd[k]) for k in sd)


def test_exact_tier_gives_the_originals_tied(gpt2_family, tmp_path):
    out = _pack(gpt2_family, tmp_path / "exact.tallpack", exact=True)
    with tallpack.open(out) as fam:
        assert fam.manifest.aliases == {TIED: TARGET}
        for t in ("t0", "t3"):
            sd = fam.state_dict(t, exact=True)
            orig = torch.load(gpt2_family["paths"][t], weights_only=True)
            assert list(sd) == list(orig) and sd[TIED] is sd[TARGET]
            assert all(torch.equal(sd[k], orig[k]) for k in orig)
            assert torch.equal(fam.get_tensor(t, TIED, exact=True), orig[TIED])
        assert fam.verify() == []


def test_one_untied_task_falls_back_to_two_tensors(gpt2_family, tmp_path, caplog):
    """A task that does not tie the weight: both names stored as tensors, as before 1.14, and the
    archive is the one the untied family gives, byte for byte (paths left out)."""
    with caplog.at_level("DEBUG", logger="tallpack.sources"):
        out = _pack(gpt2_family, tmp_path / "one.tallpack", untied_tasks=("t2",), record_paths=False)
    assert any("does not tie them" in r.getMessage() and "'t2'" in r.getMessage() for r in caplog.records)
    same = _pack(gpt2_family, tmp_path / "all.tallpack", untied_tasks=TASKS, untied_base=True, record_paths=False)
    assert out.read_bytes() == same.read_bytes()
    with tallpack.open(out) as fam:
        assert not fam.manifest.aliases and "aliases" not in fam.manifest.requires
        sd = fam.state_dict("t0")
        assert sd[TIED] is not sd[TARGET] and torch.equal(sd[TIED], sd[TARGET])


class _Tied(torch.nn.Module):
    """A hand-made tied model, with a buffer that views part of the embeddings (no alias)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(300, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 300, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.head.weight = self.emb.weight


def test_hand_made_tied_model(tmp_path):
    """Exact aliases only: a view of part of the storage, or the transposed one, stays a tensor."""
    sds = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        m = _Tied(0)
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        sd = m.state_dict()
        sd["part"] = sd["emb.weight"][:10]  # same storage and offset, another shape
        sd["turned"] = sd["emb.weight"].t()  # same storage and offset, other strides
        torch.save(sd, tmp_path / f"{name}.pt")
        sds[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert sds["a"]["head.weight"].data_ptr() == sds["a"]["emb.weight"].data_ptr() == sds["a"]["part"].data_ptr()
    out = tmp_path / "f.tallpack"
    tallpack.pack(tmp_path / "base.pt", {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"}, out)
    want = expected_reconstruction(sds["base"], {t: sds[t] for t in "ab"}, {"a": 0.4, "b": 0.4})
    with tallpack.open(out) as fam:
        assert fam.manifest.aliases == {"head.weight": "emb.weight"}
        stored = {n for e in fam.manifest.tensors for n in ([m.name for m in e.members] or [e.name])}
        assert {"part", "turned", "emb.weight"} <= stored and "head.weight" not in stored
        for t in "ab":
            sd = fam.state_dict(t)
            assert list(sd) == list(sds[t])
            assert sd["head.weight"] is sd["emb.weight"]
            assert all(torch.equal(sd[k], want[t][k]) for k in sd)
        model = _Tied(5)
        model.load_state_dict({k: v for k, v in fam.state_dict("a").items() if k not in ("part", "turned")})
        assert model.head.weight is model.emb.weight


def test_in_memory_state_dicts_tie_too(tmp_path):
    """A tied model's ``state_dict()`` given as tensors: the same aliases as its torch.save file."""
    model = _Tied(0)
    out = tmp_path / "d.tallpack"
    tallpack.pack(model.state_dict(), {"a": _Tied(1).state_dict(), "b": _Tied(2).state_dict()}, out)
    with tallpack.open(out) as fam:
        assert fam.manifest.aliases == {"head.weight": "emb.weight"}
        sd = fam.state_dict("b")
        assert sd["head.weight"] is sd["emb.weight"]


# -- crafted manifests -----------------------------------------------------------------------------

def _manifest(raw: bytes) -> dict:
    m_off, m_len, _, flags, _ = FOOTER.unpack(raw[-FOOTER.size:])
    stored = raw[m_off:m_off + m_len]
    return json.loads(zstandard.ZstdDecompressor().decompress(stored) if flags & 1 else stored)


def _with_manifest(raw: bytes, manifest: dict) -> bytes:
    m_off, _, _, flags, end = FOOTER.unpack(raw[-FOOTER.size:])
    stored = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    return raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), flags | 1, end)


@pytest.fixture(scope="module")
def small_tied(tmp_path_factory):
    """A small tied family (in-memory state dicts): tensor ``w`` under a second name ``w2``, a
    group of small tensors, and a tensor stored alone."""
    g = torch.Generator().manual_seed(0)

    def sd(scale: float) -> dict[str, torch.Tensor]:
        w = torch.randn(300, 1000, generator=g) * scale
        return {"w": w, "n0": torch.randn(8, generator=g), "n1": torch.randn(16, generator=g), "w2": w}

    base = sd(1.0)
    tasks = {t: {k: (v + 0.01 * torch.randn(v.shape, generator=g)) for k, v in base.items() if k != "w2"}
             for t in "ab"}
    for t in tasks.values():
        t["w2"] = t["w"]
    out = tmp_path_factory.mktemp("small") / "s.tallpack"
    tallpack.pack(base, tasks, out)
    raw = out.read_bytes()
    m = _manifest(raw)
    assert m["aliases"] == {"w2": "w"} and "aliases" in m["requires"]
    return raw


def _open_crafted(tmp_path, raw: bytes, manifest: dict):
    p = tmp_path / "crafted.tallpack"
    p.write_bytes(_with_manifest(raw, manifest))
    return p


def _stored(manifest: dict) -> tuple[set[str], set[str]]:
    entries = {e["name"] for e in manifest["tensors"] if not e.get("members")}
    groups = {e["name"] for e in manifest["tensors"] if e.get("members")}
    members = {m[0] for e in manifest["tensors"] for m in e.get("members") or ()}
    return entries | members, groups


NAMES = st.sampled_from(["w", "n0", "n1", "tallpack.group.0", "x", "y", "z", "lm_head.weight"])


@given(aliases=st.dictionaries(NAMES, NAMES, max_size=4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_alias_maps(small_tied, tmp_path, aliases):
    """Any alias map: a valid one reads back (each alias its target's tensor), any other is a
    FormatError at open naming the archive and the alias."""
    m = _manifest(small_tied)
    stored, groups = _stored(m)
    m["aliases"] = aliases
    m.pop("requires", None)
    m["requires"] = (["groups"] if groups else []) + (["aliases"] if aliases else [])
    for task in m["tasks"]:
        task["keys"] = [k for k in task["keys"] if k != "w2"] + [a for a in aliases if a not in task["keys"]]
    bad = [a for a, t in aliases.items()
           if a == t or a in stored or a in groups or t in aliases or t not in stored]
    p = _open_crafted(tmp_path, small_tied, m)
    if bad:
        with pytest.raises(FormatError) as e:
            tallpack.open(p)
        assert str(p) in str(e.value) and "alias" in str(e.value) and "\n" not in str(e.value)
        assert any(repr(a) in str(e.value) for a in bad)
        return
    with tallpack.open(p) as fam:
        for t in fam.tasks:
            sd = fam.state_dict(t)
            assert list(sd) == fam.keys(t)
            for a, target in aliases.items():
                assert sd[a] is sd[target]
                assert torch.equal(fam.get_tensor(t, a), sd[target])
                assert fam.state_dict(t, lazy=True)[a].shape == sd[target].shape


def test_alias_without_its_target_in_a_task(small_tied, tmp_path):
    m = _manifest(small_tied)
    m["tasks"][0]["keys"] = [k for k in m["tasks"][0]["keys"] if k != "w"]
    with pytest.raises(FormatError, match="alias 'w2' listed without its target 'w'"):
        tallpack.open(_open_crafted(tmp_path, small_tied, m))


def test_aliases_without_requires_are_refused(small_tied, tmp_path):
    """An archive whose ``requires`` lost ``"aliases"`` is refused (spec §3.8), not read without
    the alias; one that requires a feature this reader lacks says to upgrade."""
    m = _manifest(small_tied)
    m["requires"] = [r for r in m["requires"] if r != "aliases"]
    with pytest.raises(FormatError, match="does not require 'aliases'"):
        tallpack.open(_open_crafted(tmp_path, small_tied, m))
    m["requires"].append("aliases-v2")
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        tallpack.open(_open_crafted(tmp_path, small_tied, m))


@pytest.mark.parametrize("value", [["w"], {"w2": 3}, "w"])
def test_malformed_aliases(small_tied, tmp_path, value):
    m = _manifest(small_tied)
    m["aliases"] = value
    with pytest.raises(TallpackError):
        tallpack.open(_open_crafted(tmp_path, small_tied, m))


def test_names_not_found_with_aliases(small_tied, tmp_path):
    """Unknown and non-string names stay a TensorNotFoundError in an archive with aliases."""
    p = tmp_path / "s.tallpack"
    p.write_bytes(small_tied)
    with tallpack.open(p) as fam:
        lazy = fam.state_dict("a", lazy=True)
        for ask in ("w3", ["w2"]):
            for read in (lambda: fam.get_tensor("a", ask), lambda: lazy[ask], lambda: fam.get_slice("a", ask)):
                with pytest.raises(tallpack.TensorNotFoundError):
                    read()
        assert ["w2"] not in lazy and "w2" in lazy
