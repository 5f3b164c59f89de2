"""What the last round's testers of training-framework checkpoints and of scripting left: a
training wrapper's name prefix taken off (``strip_prefix``), DeepSpeed's ``last.ckpt/`` folder,
tied weights of DCP-converted files, a reader of the output gone (``| head -1``), and signals while
``python -m tallpack`` loads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_checkpoints_r32 import _hf_folder, _lightning, _model

import tallpack
from tallpack.errors import CheckpointError, IncompatibleCheckpointsError, InvalidArgumentError
from tallpack_cli.main import main


def _pack_cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["pack", "--no-progress", *map(str, args)])
    return r.exit_code, r.output


# -- 1. a training wrapper's prefix: strip_prefix / --strip-prefix -----------------------------------------------

def test_lightning_tasks_stripped_of_model_prefix_unpack_under_the_bases_names(tmp_path: Path) -> None:
    """Lightning's ``model.`` taken off the tasks' names: the archive, its unpacked tasks (exact ones
    too: a pickle comes back as safetensors, bit for bit) and its merged model hold the base's names,
    which a folder with the base's config.json loads; the manifest says what was taken off."""
    base = _hf_folder(_model(0), tmp_path / "base")
    tasks = {f"t{i}": _lightning(_model(i), tmp_path / f"t{i}.ckpt") for i in (1, 2)}
    out = tmp_path / "o.tallpack"
    tallpack.pack(base, tasks, out, strip_prefix="model.", exact=True)
    want = {k: v for k, v in _model(1).state_dict().items()}
    with tallpack.open(out) as fam:
        assert fam.task_info("t1").source["stripped"] == "model."
        assert set(fam.keys("t1")) == set(want)  # the tied head too, no longer 'model.lm_head.weight'
        got = fam.state_dict("t1", exact=True)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        tallpack.write_task(fam, "t1", tmp_path / "t1", exact=True)
        tallpack.write_merged(fam, tmp_path / "merged")
    written = load_file(tmp_path / "t1" / "model.safetensors")
    for k, v in written.items():
        assert torch.equal(v, want[k]), k
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) <= set(want)


def test_ddp_tasks_named_and_packed_with_strip_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDP's ``module.``: the refusal names --strip-prefix, which packs them under the base's names."""
    _hf_folder(_model(0), tmp_path / "base")
    for i in (1, 2):
        torch.save({f"module.{k}": v for k, v in _model(i).state_dict().items()}, tmp_path / f"d{i}.pt")
    monkeypatch.chdir(tmp_path)
    code, said = _pack_cli("--base", "base", "-o", "o.tallpack", "d1.pt", "d2.pt")
    assert code == 1 and "--strip-prefix module." in said, said
    code, said = _pack_cli("--base", "base", "-o", "o.tallpack", "--strip-prefix", "module.", "d1.pt", "d2.pt")
    assert code == 0, said
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert "fc.weight" in fam.keys("d1") and not any(k.startswith("module.") for k in fam.keys("d2"))


def test_a_prefixed_base_is_stripped_too(tmp_path: Path) -> None:
    """Base and tasks all Lightning files: every input loses the prefix, not the tasks alone (which
    would leave the base's names no task shares)."""
    base = _lightning(_model(0), tmp_path / "base.ckpt")
    a = _lightning(_model(1), tmp_path / "a.ckpt")
    tallpack.pack(base, [a], tmp_path / "o.tallpack", strip_prefix="model.", keep_base_only=True)
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        assert "fc.weight" in fam.keys("a") and fam.base_tensor("fc.weight") is not None


def test_strip_prefix_refusals(tmp_path: Path) -> None:
    """A prefix no name has (a typo), one that would leave names starting with '.', one whose names
    without it the checkpoint holds too, and a safetensors task with the exact tier (its file comes
    back byte for byte, with the names it had): each refused before any work, saying which."""
    base = _hf_folder(_model(0), tmp_path / "base")
    sd = _model(1).state_dict()
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
              tmp_path / "a.safetensors")
    out = tmp_path / "o.tallpack"
    with pytest.raises(InvalidArgumentError,
                       match=r"strip_prefix 'modul\.' .*no tensor name .*task 'a': 'module\.fc\.bias'"):
        tallpack.pack(base, {"a": tmp_path / "a.safetensors"}, out, strip_prefix="modul.")
    with pytest.raises(InvalidArgumentError, match=r"would leave the tensor 'module\.\S+' of task 'a' as '\.\S+'"):
        tallpack.pack(base, {"a": tmp_path / "a.safetensors"}, out, strip_prefix="module")
    with pytest.raises(IncompatibleCheckpointsError, match=r"a\.safetensors: task 'a': its safetensors file .*--exact"):
        tallpack.pack(base, {"a": tmp_path / "a.safetensors"}, out, strip_prefix="module.", exact=True)
    torch.save({**{f"model.{k}": v for k, v in sd.items()}, "fc.weight": sd["fc.weight"]}, tmp_path / "b.pt")
    with pytest.raises(IncompatibleCheckpointsError,
                       match=r"'model\.fc\.weight' gives 'fc\.weight', a tensor it holds"):
        tallpack.pack(base, {"b": tmp_path / "b.pt"}, out, strip_prefix="model.")
    for bad in ("", 3):
        with pytest.raises(InvalidArgumentError, match="strip_prefix must be a non-empty string"):
            tallpack.pack(base, {"a": tmp_path / "a.safetensors"}, out, strip_prefix=bad)
    assert not out.exists()
    tallpack.pack(base, {"a": tmp_path / "a.safetensors"}, out, strip_prefix="module.")  # lossy: renamed, packed
    with tallpack.open(out) as fam:
        assert "fc.weight" in fam.keys("a")


