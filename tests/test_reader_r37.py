"""Round 37: a tensor's inputs read on the archive's threads, one of them damaged: the error
reaches the caller only once the other reads have ended (none still decoding into the archive's
buffers, or reading a file the caller closes next)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import tallpack


def test_a_damaged_input_read_on_threads_raises_after_the_other_reads_end(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1024, 512, generator=g)}  # 2 MB: base, merged vector and mask go to the threads
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(1024, 512, generator=g)} for t in "abc"}
    p = tmp_path / "f.tallpack"
    tallpack.pack(base, tasks, p)
    with tallpack.open(p) as fam:
        ref = fam.manifest.tensors[0].arrays["base"]
        at = ref.chunks[0].offset + ref.chunks[0].nbytes // 2
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0xFF
    p.write_bytes(bytes(raw))

    started, ended = threading.Event(), threading.Event()
    for how in ("get_tensor", "state_dict"):
        started.clear()
        ended.clear()
        with tallpack.open(p, threads=2) as fam:
            def slowed(read):  # the damaged base fails after 0.2 s, the merged vector's read takes 0.5 s
                def slow_merged(ref, where, *args, **kwargs):
                    if "(merged)" not in where:
                        if "(base)" in where:
                            time.sleep(0.2)
                        return read(ref, where, *args, **kwargs)
                    started.set()
                    time.sleep(0.5)
                    try:
                        return read(ref, where, *args, **kwargs)
                    finally:
                        ended.set()
                return slow_merged

            # (planes-exp arrays are read as planes, joined in the rebuild; others as arrays)
            fam.read_array, fam._read_planar = slowed(fam.read_array), slowed(fam._read_planar)
            with pytest.raises(tallpack.IntegrityError, match="'w'"):
                fam.get_tensor("a", "w") if how == "get_tensor" else fam.state_dict("a")
            # get_tensor reads the inputs side by side; state_dict one tensor's inputs in turn (none after the error)
            assert started.is_set() == (how == "get_tensor"), how
            assert ended.is_set() == started.is_set(), f"{how}: the error was raised while the merged vector's read still ran"
