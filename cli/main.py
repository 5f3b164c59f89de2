"""``tallpack``: pack, inspect, unpack, verify and merge model-family archives."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

import tallpack
from tallpack.errors import InvalidArgumentError, TallpackError, TaskNotFoundError, memory_detail, out_of_memory
from tallpack.fsutil import committed
from tallpack.checksums import CHECKSUMS
from tallpack.dial import shown as shown_fidelity
from tallpack.kernels import COMPILED
from tallpack.manifest import task_name_problem
from tallpack.merged import base_not_held, default_model, in_some_tasks, left_out, missing_components
from tallpack.merging import MERGED_MODELS, METHODS, MergeMethod, Option, check_alpha, default_alpha, is_consensus
from tallpack.options import DENSE_PRESETS, MAX_LEVEL, MIN_LEVEL, PackOptions
from tallpack.progress import Bar, LogLines
from tallpack.report import TABLE_WIDTH, format_size, render, render_tensors, show_name, tensor_rows
from tallpack.sources import stems
from tallpack import staging
from tallpack.reader import LISTED_TASKS
from tallpack.remote import RedactingFilter, redact

_DEFAULTS = PackOptions()


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _usage(message: str) -> None:
    """An option or its value the command cannot take: a usage error (exit 2), as click's own."""
    raise click.UsageError(message, click.get_current_context())


class _Finite(click.FloatRange):
    """A float option that is a finite number (click's ranges let NaN and inf through)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        """No range when unbounded (click's reads ``x<=None`` in the help)."""
        return "" if self.min is None and self.max is None else super()._describe_range()


class _Alpha(_Finite):
    """A merge's alpha: a number that stays finite rounded to float32, as the merge uses it
    (``merging.check_alpha``), refused here with a usage error before the archive is read."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        try:
            return check_alpha(rv)
        except InvalidArgumentError:
            self.fail(f"{value!r} is past float32's range (|alpha| < 3.4e38), in which the merge scales", param, ctx)


class _Terminated(BaseException):
    """SIGTERM, or SIGHUP (the terminal or SSH session closed), raised where the main thread is, so
    that the command unwinds as on Ctrl-C: its temporaries and the folders it created are removed
    (not an ``Exception``: no handler takes it for an error of its own)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise _Terminated(signum)


_SIGHUP: signal.Signals | None = getattr(signal, "SIGHUP", None)  # (none on Windows)


def _signal_line(signum: int, written: bool, left: str | None = None) -> str:
    """The one line of a command ended by ``signum``: whether its output is in place, or ``left``,
    what an upload cut off left at its URL (``left_at_url`` of the signal's exception: staging)."""
    what = ("terminated (SIGTERM)" if signum == signal.SIGTERM else "hung up (SIGHUP)" if signum == _SIGHUP
            else "interrupted")
    if left:
        return f"error: {what}; {left}"
    return f"error: {what}{' after its output was written' if written else '; nothing was written'}"


def _end_at_once(before: int, said: list[bool]) -> None:
    """From the end of the command to the end of the process (click's return, Python's shutdown:
    threads joined, atexit handlers, finalizers), SIGINT and SIGTERM end it at once with the
    command's signal line and exit 130 or 143, as during the command. Left to Python, SIGTERM
    killed it without a line and Ctrl-C gave a traceback, or none and exit 0, after its ``wrote``
    line. ``said``: the command's own line is already out (a second signal adds none). Only in
    the command's own process (``run``): a caller's process keeps its handlers."""

    def end(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):  # what the command printed goes out before its end
            try:
                if stream is not None:  # None: closed when the process started (2>&-)
                    stream.flush()
            except (OSError, ValueError, RuntimeError):  # RuntimeError: the signal came mid-write (reentrant)
                pass
        if not said:
            try:
                os.write(2, (_signal_line(signum, committed() > before) + "\n").encode())
            except OSError:
                pass
        os._exit(128 + signum)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it (cmd &)
        signal.signal(signal.SIGINT, end)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (not where the parent ignores it)
        signal.signal(signal.SIGTERM, end)
    if _SIGHUP is not None and signal.getsignal(_SIGHUP) is _terminate:  # (not where it is ignored: nohup)
        signal.signal(_SIGHUP, end)


#: The exit status of a command whose output's reader went away (``| head -1``): the one a shell
#: reports for a command that SIGPIPE ended (128 + 13), as coreutils' are, so that ``set -o pipefail``
#: takes tallpack as it takes ``cat``; 1 would be an error of its own.
OUTPUT_GONE = 141


def _stdout_gone() -> bool:
    """Whether this process's standard output is a pipe whose reader is gone (its write end polls
    POLLERR), the ``BrokenPipeError`` being its; where ``poll`` is missing (Windows), assumed so."""
    import select

    if not hasattr(select, "poll"):
        return True
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        poller = select.poll()
        poller.register(fd, 0)  # (POLLERR is reported whatever is asked)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def _output_gone(own_process: bool) -> None:
    """End a command whose output's reader went away: quietly (no traceback, no line: the reader
    asked for no more), with exit status OUTPUT_GONE. In the command's own process what stdout
    still buffers goes to the null device (Python's recommended handling), not to a second error
    at exit."""
    if own_process:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ is not None else 1)
            os.close(devnull)
        except (OSError, ValueError):
            pass
    sys.exit(OUTPUT_GONE)


