"""tallpack as a downstream inference library loads it (round 35): tensor-parallel ranks in real
processes (torch.distributed, gloo) each reading its shard of every weight with ``get_slice``, as
they would with safetensors' ``safe_open(...).get_slice``; a model built on the meta device and
loaded with ``assign=True`` from a lazy state dict; tasks switched in place on a live model; the
slicing forms safetensors' slices take, side by side with safetensors on the same tensors.

Bytes read are counted by wrapping ``tallpack.storage.LocalFile.read``, the one call through which
every chunk of a local archive is read (a view of the mapped file): each ``(offset, nbytes)`` is one
stored chunk, its checksum checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

import tallpack
from tallpack import storage
from tallpack.errors import ExactTierMissingError, TallpackError, TaskNotFoundError, TensorNotFoundError
from conftest import cli_ok

TASKS = ("chat", "code", "math")
WORLD = 4
RANK_TASKS = ("chat", "math")  # what the ranks load (a second task of an open archive: its masks only)
#: row-parallel layers (their input dimension split: a rank takes columns), as in Megatron and vLLM
BY_COLUMNS = ("o_proj.weight", "down_proj.weight")


def _llama_config():
    from transformers import LlamaConfig

    # every dimension a multiple of WORLD; 256 x 64 elements (the embedding) is 16 chunks of 1024
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=64)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """A float32 Llama-style family saved by transformers (base + 3 fine-tunes touching 30% of the
    weights), packed by the command line plain (no groups, 1024-element chunks) and exact."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config())
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(10 + i)
        model.load_state_dict({k: v + (torch.rand(v.shape, generator=g) < 0.3) * 0.02 * torch.randn(v.shape, generator=g)
                               for k, v in base.items()})
        model.save_pretrained(root / task)
    tasks = [a for t in TASKS for a in ("--task", f"{t}={root / t}")]
    cli_ok("pack", "--base", root / "base", *tasks, "--no-group", "--chunk-elements", "1024", "-o", root / "plain.tallpack")
    cli_ok("pack", "--base", root / "base", *tasks, "--exact", "--chunk-elements", "1024", "-o", root / "exact.tallpack")
    return {"root": root, "plain": root / "plain.tallpack", "exact": root / "exact.tallpack"}


