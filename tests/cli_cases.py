"""Runs a command line of experiments/ once per list of arguments, all in one process:

  python tests/cli_cases.py MODULE CASES.json RESULTS.json

CASES.json is a list of ``{"args": [...], "cwd": DIR}``; RESULTS.json gets, in the same
order, ``{"code", "stdout", "stderr"}``: the exit code and everything written to file
descriptors 1 and 2. Each case runs as ``python -m MODULE ARGS...`` in ``DIR`` runs it (the
module's ``__main__`` line: ``app.run`` of its ``main`` with ``cli.parse_flags``), its flags
reset to their defaults first. One interpreter, with JAX imported once, serves every case:
the tests of bad flags and files take a fraction of a second each instead of a process start.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback

from absl import app, flags

from experiments import cli


def _exit_code(e: SystemExit) -> int:
    """The process's exit code for ``sys.exit(e.code)``: a message is printed, code 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_case(module, args: list[str], cwd: str) -> dict:
    """``python -m module *args`` in ``cwd``, in this process."""
    flags.FLAGS.unparse_flags()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    here = os.getcwd()
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, f in files.items():
        os.dup2(f.fileno(), fd)
    try:
        os.chdir(cwd)
        try:
            app.run(
                lambda argv: sys.exit(module.main(argv)),
                argv=[module.__file__, *args],
                flags_parser=cli.parse_flags,
            )
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except Exception:  # as the interpreter reports an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        os.chdir(here)
    out = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        files[fd].seek(0)
        out[name] = files[fd].read().decode(errors="replace")
        files[fd].close()
    return dict(code=code, **out)


def main() -> None:
    name, cases_path, results_path = sys.argv[1:]
    module = importlib.import_module(name)
    with open(cases_path) as f:
        cases = json.load(f)
    results = [run_case(module, case["args"], case["cwd"]) for case in cases]
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
