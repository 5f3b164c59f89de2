"""Looking at an archive: inspect --tensors, stats (and its figure), progress output."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from tallpack import stats
from tallpack.progress import LogLines, track
from tallpack_cli.main import main


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def packed(small_family, tmp_path):
    out = tmp_path / "fam.tallpack"
    # one entry per tensor, read below by name (test_groups.py: the same figures from groups)
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, chunk_elements=256, group=False)
    return out


def test_inspect_tensors(packed):
    s = json.loads(run("inspect", packed, "--json", "--tensors").stdout)
    rows = {r["name"]: r for r in s["tensors"]}
    assert rows["body.w"]["kind"] == "merged" and rows["body.w"]["shape"] == [64, 48]
    assert rows["body.w"]["dtype"] == "float32" and "bitpack+zstd" in rows["body.w"]["codecs"]
    assert rows["steps"]["kind"] == "shared" and rows["head.w"]["kind"] == "task-own"
    assert rows["head.w"]["shapes"] == {"a": [2, 48], "b": [3, 48], "c": [4, 48]}
    assert sum(r["stored_bytes"] for r in rows.values()) == sum(s["stored_bytes"].values())
    with tallpack.open(packed) as fam:
        entry = next(e for e in fam.manifest.tensors if e.name == "body.w")
        assert rows["body.w"]["density"]["b"] == entry.tasks["b"].params["ones"] / (64 * 48)
    table = run("inspect", packed, "--tensors").stdout
    assert "body.w" in table and "merged" in table and "per task" in table


def test_inspect_tensors_escapes_names_from_the_archive(tmp_path):
    """Tensor and task names are the archive's: control characters are escaped, one row a tensor,
    and a very long name widens its own row only."""
    g = torch.Generator().manual_seed(3)
    names = ["ctl\x1b[31mred", "new\nline", "tab\tname", "x" * 300, "plain"]
    base = {n: torch.randn(16, 8, generator=g) for n in names}
    tasks = {t: {n: v + 0.1 * torch.randn(16, 8, generator=g) for n, v in base.items()} for t in ("a", "c")}
    out = tmp_path / "names.tallpack"
    tallpack.pack(base, tasks, out, group=False)
    table = run("inspect", out, "--tensors").stdout
    assert "\x1b" not in table and "\t" not in table
    lines = table.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("tensor ")):]
    assert len(lines) == 2 + len(names)
    assert repr("new\nline") in table and repr("ctl\x1b[31mred") in table
    assert len(lines[0]) < 200 and max(map(len, lines)) > 300


def test_stats_counts_tasks_per_weight(packed, tmp_path):
    with tallpack.open(packed) as fam:
        s = stats.compute(fam)
        masks = {t: torch.cat([fam.read_array(e.tasks[t].arrays["mask"], "m").reshape(-1)
                               for e in fam.manifest.tensors if e.kind == "merged"]) for t in fam.tasks}
    count = sum(m.long() for m in masks.values())
    assert s.tasks_using == [int((count == k).sum()) for k in range(4)]
    assert s.density == pytest.approx({t: m.float().mean().item() for t, m in masks.items()})
    assert sum(s.fractions().values()) == pytest.approx(1.0)
    assert set(s.layers) == {"other"}
    r = run("stats", packed, "--plot", tmp_path / "stats.png")
    assert "catastrophic" in r.stdout and "consensus" in r.stdout
    assert "density per layer:" in r.stdout
    assert [f"{s.layers['other'][t]:.3f}" for t in s.tasks] in [ln.split()[1:] for ln in r.stdout.splitlines()
                                                               if ln.startswith("other ")]
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run("stats", packed, "--json").stdout)["weights"] == s.weights


def _layered_family(seed: int, tasks: int) -> tuple[dict, dict]:
    """Tensors in numbered layers and outside them, small enough to be grouped (format 1.12)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (40, 16), **{f"model.layers.{i}.{k}": s for i in range(3)
                                           for k, s in (("w", (24, 16)), ("b", (24,)))}, "head.weight": (5, 16)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = {f"t{j}": {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for j in range(tasks)}
    return base, fts


def _reference_stats(fam) -> tuple[list[int], dict, dict]:
    """tasks_using, density and density per layer counted plainly from the stored masks of an
    archive of one entry per tensor."""
    names = list(fam.tasks)
    count: list[int] = []
    ones = {t: [0, 0] for t in names}
    layers: dict[str, dict[str, list[int]]] = {}
    for e in fam.manifest.tensors:
        if e.kind != "merged":
            continue
        masks = [fam.read_array(e.tasks[t].arrays["mask"], "m").reshape(-1).tolist() for t in names]
        count += [sum(bits) for bits in zip(*masks)]
        for t, m in zip(names, masks):
            row = layers.setdefault(stats.layer_of(e.name), {u: [0, 0] for u in names})[t]
            for acc in (ones[t], row):
                acc[0] += sum(m)
                acc[1] += len(m)
    return ([count.count(k) for k in range(len(names) + 1)], {t: k / n for t, (k, n) in ones.items()},
            {lay: {t: k / n for t, (k, n) in row.items()} for lay, row in layers.items()})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), tasks=st.integers(1, 4))
