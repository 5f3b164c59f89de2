"""Running out of memory is not damage (round 21): a read, a rebuild or a thread start that cannot
have its memory is an OutOfMemoryError (a MemoryError too), one line naming the archive and what it
was reading, never "damaged archive", "too large to decode", "the archive was closed" or "a bug in tallpack".

Memory pressure is real: a child process caps its address space (RLIMIT_AS, what ``ulimit -v`` does)
at what it holds after its imports plus a margin, runs the command, lifts the cap, and tries the
next margin. Errors of damage name the tensor and file the caller asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from conftest import RUN_CLI
from tallpack.errors import IntegrityError, OutOfMemoryError, TallpackError

ROOT = Path(tallpack.__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").is_file() or sys.platform != "linux",
                                reason="RLIMIT_AS and /proc/self/statm: Linux")

#: Margins (MB) over what the child holds: from nothing spare to enough for the whole command.
MARGINS = [0, 4, 10, 16, 25, 40, 200]

CHILD = RUN_CLI + textwrap.dedent("""
    import json, resource, sys
    import torch, numpy, safetensors.torch, tallpack, tallpack.reader, tallpack.outputs, tallpack.packer
    import tallpack.merged, tallpack.originals
    torch.set_num_threads(1)  # libgomp ends the process when it cannot start a thread: nothing to catch
    def held():
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    commands, margins = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    every = []
    for args in commands:  # one child for a test's commands: the imports once
        results = [["free", run_cli([a.replace("MB", "free") for a in args])]]
        for mb in margins:
            resource.setrlimit(resource.RLIMIT_AS, (held() + (mb << 20), resource.RLIM_INFINITY))
            try:
                got = run_cli([a.replace("MB", str(mb)) for a in args])
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            results.append([mb, got])
        every.append(results)
    print(json.dumps(every))
""")


def child(code: str, *argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli"), *sys.path]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """A base and two tasks of 8 tensors of 1 MB (float32), packed lossy and with the exact tier."""
    d = tmp_path_factory.mktemp("oom")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(8)}
    save_file(base, d / "base.safetensors")
    for t in ("t0", "t1"):
        save_file({k: v + (torch.rand(v.shape, generator=g) < 0.1) * 0.01 * torch.randn(v.shape, generator=g)
                   for k, v in base.items()}, d / f"{t}.safetensors")
    tasks = {t: d / f"{t}.safetensors" for t in ("t0", "t1")}
    tallpack.pack(d / "base.safetensors", tasks, d / "f.tallpack")
    tallpack.pack(d / "base.safetensors", tasks, d / "x.tallpack", exact=True)
    return {"dir": d, "archive": d / "f.tallpack", "exact": d / "x.tallpack", "base": d / "base.safetensors",
            **tasks}


def under_pressure(*commands: list) -> list:
    """Each command's ``args`` run by the CLI under each margin of MARGINS (``MB`` in an argument:
    the margin), all in one child; a list of results per command."""
    return json.loads(child(CHILD, json.dumps([[str(a) for a in args] for args in commands]), json.dumps(MARGINS)))


def check(results: list, name: str) -> None:
    (_, (code, out, err)), *capped = results
    assert code == 0, err  # with no cap it works
    failed = 0
    for mb, (code, out, err) in capped:
        if code == 0:
            continue
        failed += 1
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), (mb, code, err)
        assert "out of memory" in err, (mb, err)
        for wrong in ("damaged archive", "too large", "closed", "not a readable", "a bug in tallpack",
                      "internal error"):
            assert wrong not in err, (mb, err)
        assert not err.startswith("error: out of memory") or f"'tallpack {name}'" in err, (mb, err)
    assert failed, f"no margin made {name} run out of memory"


def test_verify_out_of_memory_is_not_damage(family):
    """F5: verify of an intact archive in a process short of memory fails with one out-of-memory
    line (exit 1), never "too large to decode ... " per tensor as if it were damaged."""
    [results] = under_pressure(["-q", "verify", family["exact"]])
    check(results, "verify")


def test_unpack_short_of_memory_is_one_out_of_memory_line(family):
    """F5/F6: unpack (lossy and exact) short of memory: one out-of-memory line, never damage nor
    "the archive was closed while it was read"."""
    d = family["dir"]
    lossy, exact = under_pressure(["-q", "unpack", family["archive"], "--task", "t0", "-o", d / "u-MB"],
                                  ["-q", "unpack", family["exact"], "--task", "t0", "--exact", "-o", d / "x-MB"])
    check(lossy, "unpack")
    check(exact, "unpack")


THREAD = """
    import json, resource, sys, threading
    import torch, tallpack, tallpack.reader
    def held():
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    with tallpack.open(sys.argv[1], threads=4, cache_bytes=0) as fam:
        threading.stack_size(64 << 20)  # a reading thread needs more than the cap leaves
        resource.setrlimit(resource.RLIMIT_AS, (held() + (4 << 20), resource.RLIM_INFINITY))
        try:
            fam.get_tensor("t0", "layer0.weight")
            got = ["returned", ""]
        except BaseException as e:
            got = [type(e).__name__, str(e)]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        threading.stack_size(0)
        after = fam.get_tensor("t0", "layer0.weight").shape == (512, 512)  # not closed: it still reads
    print(json.dumps(got + [after]))