def test_lightning_warning_names_strip_prefix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without strip_prefix, the warning of a base matched under 'model.' names the option."""
    base = _hf_folder(_model(0), tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="tallpack.plan"):
        tallpack.pack(base, [_lightning(_model(1), tmp_path / "a.ckpt")], tmp_path / "o.tallpack")
    assert "--strip-prefix model." in caplog.text, caplog.text


# -- 2. DeepSpeed's save folder, Lightning's named like a file (last.ckpt/) ---------------------------------------

def _deepspeed_save(folder: Path, tag: str, prefix: str = "") -> Path:
    """A DeepSpeed save folder as its engine writes it (ZeRO-2): ``latest`` naming the tag folder,
    which holds the model states (under 'module') and ZeRO's optimizer partition; zero_to_fp32.py."""
    (folder / tag).mkdir(parents=True)
    sd = {f"{prefix}{k}": v.half() for k, v in _model(1).state_dict().items()}
    torch.save({"module": sd, "optimizer": None, "global_steps": 500, "ds_version": "0.16.4"},
               folder / tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}, "ds_version": "0.16.4"},
               folder / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(tag)
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    return folder


def test_lightning_deepspeed_folder_named_with_its_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's DeepSpeed strategy writes ``last.ckpt/`` as a folder: given as base or task (by the
    command line or the library) it is named as DeepSpeed's, with Lightning's conversion and
    DeepSpeed's script, not as a folder without model.safetensors or its model states file (whose
    names are the strategy wrapper's, ``_forward_module.model.*``)."""
    _hf_folder(_model(0), tmp_path / "base")
    _deepspeed_save(tmp_path / "run" / "last.ckpt", "checkpoint", "_forward_module.model.")
    monkeypatch.chdir(tmp_path)
    for args in (["--base", "base", "run/last.ckpt"], ["--base", "run/last.ckpt", "a=run/last.ckpt"]):
        code, said = _pack_cli("-o", "o.tallpack", *args)
        assert code == 1 and "run/last.ckpt: a DeepSpeed checkpoint folder" in said, said
        assert "convert_zero_checkpoint_to_fp32_state_dict" in said and "run/last.ckpt/zero_to_fp32.py" in said, said
    with pytest.raises(CheckpointError, match="DeepSpeed checkpoint folder .*convert_zero_checkpoint_to_fp32"):
        tallpack.pack(tmp_path / "base", {"a": tmp_path / "run" / "last.ckpt"}, tmp_path / "o.tallpack")


def test_deepspeed_folder_as_the_base_named(tmp_path: Path) -> None:
    """DeepSpeed's own save folder given as the base (a task folder of it names its model states
    file, test_checkpoints_r32): its conversion, and the model states file of ZeRO-1/2."""
    ds = _deepspeed_save(tmp_path / "ds", "global_step500")
    (ds / "zero_to_fp32.py").unlink()  # DeepSpeed's module then
    with pytest.raises(CheckpointError) as e:
        tallpack.pack(ds, [tmp_path / "x.pt"], tmp_path / "o.tallpack")
    said = str(e.value)
    assert "a DeepSpeed checkpoint folder" in said and "python -m deepspeed.utils.zero_to_fp32" in said, said
    assert str(ds / "global_step500" / "mp_rank_00_model_states.pt") in said, said


# -- 4. the reader of the output gone (| head -1) -----------------------------------------------------------------