def end_process(code: int | str | None) -> None:
    """End the ``tallpack`` command's own process with exit status ``code`` (a ``SystemExit``'s)
    as Python's shutdown begins (its threads ended and joined, its ``atexit`` callbacks run), not
    the rest of it: a second of module and library teardown (torch's) in which a signal could no
    longer be told, so that it killed the process without a line after its ``wrote`` line (-15,
    -2). Where Python has no ``threading._shutdown``, its own shutdown does it all."""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)  # its pools' workers told to end, and every thread joined
    if shutdown is None:
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()  # logging's flush, weakref.finalize's, ...
    if code is not None and not isinstance(code, int):  # sys.exit("message"): said, then 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: closed when the process started (2>&-)
                stream.flush()
        except BrokenPipeError:  # its output's last lines had no reader (| head -1): as during the command
            if stream is sys.stdout and not code:
                code = OUTPUT_GONE
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def _refuse_repeats(command: click.Command, ctx: click.Context, args: list[str], *, group: bool = False) -> None:
    """A usage error for an option given twice: click keeps the last of a repeated one without a
    word (``merge --task cars --task dtd`` merged with dtd's head alone). Options that take several
    values (``multiple``) and counted ones (``-vv``) may repeat. A group's options end at its
    command's name (``tallpack -q pack -q``: the second is pack's)."""
    if ctx.resilient_parsing:  # shell completion: nothing is run
        return
    takes: dict[str, click.Option] = {}  # an option's spellings that take a value (the next argument's)
    flags: dict[str, click.Option] = {}  # and those that take none (an on/off pair: one of them, once)
    for p in command.params:
        if isinstance(p, click.Option):
            for o in (*p.opts, *p.secondary_opts):
                (flags if p.is_flag or p.count else takes)[o] = p
    seen: set[str] = set()

    def given(option: click.Option) -> None:
        if option.multiple or option.count or option.name is None:
            return
        if option.name in seen:
            spelled = "/".join((*option.opts, *option.secondary_opts))
            raise click.UsageError(f"{spelled} given twice; give it once", ctx)
        seen.add(option.name)

    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, _ = arg.partition("=")
            if name in flags:
                given(flags[name])
            elif name in takes:
                i += 0 if eq else 1  # ``--opt value``: the value is no option
                given(takes[name])
        elif arg.startswith("-") and len(arg) > 1:  # short options, perhaps bundled: -fo x
            for j in range(1, len(arg)):
                short = "-" + arg[j]
                if short in takes:
                    i += 1 if j == len(arg) - 1 else 0  # its value: the rest, or the next argument
                    given(takes[short])
                    break
                if short not in flags:  # not an option (a value such as -1): click decides
                    break
                given(flags[short])
        elif group:  # the command's name: the rest is the command's
            break


#: The options of ``tallpack`` itself, which go before the command's name.
_GROUP_OPTIONS = frozenset({"-q", "--quiet", "-v", "--verbose"})


class _Command(click.Command):
    """A command whose single-value options may be given once (:func:`_refuse_repeats`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeats(self, ctx, args)
        return super().parse_args(ctx, args)


class _Group(click.Group):
    """Turns every library error into one ``error: ...`` line and a non-zero exit; SIGTERM and
    Ctrl-C clean up as any failure does, and exit 143 and 130 as shells expect."""

    command_class = _Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeats(self, ctx, args, group=True)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's own handling, except that a usage error is one line (``error: ...``, where to
        find the command's options) with exit 2, as every other error is one line."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare ``tallpack``: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            message = _one_line(e.format_message())
            if (isinstance(e, click.NoSuchOption) and e.option_name in _GROUP_OPTIONS and e.ctx is not None
                    and e.ctx.parent is not None):  # tallpack verify x -q: the group's, given after the command
                message = message.removesuffix(".") + (f" ({e.option_name} goes before the command: '{e.ctx.parent.command_path} "
                            f"{e.option_name} {e.ctx.info_name} ...'; see '{e.ctx.parent.command_path} --help')")
            elif e.ctx is not None:
                if re.search(r"[A-Za-z0-9')]\.$", message):  # click's sentences: the hint in their place
                    message = message[:-1]
                message += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"error: {message}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    #: True in the ``tallpack`` command's own process (``run``): once a command has ended, a signal
    #: ends the process at once, with its line (:func:`_end_at_once`)
    own_process = False

    def invoke(self, ctx: click.Context) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        # (SIGTERM or SIGHUP that the parent ignores, nohup's, stays ignored)
        ignored = signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread and not ignored else None
        hup = _SIGHUP if main_thread and _SIGHUP is not None and signal.getsignal(_SIGHUP) is signal.SIG_DFL else None
        if hup is not None:  # (not where it is ignored: nohup)
            signal.signal(hup, _terminate)
        before = committed()  # outputs are renamed into place all at once, signals held (fsutil)
        said: list[bool] = []
        try:
            return super().invoke(ctx)
        except (_Terminated, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, _Terminated) else signal.SIGINT
            if main_thread and self.own_process:
                _end_at_once(before, said)  # a second signal while this line is written: still a line
            try:
                click.echo(_signal_line(signum, committed() > before, getattr(e, "left_at_url", None)), err=True)
            except OSError:  # the terminal that hung up, a log's pipe gone: the exit status says it
                pass
            said.append(True)
            sys.exit(128 + signum)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors and exits: click prints them
        except BrokenPipeError as e:
            if _stdout_gone():  # the reader of the output gone (| head -1); else a pipe or socket of its own work
                _output_gone(main_thread and self.own_process)
            _fail(_one_line(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")))
        except TallpackError as e:
            _fail(_one_line(str(e)))
        except OSError as e:
            if out_of_memory(e):  # ENOMEM: a mapping refused
                _fail(_out_of_memory(ctx, e))
            _fail(_one_line(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")))
        except UnicodeEncodeError as e:  # a name for a file or folder in a locale that is not UTF-8 (PYTHONUTF8=0)
            _fail(_one_line(f"{e.object!r}: {e.object[e.start:e.end]!r} cannot be written in this system's encoding "
                            f"({e.encoding}): use a UTF-8 locale (LANG=C.UTF-8) or set PYTHONUTF8=1"))
        except Exception as e:
            if out_of_memory(e):  # Python's MemoryError, torch's allocator, a thread that could not start
                _fail(_out_of_memory(ctx, e))
            # a bug: still one line, and where to report it
            _fail(_one_line(f"internal error: {type(e).__name__}: {e}")
                  + " (a bug in tallpack: please report it with the command that caused it)")
        finally:
            if main_thread and self.own_process:
                _end_at_once(before, said)
            elif main_thread:
                if previous is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signal.SIGTERM, previous)
                if hup is not None:
                    signal.signal(hup, signal.SIG_DFL)


def _out_of_memory(ctx: click.Context, e: BaseException) -> str:
    """The line of an error that says memory (or a thread) ran out: the command, and what it asked for."""
    command = f" while running 'tallpack {ctx.invoked_subcommand}'" if ctx.invoked_subcommand else ""
    detail = memory_detail(e)
    if isinstance(e, OSError) and e.filename:
        detail = f"{e.filename}: {detail}"
    return f"out of memory{command} ({detail}): free memory and run it again"


def _one_line(message: str, limit: int = 2000) -> str:
    message = " ".join(message.split("\n"))
    return message if len(message) <= limit else message[:limit] + "..."


#: Libraries whose debug log shows HTTP request headers (an S3 request's ``Authorization``): kept at
#: INFO under ``-vv``.
_SIGNING_LOGGERS = ("botocore", "aiobotocore", "urllib3", "s3transfer", "boto3")

@click.group(cls=_Group, epilog=(
    "Exit status: 0 done; 1 an error (verify: damage found); 2 a mistake in the command line (an option, "
    "a value); 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (nothing is left half-written); 141 the reader of the "
    "output gone (| head). Errors are one line on stderr; results and --json output go to stdout, progress to "
    "stderr."))
@click.version_option(tallpack.__version__, prog_name="tallpack", message=(
    "%(prog)s, version %(version)s (" + ("compiled kernels" if COMPILED else "numpy loops, no compiled kernels") + ")"))
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output, only errors and results.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Store a base model and its fine-tunes as one small, lazily readable archive.

    Archives and outputs may be local paths or URLs fsspec understands (s3://, https://, ...).
    """
    if quiet and verbose:
        _usage("-q/--quiet and -v/--verbose conflict: -q logs only errors, -v more; give one of them")
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=logging.ERROR if quiet else level, format="%(levelname)s %(name)s: %(message)s")
    for name in _SIGNING_LOGGERS:  # their debug lines hold request headers: a signature, an access key id
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).getEffectiveLevel()))
    for handler in logging.getLogger().handlers:  # every library's records: a signed link's secrets taken out
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    ctx.obj = {"quiet": quiet}


