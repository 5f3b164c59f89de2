"""Checkpoints pickled by Python 3.13, whose paths are named ``pathlib._local.*``, read on every Python."""
import pathlib
import sys
import types

import pytest
import torch

from tallpack.sources import open_source


def _named_as_313(cls_name: str, arg: str) -> object:
    """An object that pickles as Python 3.13 pickles ``pathlib.<cls_name>(arg)``: under the global
    ``pathlib._local.<cls_name>`` (made here with a stand-in module while ``torch.save`` runs)."""
    module = types.ModuleType("pathlib._local")
    stand_in = type(cls_name, (), {"__module__": "pathlib._local"})
    setattr(module, cls_name, stand_in)

    class Path313:
        def __reduce__(self):
            return (stand_in, (arg,))

    return module, Path313()


@pytest.mark.parametrize("cls_name,arg", [("WindowsPath", "C:\\data"), ("PosixPath", "/data")])
def test_a_checkpoint_pickled_by_python_313_with_a_path_packs(tmp_path, monkeypatch, cls_name, arg):
    # Python 3.13 names pathlib's classes ``pathlib._local.WindowsPath``; the allow-list only knew
    # ``pathlib.WindowsPath``: 'not a readable PyTorch file (... Unsupported global: GLOBAL pathlib._local...)'
    path = tmp_path / "last.ckpt"
    module, obj = _named_as_313(cls_name, arg)
    with monkeypatch.context() as m:  # (on 3.13 the stand-in hides the real module while torch.save runs)
        m.setitem(sys.modules, "pathlib._local", module)
        torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": {"w": torch.ones(4)},
                    "hyper_parameters": {"data_dir": obj}}, path)
    assert b"pathlib._local" in _members(path)
    src = open_source(path)
    assert src.keys() == ["w"] and torch.equal(src.get("w"), torch.ones(4))


def _members(path: pathlib.Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
