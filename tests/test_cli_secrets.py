"""The command line never shows a signed link's secrets nor S3 request signatures: result lines
(`verify`'s ``ok:``, ``wrote ...``), errors (an output that exists) and ``-vv``'s debug log
(botocore logs each request's headers at DEBUG: its ``Authorization``, the access key id)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tallpack

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

ROOT = Path(tallpack.__file__).resolve().parents[1]
SECRET = "X-Amz-Signature=SEKRIT5ig&X-Amz-Credential=AKIASEKRIT"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 64, generator=g)} for t in ("a", "b")}
    tallpack.pack(base, tasks, d / "f.tallpack")
    return d / "f.tallpack"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli")]))
    return subprocess.run([sys.executable, "-m", "tallpack", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_verify_and_an_existing_output_at_a_signed_link(family, http_server):
    shutil.copy(family, http_server.root / "signed.tallpack")
    url = f"{http_server.url}/signed.tallpack?{SECRET}"
    r = _cli("-vv", "verify", url)
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {http_server.url}/signed.tallpack: "), r.stdout
    assert "SEKRIT" not in r.stdout + r.stderr
    r = _cli("pack", "--base", str(family), "--task", f"a={family}", "-o", url)  # exists: refused before reading
    assert r.returncode != 0 and "already exists" in r.stderr and "SEKRIT" not in r.stdout + r.stderr, r.stderr


def test_debug_log_of_an_s3_read_holds_no_request_signature(family):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("fam")
        fs.put_file(str(family), "fam/f.tallpack")
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIATESTKEYID", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        r = _cli("-vv", "verify", "s3://fam/f.tallpack", env=env)
    finally:
        server.stop()
    assert r.returncode == 0 and r.stdout.startswith("ok: s3://fam/f.tallpack: "), r.stderr
    assert "DEBUG s3fs" in r.stderr  # -vv's debug log is on
    for secret in ("Authorization", "Signature=", "AKIATESTKEYID"):
        assert secret not in r.stderr, secret


def test_every_logger_the_command_line_shows_is_redacted(family, http_server):
    """A record of any library (not only fsspec's loggers, where the library's filter sits) passes
    the command line's handler with a signed link's secrets taken out."""
    shutil.copy(family, http_server.root / "signed2.tallpack")
    code = (f"import logging, sys; sys.argv = ['tallpack', '-vv', 'verify', {http_server.url + '/signed2.tallpack?' + SECRET!r}]\n"
            "import tallpack_cli.main as m\n"
            "orig = m.main.callback\n"
            "def spy(**kw):\n"
            "    orig(**kw)\n"
            f"    logging.getLogger('some.library.child').debug('GET {http_server.url}/x?{SECRET} failed')\n"
            "m.main.callback = spy\n"
            "m.main(standalone_mode=False)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "some.library.child" in r.stderr and "SEKRIT" not in r.stderr + r.stdout, r.stderr
