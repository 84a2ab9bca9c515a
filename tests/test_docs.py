"""Every Python example of README.md and docs/ runs as a script, as a user pasting it into a
file would: in a fresh interpreter, in an empty folder, with the repository on PYTHONPATH.

An example prints what these tests check as one JSON line. An example followed by a bash
block that runs the CLI on ``smoke.flags`` is run together with that command.
"""

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [
    "README.md",
    *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/**/*.md", recursive=True)),
]
_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", flags=re.S | re.M)


def _blocks(page: str) -> list[tuple[str, str]]:
    """The fenced blocks of ``page``, in order: (language, code), list indentation removed."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    return [(m.group(2), textwrap.dedent(m.group(3))) for m in _FENCE.finditer(text)]


def _examples() -> list[tuple[str, int, str, str | None]]:
    """(page, index, python code, the CLI command of the bash block right after it or None)."""
    out = []
    for page in PAGES:
        blocks = _blocks(page)
        for i, (lang, code) in enumerate(blocks):
            if lang != "python":
                continue
            after = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
            cli = after[1] if after[0] == "bash" and "smoke.flags" in after[1] else None
            out.append((page, i, code, cli))
    return out


EXAMPLES = _examples()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    # `python` in a pasted command is this interpreter.
    env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
    return env


def _run_script(code: str, cwd, timeout: float = 1800) -> subprocess.CompletedProcess:
    path = os.path.join(cwd, "example.py")
    with open(path, "w") as f:
        f.write(code)
    return subprocess.run(
        [sys.executable, path], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _printed(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object ({} if none)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def _check_ran(proc: subprocess.CompletedProcess, what: str) -> None:
    tail = (proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.returncode == 0, f"{what} failed: {tail}"
    # A failure in a background thread (orbax saving after the interpreter began to shut
    # down) is logged with its traceback while the process still exits 0.
    assert "Traceback" not in proc.stderr, f"{what} raised in the background: {tail}"


def _restore(path: str) -> dict:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


def test_the_docs_have_the_examples():
    codes = [code for _, _, code, _ in EXAMPLES]
    pages = {page for page, _, _, _ in EXAMPLES}
    assert "README.md" in pages, "README.md lacks a Python example"
    assert any("model=model, variables=" in c for c in codes), "no own-model example"
    assert any("greedy_groups" in c for c in codes), "no mapping and grouping example"
    assert any("StandardCheckpointer" in c for c in codes), "no own-weights example"
    clis = [cli for _, _, _, cli in EXAMPLES if cli]
    assert any("--init_checkpoint=" in c for c in clis), "own weights not shown with the CLI"
    assert any("--chip_fault_maps=" in c for c in clis), "fault maps not shown with the CLI"


def _check_printed(code: str, printed: dict, cwd) -> None:
    """The properties an example's printed result must have."""
    if "groups" in printed:  # the example asserts that every servable chip is in one group
        assert 0 < printed["servable"] <= printed["chips"]
        assert 0 < printed["groups"] < printed["servable"], "no two chips share a retraining"
    if "baseline_source" in printed:  # your own model: measured, not retrained
        assert printed["baseline_source"] == "given" and printed["baseline_steps"] == 0
        assert printed["baseline_test_accuracy"] == pytest.approx(
            printed["own_test_accuracy"], abs=1e-6
        )
        assert printed["baseline_test_accuracy"] > 0.8 and printed["baseline_accuracy"] > 0.8
        assert printed["chips"] == 8
    if "StandardCheckpointer" in code:  # the checkpoint is complete and holds the weights
        assert printed["test_accuracy"] > 0.8
        restored = _restore(os.path.join(cwd, "weights"))
        assert set(restored) == {"params"} and restored["params"], restored
    if "save_fault_maps" in code:
        assert os.path.exists(os.path.join(cwd, "maps.csv"))
    if "load_chip" in code:  # the stored chip is the chip the run reports
        assert printed["test_accuracy"] == pytest.approx(printed["reported"], abs=1e-6)