class _Reads:
    """The ``(offset, nbytes)`` of every read of a local archive while counting (this process)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int]] = []
        self._read = storage.LocalFile.read
        reads = self

        def read(source, offset: int, nbytes: int):
            reads.log.append((offset, nbytes))
            return reads._read(source, offset, nbytes)

        storage.LocalFile.read = read  # type: ignore[method-assign,assignment]

    def take(self) -> set[tuple[int, int]]:
        got, self.log = set(self.log), []
        return got

    def restore(self) -> None:
        storage.LocalFile.read = self._read  # type: ignore[method-assign]


def _shard(shape: list[int], name: str, rank: int, world: int) -> tuple[int, tuple]:
    """How a tensor-parallel loader splits ``name``: its dimension (-1: replicated) and the index."""
    if len(shape) < 2:
        return -1, (Ellipsis,)
    dim = 1 if name.endswith(BY_COLUMNS) else 0
    n = shape[dim] // world
    part = slice(rank * n, (rank + 1) * n)
    return dim, ((slice(None), part) if dim else (part,))


def _rank(rank: int, world: int, init: str, family: dict, out: str) -> None:
    """One rank: its shard of every weight of every task, from the plain archive (lossy) and the
    exact one (exact and lossy), gathered and compared with the whole tensors; the chunks read."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    reads = _Reads()
    report: dict = {"bytes": {}, "rows": {}, "columns": {}}
    try:
        for kind, path, exact in (("plain", family["plain"], False), ("exact", family["exact"], True),
                                  ("derived", family["exact"], False)):
            with tallpack.open(path, cache_bytes=0) as fam:
                reads.take()  # (the manifest, at open)
                for task in RANK_TASKS:
                    st = safe_open(str(family["root"] / task / "model.safetensors"), "pt")
                    whole = fam.state_dict(task, exact=exact)
                    reads.take()
                    for name in fam.keys(task):
                        piece = fam.get_slice(task, name, exact=exact)
                        assert piece.get_shape() == st.get_slice(name).get_shape(), name
                        assert piece.get_dtype() == st.get_slice(name).get_dtype() == "F32", name
                        dim, index = _shard(piece.get_shape(), name, rank, world)
                        mine = piece[index]
                        got = reads.take()
                        report["bytes"][f"{kind}/{task}/{name}"] = sum(n for _, n in got)
                        if dim >= 0:
                            report["rows" if dim == 0 else "columns"][f"{kind}/{task}/{name}"] = sorted(got)
                        assert torch.equal(mine, whole[name][index]), (kind, task, name)
                        if exact:  # the original bits, as safetensors' slice of the fine-tune gives them
                            assert torch.equal(mine, st.get_slice(name)[index]), (task, name)
                        if dim >= 0:  # the ranks' shards together are the tensor
                            parts = [torch.empty_like(mine) for _ in range(world)]
                            dist.all_gather(parts, mine.contiguous())
                            assert torch.equal(torch.cat(parts, dim), whole[name]), (kind, task, name)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        reads.restore()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(family, tmp_path_factory) -> list[dict]:
    """Four real processes (forked: the parent's torch and tallpack, no import each), one a rank."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("forked ranks: this platform has no fork")
    d = tmp_path_factory.mktemp("ranks")
    out = d / "ranks.json"
    mp.start_processes(_rank, args=(WORLD, f"file://{d / 'init'}", family, str(out)), nprocs=WORLD,
                       start_method="fork", join=True)
    return json.loads(out.read_text())


def _whole_reads(path: Path, task: str, name: str, exact: bool) -> set[tuple[int, int]]:
    reads = _Reads()
    try:
        with tallpack.open(path, cache_bytes=0) as fam:
            reads.take()
            fam.get_tensor(task, name, exact=exact)
            return reads.take()
    finally:
        reads.restore()


def test_ranks_shards_equal_the_whole_tensors(ranks):
    """Every rank's shards (rows, columns, replicated) equal ``state_dict(task)[name][shard]``, the
    gathered shards the whole tensor; exact ones equal safetensors' slices of the fine-tunes (all
    asserted in the ranks); here: each rank reported every tensor of every task of each archive."""
    assert len(ranks) == WORLD
    for r in ranks:
        assert len(r["bytes"]) == 3 * len(RANK_TASKS) * 21
        assert len(r["rows"]) == 3 * len(RANK_TASKS) * 12 and len(r["columns"]) == 3 * len(RANK_TASKS) * 4


def _chunks(fam, task: str, name: str, exact: bool) -> list[list[tuple[int, int]]]:
    """The ``(offset, nbytes)`` of each chunk of each array a read of ``name`` reads, from the
    archive's manifest (a ``tall-derived-merged`` tensor read lossy: the base and every task's
    residual)."""
    from tallpack.encodings import encoding_for
    from tallpack.reader import _needs

    entry, tt = fam._entry(task, name)
    encoding = encoding_for(tt.encoding)
    assert encoding is not None
    return [[(c.offset, c.nbytes) for c in ref.chunks] for ref in _needs(entry, tt, encoding, exact)]


@pytest.mark.parametrize("kind", ["plain", "exact", "derived"])
def test_a_ranks_rows_read_only_their_chunks(ranks, family, kind):
    """Each rank reads, of each array of the tensor, exactly the chunks that hold its rows'
    elements (the manifest says where each lies): a quarter of them where a quarter of the rows is
    whole chunks, and a chunk another rank reads only where their rows share it."""
    path, exact = (family["plain"], False) if kind == "plain" else (family["exact"], kind == "exact")
    with tallpack.open(path) as fam:
        for key in [k for k in ranks[0]["rows"] if k.startswith(kind + "/")]:
            _, task, name = key.split("/", 2)
            shape = fam.get_slice(task, name).get_shape()
            numel = shape[0] * shape[1]
            arrays = _chunks(fam, task, name, exact)
            assert {c for a in arrays for c in a} == _whole_reads(path, task, name, exact), key
            for r, report in enumerate(ranks):
                lo, hi = r * numel // WORLD, (r + 1) * numel // WORLD
                want = {a[i] for a in arrays for i in range(lo // 1024, -(-hi // 1024))}
                assert set(map(tuple, report["rows"][key])) == want, (key, r)


def test_rank_reads_quarter_of_the_row_split_bytes(ranks):
    """Per rank, the bytes its row shards read, against a whole read of the same tensors: a quarter
    (each rank's rows are a quarter of the chunks; chunks differ a little in stored size)."""
    for kind in ("plain", "exact", "derived"):
        per_rank = [sum(n for k, n in r["bytes"].items() if k.startswith(kind + "/") and k in r["rows"]) for r in ranks]
        total = sum(per_rank)
        assert all(0.2 < b / total < 0.3 for b in per_rank), (kind, per_rank)


# -- a model on the meta device, and tasks switched in place ---------------------------------------

def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def test_meta_model_loads_with_assign_and_switches_tasks_in_place(family):
    """No disk, no second copy: the config from the archive, the model built on the meta device,
    ``load_state_dict(lazy, assign=True, strict=True)``; then other tasks copied in place and
    assigned. Exact reads give the fine-tunes' own logits, bit for bit, as transformers loads them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    originals = {t: _logits(AutoModelForCausalLM.from_pretrained(family["root"] / t), x) for t in TASKS}
    with tallpack.open(family["exact"]) as fam:
        config = AutoConfig.for_model(**json.loads(fam.read_file("config.json", "chat")))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        got = model.load_state_dict(fam.state_dict("chat", exact=True, lazy=True), assign=True, strict=True)
        assert not got.missing_keys and not got.unexpected_keys
        assert not any(p.is_meta for p in model.parameters())
        # non-persistent buffers are no checkpoint's: made again, as accelerate's init_empty_weights leaves them
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        assert torch.equal(_logits(model, x), originals["chat"])
        for task in ("code", "math", "chat"):  # a live model, swapped one tensor at a time
            lazy = fam.state_dict(task, exact=True, lazy=True)
            with torch.no_grad():
                for name, p in model.state_dict().items():
                    p.copy_(lazy[name])
            assert torch.equal(_logits(model, x), originals[task]), task
        model.load_state_dict(fam.state_dict("math", exact=True, lazy=True), assign=True)
        assert torch.equal(_logits(model, x), originals["math"])
        lossy = fam.state_dict("code")  # the TALL member, as the archive rebuilds it
    model.load_state_dict(lossy, assign=True)  # closed archive: the model keeps working
    assert torch.equal(model.lm_head.weight, lossy["lm_head.weight"])
    assert _logits(model, x).isfinite().all()


def test_from_pretrained_with_the_archives_state_dict(family):
    """transformers' own in-memory way (a model class's ``from_pretrained(None, config=...,
    state_dict=...)``) with a dict and with a lazy state dict; the README's way, an unpacked folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    x = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    config = AutoConfig.from_pretrained(family["root"] / "code")
    want = _logits(AutoModelForCausalLM.from_pretrained(family["root"] / "code"), x)
    with tallpack.open(family["exact"]) as fam:
        for sd in (fam.state_dict("code", exact=True), fam.state_dict("code", exact=True, lazy=True)):
            assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(None, config=config, state_dict=sd), x), want)
        tallpack.write_task(fam, "code", family["root"] / "code-out", exact=True)
        lossy = fam.state_dict("code")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(family["root"] / "code-out"), x), want)
    with tallpack.open(family["plain"]) as fam:
        tallpack.write_task(fam, "code", family["root"] / "code-lossy")
        model = AutoModelForCausalLM.from_pretrained(family["root"] / "code-lossy")
        for name, t in model.state_dict().items():
            assert torch.equal(t, fam.state_dict("code")[name]), name
        assert not torch.equal(_logits(model, x), want)  # TALL's member, not the fine-tune
    del lossy


