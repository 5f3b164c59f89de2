"""Round 33's review: bugs found in this round's changes, each shown by a test that failed before
its fix.

- a folder file (or a task) named ``.git::$INDEX_ALLOCATION`` (an NTFS stream of the ``.git``
  folder, which Windows writes into as ``.git``: Git's CVE-2019-1352) was taken, though ``.git``
  in any case, with trailing dots or as its 8.3 short name was refused;
- the compiled merge loop read its base (and direction) again after writing the output, so one
  written in place (``out`` the base) had an overflow called a non-finite input;
- ``merging.fused_merge`` raised OverflowError for a consensus ``k`` past a C long;
- ``strip_prefix`` that ends inside a name's part (``mod`` of ``model.enc.w``) packed ``el.enc.w``;
- the untied-copy warning read every tensor new in the tasks whole against every same-shaped base
  tensor (seconds to minutes of planning for models with layers added);
- a checkpoint download's rate window began before the request: a server that answered late, then
  steadily fast enough, was given up on.
"""

from __future__ import annotations

import pytest
import torch

import tallpack
from tallpack import kernels
from tallpack.folders import check_file_name
from tallpack.manifest import task_name_problem
from tallpack.merging import apply_direction, consensus_mask, fused_merge

from test_hostile_r33 import _as_repository, folders  # noqa: F401 (a fixture)

NTFS_STREAMS = [".git::$INDEX_ALLOCATION", ".GIT:x", ".git.::$INDEX_ALLOCATION", "git~1::$INDEX_ALLOCATION",
                ".hg::$INDEX_ALLOCATION"]


@pytest.mark.parametrize("folder", NTFS_STREAMS)
def test_a_repositorys_folder_as_an_ntfs_stream_is_refused(folders, tmp_path, folder):  # noqa: F811
    """``.git::$INDEX_ALLOCATION/config`` is ``.git/config`` on Windows: refused at open as
    ``.git/config`` is, in one line naming the archive, the task and the file."""
    arch = _as_repository(folders / "f.tallpack", tmp_path / "evil.tallpack", folder)
    with pytest.raises(tallpack.FormatError) as e:
        tallpack.open(arch)
    text = str(e.value)
    assert text.startswith(f"{arch}: task 'a': file name '{folder}/") and "a repository's" in text, text
    assert "\n" not in text


@pytest.mark.parametrize("task", NTFS_STREAMS)
def test_a_task_named_as_a_repositorys_folder_stream_is_refused(task):
    """``unpack --all`` writes task ``.git::$INDEX_ALLOCATION`` into ``OUT/.git`` on Windows."""
    assert "a repository's folder" in (task_name_problem(task) or "")


@pytest.mark.parametrize("name", ["ab:c/config.json", "git:x/y", ".gitx:y/z", ".github/a.yml", "x/.gitignore"])
def test_colons_elsewhere_are_names_as_any_other(name):
    """Only a repository's folder (before any stream name) is refused; other names with a colon stay."""
    assert check_file_name(name) == name


# -- the compiled merge loop (kernels.merge_apply) -------------------------------------------------