def _progress(enabled: bool = True, *, parts: int = 1):
    """A bar on a terminal (one for all ``parts``: the tasks of a multi-task unpack), a plain line
    per ~10% otherwise (of all ``parts``), nothing with -q."""
    ctx = click.get_current_context()
    if not enabled or (ctx.obj or {}).get("quiet") or sys.stderr is None:  # None: stderr closed (2>&-)
        return None
    if sys.stderr.isatty():
        return Bar(parts) if parts > 1 else True
    return LogLines(lambda line: click.echo(line, err=True), parts=parts)



def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a name too long to be a path: NAME=PATH, checked as such
        return False


class _PathOrUrl(click.Path):
    """A path or a URL, as given, completed as a file name by the shell's completion; ``-`` (a
    script's way to say standard input or output) is refused, not taken as a file named ``-``:
    ``pack -o - | aws s3 cp - ...`` wrote ``./-`` and uploaded nothing."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "-":
            self.fail("'-' (standard input or output) is not supported: tallpack reads and writes files by name; "
                      "give a path (./- for a file named -) or a URL (s3://...)", param, ctx)
        return super().convert(value, param, ctx)


#: Paths and URLs, as given (nothing else checked here).
_PATH = _PathOrUrl(path_type=str)


def _output(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("an empty path names no output")
    return value


def _nonempty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("an empty path names nothing")
    return value


def _shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--max-shard-size checked before any work: a usage error, not a failure after the rebuild."""
    if value is not None:
        from tallpack.sharding import parse_size
        try:
            parse_size(value)
        except TallpackError as e:
            raise click.BadParameter(_one_line(str(e))) from None
    return value


_MAX_SHARD = click.option("--max-shard-size", default=None, metavar="SIZE", callback=_shard_size,
                          help="Shards of at most SIZE (5GB, 500MB: decimal units) with an index; "
                               "default: the original's shards when the archive recorded them.")


def _parse_tasks(specs: tuple[str, ...], more: tuple[str, ...] = ()) -> dict[str, str]:
    """``--task`` values, then the positional TASKs (``more``): each ``NAME=PATH`` or ``PATH``."""
    tasks: dict[str, str] = {}
    ctx = click.get_current_context(silent=True)  # (none when called as a function)
    base = None if ctx is None else ctx.params.get("base")
    bare = [s for s in (*specs, *more) if "=" not in s or _exists(s) or "://" in s.partition("=")[0]]
    auto = dict(zip(bare, stems(bare)))  # files of one name (runs/*/ckpt.pt) named after their folders
    for spec, hint in [*((s, "--task") for s in specs), *((s, "TASK") for s in more)]:
        name, sep, path = spec.partition("=")
        if not sep or _exists(spec) or "://" in name:  # a bare path or URL, even one with '=' in it (?sig=...)
            name, path = auto[spec], spec
            why = task_name_problem(name) if name else None
            if why is not None:  # Lightning's epoch=3-step=500.ckpt
                raise click.BadParameter(f"{spec!r}: bad task name {name!r} (taken from the path): {why}; "
                                         f"give NAME={spec}", param_hint=hint)
            if hint == "TASK" and base is not None and _exists(spec) and _same(Path(spec), base):
                # a glob over the family's folder matches the base too: never a task of itself
                logging.getLogger("tallpack.cli").warning(
                    "%s is the base (--base), left out of the tasks (a shell glob's match?); give it as "
                    "--task NAME=%s to pack the base as a task too", spec, spec)
                continue
        if path and not name and not sep:
            raise click.BadParameter(f"{spec!r}: no task name can be taken from this path; give NAME={spec}",
                                     param_hint=hint)
        if not name or not path:
            raise click.BadParameter(f"{spec!r}: expected NAME=PATH or PATH", param_hint=hint)
        if name in tasks:
            raise click.BadParameter(f"task {name!r} given twice (name tasks with NAME=PATH)", param_hint=hint)
        _one_model(path, hint)
        tasks[name] = path
    return tasks


