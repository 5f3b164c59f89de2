"""Write the fuzzing seed corpus: small valid archives of every encoding, codec, merge method and
checksum, in each of the harness's three input forms (see ``fuzz_open.py``).

    python tests/fuzz/make_corpus.py CORPUS_DIR

Every family is tiny (chunk_elements=64), so each seed is a few KB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import tallpack
from tallpack import codecs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fuzz_open import FILE, MANIFEST, RESUMMED, manifest_text  # noqa: E402


def family(seed: int, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """A base and three tasks: merged (masked), shared (one of them changed alike in every task,
    stored with its base), task-own (heads of other shapes, an int buffer that differs), a bool
    tensor and an empty one."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(12, 10, generator=g).to(dtype), "b": torch.randn(70, generator=g).to(dtype),
            "ids": torch.arange(9), "frozen": torch.randn(5, generator=g), "flag": torch.tensor([True, False]),
            "empty": torch.zeros(0, 3), "moved": torch.randn(6, generator=g).to(dtype)}
    tasks = {}
    for i, t in enumerate(("cars", "dtd", "svhn")):
        sd = {k: v.clone() for k, v in base.items()}
        sd["w"] = (base["w"].float() + 0.1 * torch.randn(12, 10, generator=g)).to(dtype)
        sd["b"] = (base["b"].float() + 0.1 * torch.randn(70, generator=g)).to(dtype)
        sd["head"] = torch.randn(i + 2, 10, generator=g)
        sd["moved"] = (base["moved"].float() + 0.5).to(dtype)  # changed alike in every task: shared with its base (1.13)
        if i == 1:
            sd["ids"] = torch.arange(9) * 2
        tasks[t] = sd
    return base, tasks


CONFIGS = {
    "ta_bytegroup_xxh3": dict(merge="ta", codec="bytegroup-zstd", checksum="xxh3-64"),
    "ta_zstd_crc32": dict(merge="ta", codec="zstd", checksum="crc32"),
    "ta_raw_xxh3": dict(merge="ta", codec="raw", checksum="xxh3-64"),
    "ties_raw_crc32": dict(merge="ties", codec="raw", checksum="crc32"),
    "ties_bytegroup_xxh3": dict(merge="ties", codec="bytegroup-zstd", checksum="xxh3-64"),
    "ta_bf16_zstd": dict(merge="ta", codec="zstd", checksum="xxh3-64", dtype=torch.bfloat16),
    "ties_f16_bytegroup_crc32": dict(merge="ties", codec="bytegroup-zstd", checksum="crc32", dtype=torch.float16),
    "ta_base_only_raw": dict(merge="ta", codec="raw", checksum="crc32", keep_base_only=True),
    # the default codec (planes-exp, 1.11) in both float types, at a level that rotates (from 10)
    "ta_planes_exp": dict(merge="ta", checksum="xxh3-64"),  # w and b in one group (1.12), as every plain config
    "ta_planes_exp_single": dict(merge="ta", checksum="xxh3-64", group=False),  # each tensor an entry of its own
    "ties_bf16_planes_exp_l19": dict(merge="ties", checksum="xxh3-64", level=19, dtype=torch.bfloat16),
    "ta_f16_planes": dict(merge="ta", checksum="crc32", dtype=torch.float16),  # plain planes: float16 has no planes-exp
    # the exact tier: derived masks and merged vectors, bitsplit or planes residuals (1.6-1.9)
    "ta_exact": dict(merge="ta", exact=True),
    "ties_exact_planes": dict(merge="ties", exact=True, codec="planes"),
    # the fidelity dial: corrections and qtau (1.5, 1.7)
    "ta_fidelity": dict(merge="ta", fidelity=0.95),
    "ta_fidelity_corrections": dict(merge="ta", fidelity=0.99, corrections=("sparse", "quant4", "quant8", "exact")),
    # masks that zstd does not shrink by 10%, written as zstd frames of raw blocks (from 4 KiB
    # packed in real archives; here from any size, so that these tiny masks are too)
    "ta_raw_block_masks": dict(merge="ta", checksum="xxh3-64", raw_masks=True),
    # a tied weight (one tensor under two names in the base and every task) stored once (1.14)
    "ta_aliases": dict(merge="ta", checksum="xxh3-64", tied=True),
}


def archives(workdir: Path) -> dict[str, bytes]:
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        cfg = dict(cfg)
        dtype = cfg.pop("dtype", torch.float32)
        base, tasks = family(i, dtype)
        if cfg.get("keep_base_only"):
            base["only_in_base"] = torch.randn(6)
        if cfg.pop("tied", False):
            for sd in (base, *tasks.values()):
                sd["w_tied"] = sd["w"]
        path = workdir / f"{name}.tallpack"
        path.unlink(missing_ok=True)
        raw_from = codecs.Zstd.RAW_FROM
        codecs.Zstd.RAW_FROM = 0 if cfg.pop("raw_masks", False) else raw_from
        try:
            tallpack.pack(base, tasks, path, chunk_elements=64, metadata={"seed": name}, **cfg)
        finally:
            codecs.Zstd.RAW_FROM = raw_from
        out[name] = path.read_bytes()
    return out


def main(corpus: str) -> None:
    root = Path(corpus)
    root.mkdir(parents=True, exist_ok=True)
    seeds = archives(root)
    (HERE / "seeds").mkdir(exist_ok=True)
    for i, (name, raw) in enumerate(seeds.items()):
        (HERE / "seeds" / f"{i}.tallpack").write_bytes(raw)  # the data areas manifest inputs use
        (root / f"{name}.tallpack").unlink()
        (root / f"file-{name}").write_bytes(FILE + raw)
        (root / f"resummed-{name}").write_bytes(RESUMMED + raw)
        text = json.dumps(json.loads(manifest_text(raw)), separators=(",", ":")).encode()
        (root / f"manifest-{name}").write_bytes(MANIFEST + bytes([i]) + text)
    print(f"wrote {3 * len(seeds)} seeds to {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / "corpus"))