def test_stats_equal_a_plain_count_of_the_masks_alone_and_grouped(tmp_path, seed, tasks):
    """tasks_using, density per task and per layer are exact counts of the stored masks, for
    tensors stored alone and in groups (each member counted in its own layer)."""
    base, fts = _layered_family(seed, tasks)
    alone, grouped = tmp_path / f"alone{seed}.tp", tmp_path / f"grouped{seed}.tp"
    tallpack.pack(base, fts, alone, group=False, chunk_elements=64, overwrite=True)
    tallpack.pack(base, fts, grouped, chunk_elements=64, overwrite=True)
    with tallpack.open(alone) as a, tallpack.open(grouped) as b:
        assert any(e.members for e in b.manifest.tensors)
        using, density, layers = _reference_stats(a)
        for fam in (a, b):
            s = stats.compute(fam)
            assert s.tasks_using == using and s.density == density
            assert s.layers == layers and list(s.layers)[-1] == "other"


def test_stats_count_masks_without_torch_arithmetic(packed):
    """The masks are counted by numpy: torch's bool ``sum`` widens each element to int64 and made
    ``stats`` 13-20x slower than reading the masks (bincount and the int16 histogram as well)."""
    with tallpack.open(packed) as fam:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            s = stats.compute(fam)
    assert s.weights > 0
    ran = {e.key for e in prof.key_averages()}
    assert not ran & {"aten::sum", "aten::count_nonzero", "aten::bincount", "aten::add", "aten::_to_copy"}, ran


