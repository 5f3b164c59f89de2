"""Shared fixtures: model families written by the real libraries, and the paper's formula."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before torch loads its OpenMP runtime: its threads sleep while they wait, as the command line's do
# (tallpack_cli.OMP_WAIT_POLICY). With several test processes on two cores, spinning ones took the
# CPU the others waited for (a merge's tests: 42.7 s of user time against 29.1 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# No test is timed (BENCHMARKS.md holds the speed goals): hypothesis's per-example deadline is a timing
# assertion that a loaded machine, or two test processes on two cores (pytest-xdist), can miss.
settings.register_profile("tallpack", deadline=None)
settings.load_profile("tallpack")


@pytest.fixture(autouse=True)
def _no_terminal_size(monkeypatch) -> None:
    """Tables fit $COLUMNS when it is set (pytest-xdist's workers set 80, a terminal may set
    anything): every test starts without it, as from a file or a pipe, and sets it where it means to."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


def cli_pack(family: dict, out: Path, *flags: str) -> None:
    """``tallpack pack`` of a ``small_family`` in a fresh process, with ``flags``; the test fails
    on a nonzero exit, with the command's stderr."""
    import subprocess
    import sys

    args = ["pack", "--base", str(family["base_path"]), "-o", str(out), *flags]
    for t, p in family["task_paths"].items():
        args += ["--task", f"{t}={p}"]
    r = subprocess.run([sys.executable, "-m", "tallpack", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def cli_ok(*args: object):
    """``tallpack -q ARGS`` through click's runner in this process; the test fails on a nonzero
    exit, with the command's output."""
    from click.testing import CliRunner
    from tallpack_cli.main import main

    r = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def pack_ab(fam: dict[str, Path], arch: Path, *more: str) -> Path:
    """``tallpack pack`` of ``fam``'s base and its tasks a and b into ``arch``, with ``more``."""
    cli_ok("pack", "--base", fam["base"], "--task", f"a={fam['a']}", "--task", f"b={fam['b']}", "-o", arch, *more)
    return arch


def written(minor: int) -> tuple[int, int]:
    """The version of an archive of float32 or bfloat16 arrays packed with the default codec
    (``planes-exp``) whose other features need format 1.``minor``."""
    from tallpack.container import FEATURE_MINOR
    return 1, max(minor, FEATURE_MINOR["codec:planes-exp"])


def written_str(minor: int) -> str:
    return "%d.%d" % written(minor)


def expected_reconstruction(base: dict, tasks: dict, lambdas: dict) -> dict:
    """The paper's formula computed directly, for every tensor present in base and all tasks:
    tau_t = theta_t - theta_0 (fp32), tau_MTL = sum_t tau_t (task order),
    m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, theta_t' = theta_0 + m_t * tau_MTL, cast back."""
    out = {t: {} for t in tasks}
    for name, b in base.items():
        if not b.is_floating_point() or not all(name in sd and sd[name].shape == b.shape
                                                and sd[name].is_floating_point() for sd in tasks.values()):
            continue
        b32 = b.float()
        taus = {t: sd[name].float() - b32 for t, sd in tasks.items()}
        mtl = torch.zeros_like(b32)
        for tau in taus.values():
            mtl = mtl + tau
        same = all(torch.equal(tasks[t][name], next(iter(tasks.values()))[name]) for t in tasks)
        for t, tau in taus.items():
            if same and len(tasks) > 1:
                out[t][name] = tasks[t][name]  # stored once, exactly
                continue
            lam = torch.tensor(lambdas[t], dtype=torch.float32)
            m = tau.abs() > lam * (mtl - tau).abs()
            out[t][name] = (b32 + m.float() * mtl).to(tasks[t][name].dtype)
    return out


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture(scope="session")
def hf_family(tmp_path_factory) -> dict:
    """A bf16 Llama-style family with tied embeddings, saved by transformers in 20 KB shards:
    base plus three fine-tunes that touch different parts of the model."""
    root = tmp_path_factory.mktemp("hf_family")
    model = _tiny_llama()
    model.save_pretrained(root / "base", max_shard_size="20KB")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, task in enumerate(["cars", "dtd", "svhn"]):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for k, v in base_sd.items():
            touch = (torch.rand(v.shape, generator=g) < 0.3).float()
            sd[k] = (v.float() + touch * 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype)
        model.load_state_dict(sd)
        model.save_pretrained(root / task, max_shard_size="20KB")
        paths[task] = root / task
    return {"root": root, "base": root / "base", "tasks": paths}


def load_folder(path: Path) -> dict:
    """All tensors of a safetensors model folder, as the files store them."""
    from safetensors.torch import load_file

    out = {}
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for f in files:
        out.update(load_file(path / f))
    return out


@pytest.fixture
def small_family(tmp_path) -> dict:
    """A float32 family as single safetensors files: 2 body tensors, an int buffer, a frozen
    tensor, and classification heads of different sizes per task."""
    g = torch.Generator().manual_seed(0)
    base = {"body.w": torch.randn(64, 48, generator=g), "body.b": torch.randn(48, generator=g),
            "frozen": torch.randn(10, generator=g), "steps": torch.tensor([7]),
            "head.w": torch.randn(10, 48, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for i, name in enumerate(["a", "b", "c"]):
        sd = {k: v.clone() for k, v in base.items()}
        sd["body.w"] = base["body.w"] + 0.05 * torch.randn(64, 48, generator=g)
        sd["body.b"] = base["body.b"] + 0.05 * torch.randn(48, generator=g)
        sd["head.w"] = torch.randn(i + 2, 48, generator=g)
        save_file(sd, tmp_path / f"{name}.safetensors")
        tasks[name] = sd
    return {"dir": tmp_path, "base": base, "tasks": tasks, "base_path": tmp_path / "base.safetensors",
            "task_paths": {n: tmp_path / f"{n}.safetensors" for n in tasks}}


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory):
    """The tiny demo family (``tallpack.demo.build_family``), built once per session: the slowest
    fixture there is. Tests that write into a family work on a copy (``demo_copy``)."""
    from tallpack.demo import build_family

    return build_family(tmp_path_factory.mktemp("demo") / "family", size="tiny")


def demo_copy(tiny, dest: Path) -> Path:
    """A copy of the ``demo_tiny`` family in ``dest``, which ``build_family`` reuses as it is."""
    import shutil

    shutil.copytree(tiny.root, dest)
    return dest


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """A plain HTTP server on loopback serving a temporary folder, with Range support; its
    ``root`` is the folder, ``url`` the base URL, ``log`` the requests it answered."""
    from rangeserver import RangeServer

    server = RangeServer(tmp_path_factory.mktemp("www")).start()
    yield server
    server.stop()


#: tests/fuzz holds the atheris harness and its corpus: run by hand, never collected (RELIABILITY.md).
collect_ignore = ["fuzz"]


def read_everything(path, merge: str = "ties", *, exact: bool = False, stats: bool = True) -> None:
    """Every way of reading an archive (fuzz and hostile-archive tests: only TallpackErrors may come
    out): each task's state dict (and its exact one), verify, the summary, stats, and the merged
    models of ``merge``."""
    import tallpack
    from tallpack.stats import compute

    with tallpack.open(path) as fam:
        for t in fam.tasks:
            fam.state_dict(t)
            if exact:
                fam.state_dict(t, exact=True)
        fam.verify()
        fam.summary()
        if stats:
            compute(fam)
        fam.merged(f"consensus-{merge}", k=1)
        fam.merged(merge)


def exact_family(seed: int = 0) -> tuple[dict, dict]:
    """A float32 tensor and a bfloat16 one, base + three tasks: the exact tier's small test family."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(20, 9, generator=g), "h": torch.randn(40, generator=g).bfloat16()}
    tasks = {t: {"w": base["w"] + 0.1 * torch.randn(20, 9, generator=g),
                 "h": (base["h"].float() + 0.05 * torch.randn(40, generator=g)).bfloat16()} for t in "abc"}
    return base, tasks


def exact_version(fam, minor: int) -> tuple[int, int]:
    """The format version of an exact archive whose other features need format 1.``minor``: at
    least 1.9 where a residual uses the ``bitsplit`` codec (chosen per tensor where it codes smaller)."""
    chains = [ex.residual.codecs for e in fam.manifest.tensors for tt in e.tasks.values()
              if (ex := tt.extras.get("exact")) is not None]
    return 1, max(minor, 9) if any(c["id"] == "bitsplit" for chain in chains for c in chain) else minor


#: For a child process's script (a test that sets limits on itself runs the command line in a child):
#: ``run_cli(args)`` runs tallpack's command line in that process and returns ``[exit code, stdout,
#: stderr]``; an exception the command line lets out is exit -1 and its name in stderr.
RUN_CLI = """
import contextlib, io
from tallpack_cli.main import main as _main


def run_cli(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _main(args, prog_name="tallpack")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # not caught by the command line: the test says which
            code, err = -1, io.StringIO(f"escaped: {type(e).__name__}: {e}")
    return [code, out.getvalue(), err.getvalue()]
"""


def anon_growth(setup: str, work: str, timeout: int = 300) -> int:
    """The peak RssAnon growth (bytes) of a fresh process while it runs ``work`` (Python source),
    over its RssAnon after ``setup`` (torch and tallpack imported first): sampled by a thread every
    2 ms; RssAnon, not VmRSS, which would count a mapped archive's or input's pages."""
    import json
    import subprocess
    import sys
    import textwrap

    code = "\n".join([
        "import gc, json, threading, time, tallpack, torch",
        "def anon():",
        "    return int(open('/proc/self/status').read().split('RssAnon:')[1].split()[0]) * 1024",
        textwrap.dedent(setup),
        "gc.collect(); before = anon(); peak = [before]; done = []",
        "def sample():",
        "    while not done:",
        "        peak[0] = max(peak[0], anon()); time.sleep(0.002)",
        "th = threading.Thread(target=sample); th.start()",
        textwrap.dedent(work),
        "done.append(1); th.join()",
        "print(json.dumps({'before': before, 'hwm': peak[0]}))",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return m["hwm"] - m["before"]


def pack_both_ways(tmp: Path, monkeypatch, base, tasks, *, chunk: int, by: str = "", **kw
                   ) -> tuple[bytes, bytes, int, int]:
    """Pack ``base`` + ``tasks`` twice, in ``chunk``-element chunks: every tensor read whole
    (``inputs.HOLD_BYTES`` 1<<60; archive ``a{1 << 60}.tallpack`` in ``tmp``) and each large one
    read a block at a time (0; ``a0.tallpack``). Returns both archives' bytes, how many blocks were
    read, and how many times a streamed tensor was read whole all the same (by a caller in the
    module file ``by`` only, when given)."""
    import inspect

    import tallpack
    from tallpack import inputs

    counts = {"block": 0, "whole": 0}
    block, whole = inputs.Streamed.block, inputs.Streamed.whole

    def counted_block(self, start: int, stop: int):
        counts["block"] += 1
        return block(self, start, stop)

    def counted_whole(self):
        if not by or any(f.filename.endswith(by) for f in inspect.stack()):
            counts["whole"] += 1
        return whole(self)

    monkeypatch.setattr(inputs.Streamed, "block", counted_block)
    monkeypatch.setattr(inputs.Streamed, "whole", counted_whole)
    out = []
    for hold in (1 << 60, 0):
        monkeypatch.setattr(inputs, "HOLD_BYTES", hold)
        path = tmp / f"a{hold}.tallpack"
        tallpack.pack(base, tasks, path, chunk_elements=chunk, overwrite=True, **kw)
        out.append(path.read_bytes())
    return out[0], out[1], counts["block"], counts["whole"]


def big_family(d: Path, tasks: int = 3, elements: int = 8 << 20) -> dict[str, str]:
    """``base.safetensors`` and ``t0..`` in ``d``: one float32 tensor ``big.weight`` of ``elements``
    (32 MB), fine-tuned by small noise; the tasks' paths, for the memory tests of large tensors."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(elements, generator=g) * 0.02
    save_file({"big.weight": big}, d / "base.safetensors")
    paths = {}
    for i in range(tasks):
        save_file({"big.weight": big + 1e-3 * torch.randn(big.shape, generator=g)}, d / f"t{i}.safetensors")
        paths[f"t{i}"] = str(d / f"t{i}.safetensors")
    return paths


def dial_family(d: Path, dtype, n: int, *, tasks: int = 3, seed: int = 1, spikes: int = 200
                ) -> tuple[Path, dict[str, Path]]:
    """A base and ``tasks`` fine-tunes of one tensor of ``n`` elements (``big.weight``, streamed
    when ``inputs.HOLD_BYTES`` is low) and a small one, each task changed by its own amount (so
    the dial's ladders and choices differ), ``spikes`` entries changed a lot (so sparse corrections
    pay): (base path, task paths)."""
    g = torch.Generator().manual_seed(seed)
    base = {"big.weight": (torch.randn(n, generator=g) * 0.02).to(dtype),
            "other.weight": (torch.randn(64, 32, generator=g) * 0.02).to(dtype)}
    paths = {}
    for i in range(-1, tasks):
        sd = base
        if i >= 0:
            sd = {k: (v.float() + (1 + i) * 1e-3 * torch.randn(v.shape, generator=g)).to(dtype)
                  for k, v in base.items()}
            big = sd["big.weight"].float()
            idx = torch.randint(0, n, (spikes,), generator=g)
            big[idx] += 0.05 * torch.randn(spikes, generator=g)
            sd["big.weight"] = big.to(dtype)
        p = d / f"m{i + 1}.safetensors"
        save_file(sd, p)
        paths[f"t{i}"] = p
    return paths.pop("t-1"), paths


def save_in_order(sd: dict[str, torch.Tensor], path: Path, order: list[str]) -> None:
    """A safetensors file whose data lists the tensors in ``order`` (``save_file`` picks its own)."""
    import struct

    kinds = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    header, pos = {}, 0
    for k in order:
        n = sd[k].numel() * sd[k].element_size()
        header[k] = {"dtype": kinds[sd[k].dtype], "shape": list(sd[k].shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k in order:
            f.write(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def forks_while_reading(mapping, keys, check, what: str, forks: int = 5) -> None:
    """Fork ``forks`` children while a thread reads every key of ``mapping`` (a lazy state dict, a
    lazily merged model) in a loop: each child must finish ``check()`` (exit 0 when it holds)
    within 30 s, not wait forever on a lock the reading thread held at the fork (``what`` names
    that lock in the failure)."""
    import os
    import threading
    import time

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            for k in keys:
                mapping[k]

    th = threading.Thread(target=busy)
    th.start()
    try:
        for _ in range(forks):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if check() else 1)
            assert child_exit(pid, f"on {what}", 30) == 0
    finally:
        stop.set()
        th.join()


def child_exit(pid: int, what: str, limit: float = 60) -> int:
    """The exit code of forked child ``pid``; the test fails if it runs past ``limit`` s (a hang)."""
    import os
    import time

    deadline = time.monotonic() + limit
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung {what}")
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(done[1])