@pytest.mark.parametrize("command", [["inspect", "--json"], ["stats"]])
def test_output_reader_gone_exits_141_quietly(tmp_path: Path, command: list[str]) -> None:
    """``tallpack inspect X --json | head -1`` where head has gone before the output is written: exit
    141, as a command that SIGPIPE ends (pipefail then takes it as it takes cat's), no traceback and
    no error line (was 1, an error). The pipe's read end is closed before the command starts, so
    its first write finds no reader."""
    import os
    import subprocess
    import sys

    base = _hf_folder(_model(0), tmp_path / "base")
    tallpack.pack(base, [_lightning(_model(1), tmp_path / "a.ckpt")], tmp_path / "o.tallpack", strip_prefix="model.")
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.Popen([sys.executable, "-m", "tallpack", command[0], str(tmp_path / "o.tallpack"), *command[1:]],
                             stdout=write, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        os.close(write)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, (p.returncode, err)
    assert "Traceback" not in err and "error" not in err.lower(), err


# -- 5. signals while ``python -m tallpack`` loads ---------------------------------------------------------------

#: A sitecustomize that holds the process in tallpack's own import (at numpy's, which the package's
#: modules import), says so on stderr, and waits there for the test's signal.
_HOLD = '''
import sys, time
class _Hold:
    done = False
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and "tallpack" in sys.modules and not self.done:
            self.done = True
            sys.stderr.write("loading\\n")
            sys.stderr.flush()
            time.sleep(120)
        return None
sys.meta_path.insert(0, _Hold())
'''


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("entry", [["-m", "tallpack"], ["-c", "import tallpack_cli; tallpack_cli.run()"]])
def test_a_signal_while_the_package_loads_ends_in_one_line(tmp_path: Path, signame: str, entry: list[str]) -> None:
    """``python -m tallpack`` imports the tallpack package before its __main__ sets the command's
    handlers: SIGTERM there ended it silently (-15), Ctrl-C in a traceback. Now both entry points
    (``-m`` and the ``tallpack`` script's ``run``) end in the line and status a signal has later."""
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_HOLD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *sys.path])}
    p = subprocess.Popen([sys.executable, *entry, "inspect", str(tmp_path / "none.tallpack")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None and p.stderr.readline() == "loading\n"
        sig = getattr(signal, signame)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    what = "terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted"
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert err == f"error: {what}; nothing was written\n", err


# -- 3. tied weights that dcp_to_torch_save writes twice ---------------------------------------------------------

@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_converted_tied_weights_come_back_and_the_copy_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """torch.distributed.checkpoint's dcp_to_torch_save writes a tied head and its embedding as two
    tensors of equal bytes. Beside a base save_pretrained wrote (the head left out) the head is
    stored in every task, dense: the pack warns, naming the tie to make; an exact read gives both
    back bit for bit. Tied again before saving, it is stored once (an alias), as torch.save's is."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    class _Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Embedding(1024, 256)
            self.lm_head = torch.nn.Linear(256, 1024, bias=False)
            self.lm_head.weight = self.wte.weight

    def model(seed: int) -> _Big:
        torch.manual_seed(0)
        m = _Big()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            m.wte.weight.add_((torch.rand(m.wte.weight.shape, generator=g) < 0.1) * 0.01 * seed)
        return m

    base = tmp_path / "base"
    base.mkdir()
    save_file({"wte.weight": model(0).wte.weight.detach().clone()}, base / "model.safetensors")
    tasks = {}
    for i in (1, 2):
        dcp.save({"model": model(i).state_dict()}, checkpoint_id=str(tmp_path / f"dcp{i}"))
        dcp_to_torch_save(str(tmp_path / f"dcp{i}"), str(tmp_path / f"d{i}.pt"))
        tasks[f"d{i}"] = tmp_path / f"d{i}.pt"
    with caplog.at_level(logging.WARNING, logger="tallpack.plan"):
        tallpack.pack(base, tasks, tmp_path / "d.tallpack", exact=True)
    assert "'lm_head.weight' and 'wte.weight' are equal bit for bit in every task" in caplog.text, caplog.text
    assert "sd['lm_head.weight'] = sd['wte.weight']" in caplog.text, caplog.text
    with tallpack.open(tmp_path / "d.tallpack") as fam:
        sd = fam.state_dict("d1", exact=True)
        assert torch.equal(sd["lm_head.weight"], model(1).wte.weight)
        assert torch.equal(sd["wte.weight"], sd["lm_head.weight"])
        assert not fam.manifest.aliases
    for i in (1, 2):  # tied again, as the warning says
        sd = torch.load(tasks[f"d{i}"], weights_only=True)["model"]
        sd["lm_head.weight"] = sd["wte.weight"]
        torch.save(sd, tasks[f"d{i}"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tallpack.plan"):
        tallpack.pack(base, tasks, tmp_path / "t.tallpack", exact=True)
    assert "equal bit for bit" not in caplog.text
    with tallpack.open(tmp_path / "t.tallpack") as fam:
        assert fam.manifest.aliases == {"lm_head.weight": "wte.weight"}
    sizes = [(tmp_path / f"{n}.tallpack").stat().st_size for n in "td"]
    assert sizes[0] < 0.7 * sizes[1], sizes


def test_exact_unpack_of_a_stripped_task_says_its_names_lost_the_prefix(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = _hf_folder(_model(0), tmp_path / "base")
    tasks = {f"t{i}": _lightning(_model(i), tmp_path / f"t{i}.ckpt") for i in (1, 2)}
    out = tmp_path / "o.tallpack"
    tallpack.pack(base, tasks, out, strip_prefix="model.", exact=True)
    with tallpack.open(out) as fam, caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.write_task(fam, "t1", tmp_path / "t1", exact=True)
    assert "task 't1': its exact tensors are written as safetensors" in caplog.text
    assert "without the prefix 'model.'" in caplog.text