"""


def test_a_thread_that_cannot_start_is_not_a_closed_archive(family):
    """F6: a reading thread that cannot start (memory) is an OutOfMemoryError that says so, not
    "the archive was closed while it was read"; the archive, open, reads once memory is back."""
    kind, message, after = json.loads(child(THREAD, str(family["archive"])))
    assert kind == "OutOfMemoryError", (kind, message)
    assert message.startswith(f"{family['archive']}: cannot start a reading thread") and "closed" not in message
    assert after


def test_merge_and_pack_out_of_memory_are_not_bugs(family):
    """F7: torch's allocator failing (a RuntimeError) or a thread that cannot start is one line
    naming what ran out, not an internal error."""
    d = family["dir"]
    merge, pack = under_pressure(["-q", "merge", family["archive"], "-o", d / "m-MB"],
                                 ["-q", "pack", "--base", family["base"], "--task", family["t0"], "--task", family["t1"],
                                  "-o", d / "p-MB.tallpack"])
    check(merge, "merge")
    check(pack, "pack")


API = """
    import importlib, json, resource, sys
    import torch, tallpack, tallpack.reader, tallpack.originals
    from tallpack.errors import OutOfMemoryError
    def held():
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    path, margins, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    for where, value in settings.items():  # module attributes ("tallpack.encodings.exact.RUNS_FROM": 4096)
        module, name = where.rsplit(".", 1)
        setattr(importlib.import_module(module), name, value)
    torch.set_num_threads(1)  # (nor torch's own pool, started on a first parallel op)
    results = []
    for mb in margins:
        # one thread: verify starts none, so the limit bites in allocations Python sees, not in a
        # thread's start, where glibc may abort the process ("cannot allocate memory for
        # thread-local data"): a limit of the platform's, which no library can turn into an error
        with tallpack.open(path, cache_bytes=0, threads=1) as fam:
            resource.setrlimit(resource.RLIMIT_AS, (held() + (mb << 20), resource.RLIM_INFINITY))
            try:
                got = ["returned", fam.verify()]
            except OutOfMemoryError as e:
                got = ["OutOfMemoryError", str(e)]
            except BaseException as e:
                got = [type(e).__name__, str(e)]
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        results.append([mb] + got)
    print(json.dumps(results))