def test_plot_names_an_image_format_and_replaces_only_with_force(packed, tmp_path):
    """--plot takes a file name matplotlib writes (checked before the masks are read), and is an
    output as any other: an existing file is replaced only with --force."""
    pytest.importorskip("matplotlib")
    for bad in ("x.safetensors", "stats", "x.pgf", "nodir/x.png"):  # pgf needs TeX; a folder that is not there
        r = CliRunner().invoke(main, ["stats", str(packed), "--plot", str(tmp_path / bad)])
        assert r.exit_code == 1 and ("image format" in r.output or "does not exist" in r.output), r.output
        assert r.output.count("\n") == 1, r.output
        assert "catastrophic" not in r.output and not (tmp_path / bad).exists()
    png = tmp_path / "p.png"
    png.write_bytes(b"precious")
    r = CliRunner().invoke(main, ["stats", str(packed), "--plot", str(png)])
    assert r.exit_code == 1 and "already exists; pass --force" in r.output and png.read_bytes() == b"precious"
    run("stats", packed, "--plot", png, "--force")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*partial"))
    with tallpack.open(packed) as fam:
        s = stats.compute(fam)
    with pytest.raises(tallpack.OutputExistsError):
        stats.plot(s, png)
    stats.plot(s, tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_layers_are_named_from_tensor_names():
    assert stats.layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert stats.layer_of("transformer.h.3.attn.c_attn.weight") == "layer 3"
    assert stats.layer_of("bert.encoder.layer.0.output.dense.weight") == "layer 0"
    assert stats.layer_of("lm_head.weight") == "other"
    assert stats.layer_of("body.4.weight") == "layer 4"  # nn.Sequential, as the demo family
    assert stats.layer_of("model.norm.weight") == "other"


def test_plot_without_matplotlib_says_what_to_install(packed, tmp_path, monkeypatch):
    with tallpack.open(packed) as fam:
        s = stats.compute(fam)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(tallpack.TallpackError, match=r"pip install 'tallpack\[plot\]'"):
        stats.plot(s, tmp_path / "x.png")


def test_progress_is_log_lines_off_a_terminal_and_quiet_with_q(small_family, tmp_path):
    p = small_family["task_paths"]
    args = ["pack", "--base", small_family["base_path"], "--task", p["a"], "--task", p["b"]]
    r = run(*args, "-o", tmp_path / "x.tallpack")
    lines = [x for x in r.stderr.splitlines() if x.startswith("packing:")]
    assert lines and lines[-1] == "packing: 5/5"
    r = run("-q", *args, "-o", tmp_path / "y.tallpack")
    assert r.stderr == ""
    r = run("verify", tmp_path / "x.tallpack")
    assert "verifying:" in r.stderr
    r = run("unpack", tmp_path / "x.tallpack", "--task", "a", "-o", tmp_path / "a")
    assert "writing: 5/5" in r.stderr


def test_progress_helpers(capsys):
    seen = []
    assert list(track(range(20), LogLines(seen.append), "x")) == list(range(20))
    assert seen[0] == "x: 2/20" and seen[-1] == "x: 20/20" and len(seen) == 10
    assert list(track([1, 2], True, "bar")) == [1, 2]  # a tqdm bar on stderr
    assert list(track([1, 2], None, "none")) == [1, 2]


def test_log_lines_show_every_run_of_a_step_under_its_label():
    """Each task of a multi-task unpack shows its own ~10% lines, named (a second run under the
    same name showed only its last step)."""
    from tallpack.progress import Labelled

    seen = []
    lines = LogLines(seen.append)
    for task in ("a", "b"):
        list(track(range(5), Labelled(lines, task), "writing"))
    assert seen == [f"{t}: writing: {i}/5" for t in "ab" for i in range(1, 6)]
    seen.clear()
    for _ in range(2):  # unlabelled, twice: both runs shown
        list(track(range(3), lines, "writing"))
    assert seen == [f"writing: {i}/3" for _ in range(2) for i in range(1, 4)]
    assert list(track([1, 2], Labelled(True, "a"), "bar")) == [1, 2]
    assert list(track([1, 2], Labelled(None, "a"), "none")) == [1, 2]


def test_inspect_keeps_its_columns_with_long_task_names(tmp_path):
    from tallpack.report import render

    base = {"w": torch.zeros(64, 8)}
    long = "a-task-name-longer-than-the-column"
    tallpack.pack(base, {long: {"w": torch.ones(64, 8)}, "b": {"w": -torch.ones(64, 8) * 0.5}}, tmp_path / "x.tallpack")
    with tallpack.open(tmp_path / "x.tallpack") as fam:
        lines = render(fam.summary()).splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("task "))
    rows = lines[head + 2 : head + 4]
    assert rows[0].startswith(long) and all(r.index("0.40") == lines[head].index("lambda") + 2 for r in rows), lines