def _one_model(path: str, hint: str) -> None:
    """A usage error for a folder of model folders given as one task, with the command to type."""
    from tallpack.inputs import lone_file, model_folders  # (it imports torch, which --help does without)

    inside = model_folders(path)
    if not inside:
        return
    ctx = click.get_current_context()
    base = ctx.params.get("base")
    base_in = base is not None and any(_same(d, base) for d in inside)
    tasks = [d for d in inside if not (base is not None and _same(d, base))]
    names = [d.name for d in tasks]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    folder = path.rstrip("/") or path
    listed = {e.name for e in Path(path).iterdir() if not e.name.startswith(".")}  # what a shell's * matches
    lone = lone_file(tasks)  # nanoGPT's out-a/ckpt.pt: the files, which are named after their folders
    tail = "/" + shlex.quote(lone) if lone else ""
    if len(names) > 1 and listed == set(names):
        spelled = shlex.quote(folder + "/") + "*" + tail
    elif prefix and {n for n in listed if n.startswith(prefix)} == set(names):
        spelled = shlex.quote(f"{folder}/{prefix}") + "*" + tail
    else:
        spelled = " ".join(shlex.quote(str(d / lone) if lone else str(d)) for d in tasks[:3]) + \
            (" ..." if len(tasks) > 3 else "")
    shown = ", ".join(d.name for d in inside[:3]) + (", ..." if len(inside) > 3 else "")
    raise click.BadParameter(
        f"{path} holds no model but {len(inside)} model folder{'s' if len(inside) > 1 else ''} ({shown}); give "
        f"each as a task: tallpack pack --base {shlex.quote(base or 'BASE')} -o "
        f"{shlex.quote(ctx.params.get('output') or 'OUT')} {spelled}", param_hint=hint)


def _same(folder: Path, path: str) -> bool:
    """Whether two paths are one model (a Hugging Face cache repository folder and its snapshot too)."""
    from tallpack.sources import hub_snapshot

    def model(p: Path) -> Path:
        try:
            return (hub_snapshot(p) or p).resolve()
        except TallpackError:  # several snapshots: the folder itself
            return p.resolve()
    try:
        return model(folder) == model(Path(path))
    except OSError:
        return False


def _parse_lambdas(specs: tuple[str, ...], tasks: dict[str, str]) -> dict[str, float]:
    default = tallpack.DEFAULT_LAMBDA
    per: dict[str, float] = {}
    seen: dict[str | None, str] = {}  # task name (None: every task) -> the spec that set it
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            v = float(value)
        except ValueError:
            raise click.BadParameter(f"{spec!r}: expected a number or NAME=NUMBER", param_hint="--lambda") from None
        if not (math.isfinite(v) and v >= 0):
            raise click.BadParameter(f"{spec!r}: lambda must be a finite number >= 0", param_hint="--lambda")
        if sep and name not in tasks:
            raise click.BadParameter(f"{spec!r}: no task {name!r} (tasks: {', '.join(tasks)})", param_hint="--lambda")
        if (name if sep else None) in seen:  # a second value would silently win
            what = f"lambda for task {name!r}" if sep else "lambda for all tasks"
            raise click.BadParameter(f"{what} given twice ({seen[name if sep else None]!r} and {spec!r})",
                                     param_hint="--lambda")
        seen[name if sep else None] = spec
        if sep:
            per[name] = v
        else:
            default = v
    return {t: default for t in tasks} | per


def _given() -> set[str]:
    """The current command's parameters set on the command line (not left at their defaults)."""
    ctx = click.get_current_context()
    return {n for n in ctx.params if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}


def _method_flag(method: type[MergeMethod], opt: Option) -> str:
    return f"--{method.name}-{opt.name.replace('_', '-')}"


def _method_options(f):
    """One ``--{method}-{option}`` flag per option of every registered merge method."""
    for method in reversed(list(METHODS.values())):
        for opt in reversed(method.options):
            f = click.option(_method_flag(method, opt), f"{method.name}_{opt.name}",
                             type=_Finite(opt.low, opt.high, min_open=opt.low_open) if opt.type is float else opt.type,
                             default=opt.default,
                             show_default=True, help=opt.help)(f)
    return f


def _refuse_ignored_pack_flags(merge: str, exact: bool, dial: bool, derive_masks: bool) -> None:
    """An error for a flag given that the others leave without effect. Only what the library cannot
    see: flags left at their defaults' values (``--derive-masks``) or that never reach it (another
    method's options); it refuses ``--store-masks`` without ``--exact`` itself."""
    given, params = _given(), click.get_current_context().params
    for method in METHODS.values():
        for opt in method.options:
            if f"{method.name}_{opt.name}" in given and method.name != merge:
                _usage(f"{_method_flag(method, opt)} is an option of --merge {method.name}, not of --merge {merge}")
    if "progress" in given and (click.get_current_context().obj or {}).get("quiet"):
        spelled = "--progress" if params["progress"] else "--no-progress"
        _usage(f"{spelled} has no effect with -q, which shows no progress; leave one of them out")
    if "group" in given and (exact or dial):  # either spelling: neither changes a byte there
        spelled = "--group" if params["group"] else "--no-group"
        what = "--exact: the exact tier" if exact else "--fidelity or --budget: the fidelity dial"
        _usage(f"{spelled} has no effect with {what} works tensor by tensor, never in groups; leave {spelled} out")
    for key, flag in (("derive_masks", "--derive-masks"), ("derive_merged", "--derive-merged")):
        if key in given and not exact:  # either spelling: --derive-masks or --store-masks
            spelled = flag if params[key] else flag.replace("--derive-", "--store-")
            _usage(f"{spelled} needs --exact: without the exact tier every mask and merged vector is stored")
    if "derive_merged" in given and not derive_masks:
        if params["derive_merged"]:
            _usage("--derive-merged needs --derive-masks: with --store-masks every merged vector is stored")
        _usage("--store-merged has no effect with --store-masks, which stores every merged vector already; "
               "leave --store-merged out")
    if exact and dial:
        _usage("--fidelity and --budget do not go with --exact: the exact tier already stores every task's "
               "original bits; give one or the other")
    if params.get("sensitivity_file") is not None and not dial:
        _usage("--sensitivity weighs the fidelity dial's errors: give --fidelity or --budget too")


