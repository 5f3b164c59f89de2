"""What ``--help`` says, and the usage errors of options it describes: ranges shown and checked
where the option is read, global options that conflict, flags the others leave without effect;
and the Python API's checks of the same values."""

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from tallpack_cli.main import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="tallpack", catch_exceptions=False)


def usage_error(result, command: str = "pack") -> str:
    """The one ``error: ...`` line of a usage error (exit 2) that names the command's --help."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert lines[0].endswith(f"(see 'tallpack{' ' + command if command else ''} --help')"), lines[0]
    return lines[0]


def pack_args(family, out):
    p = family["task_paths"]
    return ["pack", "--base", family["base_path"], "--task", f"a={p['a']}", "--task", f"b={p['b']}", "-o", out]


@pytest.fixture
def packed(small_family, tmp_path):
    out = tmp_path / "fam.tallpack"
    assert run(*pack_args(small_family, out)).exit_code == 0
    return out


def test_help_shows_real_ranges_and_no_unbounded_ones():
    pack_help, merge_help = run("pack", "--help").output, run("merge", "--help").output
    for text in (pack_help, merge_help):
        assert "None]" not in text and "x<=None" not in text
    ties = pack_help[pack_help.index("--ties-top-k"):]
    assert "[default: 0.2; 0<x<=1]" in " ".join(ties[:200].split())


@pytest.mark.parametrize("value", ["1.5", "0", "-1", "5", "1.0000001"])
def test_ties_top_k_out_of_range_is_a_usage_error(small_family, tmp_path, value):
    out = tmp_path / "o.tallpack"
    r = run(*pack_args(small_family, out), "--merge", "ties", "--ties-top-k", value)
    line = usage_error(r)
    assert "'--ties-top-k'" in line and "0<x<=1 (see" in line and "top_k" not in line.replace("--ties-top-k", "")
    assert not out.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 0 < x <= 1))
def test_every_ties_top_k_the_method_refuses_is_refused_while_parsing(tmp_path, x):
    """Refused before any input is read: the base named here does not exist."""
    with pytest.raises(tallpack.InvalidArgumentError):
        tallpack.merging.get_method({"method": "ties", "top_k": x})
    r = run("pack", "--base", tmp_path / "missing.safetensors", "--task", tmp_path / "t.safetensors",
            "-o", tmp_path / "o.tallpack", "--merge", "ties", "--ties-top-k", repr(x))
    assert "--ties-top-k" in usage_error(r)


@pytest.mark.parametrize("args, says", [
    (["-q", "-v"], "-q/--quiet and -v/--verbose conflict"),
    (["-v", "-q"], "-q/--quiet and -v/--verbose conflict"),
    (["-vq"], "-q/--quiet and -v/--verbose conflict"),
    (["-q", "-vv"], "-q/--quiet and -v/--verbose conflict"),
    (["-q", "-q"], "-q/--quiet given twice"),
    (["-qq"], "-q/--quiet given twice"),
    (["--quiet", "-q"], "-q/--quiet given twice"),
])
def test_conflicting_or_repeated_global_options_are_usage_errors(packed, args, says):
    r = run(*args, "inspect", packed)
    assert says in usage_error(r, command="")


def test_verbose_counts_and_quiet_once_still_work(packed):
    for args in (["-v", "-v"], ["-vv"], ["-q"], ["--verbose"]):
        r = run(*args, "inspect", packed)
        assert r.exit_code == 0 and "density" in r.output, (args, r.output)


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_quiet_with_a_progress_flag_is_refused(small_family, tmp_path, flag):
    out = tmp_path / "o.tallpack"
    line = usage_error(run("-q", *pack_args(small_family, out), flag))
    assert f"{flag} has no effect with -q" in line
    assert not out.exists()


def test_a_repeated_flag_is_refused(small_family, tmp_path):
    out = tmp_path / "o.tallpack"
    assert "--exact given twice" in usage_error(run(*pack_args(small_family, out), "--exact", "--exact"))
    assert not out.exists()


@pytest.mark.parametrize("flags, says", [
    (["--exact", "--store-masks", "--store-merged"], "--store-merged has no effect with --store-masks"),
    (["--exact", "--no-group"], "--no-group has no effect with --exact"),
    (["--fidelity", "0.95", "--no-group"], "--no-group has no effect with --fidelity or --budget"),
    (["--budget", "3", "--no-group"], "--no-group has no effect with --fidelity or --budget"),
])
def test_a_flag_without_effect_is_refused_in_either_spelling(small_family, tmp_path, flags, says):
    out = tmp_path / "o.tallpack"
    assert says in usage_error(run(*pack_args(small_family, out), *flags))
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--exact", "--store-masks"], ["--exact", "--store-merged"], ["--no-group"]])
def test_the_same_flags_where_they_have_an_effect_are_taken(small_family, tmp_path, flags):
    r = run(*pack_args(small_family, tmp_path / "o.tallpack"), *flags)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("level", ["3", None, True, 3.0, 0, -1, -100, 23])
def test_pack_level_must_be_an_integer_in_the_command_lines_range(small_family, tmp_path, level):
    out = tmp_path / "o.tallpack"
    with pytest.raises(tallpack.InvalidArgumentError, match=r"^level must be an integer 1\.\.22 .*got "):
        tallpack.pack(small_family["base_path"], {"a": small_family["task_paths"]["a"]}, out, level=level)
    assert not out.exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(-40, 40))
def test_the_command_line_and_the_api_take_the_same_levels(tmp_path, level):
    """A level the API refuses is a usage error (exit 2); one it takes gets as far as the missing base."""
    try:
        tallpack.PackOptions(level=level).validated()
        api_ok = True
    except tallpack.InvalidArgumentError:
        api_ok = False
    r = run("pack", "--base", tmp_path / "missing.safetensors", "--task", tmp_path / "t.safetensors",
            "-o", tmp_path / "o.tallpack", "--level", str(level))
    assert (r.exit_code != 2) == api_ok, (level, r.output)


@pytest.mark.parametrize("corrections", [("sparse",), (), ["quant8", "exact"]])
def test_corrections_without_the_dial_are_refused(small_family, tmp_path, corrections):
    out = tmp_path / "o.tallpack"
    with pytest.raises(tallpack.InvalidArgumentError, match="give fidelity or budget too"):
        tallpack.pack(small_family["base_path"], small_family["task_paths"], out, corrections=corrections)
    assert not out.exists()


@pytest.mark.parametrize("corrections", ["sparse", None, 3])
def test_corrections_not_a_sequence_of_names_say_so(corrections):
    with pytest.raises(tallpack.InvalidArgumentError, match="corrections must be a sequence of names") as e:
        tallpack.PackOptions(fidelity=0.9, corrections=corrections).validated()
    assert "unknown" not in str(e.value)


def test_corrections_with_the_dial_still_pack(small_family, tmp_path):
    out = tmp_path / "o.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out, fidelity=0.99, corrections=["sparse"])
    with tallpack.open(out) as fam:
        assert fam.tasks


def test_unpack_help_says_where_each_task_goes(packed, tmp_path):
    text = " ".join(run("unpack", "--help").output.split())
    assert "-o, --output OUTDIR" in text
    assert "one task is written into OUTDIR itself, two or more each into OUTDIR/NAME" in text
    # and that is where they go
    assert run("unpack", packed, "--task", "a", "-o", tmp_path / "one").exit_code == 0
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert run("unpack", packed, "--task", "a", "--task", "b", "-o", tmp_path / "two").exit_code == 0
    assert all((tmp_path / "two" / t / "model.safetensors").is_file() for t in "ab")


def test_every_option_of_every_command_has_help_text():
    for name, command in main.commands.items():
        for p in command.params:
            assert getattr(p, "help", None) or p.param_type_name == "argument", (name, p.name)
    assert "about a minute" in " ".join(run("demo", "--help").output.split())
