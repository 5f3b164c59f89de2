"""A PyTorch practitioner's archive (r32): one model in memory, its fine-tunes swapped in from a
tallpack archive many times, and research code around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tallpack


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.fixture(scope="module")
def mlp_family(tmp_path_factory) -> Path:
    """A small MLP and two fine-tunes of a few SGD steps each, packed from their state dicts."""
    torch.manual_seed(0)
    base = _mlp()
    tasks = {}
    for i, name in enumerate(("a", "b")):
        model = _mlp()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            x = torch.randn(16, 8)
            torch.nn.functional.cross_entropy(model(x), torch.full((16,), i)).backward()
            opt.step()
            opt.zero_grad()
        tasks[name] = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("mlp") / "mlp.tallpack"
    tallpack.pack(base.state_dict(), tasks, out)
    return out


def test_an_archive_open_at_exit_leaves_no_unclosed_file_warning(mlp_family: Path) -> None:
    """A service keeps its archive open for its whole life: at exit the process closes it, with no
    warning (``Archive._finalizer``). The file under the mapping warned at shutdown all the same,
    naming only a descriptor (``ResourceWarning: unclosed file <_io.BufferedReader name=3>``),
    under ``python -X dev`` or ``-W always``."""
    code = ("import tallpack, torch\n"
            f"fam = tallpack.open({str(mlp_family)!r})\n"
            "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
            "model.load_state_dict(fam.state_dict('a'))\n"
            "print('served')\n")
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "always", "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "served"
    assert "ResourceWarning" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def pipeline_family(tmp_path_factory) -> Path:
    """A diffusers pipeline (a tiny UNet2DModel and its scheduler, ``DDPMPipeline.save_pretrained``)
    and a fine-tune of its UNet, packed: the UNet's tensors are named ``unet/NAME`` in the archive."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=10)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "base")
    opt = torch.optim.SGD(unet.parameters(), lr=0.01)
    unet(torch.randn(2, 3, 8, 8), 5).sample.pow(2).mean().backward()
    opt.step()
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "cats")
    out = root / "pipe.tallpack"
    tallpack.pack(root / "base", {"cats": root / "cats"}, out)
    return out


@pytest.mark.parametrize("name", ["conv_in.weight", "unet.conv_in.weight"])
def test_a_component_tensor_asked_by_its_model_name_is_named_with_its_component(pipeline_family: Path,
                                                                                name: str) -> None:
    """A diffusers user asks for a tensor of ``pipe.unet`` by the name ``pipe.unet.state_dict()``
    gives it (or ``pipe.unet``'s dotted path): the error said only that the task has no such
    tensor, not that the archive names it ``unet/conv_in.weight``."""
    with tallpack.open(pipeline_family) as fam:
        want = fam.get_tensor("cats", "unet/conv_in.weight")
        with pytest.raises(tallpack.errors.TensorNotFoundError, match=r"did you mean 'unet/conv_in\.weight'\?"):
            fam.get_tensor("cats", name)
        with pytest.raises(KeyError, match=r"did you mean 'unet/conv_in\.weight'\?"):
            fam.get_slice("cats", name)
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(pipeline_family.parent / "cats")
    assert pipe.unet.conv_in.weight.shape == want.shape


@pytest.fixture(scope="module")
def st_family(tmp_path_factory) -> Path:
    """A tiny sentence-transformers model (BERT, mean pooling, a Dense module; ``save()``) and a
    fine-tune of its Dense module, packed: the Dense weights are ``2_Dense/linear.weight``."""
    pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers 6 (sentence_transformers.models warns there), else 3-5
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    root = tmp_path_factory.mktemp("st")
    hf = root / "hf"
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=16)).save_pretrained(hf)
    model = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=8), models.Pooling(16, "mean"),
                                         models.Dense(16, 8)], device="cpu")
    model.save(str(root / "base"))
    with torch.no_grad():
        model[2].linear.weight.add_(0.01)
    model.save(str(root / "qa"))
    out = root / "st.tallpack"
    tallpack.pack(root / "base", {"qa": root / "qa"}, out)
    return out


def test_a_module_tensor_asked_by_its_model_name_is_named_with_its_module_folder(st_family: Path) -> None:
    """``SentenceTransformer.state_dict()`` names the Dense module's weight ``2.linear.weight``;
    the archive, ``2_Dense/linear.weight`` (its folder): the error gave no hint."""
    with tallpack.open(st_family) as fam:
        assert "2_Dense/linear.weight" in fam.keys("qa")
        with pytest.raises(tallpack.errors.TensorNotFoundError, match=r"did you mean '2_Dense/linear\.weight'\?"):
            fam.get_tensor("qa", "2.linear.weight")


def test_an_alpha_that_requires_grad_is_refused_not_silently_detached(mlp_family: Path) -> None:
    """Research code learning alpha by gradient (AdaMerging's way) passed ``alpha`` as a tensor
    that requires grad: the merged model came back built from its value, with no graph, and the
    loss's backward left ``alpha.grad`` None without a word. It is refused, saying what to pass
    instead; the way the message names, ``merge_parts(method).parts``, differentiates."""
    alpha = torch.tensor(0.3, requires_grad=True)
    x = torch.randn(4, 8)
    with tallpack.open(mlp_family) as fam:
        for build in (lambda: fam.merged("ta", alpha=alpha), lambda: fam.merge_parts("ta").state_dict(alpha),
                      lambda: tallpack.write_merged(fam, mlp_family.parent / "merged", "ta", alpha=alpha)):
            with pytest.raises(tallpack.errors.InvalidArgumentError, match=r"requires grad.*alpha\.item\(\)"):
                build()
        assert not (mlp_family.parent / "merged").exists()
        parts = fam.merge_parts("ta").parts
        merged = {n: b if d is None else b + alpha * d for n, (b, d) in parts.items()}
        want = fam.merged("ta", alpha=alpha.item())
    assert all(torch.equal(merged[n].detach(), want[n]) for n in want)
    torch.func.functional_call(_mlp(), merged, (x,)).sum().backward()
    assert alpha.grad is not None and alpha.grad != 0


# the fix (tallpack/sources.py, open_source) is left to the lead: that file held another helper's
# uncommitted change; drop this mark with it
def test_a_model_given_to_pack_is_refused_with_the_state_dict_to_give(tmp_path: Path) -> None:
    """``tallpack.pack(base_model, {"a": model_a})``, models as they are in memory: the error said
    "cannot read a checkpoint from a Sequential", neither which input nor what to pass instead."""
    torch.manual_seed(0)
    base, task = _mlp(), _mlp()
    for given, which in (((base, {"a": task.state_dict()}), "base"), ((base.state_dict(), {"a": task}), "'a'")):
        with pytest.raises(tallpack.errors.CheckpointError, match=rf"{which}.*Sequential.*state_dict\(\)") as e:
            tallpack.pack(*given, tmp_path / "m.tallpack")
        assert "\n" not in str(e.value)
    tallpack.pack(base.state_dict(), {"a": task.state_dict()}, tmp_path / "m.tallpack")  # as the message says
    with tallpack.open(tmp_path / "m.tallpack") as fam:
        assert fam.tasks == ("a",)