@main.command()
@click.option("--base", "base", required=True, type=_PATH, callback=_nonempty, help="The base model: .safetensors, .bin/.pt/.pth/.ckpt, or a model folder.")
@click.argument("more_tasks", nargs=-1, metavar="[TASK]...", type=_PATH)
@click.option("--task", "task_specs", multiple=True, metavar="NAME=PATH", type=_PATH,
              help="A fine-tuned member (repeat), as a TASK argument is: NAME=PATH, or a PATH named after its "
                   "folder or file stem (ft/cars/ and ft/cars/model.safetensors: cars).")
@click.option("-o", "--output", required=True, type=_PATH, callback=_output, help="The archive to write (a path or a URL).")
@click.option("--lambda", "lambda_specs", multiple=True, metavar="[NAME=]VALUE",
              help=f"Mask lambda, for all tasks or one (repeat). Default {tallpack.DEFAULT_LAMBDA}.")
@click.option("--merge", type=click.Choice(list(METHODS)), default=_DEFAULTS.merge, show_default=True,
              help="How the merged vector tau_MTL is built.")
@_method_options
@click.option("--codec", type=click.Choice(DENSE_PRESETS), default=_DEFAULTS.codec, show_default=True,
              help="Codec of dense sections: planes is the smallest, raw loads fastest (its masks kept verbatim too).")
@click.option("--level", type=click.IntRange(MIN_LEVEL, MAX_LEVEL), default=_DEFAULTS.level, show_default=True, help="zstd level (planes: 10 and up choose how float32/bfloat16 exponent bits are split per chunk, about 0.3% smaller, slower to decode).")
@click.option("--checksum", type=click.Choice(list(CHECKSUMS)), default=_DEFAULTS.checksum, show_default=True,
              help="Chunk checksum (crc32 with --codec bytegroup-zstd and --no-group, from files, gives a "
                   "format 1.0 archive that tallpack 0.1 reads).")
@click.option("--chunk-elements", type=click.IntRange(8), default=_DEFAULTS.chunk_elements, show_default=True,
              help="Elements per chunk (a multiple of 8).")
@click.option("--no-paths", is_flag=True,
              help="Leave the inputs' paths out of the archive (recorded as given, for provenance, by default).")
@click.option("--keep-base-only/--no-keep-base-only", default=False, show_default=True,
              help="Keep base tensors that no task has.")
@click.option("--allow-mismatch", is_flag=True,
              help="Pack a task even if it does not look fine-tuned from the base (no tensor name in common, or "
                   "over half of the shared names differ in shape). Tensors whose shape differs from the base's "
                   "are stored per task either way.")
@click.option("--strip-prefix", default=None, metavar="PREFIX",
              help="Take PREFIX off the tensor names of the base and the tasks that start with it: a training "
                   "wrapper's (Lightning's 'model.', DDP's 'module.'), so that unpacked and merged models load with "
                   "the base's config. Not for a task of safetensors files with --exact (kept byte for byte).")
@click.option("--group/--no-group", default=_DEFAULTS.group, show_default=True,
              help="Store small merged or shared tensors (under 262,144 elements) together, up to 1M elements a group: "
                   "faster loads of checkpoints with many tensors (format 1.12). Not with --exact or the dial.")
@click.option("-j", "--threads", type=click.IntRange(1), default=None, help="Encoder threads, and the tasks the fidelity dial measures at once (default: the CPUs this process may run on, at most 8).")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing archive.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress (a bar on a terminal, log lines otherwise).")
@click.option("--exact", is_flag=True, help="Also store the original bits and files (unpack --exact gives them back).")
@click.option("--derive-masks/--store-masks", default=True, show_default=True,
              help="With --exact: leave out masks the reader can derive from the originals (smaller; "
                   "lossy reads of those tensors cost about an exact read).")
@click.option("--derive-merged/--store-merged", default=True, show_default=True,
              help="With --exact and --derive-masks: also leave out the merged vector where every mask of a tensor "
                   "is derived (smaller; a lossy read of one task then rebuilds every task's original of it).")
@click.option("--fidelity", type=_Finite(0, 1, min_open=True), default=None,
              help="Reconstruct every task at least this well (weight fidelity; 1: exact), adding corrections.")
@click.option("--budget", type=_Finite(0, min_open=True), default=None,
              help="Keep the archive within this many times one task checkpoint, best fidelity within it.")
@click.option("--sensitivity", "sensitivity_file", default=None, metavar="FILE", type=_PATH,
              help="With --fidelity or --budget: weights of each element's error, a safetensors file keyed "
                   "TASK/TENSOR (tallpack.sensitivity.save).")
