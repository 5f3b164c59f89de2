"""An archivist's workflows through the command line (round 31): archives moved to a real
S3-compatible server (moto's, on loopback) and interrupted there."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    client = boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1",
                          endpoint_url=env["AWS_ENDPOINT_URL"])
    # moto keeps its buckets per process, shared with the other test files' servers in this worker
    # (test_remote's "family"): a bucket of this test's own
    bucket = f"archivist-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield client, env, bucket
    server.stop()


def _interrupted(args: list, env: dict, when) -> tuple[int, str]:
    """Run ``tallpack ARGS``, send it Ctrl-C once ``when()`` is true; its exit status and output."""
    p = subprocess.Popen([sys.executable, "-m", "tallpack", "-q", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while p.poll() is None and not when():
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=60)[0]
        return p.returncode, out
    finally:
        p.kill()


def test_ctrl_c_during_a_multipart_upload_leaves_no_upload_open(s3, tmp_path):
    """An archive of 100 MiB and more goes to S3 as a multipart upload (s3fs): Ctrl-C while its
    parts are sent left the upload open (its parts kept, and billed, on the server, listed by no
    ``ls``) while the command said that nothing was written; it is aborted now."""
    client, env, bucket = s3
    base = torch.zeros(28 * 2**20, dtype=torch.float32)  # 112 MiB: above s3fs's 2 x 50 MiB threshold
    task = base.clone()
    task[:1000] = 1.0
    save_file({"w": base}, tmp_path / "base.safetensors")
    save_file({"w": task}, tmp_path / "a.safetensors")
    del base, task
    code, out = _interrupted(["pack", "--codec", "raw", "--base", tmp_path / "base.safetensors", "-o",
                              f"s3://{bucket}/f.tallpack", tmp_path / "a.safetensors"], env,
                             lambda: client.list_multipart_uploads(Bucket=bucket).get("Uploads"))
    assert code == 130, out
    assert out.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket).get("Contents", []) == []


def test_ctrl_c_during_a_folders_upload_says_what_it_left(s3, tmp_path):
    """``unpack --exact`` to S3 puts a folder file by file: Ctrl-C once its small config.json is up
    and while its 112 MiB weights are being sent said "nothing was written", with config.json
    there; now the line names what is left (as a failed upload's does), and no part is kept."""
    client, env, bucket = s3
    w = torch.zeros(28 * 2**20, dtype=torch.float32)
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
        save_file({"w": w}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text('{"model_type": "x"}')
        w[:1000] = 1.0
    del w
    run = {"env": {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}, "text": True,
           "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    packed = subprocess.run([sys.executable, "-m", "tallpack", "-q", "pack", "--exact", "--codec", "raw", "--base",
                             str(tmp_path / "base"), "-o", str(tmp_path / "f.tallpack"), str(tmp_path / "a")], **run)
    assert packed.returncode == 0, packed.stdout
    code, out = _interrupted(["unpack", tmp_path / "f.tallpack", "--task", "a", "--exact", "-o", f"s3://{bucket}/a"], env,
                             lambda: (client.list_objects_v2(Bucket=bucket).get("Contents")
                                      and client.list_multipart_uploads(Bucket=bucket).get("Uploads")))
    assert code == 130, out
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["a/config.json"]
    assert out.strip().splitlines()[-1] == (
        f"error: interrupted; 1 of 2 files were uploaded to s3://{bucket}/a before it ended (config.json): the output "
        "there is incomplete; write it again with --force (overwrite=True), or remove them")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.parametrize("exact", [False, True])
def test_unpack_names_the_task_of_a_damaged_folder_file(tmp_path, exact):
    """Each task keeps its own tokenizer.json: a damaged one made ``unpack --all`` say "file
    'tokenizer.json': checksum mismatch", not whose (verify says it); the task is named now."""
    import tallpack

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for t in ("cars", "svhn"):
        d = tmp_path / t
        d.mkdir()
        save_file({"w": base["w"] + 0.01 * torch.randn(64, 32, generator=g)}, d / "model.safetensors")
        (d / "config.json").write_text('{"model_type": "x"}')
        (d / "tokenizer.json").write_text(f'{{"task": "{t}", "vocab": {list(range(40))}}}')
        tasks[t] = d
    archive = tmp_path / "f.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, archive, exact=True)
    with tallpack.open(archive) as fam:
        chunk = fam.manifest.files[fam.files("svhn")["tokenizer.json"]].chunks[0]
    data = bytearray(archive.read_bytes())
    data[chunk.offset + chunk.nbytes // 2] ^= 0x5A
    archive.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "tallpack", "-q", "unpack", str(archive), "--all", *(["--exact"] * exact),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"})
    assert r.returncode == 1
    assert r.stderr == (f"error: {archive}: file 'tokenizer.json' of task 'svhn': checksum mismatch in chunk 0 "
                        "(damaged archive)\n")
    assert not (tmp_path / "out").exists()


def test_bytes_appended_to_an_archive_are_named_as_such(small_family, tmp_path):
    """An archive with bytes appended (a download resumed over a whole one, ``cat >>``) was
    "footer missing (truncated or damaged archive)": it is whole, up to its footer, which is found
    and named with the bytes after it; a truncated archive is still called so."""
    import tallpack

    archive = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], archive)
    whole = archive.read_bytes()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}
    rest = "(appended to it?); the archive before them is whole if nothing else is damaged"
    for tail in (b"garbage!" * 10, whole):
        want = f"{len(tail)} bytes after the archive's footer, which ends at byte {len(whole)} {rest}"
        archive.write_bytes(whole + tail)
        r = subprocess.run([sys.executable, "-m", "tallpack", "verify", str(archive)], capture_output=True, text=True,
                           env=env)
        assert (r.returncode, r.stderr.splitlines()[-1]) == (1, f"error: {archive}: {want}")
    archive.write_bytes(whole[:-1])
    with pytest.raises(tallpack.IntegrityError, match=r"footer missing \(truncated or damaged archive\)$"):
        tallpack.open(archive)


def test_a_tail_of_many_footers_checks_a_few_manifests(small_family, tmp_path, monkeypatch):
    """A hostile tail of footers, each naming a manifest that ends right before it, is searched
    for an archive's footer with a few manifests' CRC-32 checked (``APPENDED_CHECKS``), not one
    pass over the file per footer; then the archive is refused as damaged, in one line."""
    import zlib

    import tallpack
    from tallpack import container
    from tallpack.container import END_MAGIC, FOOTER, HEADER

    path = tmp_path / "hostile.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], path)
    raw = bytearray(path.read_bytes())
    raw += b"x" * 5  # (the archive's own footer no longer last, nor aligned to these)
    for _ in range(2000):
        end = len(raw) + FOOTER.size
        raw += FOOTER.pack(HEADER.size, end - FOOTER.size - HEADER.size, 0, 0, END_MAGIC)
    raw += b"!!!"  # the last bytes no footer: the search runs
    path.write_bytes(bytes(raw))
    checked = []
    monkeypatch.setattr(container, "crc32", lambda b: checked.append(len(b)) or zlib.crc32(b))
    with pytest.raises(tallpack.errors.TallpackError) as e:
        tallpack.open(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert 0 < len(checked) <= 4, len(checked)  # (APPENDED_CHECKS), not one per footer (2000)