"""


def verify_short_of_memory(path: Path, margins: list[int] = MARGINS, settings: dict | None = None) -> None:
    """``Archive.verify`` of the intact ``path`` in a child, under each margin (MB over what it
    holds; ``settings``: module attributes set first): no problem where it has enough, else an
    OutOfMemoryError naming the archive once, in one line; some margin short, the last enough."""
    results = json.loads(child(API, str(path), json.dumps(margins), json.dumps(settings or {})))
    raised = 0
    for mb, kind, got in results:
        if kind == "returned":
            assert got == [], (mb, got)  # intact
            continue
        raised += 1
        assert kind == "OutOfMemoryError", (mb, kind, got)
        assert got.startswith(f"{path}: ") and "\n" not in got and "damaged archive" not in got, got
        assert got.count(path.name) == 1, got
    assert raised and results[-1][1:] == ["returned", []], results


def test_verify_raises_out_of_memory_instead_of_listing_damage(family):
    """F5, the Python API: Archive.verify short of memory raises OutOfMemoryError (a TallpackError
    and a MemoryError) naming the archive, rather than returning problems for an intact archive."""
    assert issubclass(OutOfMemoryError, TallpackError) and issubclass(OutOfMemoryError, MemoryError)
    verify_short_of_memory(family["exact"])


def test_read_file_names_the_archive_once_and_the_task(tmp_path):
    """review F2: a damaged kept file read by Archive.read_file is named once with its archive,
    and with the task (or the base) it belongs to."""
    src = tmp_path / "t0"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=g)}
    (tmp_path / "b").mkdir()
    save_file(base, tmp_path / "b" / "model.safetensors")
    save_file({"w": base["w"] + 0.01}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "pad": "x" * 500}))
    out = tmp_path / "f.tallpack"
    tallpack.pack(tmp_path / "b", {"t0": src}, out)
    with tallpack.open(out) as fam:
        ref = fam.manifest.files[fam.files("t0")["config.json"]]
    data = bytearray(out.read_bytes())
    data[ref.chunks[0].offset + ref.chunks[0].nbytes // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    with tallpack.open(out) as fam:
        with pytest.raises(IntegrityError) as e:
            fam.read_file("config.json", "t0")
    assert str(e.value).startswith(f"{out}: file 'config.json' of task 't0': "), str(e.value)
    assert str(e.value).count("f.tallpack") == 1


def test_a_damaged_group_names_the_member_asked_for(tmp_path):
    """review F4: get_tensor of one member of a damaged tensor group (format 1.12) names that
    member (and its group), not the group's first four members."""
    g = torch.Generator().manual_seed(3)
    base = {f"layer{i}.norm": torch.randn(64, generator=g) for i in range(8)}
    save_file(base, tmp_path / "base.safetensors")
    for t in ("t0", "t1"):
        save_file({k: v + 0.01 * torch.randn(64, generator=g) for k, v in base.items()}, tmp_path / f"{t}.safetensors")
    out = tmp_path / "g.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", {t: tmp_path / f"{t}.safetensors" for t in ("t0", "t1")}, out)
    with tallpack.open(out) as fam:
        group = next(e for e in fam.manifest.tensors if e.members)
        c = group.arrays["merged"].chunks[0]
    data = bytearray(out.read_bytes())
    data[c.offset + c.nbytes // 2] ^= 0x55
    out.write_bytes(bytes(data))
    with tallpack.open(out) as fam:  # one archive: the reads share the group's plan
        for name in ("layer7.norm", "layer0.norm"):
            with pytest.raises(IntegrityError) as e:
                fam.get_tensor("t0", name)
            assert f"task 't0', tensor {name!r} (in group {group.name!r})" in str(e.value), str(e.value)
        with pytest.raises(IntegrityError, match=f"tensor group {group.name!r}"):  # the whole group: as a group
            fam.state_dict("t0")


MERGE_API = """
    import json, resource, sys
    import torch, tallpack, tallpack.merged, tallpack.stats
    torch.set_num_threads(1)  # libgomp ends the process when it cannot start a thread: nothing to catch
    def held():
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    out = []
    for what in ("merged", "merge_parts", "stats"):
        for mb in (4, 6, 8, 10, 12, 16):
            fam = tallpack.open(sys.argv[1], cache_bytes=0, threads=1)
            fam.get_tensor("t0", "layer0.weight")
            resource.setrlimit(resource.RLIMIT_AS, (held() + (mb << 20), resource.RLIM_INFINITY))
            try:
                if what == "merged":
                    fam.merged("ta")
                elif what == "merge_parts":
                    fam.merge_parts("ta").state_dict(0.3)
                else:
                    tallpack.stats.compute(fam)
                got = ["ok", ""]
            except BaseException as e:
                got = [type(e).__name__, str(e), isinstance(e, tallpack.TallpackError)]
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            fam.close()
            out.append([what, mb, got])
    print(json.dumps(out))
"""


def test_merged_models_and_statistics_short_of_memory_are_out_of_memory_errors(family):
    """merged(), a merge's state_dict and stats.compute short of memory raised torch's allocator
    RuntimeError (not a TallpackError; the command line alone turned it into one line)."""
    results = json.loads(child(MERGE_API, str(family["archive"])))
    failed = [r for r in results if r[2][0] != "ok"]
    assert failed, results
    for what, mb, got in failed:
        assert got[0] == "OutOfMemoryError" and got[2] and "not damaged" in got[1], (what, mb, got)


def test_a_library_that_cannot_be_mapped_is_out_of_memory() -> None:
    """Under ``ulimit -v``, importing torch fails with the loader's ENOMEM as an ImportError
    ("failed to map segment from shared object"): the command line called it a bug in tallpack."""
    from tallpack.errors import out_of_memory

    assert out_of_memory(ImportError("libtorch_cpu.so: failed to map segment from shared object"))
    assert not out_of_memory(ImportError("No module named 'torch'"))


def test_a_lock_that_cannot_be_allocated_is_out_of_memory() -> None:
    """CI (stop 37): verify under a 10 MB margin failed with CPython's ``RuntimeError("can't
    allocate lock")`` from ``threading.Lock()``, which the command line called a bug in tallpack."""
    from tallpack.errors import memory_detail, memory_named, out_of_memory

    e = RuntimeError("can't allocate lock")
    assert out_of_memory(e) and memory_detail(e) == "could not allocate a lock"
    with pytest.raises(OutOfMemoryError, match="could not allocate a lock; the archive is not damaged"):
        with memory_named("a.tallpack: verify"):
            raise e
    assert not out_of_memory(RuntimeError("lock held by another thread"))