def pack(base, more_tasks, task_specs, output, lambda_specs, merge, codec, level, checksum, chunk_elements,
         keep_base_only, allow_mismatch, group, threads, force, progress, exact, derive_masks, derive_merged, fidelity,
         budget, sensitivity_file, no_paths, strip_prefix, **method_options) -> None:
    """Pack a base model and its fine-tuned tasks into one archive.

    Each TASK (and --task) is a fine-tuned member: NAME=PATH or PATH, so that a shell glob gives
    many (tallpack pack --base base/ -o family.tallpack ft/*).
    """
    if not task_specs and not more_tasks:
        _usage("no task: give the fine-tuned members as TASK arguments (NAME=PATH or PATH, ft/*) or --task")
    _refuse_ignored_pack_flags(merge, exact, fidelity is not None or budget is not None, derive_masks)
    tasks = _parse_tasks(task_specs, more_tasks)
    lambdas = _parse_lambdas(lambda_specs, tasks)
    if chunk_elements % 8:
        raise click.BadParameter("must be a multiple of 8", param_hint="--chunk-elements")
    prefix = f"{merge}_"
    merge_spec = {"method": merge} | {k[len(prefix):]: v for k, v in method_options.items() if k.startswith(prefix)}
    options = PackOptions(lambdas=lambdas, merge=merge_spec, codec=codec, level=level, checksum=checksum,
                          chunk_elements=chunk_elements, keep_base_only=keep_base_only,
                          allow_mismatch=allow_mismatch, strip_prefix=strip_prefix, group=group, threads=threads,
                          progress=_progress(progress), exact=exact, derive_masks=derive_masks,
                          derive_merged=derive_merged, overwrite=force, record_paths=not no_paths,
                          fidelity=fidelity, budget=budget,
                          sensitivity=None if sensitivity_file is None else tallpack.sensitivity.load(sensitivity_file))
    dial_log = logging.getLogger("tallpack.dial")
    dial_log.addFilter(_no_exact_hint)  # the hint is a result line here, kept with -q
    try:
        m = tallpack.pack(base, tasks, output, options)
    finally:
        dial_log.removeFilter(_no_exact_hint)
    size = staging.size(output)
    src = m.stats["source_bytes"]
    click.echo(f"wrote {redact(output)}: {len(m.tasks)} task{'' if len(m.tasks) == 1 else 's'}, {format_size(size)} from {format_size(src)} ({src / size:.2f}x)"
               + _unmet(m.stats.get("dial")))
    for hint in m.hints:
        click.echo(f"hint: {hint}")


def _no_exact_hint(record: logging.LogRecord) -> bool:
    """Leaves out the fidelity dial's log record of its hint that --exact would be as small, which
    pack prints with its result (the record is the library's, for its callers)."""
    return not getattr(record, "exact_hint", False)


def _unmet(dial: Any) -> str:
    """The result line's note of a fidelity target the archive missed (kept with -q, where the
    dial's warning is not shown)."""
    if not isinstance(dial, dict) or dial.get("met") is not False or not isinstance(dial.get("tasks"), dict):
        return ""
    target, measure = dial.get("target"), dial.get("measure", "weight")  # weight, weighted or score
    if not isinstance(target, (int, float)):
        return ""
    short: dict[str, float] = {t: float(d[measure]) for t, d in dial["tasks"].items()
                               if isinstance(d, dict) and isinstance(d.get(measure), (int, float))
                               and d[measure] < target}
    if not short:
        return f"; fidelity target {shown_fidelity(target)} not met"
    worst = sorted(short.items(), key=lambda kv: kv[1])[:3]
    shown = ", ".join(f"{t} {shown_fidelity(w, below=target)}" for t, w in worst) + (", ..." if len(short) > 3 else "")
    return (f"; fidelity target {shown_fidelity(target)} not reached for {len(short)} "
            f"task{'s' if len(short) > 1 else ''} ({shown})")


def _table_width() -> int:
    """The width tables fit: the terminal's (or $COLUMNS), else TABLE_WIDTH (a file, a pipe)."""
    if (sys.stdout is not None and sys.stdout.isatty()) or os.environ.get("COLUMNS", "").isdigit():
        return max(40, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns)
    return TABLE_WIDTH


@contextmanager
def _opened(archive: str, **kw: Any) -> Iterator[tallpack.Archive]:
    """``tallpack.open(archive)``, where a task named on the command line that the archive lacks
    is an error that also says which command lists its tasks."""
    with tallpack.open(archive, **kw) as fam:
        try:
            yield fam
        except TaskNotFoundError as e:
            if len(fam.tasks) <= LISTED_TASKS:  # the message names them all already
                raise
            raise TaskNotFoundError(f"{e} (tallpack inspect {shlex.quote(archive)} lists them)") from None


def _chosen_tasks(fam: tallpack.Archive, names: tuple[str, ...], what: str, as_json: bool) -> list[str] | None:
    """--task NAME...: checked against the archive (TaskNotFoundError names its tasks); None: none given."""
    if not names:
        return None
    if as_json:
        _usage(f"--task chooses the {what}'s columns; --json gives every task's")
    for t in names:
        fam.task_info(t)
    return list(dict.fromkeys(names))


_TASK_COLUMNS = click.option(
    "--task", "task_names", multiple=True, metavar="NAME",
    help="A density column for this task (repeat for several), however many tasks there are; without it, "
         "past what fits the terminal (or $COLUMNS, else 120 columns), min / median / max across the tasks.")


