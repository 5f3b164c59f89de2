"""Writing to an HTTP server that does not take uploads (a plain web server answers PUT with 501
Not Implemented, or cuts a large body off): the command says so, not "server error; try again later"."""

from __future__ import annotations

import aiohttp
import pytest
import torch
from click.testing import CliRunner

import tallpack
from tallpack.remote import upload_failure
from tallpack_cli.main import main


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 64, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 64, generator=g)} for t in ("a", "b")}
    path = tmp_path_factory.mktemp("fam") / "fam.tallpack"
    tallpack.pack(base, tasks, path)
    return base, tasks, path


def test_pack_to_a_server_without_put_says_it_takes_no_uploads(http_server, family):
    base, tasks, _ = family
    url = f"{http_server.url}/new.tallpack"
    with pytest.raises(tallpack.OutputError) as e:
        tallpack.pack(base, tasks, url)
    text = str(e.value)
    # the server answers 501 and closes: the client sees the answer, or (writing the body when the
    # connection closes, a loaded machine) a cut connection; the line says what is likely either way
    assert "does not take uploads" in text and "try again" not in text, text
    assert not (http_server.root / "new.tallpack").exists()


def test_unpack_to_a_server_without_put_says_it_takes_no_uploads(http_server, family):
    r = CliRunner().invoke(main, ["unpack", str(family[2]), "--task", "a", "-o", f"{http_server.url}/out"])
    assert r.exit_code != 0
    assert "does not take uploads" in r.output and "try again" not in r.output, r.output
    assert len(r.output.strip().splitlines()[-1]) < 300


@pytest.mark.parametrize("status", [405, 501])
def test_method_refusals_named_as_no_uploads(status):
    e = aiohttp.ClientResponseError(None, (), status=status)  # (what fsspec's HTTP put raises)
    assert upload_failure(e, http=True).startswith(f"the server does not take uploads (HTTP {status}")
    assert upload_failure(aiohttp.ClientResponseError(None, (), status=500), http=True) is None


def test_a_cut_upload_at_an_http_url_names_the_likely_cause():
    cut = aiohttp.ServerDisconnectedError()
    assert "does not take uploads" in upload_failure(cut, http=True)
    assert upload_failure(cut, http=False) is None  # an object store: failure() says it was cut
    wrapped = OSError("write failed")
    wrapped.__cause__ = BrokenPipeError(32, "Broken pipe")
    assert "BrokenPipeError" in upload_failure(wrapped, http=True)