@pytest.mark.parametrize(
    "page,index",
    [
        pytest.param(
            page,
            index,
            marks=[pytest.mark.slow] if "reduce_jax.run(" in code else [],
            id=f"{page}:{index}",
        )
        for page, index, code, _ in EXAMPLES
    ],
)
def test_example_runs_as_a_script(page, index, tmp_path):
    (code,) = [c for p, i, c, _ in EXAMPLES if (p, i) == (page, index)]
    proc = _run_script(code, tmp_path)
    _check_ran(proc, f"{page}'s example {index}")
    _check_printed(code, _printed(proc.stdout), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "page,index",
    [pytest.param(p, i, id=f"{p}:{i}") for p, i, _, cli in EXAMPLES if cli],
)
def test_example_then_its_command(page, index, tmp_path):
    """The example, then the CLI command shown after it, as written, in the same folder."""
    ((code, cli),) = [(c, cmd) for p, i, c, cmd in EXAMPLES if (p, i) == (page, index)]
    proc = _run_script(code, tmp_path)
    _check_ran(proc, f"{page}'s example {index}")
    printed = _printed(proc.stdout)
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    proc = subprocess.run(
        ["bash", "-c", cli], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1800
    )
    _check_ran(proc, f"{page}'s command after example {index}")
    (workdir,) = re.findall(r"--workdir=(\S+)", cli)
    with open(tmp_path / workdir / "summary.json") as f:
        summary = json.load(f)
    if "--init_checkpoint=" in cli:  # the saved weights are the baseline, measured as saved
        assert summary["baseline"]["source"] == "checkpoint"
        assert summary["baseline"]["steps"] == 0
        assert summary["baseline_test_accuracy"] == pytest.approx(
            printed["test_accuracy"], abs=1e-6
        )
    if "--chip_fault_maps=" in cli:  # the population is the file's chips
        assert len(summary["chips"]) == 3
        rates = [chip["pe_fault_rate"] for chip in summary["chips"]]
        assert rates == pytest.approx([1 / 64, 8 / 64, 0.0])


def test_a_save_that_does_not_wait_is_caught(tmp_path):
    """orbax's save left to finish at interpreter exit loses the checkpoint: the checks above
    see it (the failure is logged from a background thread while the process exits 0, or
    the exit hangs on the save)."""
    code = textwrap.dedent(
        """
        import os

        import numpy as np
        import orbax.checkpoint as ocp

        ocp.StandardCheckpointer().save(os.path.abspath("weights"), {"params": {"w": np.ones(3)}})
        """
    )
    try:
        # An interpreter whose exit waits on the unfinished save (minutes on a loaded
        # machine) is a failure a user sees too: caught, not waited for.
        proc = _run_script(code, tmp_path, timeout=20)
    except subprocess.TimeoutExpired:
        return
    try:
        _check_ran(proc, "a save that does not wait")
        _restore(str(tmp_path / "weights"))
    except Exception:  # caught: the failure is seen, or the checkpoint does not restore
        return
    pytest.skip("orbax finished the save before the interpreter shut down: nothing was lost")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_and_paths_point_to_what_exists():
    """Every relative link (and its #anchor) of README.md and docs/ names a file (a heading)
    that exists, and every module, test or benchmark path the text names is there."""
    missing = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        folder = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = (
                os.path.normpath(os.path.join(folder, path)) if path else os.path.join(ROOT, page)
            )
            if not os.path.exists(full):
                missing.append(f"{page}: link {target}")
            elif anchor and full.endswith(".md"):
                with open(full) as f:
                    slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", f.read(), flags=re.M)}
                if anchor not in slugs:
                    missing.append(f"{page}: anchor {target}")
        for path in re.findall(
            r"\b((?:reduce_jax|tests|benchmarks|experiments)/[\w/.]+\.\w+)", text
        ):
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(f"{page}: path {path}")
    assert not missing, missing