@main.command()
@click.argument("archive", type=_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--tensors", is_flag=True, help="Per tensor: kind, shape, dtype, stored bytes, codec, density per task.")
@_TASK_COLUMNS
def inspect(archive: str, as_json: bool, tensors: bool, task_names: tuple[str, ...]) -> None:
    """Show an archive's tasks, sizes, ratios, mask densities and fidelity."""
    if task_names and not tensors:
        _usage("--task chooses the density columns of --tensors' table; add --tensors")
    with _opened(archive) as fam:
        chosen = _chosen_tasks(fam, task_names, "--tensors table", as_json)
        s = fam.summary()
        rows = tensor_rows(fam.manifest, fam.read_array, fam.packed_bits) if tensors else None
    if as_json:
        click.echo(json.dumps(s | ({"tensors": rows} if rows is not None else {}), indent=2))
    elif rows is None:
        click.echo(render(s))
    else:
        table = render_tensors(rows, chosen or list(fam.tasks), width=_table_width(), spread_tasks=not chosen)
        click.echo(f"{render(s)}\n\n{table}")


@main.command()
@click.argument("archive", type=_PATH)
@click.option("--task", "task_names", multiple=True, metavar="NAME",
              help="The task to write (repeat for several): one task is written into OUTDIR itself, "
                   "two or more each into OUTDIR/NAME.")
@click.option("--all", "all_tasks", is_flag=True, help="Write every task, each into OUTDIR/NAME.")
@click.option("-o", "--output", required=True, type=_PATH, callback=_output, metavar="OUTDIR",
              help="The folder to write into (a path or a URL).")
@_MAX_SHARD
@click.option("--exact", is_flag=True, help="Write the original files byte for byte (archives packed with --exact).")
@click.option("-f", "--force", is_flag=True, help="Replace files that already exist in the output folder.")
def unpack(archive: str, task_names: tuple[str, ...], all_tasks: bool, output: str,
           max_shard_size: str | None, exact: bool, force: bool) -> None:
    """Rebuild tasks and write each as a Hugging Face folder: safetensors (sharded like the
    original) and the folder's kept files (config, tokenizer, ...); with --exact, the original
    files byte for byte. All or nothing: a failure leaves no output."""
    if task_names and all_tasks:
        _usage("--task and --all: --all writes every task; give --task NAME (repeat for several) or --all")
    twice = next((t for i, t in enumerate(task_names) if t in task_names[:i]), None)
    if twice is not None:
        raise click.UsageError(f"task {twice!r} given twice", click.get_current_context())
    one = len(task_names) == 1 and not all_tasks  # then base and merged vectors are read once: no cache
    cache: dict[str, Any] = {"cache_bytes": 0} if one else {}
    with _opened(archive, **cache) as fam:
        if not task_names and not all_tasks:
            n = len(fam.tasks)
            some = ", ".join(map(show_name, fam.tasks[:3])) + (", ..." if n > 3 else "")
            listing = f"; tallpack inspect {shlex.quote(archive)} lists them" if n > 3 else ""
            raise click.UsageError(f"name a task with --task NAME (the archive has {n} task{'s' if n > 1 else ''}: "
                                   f"{some}{listing}) or pass --all")
        parts = len(fam.tasks if all_tasks else task_names)  # progress lines: ~10 for the whole call
        progress = _progress(parts=parts)
        kw = {"max_shard_size": max_shard_size, "progress": progress}
        try:
            if len(task_names) == 1 and not all_tasks:
                paths = [tallpack.write_task(fam, task_names[0], output, exact=exact, overwrite=force, **kw)]
            else:
                paths = tallpack.write_tasks(fam, None if all_tasks else task_names, output, exact=exact,
                                             overwrite=force, **kw)
        finally:
            if isinstance(progress, Bar):  # where it got, on its own line before the error's
                progress.close()
    for path in paths:
        click.echo(f"wrote {redact(str(path))}")


@main.command()
@click.argument("archive", type=_PATH)
def verify(archive: str) -> None:
    """Check every checksum and decode every section; exit 1 if anything is damaged."""
    with tallpack.open(archive) as fam:
        problems = fam.verify(progress=_progress())
        n = fam.chunk_count()
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    click.echo(f"ok: {redact(archive)}: {n} chunks intact")


@main.command()
@click.argument("archive", type=_PATH)
@click.option("--method", type=click.Choice(list(MERGED_MODELS)), default=None,
              help="Each needs an archive packed with the matching --merge: "
                   + "; ".join(f"{m} needs --merge {p}" for m, p in MERGED_MODELS.items())
                   + ". Default: the consensus model of the archive's merge (consensus-ta or consensus-ties).")
@click.option("--k", type=click.IntRange(0), default=2, show_default=True,
              help="Consensus: keep weights used by at least k tasks (0: every weight; for consensus-ta that is "
                   "plain TA, for consensus-ties the TIES disjoint sum, where ties takes their mean; over the "
                   "number of tasks: none, the base).")
@click.option("--alpha", type=_Alpha(), default=None,
              help="Scale of the merged vector (default: 1/T for sums, 1.0 for TIES).")
@click.option("--task", "task", default=None, help="Add this task's own tensors (its head) to the model.")
@click.option("-o", "--output", required=True, type=_PATH, callback=_output, help="The folder to write into (a path or a URL).")
@_MAX_SHARD
@click.option("-f", "--force", is_flag=True, help="Replace files that already exist in the output folder.")
def merge(archive: str, method: str | None, k: int, alpha: float | None, task: str | None, output: str,
          max_shard_size: str | None, force: bool) -> None:
    """Write one multi-task model merged from the archive's tasks."""
    if "k" in _given() and method is not None and not is_consensus(method):
        consensus = ", ".join(m for m in MERGED_MODELS if is_consensus(m))
        _usage(f"--k: only the consensus methods use it ({consensus}), not --method {method}")
    with _opened(archive) as fam:
        method = default_model(fam.manifest) if method is None else method
        alpha = default_alpha(method, len(fam.tasks)) if alpha is None else alpha
        written = tallpack.write_merged(fam, output, method, k=k if is_consensus(method) else None, alpha=alpha,
                                        task=task, max_shard_size=max_shard_size, progress=_progress(), overwrite=force)
        path, n = written
        left = [] if task is not None else left_out(fam.manifest)
        some = [] if task is not None else in_some_tasks(fam.manifest)
        lost = {} if task is not None else missing_components(fam.manifest)
        not_held = 0 if task is not None else base_not_held(fam.manifest)
        num_tasks = len(fam.tasks)
    shown_k = f", k={k}" if is_consensus(method) else ""  # the others have no k
    # what the model lacks belongs in the result line, which -q keeps (the warning it repeats does not)
    part = "module" if fam.manifest.base.get("format") == "sentence-transformers" else "pipeline component"
    lacks = "".join(f"; {part} {c!r} left out, so the folder does not load ("
                    + (f"--task {having[0]} takes that task's" if having else "repack with --keep-base-only") + ")"
                    for c, having in lost.items())
    lacks += (f"; {len(left)} tensor{'s' if len(left) > 1 else ''} every task has left out, as each task stores "
             f"its own: {', '.join(map(repr, left[:3]))}{', ...' if len(left) > 3 else ''} (--task NAME takes "
             "one task's)") if left else ""
    lacks += (f"; {len(some)} tensor{'s' if len(some) > 1 else ''} only some tasks have left out: "
              f"{', '.join(map(repr, some[:3]))}{', ...' if len(some) > 3 else ''} (--task NAME takes "
              "that task's)") if some else ""
    lacks += (f"; {format_size(not_held)} of the base's tensors not in the archive left out (--keep-base-only at "
              "pack keeps them; --task NAME takes one task's)") if not_held else ""
    lacks += (f"; k={k} is over the {num_tasks} task{'s' if num_tasks > 1 else ''}: the model is the base "
              f"(--k {max(num_tasks, 1)} keeps the weights every task uses)") if is_consensus(method) and k > num_tasks else ""
    over = written.overflow
    lacks += (f"; alpha {alpha:g} overflows {len(over)} tensor{'s' if len(over) > 1 else ''} (inf): "
              f"{', '.join(map(repr, over[:3]))}{', ...' if len(over) > 3 else ''}") if over else ""
    click.echo(f"wrote {redact(str(path))} ({method}{shown_k}, alpha={alpha:g}, {n} tensor{'' if n == 1 else 's'}{lacks})")


@main.command()
@click.argument("archive", type=_PATH)
@click.option("--plot", "plot_path", default=None, metavar="PNG", type=_PATH, callback=_nonempty,
              help="Also draw the figure (tasks using each weight, density per task and per layer); needs matplotlib.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-f", "--force", is_flag=True, help="Replace the --plot file if it exists.")
@_TASK_COLUMNS
def stats(archive: str, plot_path: str | None, as_json: bool, force: bool, task_names: tuple[str, ...]) -> None:
    """How many tasks use each weight (catastrophic, selfish, consensus), density per task and layer."""
    from tallpack import stats as mask_stats

    if plot_path is not None:  # before the masks are read: a name matplotlib cannot write, an existing file
        mask_stats.check_plot_path(plot_path, overwrite=force, archive=archive)
    elif force:
        _usage("--force: only --plot writes a file here")
    with _opened(archive) as fam:
        chosen = _chosen_tasks(fam, task_names, "density-per-layer table", as_json)  # before the masks are read
        s = mask_stats.compute(fam, progress=_progress())
    click.echo(json.dumps(s.to_dict(), indent=2) if as_json
               else mask_stats.render(s, width=_table_width(), tasks=chosen))
    if plot_path is not None:
        title = f"{Path(archive).name}: {len(s.tasks)} task{'' if len(s.tasks) == 1 else 's'}"
        click.echo(f"wrote {mask_stats.plot(s, plot_path, title=title, overwrite=force, archive=archive)}", err=as_json)


@main.command()
@click.option("--dir", "workdir", default=".tallpack-demo", show_default=True, type=click.Path(file_okay=False),
              callback=_nonempty,
              help="Where the demo family, the archive and the unpacked task go (reused when present).")
@click.option("--size", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="tiny: a smaller family and demo (a few seconds; full: about a minute, on two cores).")
@click.option("--task", default=None, help="The task to unpack (default: the first).")
def demo(workdir: str, size: str, task: str | None) -> None:
    """Build a small real model family, pack, inspect, unpack one task and score it; then the fidelity dial."""
    from tallpack.demo import TASKS
    from tallpack.demo.run import run_demo

    if task is not None and task not in TASKS:  # before minutes of building
        raise click.BadParameter(f"{task!r} is not a demo task ({', '.join(TASKS)})", param_hint="--task")
    click.echo(f"building (or reusing) the demo family in {workdir}/family ...")
    if not (click.get_current_context().obj or {}).get("quiet"):  # the build's steps: a few minutes on 2 cores
        steps = logging.getLogger("tallpack.demo")
        if steps.getEffectiveLevel() > logging.INFO:
            shown = logging.StreamHandler()
            shown.setFormatter(logging.Formatter("  %(message)s"))
            steps.addHandler(shown)
            steps.setLevel(logging.INFO)
            steps.propagate = False
    r = run_demo(workdir, size=size, task=task)
    sec = r.seconds
    click.echo(f"built in {sec['build']:.1f}s; packed (lambda chosen on validation data) in {sec['pack']:.1f}s\n")
    click.echo(f"$ tallpack inspect {r.archive}")
    click.echo(render(r.summary))
    click.echo(f"\n$ tallpack unpack {r.archive} --task {r.task} -o {r.unpacked.parent}")
    click.echo(f"wrote {r.unpacked}\n")
    click.echo(f"test accuracy, original fine-tune vs rebuilt from the archive ({r.unpacked.name} for {r.task}):")
    click.echo(f"{'task':<16} {'original':>9} {'rebuilt':>8} {'kept':>7}")
    for name, (orig, rec) in r.scores.items():
        click.echo(f"{name:<16} {orig:>9.3f} {rec:>8.3f} {rec / orig:>7.1%}")
    mean_o = sum(o for o, _ in r.scores.values()) / len(r.scores)
    mean_r = sum(x for _, x in r.scores.values()) / len(r.scores)
    click.echo(f"{'mean':<16} {mean_o:>9.3f} {mean_r:>8.3f} {mean_r / mean_o:>7.1%}")

    from tallpack.demo.run import DIAL_TARGET
    tall, dial = r.archive.stat().st_size, r.dial_archive.stat().st_size
    click.echo(f"\n$ tallpack pack ... --fidelity {DIAL_TARGET} -o {r.dial_archive}   (beyond the paper: the fidelity dial)")
    click.echo(f"packed in {sec['dial']:.1f}s: {format_size(dial)} ({dial / r.checkpoint_bytes:.2f}x one task checkpoint; "
               f"TALL alone {format_size(tall)}, {tall / r.checkpoint_bytes:.2f}x)")
    click.echo(f"{'task':<16} {'original':>9} {'rebuilt':>8} {'kept':>7}")
    for name, (orig, _) in r.scores.items():
        click.echo(f"{name:<16} {orig:>9.3f} {r.dial_scores[name]:>8.3f} {r.dial_scores[name] / orig:>7.1%}")
    mean_d = sum(r.dial_scores.values()) / len(r.dial_scores)
    worst = min(r.dial_scores[n] / o for n, (o, _) in r.scores.items())
    click.echo(f"{'mean':<16} {mean_o:>9.3f} {mean_d:>8.3f} {mean_d / mean_o:>7.1%}   (worst task {worst:.1%})")


if __name__ == "__main__":  # pragma: no cover
    main()