# -- the slicing forms safetensors' slices take, side by side -----------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """A family of every shape and dtype a checkpoint holds: scalars, 1-D, 3-D, a row, an empty
    tensor, bfloat16, float16, integers, booleans; packed plain (8-element chunks) and exact."""
    d = tmp_path_factory.mktemp("shapes")
    g = torch.Generator().manual_seed(0)
    base = {"scalar": torch.tensor(1.5), "count": torch.tensor(7), "vec": torch.randn(100, generator=g),
            "bf": torch.randn(40, 24, generator=g).bfloat16(), "hf": torch.randn(40, 24, generator=g).half(),
            "ids": torch.arange(30, dtype=torch.int32).reshape(10, 3), "flags": torch.rand(12, generator=g) > 0.5,
            "empty": torch.zeros(0, 5), "cube": torch.randn(6, 5, 4, generator=g), "one": torch.randn(1, 8, generator=g),
            "odd": torch.randn(33, 3, generator=g)}
    save_file(base, d / "base.safetensors")
    for t in ("a", "b"):
        save_file({k: v + (0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
                   for k, v in base.items()}, d / f"{t}.safetensors")
    tasks = ["--task", f"a={d / 'a.safetensors'}", "--task", f"b={d / 'b.safetensors'}"]
    cli_ok("pack", "--base", d / "base.safetensors", *tasks, "--no-group", "--chunk-elements", "8", "-o", d / "plain.tallpack")
    cli_ok("pack", "--base", d / "base.safetensors", *tasks, "--exact", "--chunk-elements", "8", "-o", d / "exact.tallpack")
    return {"dir": d, "names": list(base)}


INDEXES = [(), Ellipsis, (Ellipsis,), slice(None), 0, 3, -1, -2, 39, 40, -41, slice(0, 3), slice(2, 7), slice(-5, None),
           slice(None, -1), slice(5, 3), slice(2, 2), slice(100, 200), slice(-(2 ** 70), 2 ** 70), slice(1, None, 2),
           slice(0, 30, 7), slice(None, None, -1), slice(0, 4, 0), (slice(1, 4), 0), (slice(1, 4), slice(0, 2)),
           (slice(1, 4), slice(None, None, 2)), (slice(1, 4), -1), (0, 0), (-1, slice(1, 3)), (slice(None), 1),
           (Ellipsis, 0), (slice(0, 2), Ellipsis), (slice(0, 2), slice(0, 2), slice(0, 2)), (0, 0, 0, 0),
           (None, slice(0, 2)), (slice(0, 2), None), np.int64(2), slice(np.int64(1), np.int64(3)), [0, 2],
           torch.tensor(1), torch.tensor([1, 0])]


def _outcome(get, index):
    try:
        return get(index), None
    except (IndexError, TypeError, ValueError) as e:
        return None, type(e)


@pytest.mark.parametrize("exact", [False, True], ids=["plain", "exact"])
def test_slices_match_safetensors_and_the_state_dict(shapes, exact):
    """Each index form on each tensor: the same shape (or the same kind of error) as safetensors'
    slice of the fine-tune, the values of ``state_dict(t)[name][index]``, and with ``exact`` the
    fine-tune's own bits; ``get_shape`` and ``get_dtype`` as safetensors gives them."""
    d = shapes["dir"]
    st = safe_open(str(d / "a.safetensors"), "pt")
    with tallpack.open(d / ("exact.tallpack" if exact else "plain.tallpack")) as fam:
        whole = fam.state_dict("a", exact=exact)
        for name in shapes["names"]:
            ours, theirs = fam.get_slice("a", name, exact=exact), st.get_slice(name)
            assert ours.get_shape() == theirs.get_shape(), name
            assert ours.get_dtype() == theirs.get_dtype(), name
            for index in INDEXES:
                want, want_err = _outcome(theirs.__getitem__, index)
                got, got_err = _outcome(ours.__getitem__, index)
                assert got_err == want_err, (name, index, got_err, want_err)
                if got is None:
                    continue
                assert got.shape == want.shape and got.dtype == want.dtype, (name, index)
                assert torch.equal(got, whole[name][index]), (name, index)
                if exact:
                    assert torch.equal(got, want), (name, index)