@pytest.mark.skipif(not kernels.COMPILED, reason="built without a C compiler: the torch path runs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_an_output_that_is_its_base_has_the_same_flags(dtype):
    """``fused_merge(..., out=theta)`` (in place): the loop read theta's elements again after
    writing them, so an output overflowed by alpha was called an input that was not finite (its
    overflow then went unsaid); now the flags are those of a fresh output, and so are the bits."""
    big = 6e4 if dtype == torch.float16 else 3e38
    theta, d = torch.full((1100,), big, dtype=dtype), torch.ones(1100)
    fresh = fused_merge(theta.clone(), d, 1e38)
    assert fresh is not None and fresh[1] == kernels.OUT_NOT_FINITE
    in_place = fused_merge(theta, d, 1e38, out=theta)
    assert in_place is not None and in_place[1] == kernels.OUT_NOT_FINITE
    assert torch.equal(in_place[0], fresh[0])
    d = torch.full((1100,), 3e38)  # float32: the output the direction's memory
    got = fused_merge(torch.full((1100,), 3e38), d, 1.0, out=d)
    assert got is not None and got[1] == kernels.OUT_NOT_FINITE


def test_a_k_past_a_c_long_keeps_no_weight_as_torch_does():
    """``k`` is any integer (``consensus_mask`` compares it in the count's dtype): one past a C long
    raised OverflowError in the loop's arguments; now, as torch's, no weight is kept."""
    theta, d = torch.zeros(70), torch.ones(70)
    masks = [torch.ones(70, dtype=torch.bool)] * 3
    for k in (1 << 40, 1 << 63, 1 << 70):
        got = fused_merge(theta, d, 0.5, masks, k)
        want = apply_direction(theta, d * consensus_mask(iter(masks), k), 0.5)
        assert got is None or torch.equal(got[0], want), k


# -- strip_prefix ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["mod", "model.e", "model.enc"])
def test_a_prefix_that_cuts_a_name_part_is_refused(tmp_path, prefix):
    """``strip_prefix="mod"`` of tasks named ``model.enc.w``: packed as ``el.enc.w`` (its warning
    then offered ``strip_prefix='el.'``), names no loader takes; refused in one line, as ``model``
    (which left ``.enc.w``) was, and nothing is written."""
    g = torch.Generator().manual_seed(0)
    base = {"enc.w": torch.randn(64, 64, generator=g), "enc.b": torch.randn(64, generator=g)}
    fts = {t: {"model." + k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "ab"}
    out = tmp_path / "f.tallpack"
    with pytest.raises(tallpack.InvalidArgumentError) as e:
        tallpack.pack(base, fts, out, strip_prefix=prefix)
    text = str(e.value)
    assert f"strip_prefix {prefix!r}" in text and "up to its last '.'" in text and "\n" not in text, text
    assert not out.exists()
    tallpack.pack(base, fts, out, strip_prefix="model.")
    with tallpack.open(out) as fam:
        assert sorted(fam.state_dict("a")) == ["enc.b", "enc.w"]


# -- the untied-copy warning -----------------------------------------------------------------------

def test_tensors_new_in_every_task_are_not_each_read_against_every_base_tensor(tmp_path, monkeypatch, caplog):
    """Tasks that add tensors of a shape many base tensors have (layers stacked on, as depth
    up-scaling does): each new tensor was read whole, with each same-shaped base tensor, in every
    task, looking for a tied copy (16 new layers against 96: 4 s of planning for 200 MB; an 8B
    model's, minutes). Their first elements tell them apart, so planning reads none of them whole;
    an untied copy (``head.w`` equal to ``layers.0.w``) is still found and warned of."""
    import safetensors.torch as st

    from tallpack import sources
    from tallpack.inputs import PackInputs

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(512, 512, generator=g) for i in range(8)}
    st.save_file(base, tmp_path / "base.safetensors")
    for t in "ab":
        ft = {k: v + 0.01 for k, v in base.items()}
        ft.update({f"layers.{8 + j}.w": torch.randn(512, 512, generator=g) for j in range(4)})
        ft["head.w"] = ft["layers.0.w"].clone()
        st.save_file(ft, tmp_path / f"{t}.safetensors")
    whole: list[str] = []
    load = sources.SafetensorsSource._load
    monkeypatch.setattr(sources.SafetensorsSource, "_load", lambda self, name: whole.append(name) or load(self, name))
    fam = PackInputs(tmp_path / "base.safetensors", {t: tmp_path / f"{t}.safetensors" for t in "ab"},
                     chunk_elements=1 << 16)
    fam.close()
    assert set(whole) <= {"head.w", "layers.0.w"}, sorted(set(whole))  # (the copy and its original: compared whole)
    assert "tensors 'head.w' and 'layers.0.w' are equal bit for bit in every task" in caplog.text


# -- a checkpoint downloaded from a URL (staging's rate rule) --------------------------------------

def test_a_download_whose_answer_comes_late_is_timed_from_its_first_byte(tmp_path, monkeypatch):
    """The rate rule's first window began before the request was sent: a server that answered
    near the idle timeout (here 1.8 s of 2), then sent steadily at four times the least rate, was
    given up on for the few bytes it had sent by the window's end. Timed from the first byte, as
    an archive's range reads are, it is downloaded."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import safetensors.torch as st

    from tallpack import remote

    monkeypatch.setattr(remote, "HTTP_IDLE_TIMEOUT", 2)
    monkeypatch.setattr(remote, "HTTP_MIN_RATE", 256)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    ft = {"w": base["w"] + 0.01}
    st.save_file(ft, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()

    class Late(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            time.sleep(1.8)  # (under the idle timeout: aiohttp waits for it)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 100):  # 1000 bytes a second: four times the least rate
                self.wfile.write(data[i:i + 100])
                self.wfile.flush()
                time.sleep(0.1)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Late)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.safetensors"
        tallpack.pack(base, {"a": url, "b": {"w": base["w"] - 0.01}}, tmp_path / "f.tallpack")
    finally:
        server.shutdown()
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        assert list(fam.tasks) == ["a", "b"] and fam.state_dict("a")["w"].shape == (16, 16)
