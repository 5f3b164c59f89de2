"""The exact tier against delta compressors: what an archivist would use instead of ``pack --exact``
to keep every fine-tune's bytes (round 34).

    python benchmarks/exact_vs_delta.py            # trained bf16 and fp32 families (base + 8) + the demo family
    python benchmarks/exact_vs_delta.py --quick    # tiny families, one round: under a minute
    python benchmarks/exact_vs_delta.py --tasks 4 --hidden 384 --rounds 3 --work /tmp/keep

Methods, each storing the base and every task so that every original file comes back byte for byte:

- ``tallpack --exact``: ``tallpack.pack(..., exact=True)``; one task back with ``write_task(...,
  exact=True)`` (files) and ``state_dict(task, exact=True)`` (tensors in memory);
- ``zstd --patch-from -19`` / ``-3`` (``--long=31 -T2``): the base's files alone, each task's file as a
  patch against the base's file of the same name; one task back = the base's file, then the patch;
- ``xor planes`` / ``sub planes`` (this benchmark's own baseline, not a library's): each tensor's
  bits XOR (or the zigzag difference of the ordered bits, as the exact tier's ``sub``) the base's
  tensor of the same name and dtype, its byte planes apart, each plane one zstd-3 frame; the base's
  tensors as planes alone; the header verbatim (zstd);
- ``zstd -3 -T2`` and ``zstd -19 -T2`` of every file alone;
- ``ZipNN`` of every file alone, and ``ZipNN delta`` (its ``delta_compressed_type="byte"``: a file
  XOR the base's file of the same length), where ``import zipnn`` works.

Families: a small transformer (embedding, attention, MLP, norms, LM head, Llama-like names)
pretrained a few Adam steps on random tokens (the base), then fine-tuned per task for real, on
random data with a task's own token map: even tasks by Adam, odd ones by SGD with momentum, fp32
master weights; the bf16 family's base and tasks are those weights cast to bfloat16. Then the demo
family (``tallpack demo``'s, 10 tasks, folders with ``config.json``) unless ``--quick``. Sizes are
exact; times are medians of ``--rounds`` runs, each method in a fresh process, the order turned
every round; peak memory is the child's ``RssAnon`` (``/proc``, sampled every 2 ms: mapped files and
page cache not counted) and ``VmHWM`` (all resident pages, mapped files included). Every method's
every task is restored once more and its files compared with the originals (SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------------------------------------
# families


def _tiny_lm(vocab: int, hidden: int, layers: int):
    """A transformer-shaped causal LM whose state dict has Llama-like names."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = nn.LayerNorm(hidden)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False)
                                                                  for _ in range(4))
            self.post_attention_layernorm = nn.LayerNorm(hidden)
            self.up_proj = nn.Linear(hidden, 4 * hidden, bias=False)
            self.down_proj = nn.Linear(4 * hidden, hidden, bias=False)

        def forward(self, x):
            h = self.input_layernorm(x)
            b, s, d = h.shape
            heads = max(1, d // 64)
            q, k, v = (p(h).view(b, s, heads, d // heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
            x = x + self.o_proj(a)
            return x + self.down_proj(F.gelu(self.up_proj(self.post_attention_layernorm(x))))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, tokens):
            x = self.embed_tokens(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    return LM()


def _train(model, steps: int, opt, seed: int, vocab: int, batch: int = 8, seq: int = 32) -> float:
    """``steps`` steps on random tokens whose next token is a seeded affine map of the current one."""
    import torch
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(seed)
    mul, add = 2 * seed + 1, 7 * seed + 3
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = (x * mul + add) % vocab
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def trained_family(root: Path, dtype: str, tasks: int, hidden: int, layers: int, vocab: int, steps: int,
                   pretrain_steps: int) -> tuple[Path, dict[str, Path], dict]:
    """Base and ``tasks`` fine-tunes as safetensors files of ``dtype`` (fp32 master weights, cast on
    saving); the paths, and what the fine-tunes changed."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _tiny_lm(vocab, hidden, layers)
    _train(model, pretrain_steps, torch.optim.Adam(model.parameters(), lr=1e-3), 1000, vocab)
    cast = getattr(torch, dtype)
    base_sd = {k: v.detach().to(cast).clone() for k, v in model.state_dict().items()}  # not the live parameters
    save_file(base_sd, root / "base.safetensors")
    paths, changed, rel = {}, [], []
    for t in range(tasks):
        model.load_state_dict({k: v.float() for k, v in base_sd.items()})
        opt = (torch.optim.Adam(model.parameters(), lr=3e-5) if t % 2 == 0 else
               torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        _train(model, steps, opt, t, vocab)
        sd = {k: v.detach().to(cast).clone() for k, v in model.state_dict().items()}
        paths[f"task{t}"] = root / f"task{t}.safetensors"
        save_file(sd, paths[f"task{t}"])
        diff = torch.cat([(sd[k].float() != base_sd[k].float()).reshape(-1) for k in sd])
        changed.append(float(diff.float().mean()))
        r = torch.cat([((sd[k].float() - base_sd[k].float()).abs() / base_sd[k].float().abs().clamp_min(1e-30)).reshape(-1)
                       for k in sd])
        rel.append(float(r[diff].median()) if diff.any() else 0.0)
    params = sum(v.numel() for v in base_sd.values())
    return root / "base.safetensors", paths, {"params": params, "changed": changed, "median_rel_change": rel}


# ---------------------------------------------------------------------------------------------
# this benchmark's own delta baseline: XOR / ordered-difference of each tensor, byte planes, zstd-3

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
        "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}
LEVEL = 3


def _segments(buf: bytes) -> list[tuple[str | None, int, int, str | None]]:
    """(tensor name or None, start, end, dtype) covering a safetensors file's bytes in order."""
    n = int.from_bytes(buf[:8], "little")
    start = 8 + n
    header = json.loads(buf[8:start])
    tensors = sorted(((k, start + v["data_offsets"][0], start + v["data_offsets"][1], v["dtype"])
                      for k, v in header.items() if k != "__metadata__"), key=lambda s: s[1])
    out, at = [(None, 0, start, None)], start
    for name, b, e, dt in tensors:
        if b > at:
            out.append((None, at, b, None))
        out.append((name, b, e, dt))
        at = max(at, e)
    if at < len(buf):
        out.append((None, at, len(buf), None))
    return out


def _ordered(u: np.ndarray, bits: int) -> np.ndarray:
    """Float bit patterns as unsigned integers in the floats' order."""
    top = u.dtype.type(1 << (bits - 1))
    return np.where(u & top, ~u, u | top)


def _unordered(o: np.ndarray, bits: int) -> np.ndarray:
    top = o.dtype.type(1 << (bits - 1))
    return np.where(o & top, o & ~top, ~o)


def _delta(t: np.ndarray, b: np.ndarray, mode: str, is_float: bool) -> np.ndarray:
    if mode == "xor":
        return t ^ b
    bits = t.dtype.itemsize * 8
    if is_float:
        t, b = _ordered(t, bits), _ordered(b, bits)
    s = (t - b).view(SINT[t.dtype.itemsize])
    return ((s << 1) ^ (s >> (bits - 1))).view(t.dtype)  # zigzag


def _undelta(d: np.ndarray, b: np.ndarray, mode: str, is_float: bool) -> np.ndarray:
    if mode == "xor":
        return d ^ b
    bits = d.dtype.itemsize * 8
    one = d.dtype.type(1)
    s = (d >> one) ^ (np.zeros_like(d) - (d & one))
    if is_float:
        return _unordered(_ordered(b, bits) + s, bits)
    return b + s


def _planes(a: np.ndarray, c: zstandard.ZstdCompressor) -> list[bytes]:
    item = a.dtype.itemsize
    p = a.view(np.uint8).reshape(-1, item).T
    return [c.compress(np.ascontiguousarray(row).tobytes()) for row in p]


def _unplanes(frames: list[bytes], dtype) -> np.ndarray:
    rows = np.stack([np.frombuffer(zstandard.decompress(f), np.uint8) for f in frames])
    return np.ascontiguousarray(rows.T).view(dtype).reshape(-1)


def delta_encode(buf: bytes, base: bytes | None, mode: str) -> bytes:
    """One file's bytes, with each tensor coded against the base file's tensor of the same name."""
    c = zstandard.ZstdCompressor(level=LEVEL)
    ref = {s[0]: s for s in _segments(base) if s[0] is not None} if base is not None else {}
    index, blobs = [], []
    for name, b, e, dt in _segments(buf):
        item = ITEM.get(dt or "", 1)
        if name is None or item == 1 and dt not in ("I8", "U8") or (e - b) % item:
            frames, kind = [c.compress(buf[b:e])], "bytes"
        else:
            t = np.frombuffer(buf, UINT[item], (e - b) // item, b)
            r = ref.get(name)
            if r is not None and r[3] == dt and r[2] - r[1] == e - b:
                t = _delta(t, np.frombuffer(base, UINT[item], (e - b) // item, r[1]), mode, dt in FLOATS)
                kind = mode
            else:
                kind = "planes"
            frames = _planes(t, c)
        index.append({"name": name, "kind": kind, "item": item, "dtype": dt, "frames": [len(f) for f in frames]})
        blobs += frames
    head = json.dumps(index).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def delta_decode(blob: bytes, base: bytes | None) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    index, at = json.loads(blob[8:8 + n]), 8 + n
    ref = {s[0]: s for s in _segments(base) if s[0] is not None} if base is not None else {}
    out = []
    for seg in index:
        frames = []
        for size in seg["frames"]:
            frames.append(blob[at:at + size])
            at += size
        if seg["kind"] == "bytes":
            out.append(zstandard.decompress(frames[0]))
            continue
        item = seg["item"]
        t = _unplanes(frames, UINT[item])
        if seg["kind"] != "planes":
            r = ref[seg["name"]]
            t = _undelta(t, np.frombuffer(base, UINT[item], t.size, r[1]), seg["kind"], seg["dtype"] in FLOATS)
        out.append(t.tobytes())
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# what runs in the children (each timed in a fresh process)


def _base_file(members: dict[str, list[str]], f: str, same_size: bool = False) -> str | None:
    """The base's weights file of the same name as ``f`` (the base's only one for a task's only
    one), of the same length with ``same_size``."""
    if Path(f).suffix != ".safetensors":
        return None
    ws = [b for b in members["base"] if Path(b).suffix == ".safetensors"]
    named = [b for b in ws if Path(b).name == Path(f).name] or (ws if len(ws) == 1 else [])
    if named and (not same_size or Path(named[0]).stat().st_size == Path(f).stat().st_size):
        return named[0]
    return None


def child_delta_pack(mode: str, members: str, out: str) -> None:
    m = json.loads(members)
    for who, files in m.items():
        d = Path(out) / who
        d.mkdir(parents=True)
        for f in files:
            buf = Path(f).read_bytes()
            if f.endswith(".safetensors"):
                bf = None if who == "base" else _base_file(m, f)
                blob = delta_encode(buf, Path(bf).read_bytes() if bf else None, mode)
            else:
                blob = zstandard.ZstdCompressor(level=19).compress(buf)
            (d / (Path(f).name + ".d")).write_bytes(blob)


def _each(tasks: str, out: str) -> list[tuple[str, Path]]:
    """(task, folder) for one task into ``out``, or for several (comma-separated) into ``out/TASK``."""
    if "," not in tasks:
        return [(tasks, Path(out))]
    for t in tasks.split(","):
        (Path(out) / t).mkdir()
    return [(t, Path(out) / t) for t in tasks.split(",")]


def child_delta_restore(archive: str, tasks: str, out: str, base_raw: str = "") -> None:
    """Every file of a task back into ``out``, the base's files decoded first (from the archive, or
    read from ``base_raw``, a folder holding them)."""
    bases = {}
    for p in sorted((Path(archive) / "base").iterdir()):
        name = p.name[:-2]
        if name.endswith(".safetensors"):
            bases[name] = (Path(base_raw) / name).read_bytes() if base_raw else delta_decode(p.read_bytes(), None)
    for task, into in _each(tasks, out):
        _delta_restore(archive, task, into, bases)


def _delta_restore(archive: str, task: str, out: Path, bases: dict[str, bytes]) -> None:
    for p in sorted((Path(archive) / task).iterdir()):
        name, blob = p.name[:-2], p.read_bytes()
        if name.endswith(".safetensors"):
            ref = bases.get(name) if name in bases else (next(iter(bases.values())) if len(bases) == 1 else None)
            data = delta_decode(blob, ref)
        else:
            data = zstandard.decompress(blob)
        (Path(out) / name).write_bytes(data)


def _zipnn(dtype: str, delta: bool):
    from zipnn import ZipNN

    return ZipNN(bytearray_dtype=dtype, threads=2, delta_compressed_type="byte" if delta else 0)


def child_zipnn_pack(dtype: str, delta: str, members: str, out: str) -> None:
    m = json.loads(members)
    for who, files in m.items():
        d = Path(out) / who
        d.mkdir(parents=True)
        for f in files:
            bf = _base_file(m, f, same_size=True) if delta == "1" and who != "base" else None
            z = _zipnn(dtype, bf is not None)
            buf = Path(f).read_bytes()
            blob = z.compress(buf, delta_second_data=Path(bf).read_bytes()) if bf else z.compress(buf)
            (d / (Path(f).name + (".zd" if bf else ".z"))).write_bytes(bytes(blob))


def child_zipnn_restore(dtype: str, archive: str, tasks: str, out: str) -> None:
    bases: dict[Path, bytes] = {}
    for task, into in _each(tasks, out):
        _zipnn_restore(dtype, archive, task, into, bases)


def _zipnn_restore(dtype: str, archive: str, task: str, out: Path, bases: dict[Path, bytes]) -> None:
    for p in sorted((Path(archive) / task).iterdir()):
        name = p.name[:-3] if p.name.endswith(".zd") else p.name[:-2]
        if p.name.endswith(".zd"):
            src = Path(archive) / "base" / (name + ".z")
            if not src.exists():
                src = next((Path(archive) / "base").glob("*.safetensors.z"))
            if src not in bases:
                bases[src] = bytes(_zipnn(dtype, False).decompress(src.read_bytes()))
            data = _zipnn(dtype, True).decompress(p.read_bytes(), delta_second_data=bases[src])
        else:
            data = _zipnn(dtype, False).decompress(p.read_bytes())
        (Path(out) / name).write_bytes(bytes(data))


def child_tallpack_pack(base: str, tasks: str, out: str) -> None:
    import tallpack

    tallpack.pack(base, json.loads(tasks), out, exact=True, overwrite=True)


def child_tallpack_restore(archive: str, tasks: str, out: str) -> None:
    import tallpack

    with tallpack.open(archive) as fam:
        for task, into in _each(tasks, out):
            tallpack.write_task(fam, task, into, exact=True, overwrite=True)


def child_tallpack_state_dict(archive: str, task: str, out: str) -> None:
    import tallpack

    with tallpack.open(archive) as fam:
        sd = fam.state_dict(task, exact=True)
        held = [sd[k] for k in sd]  # every tensor decoded and held, as a caller of state_dict would
        assert held


def warm(func: str) -> None:
    """What the child's work imports, imported before its clock starts."""
    if "tallpack" in func:
        import tallpack  # noqa: F401
        import torch  # noqa: F401  (tallpack's reader and writer import it as they need it)
    if "zipnn" in func:
        import zipnn  # noqa: F401


CHILD = ("import sys, time; sys.path[:0] = sys.argv[1:3]; import exact_vs_delta as m; m.warm(sys.argv[3])\n"
         "t = time.perf_counter(); getattr(m, sys.argv[3])(*sys.argv[4:]); print('WORK', time.perf_counter() - t)")


# ---------------------------------------------------------------------------------------------
# measuring


def _status(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM) of a live process, in bytes; zeros once it is gone."""
    anon = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return anon, hwm


def measured(cmds: list[list[str]]) -> dict:
    """Run the commands one after another; their wall seconds together, the seconds of work the
    Python children report (their start and imports left out; a command line's whole run), and the
    largest peak ``RssAnon`` and ``VmHWM`` of any of them."""
    seconds, work, anon, hwm = 0.0, 0.0, 0, 0
    for cmd in cmds:
        with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as said:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=said, stderr=err, cwd="/")
            while p.poll() is None:
                a, h = _status(p.pid)
                anon, hwm = max(anon, a), max(hwm, h)
                time.sleep(0.002)
            wall = time.perf_counter() - t0
            seconds += wall
            if p.returncode:
                err.seek(0)
                raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)[:300]}\n{err.read().decode()[-3000:]}")
            said.seek(0)
            reported = [float(line.split()[1]) for line in said.read().decode().splitlines() if line.startswith("WORK ")]
            work += reported[-1] if reported else wall
    return {"seconds": seconds, "work_seconds": work, "peak_anon": anon, "peak_hwm": hwm}


def py(func: str, *args: str) -> list[str]:
    return [sys.executable, "-c", CHILD, str(HERE), str(REPO), func, *args]


ZSTD = ["zstd", "-q", "-f"]


def zstd_pack(members: dict[str, list[str]], out: Path, level: int, patch: bool) -> list[list[str]]:
    cmds = []
    for who, files in members.items():
        (out / who).mkdir(parents=True, exist_ok=True)
        for f in files:
            bf = _base_file(members, f) if patch and who != "base" else None
            extra = ["--long=31", f"--patch-from={bf}"] if bf else (["--long=31"] if patch else [])
            cmds.append(ZSTD + [f"-{level}", "-T2", *extra, f, "-o", str(out / who / (Path(f).name + ".zst"))])
    return cmds


def zstd_restore(members: dict[str, list[str]], archive: Path, task: str, out: Path, patch: bool,
                 base_raw: Path | None) -> list[list[str]]:
    """Commands that write every file of ``task`` into ``out``; for a patch, the base's file first
    (into ``out/.base``, unless ``base_raw`` holds it)."""
    cmds = []
    (out / ".base").mkdir()
    for f in members[task]:
        z = archive / task / (Path(f).name + ".zst")
        bf = _base_file(members, f) if patch else None
        if bf:
            ref = (base_raw / Path(bf).name) if base_raw else out / ".base" / Path(bf).name
            if not base_raw:
                cmds.append(ZSTD + ["-d", "--long=31", str(archive / "base" / (Path(bf).name + ".zst")), "-o", str(ref)])
            cmds.append(ZSTD + ["-d", "--long=31", f"--patch-from={ref}", str(z), "-o", str(out / Path(f).name)])
        else:
            cmds.append(ZSTD + ["-d", *(["--long=31"] if patch else []), str(z), "-o", str(out / Path(f).name)])
    return cmds


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def round_trips(members: dict[str, list[str]], task: str, out: Path) -> bool:
    """Every original file of ``task`` is in ``out`` (same name) with the same bytes."""
    for f in members[task]:
        got = out / Path(f).name
        if not got.exists():
            written = [p for p in out.rglob("*.safetensors") if ".base" not in p.parts]
            if len(members[task]) == 1 and len(written) == 1:
                got = written[0]
            else:
                return False
        if _sha(got) != _sha(Path(f)):
            return False
    return True


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Method:
    """How one method packs a family and gives one task back (commands for fresh processes)."""

    def __init__(self, name: str, pack, restore, restore_base_raw=None, shares_archive: str | None = None) -> None:
        self.name, self.pack, self.restore, self.restore_base_raw = name, pack, restore, restore_base_raw
        self.shares_archive = shares_archive  # a read-only row: the archive another method packed


def methods(members: dict[str, list[str]], dtype: str, zipnn: bool) -> list[Method]:
    tasks_arg = json.dumps({k: str(Path(v[0]).parent if len(v) > 1 else v[0]) for k, v in members.items() if k != "base"})
    base_arg = str(Path(members["base"][0]).parent) if len(members["base"]) > 1 else members["base"][0]
    mj = json.dumps(members)
    ms = [Method("tallpack --exact",
                 lambda a: [py("child_tallpack_pack", base_arg, tasks_arg, str(a / "family.tallpack"))],
                 lambda a, t, o: [py("child_tallpack_restore", str(a / "family.tallpack"), t, str(o))]),
          Method("tallpack state_dict(exact=True)", None,
                 lambda a, t, o: [py("child_tallpack_state_dict", str(a / "family.tallpack"), t, str(o))],
                 shares_archive="tallpack --exact")]
    for level in (19, 3):
        ms.append(Method(f"zstd --patch-from -{level} --long=31",
                         lambda a, lv=level: zstd_pack(members, a, lv, True),
                         lambda a, t, o: zstd_restore(members, a, t, o, True, None),
                         lambda a, t, o, b: zstd_restore(members, a, t, o, True, b)))
    for mode in ("xor", "sub"):
        ms.append(Method(f"{mode} planes + zstd-3 (own)",
                         lambda a, md=mode: [py("child_delta_pack", md, mj, str(a))],
                         lambda a, t, o: [py("child_delta_restore", str(a), t, str(o))],
                         lambda a, t, o, b: [py("child_delta_restore", str(a), t, str(o), str(b))]))
    for level in (3, 19):
        ms.append(Method(f"zstd -{level} -T2, each file",
                         lambda a, lv=level: zstd_pack(members, a, lv, False),
                         lambda a, t, o: zstd_restore(members, a, t, o, False, None)))
    if zipnn:
        for delta in ("0", "1"):
            ms.append(Method("ZipNN delta (XOR the base's file)" if delta == "1" else "ZipNN, each file",
                             lambda a, d=delta: [py("child_zipnn_pack", dtype, d, mj, str(a))],
                             lambda a, t, o: [py("child_zipnn_restore", dtype, str(a), t, str(o))]))
    return ms


def _is_python(method: str) -> bool:
    return method.startswith(("tallpack", "ZipNN")) or "(own)" in method


def measure_family(name: str, members: dict[str, list[str]], dtype: str, work: Path, rounds: tuple[int, int],
                   zipnn: bool, info: dict, only: list[str] | None = None) -> dict:
    """Every method (those whose names hold one of ``only``, and tallpack's) on one family: sizes
    once, pack and restore times alternated over ``rounds`` (packs, restores)."""
    raw = sum(Path(f).stat().st_size for files in members.values() for f in files)
    ms = [m for m in methods(members, dtype, zipnn)
          if only is None or m.name.startswith("tallpack") or any(o.lower() in m.name.lower() for o in only)]
    task = next(k for k in members if k != "base")
    res: dict = {"family": name, "dtype": dtype, "tasks": len(members) - 1, "task": task, "files_bytes": raw,
                 "task_bytes": sum(Path(f).stat().st_size for f in members[task]), **info, "methods": {}}
    packs: dict[str, list] = {m.name: [] for m in ms if m.pack}
    restores: dict[str, list] = {m.name: [] for m in ms}
    restores_raw: dict[str, list] = {m.name: [] for m in ms if m.restore_base_raw}
    archive = {m.name: work / f"a{i}" for i, m in enumerate(ms)}
    for m in ms:
        if m.shares_archive:
            archive[m.name] = archive[m.shares_archive]
    base_raw = work / "base-raw"
    base_raw.mkdir()
    for f in members["base"]:
        shutil.copyfile(f, base_raw / Path(f).name)
    for r in range(rounds[0]):  # pack: the order turned every round
        order = [m for m in ms if m.pack]
        for m in order[r % len(order):] + order[:r % len(order)]:
            shutil.rmtree(archive[m.name], ignore_errors=True)
            archive[m.name].mkdir()
            packs[m.name].append(measured(m.pack(archive[m.name])))
            print(f"  {name}: packed {m.name} ({packs[m.name][-1]['seconds']:.2f} s)", file=sys.stderr, flush=True)
    for r in range(rounds[1]):
        for m in ms[r % len(ms):] + ms[:r % len(ms)]:
            for base_given, into in ((False, restores), (True, restores_raw)):
                if base_given and not m.restore_base_raw:
                    continue
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                cmds = m.restore_base_raw(archive[m.name], task, out, base_raw) if base_given else \
                    m.restore(archive[m.name], task, out)
                into[m.name].append(measured(cmds))
                if r == 0 and not base_given and "state_dict" not in m.name and not round_trips(members, task, out):
                    raise SystemExit(f"{m.name} did not give {task} of {name} back byte for byte")
    checked: dict[str, bool | None] = {}
    every = [t for t in members if t != "base"]
    for m in ms:  # every task once more, untimed (a Python method's in one process)
        if "state_dict" in m.name:
            checked[m.name] = None
            continue
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        if _is_python(m.name) and len(every) > 1:  # (one task: into ``out`` itself, as when timed)
            measured(m.restore(archive[m.name], ",".join(every), out))
        else:
            for t in every:
                (out / t).mkdir()
                measured(m.restore(archive[m.name], t, out / t))
        checked[m.name] = all(round_trips(members, t, out / t) for t in every)
    for m in ms:
        row = {"bytes": _bytes(archive[m.name]), "round_trips": checked[m.name]}
        row["python"] = _is_python(m.name)
        if m.pack:
            row["pack_seconds"] = statistics.median(p["seconds"] for p in packs[m.name])
            row["pack_work_seconds"] = statistics.median(p["work_seconds"] for p in packs[m.name])
            row["pack_peak_anon"] = max(p["peak_anon"] for p in packs[m.name])
            row["pack_peak_hwm"] = max(p["peak_hwm"] for p in packs[m.name])
        row["restore_seconds"] = statistics.median(p["seconds"] for p in restores[m.name])
        row["restore_work_seconds"] = statistics.median(p["work_seconds"] for p in restores[m.name])
        row["restore_peak_anon"] = max(p["peak_anon"] for p in restores[m.name])
        row["restore_peak_hwm"] = max(p["peak_hwm"] for p in restores[m.name])
        if m.name in restores_raw:
            row["restore_base_raw_seconds"] = statistics.median(p["seconds"] for p in restores_raw[m.name])
        res["methods"][m.name] = row
    return res


def python_baseline() -> dict:
    """Peak memory of a child that only imports what the Python methods import."""
    code = "import sys; sys.path[:0] = sys.argv[1:3]; import numpy, zstandard, tallpack, exact_vs_delta"
    return measured([[sys.executable, "-c", code, str(HERE), str(REPO)]])


def table(res: dict) -> str:
    ms = res["methods"]
    ref = ms["tallpack --exact"]["bytes"]
    mb = 1e6
    lines = [f"#### {res['family']} ({res['dtype']}, base + {res['tasks']} tasks, files {res['files_bytes'] / mb:.1f} MB, "
             f"one task ({res['task']}) {res['task_bytes'] / mb:.2f} MB)", ""]
    if "changed" in res:
        lines += [f"Elements a fine-tune changed: {', '.join(f'{c:.0%}' for c in res['changed'])} (Adam, SGD alternating); "
                  f"median |change| / |base| of those: {statistics.median(res['median_rel_change']):.1e}.", ""]
    lines += ["| method | bytes | of files | / tallpack | pack s | one task back s | same, base's files on disk | "
              "peak MB pack | peak MB task back | every task round-trips |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for name, r in ms.items():
        shared = name.startswith("tallpack state_dict")
        size = "(same archive)" if shared else f"{r['bytes']:,}"
        frac = "" if shared else f"{r['bytes'] / res['files_bytes']:.3f}"
        rel = "" if shared else f"{r['bytes'] / ref:.2f}x"
        def secs(k: str, digits: int) -> str:
            if k not in r:
                return ""
            work = f" ({r[k.replace('_seconds', '_work_seconds')]:.{digits}f})" if r["python"] and k != "restore_base_raw_seconds" else ""
            return f"{r[k]:.{digits}f}{work}"

        pack, back, back_raw = secs("pack_seconds", 2), secs("restore_seconds", 3), secs("restore_base_raw_seconds", 3)
        peak_p = f"{r['pack_peak_anon'] / mb:.0f} / {r['pack_peak_hwm'] / mb:.0f}" if "pack_peak_anon" in r else ""
        peak_r = f"{r['restore_peak_anon'] / mb:.0f} / {r['restore_peak_hwm'] / mb:.0f}"
        ok = "n/a" if r["round_trips"] is None else ("yes" if r["round_trips"] else "**NO**")
        lines.append(f"| {name} | {size} | {frac} | {rel} | {pack} | {back} | {back_raw} | {peak_p} | {peak_r} | {ok} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny families, no demo family, one round")
    ap.add_argument("--tasks", type=int, default=None, help="fine-tunes per synthetic family (default 8; quick 2)")
    ap.add_argument("--hidden", type=int, default=None, help="width (default 256; quick 64)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default 2; quick 1)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 4096; quick 512)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default 10; quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed restores of each method, alternated (default 3; quick 1)")
    ap.add_argument("--pack-rounds", type=int, default=None, help="timed packs of each method (default: --rounds)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--demo", default=None, help="demo family folder (default: .tallpack-demo/family, built when "
                                                  "absent); 'none' skips it (quick: skipped unless given)")
    ap.add_argument("--no-zipnn", action="store_true", help="leave ZipNN out even where it imports")
    ap.add_argument("--methods", default=None, help="only the methods whose names hold one of these words "
                                                    "(comma-separated; tallpack's always run), e.g. patch,xor")
    ap.add_argument("--work", type=Path, default=None, help="keep families and archives here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="where exact_vs_delta.json goes")
    a = ap.parse_args()
    q = a.quick
    tasks, hidden = a.tasks or (2 if q else 8), a.hidden or (64 if q else 256)
    layers, vocab = a.layers or (1 if q else 2), a.vocab or (512 if q else 4096)
    steps, restores = a.steps or (2 if q else 10), a.rounds or (1 if q else 3)
    rounds = (a.pack_rounds or restores, restores)
    demo = a.demo or (None if q else ".tallpack-demo/family")
    only = a.methods.split(",") if a.methods else None
    zipnn = False
    if not a.no_zipnn:
        try:
            import zipnn as _  # noqa: F401
            zipnn = True
        except ImportError:
            print("(zipnn does not import: its rows are left out)", file=sys.stderr)
    if shutil.which("zstd") is None:
        raise SystemExit("no zstd command line on PATH (its rows are this benchmark's point)")
    version = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="exact-vs-delta-") as tmp:
        work = (a.work or Path(tmp)).absolute()
        work.mkdir(parents=True, exist_ok=True)
        for dtype in a.dtypes.split(","):
            root = work / dtype
            shutil.rmtree(root, ignore_errors=True)
            (root / "files").mkdir(parents=True)
            t0 = time.perf_counter()
            base, paths, info = trained_family(root / "files", dtype, tasks, hidden, layers, vocab, steps,
                                               pretrain_steps=2 * steps)
            print(f"  trained {dtype} family ({info['params']:,} parameters) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
            members = {"base": [str(base)], **{k: [str(v)] for k, v in paths.items()}}
            results.append(measure_family(f"trained {dtype}", members, dtype, root, rounds, zipnn, info, only))
            print(table(results[-1]) + "\n", flush=True)
        if demo and demo != "none":
            sys.path.insert(0, str(REPO))
            from tallpack.demo.family import build_family

            fam = build_family(demo)
            root = work / "demo"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            members = {"base": [str(p) for p in sorted(Path(fam.base).iterdir()) if p.is_file()],
                       **{k: [str(p) for p in sorted(Path(v).iterdir()) if p.is_file()] for k, v in fam.tasks.items()}}
            results.append(measure_family("demo", members, "float32", root, rounds, zipnn, {}, only))
            print(table(results[-1]) + "\n", flush=True)
        baseline = python_baseline()
    print(f"Times: medians of {rounds[0]} (pack) and {rounds[1]} (task back) alternated runs, each in a fresh process (in parentheses, for Python: the "
          f"work alone, its imports done before the clock started); one task back = every file of the first task "
          f"from the archive alone (next column: with the base's raw files already on disk). Peak MB: RssAnon / VmHWM "
          f"of the child (a Python child that only imports: {baseline['peak_anon'] / 1e6:.0f} / "
          f"{baseline['peak_hwm'] / 1e6:.0f}). {version}.")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "exact_vs_delta.json").write_text(json.dumps({"zstd": version, "python_baseline": baseline,
                                                           "families": results}, indent=2))


if __name__ == "__main__":
    main()