def test_errors_say_what_in_one_line(shapes):
    """A wrong task, tensor, tier or row: one line naming it (tallpack's errors, which are also
    KeyError or ValueError; an index out of range an IndexError as safetensors' and torch's)."""
    with tallpack.open(shapes["dir"] / "plain.tallpack") as fam:
        cases = [(lambda: fam.get_slice("nope", "vec"), TaskNotFoundError, "nope"),
                 (lambda: fam.get_slice("a", "vecc"), TensorNotFoundError, "vecc"),
                 (lambda: fam.get_slice("a", 3), TensorNotFoundError, "3"),
                 (lambda: fam.get_slice("a", "vec", exact=True), ExactTierMissingError, "--exact"),
                 (lambda: fam.get_slice("a", "vec")[100], IndexError, "vec"),
                 (lambda: fam.get_slice("a", "bf")[-41], IndexError, "bf"),
                 (lambda: fam.get_slice("a", "bf")["x"], TypeError, "bf"),
                 (lambda: fam.get_slice("a", "bf")[1.0], TypeError, "bf")]
        for call, kind, said in cases:
            with pytest.raises(kind) as e:
                call()
            text = str(e.value).strip("'\"")
            assert "\n" not in text and said in text, text
            assert isinstance(e.value, TallpackError) or kind in (IndexError, TypeError)
        piece = fam.get_slice("a", "vec")
    with pytest.raises(TallpackError, match="closed"):
        piece[0:2]


