"""Rules the clean-room reader (tests/spec_reader) showed the spec and the reference reader to
disagree on, now normative in both (spec §5: ``bitpack`` packs bool arrays only)."""

from __future__ import annotations

import pytest
import torch

import tallpack
from tallpack.errors import FormatError
from test_integrity import rewrite_manifest


def test_bitpack_on_a_float_array_is_refused_at_open(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    tasks = {t: {"w": base["w"] + 0.1 * torch.randn(16, 16, generator=g)} for t in "ab"}
    path = tmp_path / "fam.tallpack"
    tallpack.pack(base, tasks, path, codec="raw", group=False)

    def edit(m):
        m["tensors"][0]["base"]["codecs"] = [{"id": "bitpack"}]
    rewrite_manifest(path, edit)
    with pytest.raises(FormatError, match="bitpack for float32 elements"):
        tallpack.open(path)