def test_inspect_tensors_keeps_group_members_densities_under_their_tasks(tmp_path):
    """A group's member says where it is stored in the stored and codec columns, padded so that
    its densities sit under the task columns, as every other row's."""
    from tallpack.report import render_tensors, tensor_rows

    g = torch.Generator().manual_seed(0)
    base = {f"n{i}": torch.randn(64, generator=g) for i in range(3)} | {"w": torch.randn(600, 600, generator=g)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("cars", "dtd")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        text = render_tensors(tensor_rows(fam.manifest, fam.read_array, fam.packed_bits), list(fam.tasks))
    lines = text.splitlines()
    end = lines[0].index("cars") + len("cars")  # right-aligned under the header
    rows = [line for line in lines[2:] if line.split()[0] in base or line.startswith("tallpack.group")]
    assert any(" in tallpack.group" in line for line in rows)
    for line in rows:  # cars' density ends where its header does, and dtd's column follows
        assert re.fullmatch(r" [01]\.\d{3}", line[end - 6:end]) and line[end] == " ", line


def test_unpack_all_names_each_tasks_progress(tmp_path):
    """Log lines of a multi-task unpack say whose they are, and every task gets its ~10% lines."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(300, 300, generator=g) for i in range(3)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack", group=False)
    seen: list[str] = []
    tallpack.write_tasks(tallpack.open(tmp_path / "f.tallpack"), None, tmp_path / "u", progress=LogLines(seen.append))
    assert [line for line in seen if line.endswith("3/3")] == ["a: writing: 3/3", "b: writing: 3/3"]
    assert sum(line.startswith("b: ") for line in seen) == 3


def test_thousands_of_layers_are_labelled_every_nth() -> None:
    """A label per layer took minutes to draw for a model of thousands of numbered blocks, and the
    axis was a black bar: at most MAX_LAYER_TICKS blocks are labelled, evenly, and "other" after."""
    from tallpack.stats import MAX_LAYER_TICKS, layer_ticks

    assert layer_ticks(12, True) == list(range(13))
    for blocks in (41, 1000, 8000):
        ticks = layer_ticks(blocks, True)
        assert len(ticks) <= MAX_LAYER_TICKS + 1 and ticks[0] == 0 and ticks[-1] == blocks
        assert len({b - a for a, b in zip(ticks, ticks[1:-1])}) == 1  # evenly spaced


def test_a_plot_below_a_file_says_the_file_is_not_a_folder(packed, tmp_path) -> None:
    """``--plot notes.txt/p.png`` said "the folder notes.txt does not exist" of an existing file."""
    (tmp_path / "notes.txt").write_text("hi\n")
    r = CliRunner().invoke(main, ["stats", str(packed), "--plot", str(tmp_path / "notes.txt" / "p.png")])
    assert r.exit_code == 1 and f"{tmp_path / 'notes.txt'}: is a file, not a folder" in r.output, r.output


# --- many tasks: tables within the terminal's width (r24 F5) ---

_SPREAD_ROW = re.compile(r"(\d\.\d{3}) (\S+)(?: \+(\d+))?\s+(\d\.\d{3})\s+(\d\.\d{3}) (\S+)(?: \+(\d+))?")


@pytest.fixture
def many_tasks(tmp_path):
    """12 tasks of a tiny layered model (a few KB): t0 equals the base, t5 equals t1 (ties at the extremes)."""
    base, fts = _layered_family(1, 12)
    fts["t0"], fts["t5"] = dict(base), dict(fts["t1"])
    out = tmp_path / "many.tallpack"
    tallpack.pack(base, fts, out, chunk_elements=64)
    return out


def _cli(*args, columns=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": columns}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def _check_spread(cells: str, density: dict) -> None:
    """A min / median / max cell of a table against the tasks' densities, the first task at each extreme named."""
    import statistics

    m = _SPREAD_ROW.fullmatch(cells.strip())
    assert m, cells
    known = {t: d for t, d in density.items() if d is not None}
    for value, task, more, want in ((m[1], m[2], m[3], min(known.values())), (m[5], m[6], m[7], max(known.values()))):
        at = [t for t, d in known.items() if d == want]
        assert (value, task, int(more or 0)) == (f"{want:.3f}", at[0], len(at) - 1), (cells, density)
    assert m[4] == f"{statistics.median(known.values()):.3f}", cells


def test_inspect_tensors_of_many_tasks_fit_the_width_as_min_median_max(many_tasks):
    """Past what fits in 120 columns (a file, a pipe), a tensor's densities are min / median / max across
    the tasks, the tasks at the extremes named (a column per task made rows of 20 tasks 296 wide);
    the terminal's width ($COLUMNS) gives room for a column per task again; --json is unchanged."""
    rows = {r["name"]: r for r in json.loads(_cli("inspect", many_tasks, "--json", "--tensors"))["tensors"]}
    assert all(set(r) >= {"name", "density"} for r in rows.values()) and "t11" in rows["embed.weight"]["density"]
    lines = _cli("inspect", many_tasks, "--tensors").splitlines()[1:]  # the first: the archive's (long) path
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tensor "))
    assert lines[head].split()[-3:] == ["min", "median", "max"]
    at = lines[head].index("min")
    checked = 0
    for line in lines[head + 2:]:
        name = line.split()[0]
        if name in rows and rows[name]["density"]:
            _check_spread(line[at:], rows[name]["density"])
            checked += 1
    assert checked >= 8 and any(" +1" in ln for ln in lines)  # t1 and t5 tie at the top of some tensor
    assert any(ln.startswith("min, max:") for ln in lines)
    wide = _cli("inspect", many_tasks, "--tensors", columns="300").splitlines()
    head = next(i for i, ln in enumerate(wide) if ln.startswith("tensor "))
    assert wide[head].split()[-12:] == [f"t{j}" for j in range(12)] and max(map(len, wide[1:])) <= 300


def test_inspect_and_stats_show_chosen_tasks_columns(many_tasks):
    """--task NAME (repeatable): that task's density column, whatever the number of tasks; a task the
    archive lacks is named in one line; --json keeps every task (--task with it is refused)."""
    rows = {r["name"]: r for r in json.loads(_cli("inspect", many_tasks, "--json", "--tensors"))["tensors"]}
    lines = _cli("inspect", many_tasks, "--tensors", "--task", "t7", "--task", "t3").splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tensor "))
    assert lines[head].split()[-2:] == ["t7", "t3"] and max(map(len, lines[1:])) <= 120
    shown = {ln.split()[0]: ln.split()[-2:] for ln in lines[head + 2:]}
    for name, r in rows.items():
        if r["density"]:
            assert shown[name] == [f"{r['density'][t]:.3f}" for t in ("t7", "t3")], name
    s = json.loads(_cli("stats", many_tasks, "--json"))
    text = _cli("stats", many_tasks, "--task", "t7").splitlines()
    table = text[text.index("density per layer:") + 1:]
    assert table[0].split() == ["t7"]
    assert {ln.split()[-1] for ln in table[1:]} >= {f"{s['layers']['other']['t7']:.3f}"}
    for args in (["inspect", many_tasks, "--tensors", "--task", "nope"], ["stats", many_tasks, "--task", "nope"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and "no task 'nope'" in r.output and r.output.count("\n") == 1, r.output
    for args in (["inspect", many_tasks, "--tensors", "--json", "--task", "t1"], ["inspect", many_tasks, "--task", "t1"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 2 and "--task" in r.output, r.output


def test_stats_of_many_tasks_fit_the_width(many_tasks):
    """stats of 12 tasks in 100 columns: the density per layer as min / median / max (equal to the
    figures of --json), the lists over several lines, every line within the width."""
    s = json.loads(_cli("stats", many_tasks, "--json"))
    lines = _cli("stats", many_tasks, columns="100").splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    table = lines[lines.index("density per layer:") + 1:]
    assert table[0].split() == ["min", "median", "max"]
    for line in table[1:]:
        layer = next((lay for lay in s["layers"] if line.startswith(lay + " ")), None)
        if layer is not None:
            _check_spread(line[len(layer):], s["layers"][layer])
    assert {lay for lay in s["layers"] if any(ln.startswith(lay + " ") for ln in table)} == set(s["layers"])
    listed = " ".join(lines[lines.index(next(ln for ln in lines if ln.startswith("density per task:"))):])
    assert all(f"{t}: {d:.3f}" in listed for t, d in s["density"].items())


_names = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=14)


@settings(max_examples=40, deadline=None)
@given(names=st.lists(_names, min_size=1, max_size=30, unique=True), width=st.integers(80, 220), data=st.data())
def test_stats_text_keeps_within_the_width_and_folds_the_empty_tail(names, width, data):
    """Any number of tasks and widths from 80: every line of ``stats.render`` fits, the counts of tasks
    using a weight cover 0..T once (a tail of 0.0% as one item, ``8-20: 0.0%``), the per-layer spread is
    the tasks' own min / median / max, and a table that fits is the one printed without a width."""
    dens = st.one_of(st.none(), st.integers(0, 1000).map(lambda k: k / 1000))
    layers = {lay: {t: data.draw(dens) for t in names} for lay in ("layer 0", "layer 1", "other")}
    using = data.draw(st.lists(st.integers(0, 10**6) | st.just(0), min_size=len(names) + 1, max_size=len(names) + 1))
    using[0] += 1
    s = stats.MaskStats(list(names), using, {t: data.draw(dens) for t in names}, layers)
    lines = stats.render(s, width=width).splitlines()
    assert max(map(len, lines)) <= width, max(lines, key=len)
    listing = " ".join(ln.strip() for ln in lines if ln)
    covered = []
    for a, b in re.findall(r"(?<![\d.])(\d+)(?:-(\d+))?: (?:[\d.]+%|none)", listing.split("density per task:")[0]):
        covered += range(int(a), int(b or a) + 1)
    assert covered == list(range(len(names) + 1))
    table = lines[lines.index("density per layer:") + 1:]
    if table[0].split() == ["min", "median", "max"]:
        for line in table[1:1 + len(layers)]:
            lay = next(lay for lay in layers if line.startswith(lay + " "))
            if any(d is not None for d in layers[lay].values()):
                m = _SPREAD_ROW.fullmatch(line[len(lay):].strip())
                assert m and m[1] == f"{min(d for d in layers[lay].values() if d is not None):.3f}", line
    else:
        assert table == stats.render(s, width=None).splitlines()[-len(table):]
