"""What the experiments' command lines share: flag parsing with one-line errors, JAX's
persistent compilation cache, and the stop on SIGTERM / SIGINT with a true resume hint."""

from __future__ import annotations

import glob
import logging as py_logging
import os
import signal
import sys
from collections.abc import Callable

from absl import flags

from reduce_jax.errors import ConfigError

EXIT_INTERRUPTED = 130
# absl's help flags (they exit with code 1; asking for help is no error).
HELP_FLAGS = ("-?", "-h", "-help", "--help", "--helpshort", "--helpfull", "--helpxml")
# Programs that compile faster than this are not worth a file in the cache.
_CACHE_MIN_COMPILE_S = 0.1


def define_compilation_cache_dir() -> flags.FlagHolder[str]:
    """``--compilation_cache_dir``, the same for every command line that compiles; a CLI lists
    it in its ``--help`` with ``flags.adopt_module_key_flags(cli)``."""
    return flags.DEFINE_string(
        "compilation_cache_dir",
        os.path.join("~", ".cache", "reduce_jax", "xla"),
        "Directory of JAX's persistent compilation cache: a rerun, a resumed run or another "
        "run with the same shapes loads its compiled programs instead of compiling them "
        "again (results do not change). Empty: no cache.",
    )


def quiet_platform_probing() -> None:
    """JAX logs each platform it probes and cannot load ("Unable to initialize backend
    'tpu'") at INFO; on a machine without that platform this is noise. Its warnings still
    show."""
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)


def use_compilation_cache(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path`` (``~`` expanded; empty: off).

    Raises:
      ConfigError: ``path`` cannot be created or is not writable.
    """
    if not path:
        return
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--compilation_cache_dir={path} cannot be created ({e.strerror}); pass a writable "
            "directory, or an empty value for no cache"
        ) from e
    if not os.access(path, os.W_OK):
        raise ConfigError(
            f"--compilation_cache_dir={path} is not writable; pass a writable directory, or an "
            "empty value for no cache"
        )
    import jax  # heavy import after validation

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_S)


# Files whose presence in a study's workdir means finished work a rerun resumes from.
_STUDY_SAVED = ("progress.json", "baseline.json")
# retrain_chips: its ledger of finished chips, and the saved pools of an unfinished call.
PRODUCTION_LEDGER = "production.json"
_PRODUCTION_POOLS = os.path.join("batches", "*", "progress.json")


def study_saved_work(workdir: str) -> bool:
    """Whether a study's ``workdir`` (or a seed's directory in it) holds work to resume."""
    dirs = [workdir, *glob.glob(os.path.join(glob.escape(workdir), "seed_*"))]
    return any(os.path.isfile(os.path.join(d, n)) for d in dirs for n in _STUDY_SAVED)


def production_saved_work(workdir: str) -> bool:
    """Whether a retrain_chips ``workdir`` holds finished chips: in its ledger, or a saved
    pool of a call."""
    return os.path.isfile(os.path.join(workdir, PRODUCTION_LEDGER)) or bool(
        glob.glob(os.path.join(glob.escape(workdir), _PRODUCTION_POOLS))
    )


def stop_hint(signum: int, workdir: str | None, saved: bool) -> str:
    """What a stop leaves: ``saved`` work in ``workdir`` to resume from, or nothing yet."""
    name = signal.Signals(signum).name
    if workdir and saved:
        return (
            f"interrupted ({name}); finished work is saved in {workdir}: run the same command "
            "to resume"
        )
    where = f" in {workdir}" if workdir else ""
    return (
        f"interrupted ({name}) before any work was saved{where}: run the same command to start over"
    )


def stop(signum: int, workdir: str | None, saved_work: Callable[[str], bool]) -> None:
    """Flushes the output, prints the stop hint (``saved_work(workdir)``: whether finished work
    is saved there) and ends the process at once with exit code 130.

    The process leaves with ``os._exit``, skipping the interpreter's teardown: tearing down
    while XLA's threads still run asynchronously dispatched work can crash ("Fatal Python
    error: Segmentation fault"). Nothing is lost: progress and outputs are only ever replaced
    atomically (temporary file, then ``os.replace``), so a stop anywhere leaves the last
    finished piece of work saved and at worst a stray temporary file, which the next run
    overwrites.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):  # e.g. the signal came inside a write
            pass
    hint = stop_hint(signum, workdir, bool(workdir) and saved_work(workdir)) + "\n"
    try:
        os.write(2, hint.encode())
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def _flagfile_lines(path: str, stack: tuple[str, ...] = ()) -> None:
    """Checks that ``path`` (and the flagfiles it includes) holds flags only, as absl reads
    it: blank lines, comments (``#``, ``//``) and one ``--flag=value`` per line.

    Raises:
      ConfigError: naming the file and its first line that is not a flag. A file that
        cannot be opened is left to absl's own message.
    """
    if path in stack:
        return
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return
    except UnicodeDecodeError:
        raise ConfigError(
            f"--flagfile={path} is not a flagfile (not text); a flagfile holds one "
            "--flag=value per line, and # comments"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(("#", "//")):
            continue
        text = line.strip()
        if not text.startswith("-"):
            raise ConfigError(
                f"--flagfile={path} is not a flagfile: line {number} ({text[:40]!r}) is not a "
                "flag; a flagfile holds one --flag=value per line, and # comments"
            )
        for prefix in ("--flagfile=", "-flagfile="):
            if text.startswith(prefix):
                _flagfile_lines(text[len(prefix) :], (*stack, path))


def _check_flagfiles(argv: list[str]) -> None:
    """Every ``--flagfile`` on the command line is a flagfile (``_flagfile_lines``)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        for prefix in ("--flagfile=", "-flagfile="):
            if arg.startswith(prefix):
                _flagfile_lines(arg[len(prefix) :])
        if arg in ("--flagfile", "-flagfile") and i + 1 < len(argv):
            _flagfile_lines(argv[i + 1])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line message and exit code 2 for a bad or unknown flag or a
    file that is not a flagfile; ``--help`` exits with code 0 (``app.run``'s flags_parser)."""
    try:
        _check_flagfiles(argv)
        return flags.FLAGS(argv)
    except (flags.Error, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:  # absl's --help prints the help, then exits with code 1
        if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