def _reads_of(path: Path, task: str, name: str, index, exact: bool = False) -> int:
    reads = _Reads()
    try:
        with tallpack.open(path, cache_bytes=0) as fam:
            piece = fam.get_slice(task, name, exact=exact)
            reads.take()
            piece[index]
            return len(reads.take())
    finally:
        reads.restore()


def test_an_empty_share_reads_nothing_from_an_exact_archive(family):
    """A rank whose share of the rows is empty (more ranks than rows; ``[a:b]`` with ``b <= a``)."""
    for index in (slice(5, 5), slice(100, 50), slice(256, None), (slice(5, 5), slice(0, 4))):
        assert _reads_of(family["exact"], "chat", "model.embed_tokens.weight", index, exact=True) == 0, index
        assert _reads_of(family["exact"], "chat", "model.embed_tokens.weight", index) == 0, index


def test_an_empty_share_reads_nothing(family):
    """As safetensors, which reads nothing: ``[5:5]`` of a 256 x 64 float32 tensor of the default
    codec read the chunk holding row 5 of the base, the merged vector and the mask (3 reads)."""
    with tallpack.open(family["plain"]) as fam:
        want = fam.state_dict("chat")["model.embed_tokens.weight"]
        piece = fam.get_slice("chat", "model.embed_tokens.weight")
        for index in (slice(5, 5), slice(100, 50), slice(256, None), (slice(5, 5), slice(0, 4))):
            got = piece[index]
            assert got.shape == want[index].shape and got.dtype == want.dtype, index
    for index in (slice(5, 5), slice(100, 50), slice(256, None), (slice(5, 5), slice(0, 4))):
        assert _reads_of(family["plain"], "chat", "model.embed_tokens.weight", index) == 0, index


def test_a_row_given_as_a_numpy_or_tensor_integer_reads_only_its_chunks(family):
    """An expert's or a rank's row number as a program computes it (``np.arange``, a tensor): torch
    and safetensors take ``np.int64(3)`` and ``torch.tensor(3)`` as the row ``3``; the slice read
    the whole tensor for them (16 times the chunks of one row here)."""
    name = "model.embed_tokens.weight"
    with tallpack.open(family["plain"]) as fam:
        want = fam.state_dict("chat")[name]
        piece = fam.get_slice("chat", name)
        for index in (np.int64(3), np.int32(-1), torch.tensor(3), (torch.tensor(-2), slice(0, 4))):
            assert torch.equal(piece[index], want[index]), index
        with pytest.raises(IndexError, match=name):
            piece[np.int64(256)]
    for row in (3, -1):
        one = _reads_of(family["plain"], "chat", name, row)
        assert one == 3  # a chunk of the base, of the merged vector and of the mask
        assert _reads_of(family["plain"], "chat", name, np.int64(row)) == one
        assert _reads_of(family["plain"], "chat", name, torch.tensor(row)) == one



def test_meta_device_reads_give_shapes_and_read_nothing(family):
    """A loader that plans its shards from ``state_dict(t, device="meta")`` (shapes and dtypes, no
    data) reads no chunk; ``dtype=`` is no argument (one line saying so), as the README says."""
    reads = _Reads()
    try:
        with tallpack.open(family["exact"], cache_bytes=0) as fam:
            reads.take()
            for exact in (False, True):
                sd = fam.state_dict("code", device="meta", exact=exact)
                assert {t.device.type for t in sd.values()} == {"meta"}
                assert fam.get_tensor("code", "lm_head.weight", device="meta", exact=exact).is_meta
                assert fam.state_dict("code", device="meta", lazy=True, exact=exact)["lm_head.weight"].is_meta
            assert not reads.take()
            want = {k: (v.shape, v.dtype) for k, v in fam.state_dict("code").items()}
            assert {k: (v.shape, v.dtype) for k, v in sd.items()} == want
            with pytest.raises(TypeError, match="dtype") as e:
                fam.state_dict("code", **{"dtype": torch.float16})
            assert "\n" not in str(e.value)
    finally:
        reads.restore()


def test_get_slice_after_close_says_the_archive_is_closed(family):
    """A handle asked of a closed archive could read nothing: ``get_slice`` says so at once, as a
    read would (it returned a handle whose first read raised)."""
    fam = tallpack.open(family["plain"])
    fam.close()
    with pytest.raises(tallpack.ArchiveClosedError, match="closed"):
        fam.get_slice("chat", "model.embed_tokens.weight")
