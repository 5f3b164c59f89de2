"""One archive read by several processes (round 33): what a process it was sent to (a spawn or
forkserver DataLoader worker, a process pool) is told when the archive is not there."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil

import tallpack


def _unpickle_error(blob: bytes, q) -> None:
    """In a spawn child: what unpickling ``blob`` raises, as ``type: message`` (or "loaded")."""
    try:
        pickle.loads(blob)
        q.put("loaded")
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        q.put(f"{type(e).__name__}: {e}")


def test_a_spawn_child_sent_an_archive_removed_since_is_told_it_was_sent_not_only_no_such_archive(small_family, tmp_path):
    """A spawn worker (or a pool's) sent an archive, a lazy state dict or a slice opens the archive
    again by its path; gone there (removed or renamed since, or another container's path), it said
    only "PATH: no such archive", from deep inside multiprocessing's start-up, as if the worker's
    own code had named a wrong path."""
    path = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], path)
    with tallpack.open(path) as fam:
        blobs = [pickle.dumps(x) for x in (fam, fam.state_dict("a", lazy=True), fam.get_slice("a", "body.w"))]
    shutil.move(path, tmp_path / "moved.tallpack")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    for blob in blobs[:1]:  # one real spawn child; the others the same call here
        p = ctx.Process(target=_unpickle_error, args=(blob, q))
        p.start()
        got = q.get(timeout=120)
        p.join(60)
        assert got.startswith("ArchiveNotFoundError: ") and str(path) in got, got
        assert "sent to this process" in got and "open it again" not in got, got
    for blob in blobs[1:]:
        try:
            pickle.loads(blob)
        except tallpack.ArchiveNotFoundError as e:
            assert str(path) in str(e) and "sent to this process" in str(e), e
            assert isinstance(e, FileNotFoundError)
        else:
            raise AssertionError("loaded an archive that is not there")
    assert os.listdir(tmp_path).count("f.tallpack") == 0
