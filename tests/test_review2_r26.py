"""Review of round 26's late commits (second pass): consensus counts past int16 and a k past them
(cfa2221), the command line's redacting handler filter meeting a malformed record (3b2815c), and a
remote merged model's prefetch: what it fetches (51ac1b1) and what its failure names (f1d9ff4)."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.errors import TallpackError
from tallpack.merging import consensus_mask, merge_direction
from tallpack.options import PackOptions
from tallpack.remote import RedactingFilter


def _formula(tau: torch.Tensor, masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """``m_cons * tau_MTL`` with the counts in int64 and m_cons as 0.0/1.0 (spec §6.2)."""
    count = torch.stack([m.to(torch.int64) for m in masks]).sum(0)
    return (count >= k).to(torch.float32) * tau


def _bits(t: torch.Tensor) -> list[int]:
    return t.view(torch.int32).tolist()


def test_consensus_counts_past_int16():
    # an archive may hold 65536 tasks (limits.MAX_TASKS): the 32768th mask wrapped an int16 count
    # to -32768, so no weight every task uses was kept at k=2
    n = 32768
    kept = consensus_mask((torch.ones(2, dtype=torch.bool) for _ in range(n)), 2)
    assert kept.tolist() == [True, True]
    assert consensus_mask([torch.tensor([True, False])] * n, n).tolist() == [True, False]


def test_k_past_the_count_dtype_keeps_nothing():
    # MergeParts clamps k to T + 1: 32768 for 32767 tasks, which an int16 comparison took as -32768
    assert consensus_mask([torch.ones(2, dtype=torch.bool)] * 32767, 32768).tolist() == [False, False]
    tau = torch.tensor([1.0, -2.0, float("nan"), -0.0, float("inf")])
    masks = [torch.tensor([True, True, False, True, True])] * 3
    for k in (0, 2, 3, 4, 40000, 70000, 1 << 40):  # 40000 and 70000 wrapped to -25536 and 4464
        assert _bits(merge_direction("consensus-ta", tau, iter(masks), k=k)) == _bits(_formula(tau, masks, k)), k


def test_redacting_handler_filter_lets_logging_report_a_malformed_record(capsys):
    # a library's bad format string: logging reports it and the program goes on, as without the
    # filter; with it on the handler, getMessage's TypeError escaped from the library's log call
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("tallpack-test-review2.somelib")
    log.addHandler(handler)
    log.propagate = False
    link = "https://host/a.bin?X-Amz-Signature=" + "s3cr3t&v=2"  # (the report shows the call's line)
    try:
        log.warning("%d bytes from %s", "many", link)
        log.warning("fine: %s", "https://host/b.bin?X-Amz-Signature=s3cr3t")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert out.getvalue() == "fine: https://host/b.bin\n"
    report = capsys.readouterr().err
    assert "--- Logging error ---" in report and "https://host/a.bin?v=2" in report
    assert "s3cr3t" not in report


def _family(tmp_path) -> tuple[str, dict[str, str]]:
    """A base and three float32 fine-tunes as safetensors files: (base path, task -> path)."""
    g = torch.Generator().manual_seed(0)
    base = {"body.w": torch.randn(128, 64, generator=g), "body.b": torch.randn(64, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for n in "abc":
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"{n}.safetensors")
        tasks[n] = str(tmp_path / f"{n}.safetensors")
    return str(tmp_path / "base.safetensors"), tasks


@contextmanager
def _in_memory(archive: Path) -> Iterator[str]:
    """``archive`` at a memory:// URL (fsspec's in-memory file system: a remote archive, read by ranges)."""
    fs = fsspec.filesystem("memory")
    path = f"/review2-{uuid.uuid4().hex}.tallpack"
    fs.pipe(path, archive.read_bytes())
    try:
        yield f"memory://{path}"
    finally:
        fs.rm(path)


def test_remote_consensus_merge_fetches_no_dial_correction(tmp_path):
    # 51ac1b1 fetched every array of a tensor at once for a consensus model, the dial's
    # corrections too, which it never reads: they stayed in the remote file's cache (up to 256 MiB)
    base, tasks = _family(tmp_path)
    out = tmp_path / "dial.tallpack"
    tallpack.pack(base, tasks, str(out), options=PackOptions(fidelity=0.999, corrections=("sparse", "quant8")))
    with tallpack.open(str(out)) as fam:
        assert any("correction" in tt.extras for e in fam.manifest.tensors for tt in e.tasks.values())
        local = fam.merged("consensus-ta", k=2, alpha=0.3)
    with _in_memory(out) as url, tallpack.open(url) as fam:
        merged = fam.merged("consensus-ta", k=2, alpha=0.3)
        assert fam._c.source._cached == 0  # every byte fetched was read
    assert all(torch.equal(merged[k], local[k]) for k in local)


def test_remote_merge_failed_fetch_names_the_tensors(tmp_path):
    # the merged model's prefetch (51ac1b1) went through Archive.prefetch, which named nothing
    # (f1d9ff4): "range read at 64 failed (...)" without the tensor it was for
    base, tasks = _family(tmp_path)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, tasks, str(out))
    with _in_memory(out) as url, tallpack.open(url) as fam:
        fs = fam._c.source._fs

        def reset(*args: object, **kwargs: object) -> None:
            raise ConnectionResetError("reset by peer")

        saved = fs.cat_file, fs.cat_ranges
        fs.cat_file = fs.cat_ranges = reset
        try:
            with pytest.raises(TallpackError, match=r"range read at \d+ failed .*\(reading .*'body\.w'"):
                fam.merged("consensus-ta")
        finally:
            fs.cat_file, fs.cat_ranges = saved


def test_alpha_as_a_meta_tensor_is_an_invalid_argument():
    # 69e5c9a took a 0-d tensor's .item(), whose RuntimeError escaped for a tensor without a value
    from tallpack.errors import InvalidArgumentError
    from tallpack.merging import check_alpha

    assert check_alpha(torch.tensor(0.25, dtype=torch.float64)) == 0.25
    with pytest.raises(InvalidArgumentError, match="alpha must be a number"):
        check_alpha(torch.tensor(0.5, device="meta"))
