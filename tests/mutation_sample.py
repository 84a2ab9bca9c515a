"""The sample of mutants the docs' mutation score is measured on, and that score.

mutmut (``pip install -e ".[mutation]"``, configured in pyproject.toml) makes several thousand
mutants of the core modules; each needs a test process that compiles its programs, a few
seconds on two cores. The score is measured on a fixed sample: the mutants whose name hashes
into ``1/EVERY`` of the hash space, the same names on every machine (docs/testing.md).

    python tests/mutation_sample.py names [--every=N] [MODULE ...]   # for mutmut run
    python tests/mutation_sample.py score [--every=N] [MODULE ...]   # detected / total

``--every=20`` takes half of the default sample (every name it picks, the default picks too).

Run from the checkout's root after ``mutmut run`` has generated the mutants (``mutants/``).
A MODULE is a dotted prefix (``reduce_jax.stages.cost``); none: every mutated module.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import sys

EVERY = 10  # one mutant in ten (by default)
# mutmut's verdicts that count as detected: a failing test, a timeout, a crash.
DETECTED = ("killed", "timeout", "segfault", "caught by type check")


def _all_mutants() -> dict[str, int | None]:
    out = {}
    for path in glob.glob("mutants/**/*.py.meta", recursive=True):
        with open(path) as f:
            out.update(json.load(f)["exit_code_by_key"])
    return out


def sampled(name: str, every: int = EVERY) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % every == 0


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def main(argv: list[str]) -> None:
    mode, prefixes, every = argv[0], argv[1:], EVERY
    if prefixes and prefixes[0].startswith("--every="):
        every, prefixes = int(prefixes[0].split("=", 1)[1]), prefixes[1:]
    mutants = {
        k: v
        for k, v in _all_mutants().items()
        if sampled(k, every) and (not prefixes or any(k.startswith(p + ".") for p in prefixes))
    }
    if mode == "names":
        print("\n".join(sorted(mutants)))
        return
    from mutmut.stats import status_by_exit_code

    counts = collections.defaultdict(collections.Counter)
    for name, code in mutants.items():
        counts[_module(name)][status_by_exit_code[code]] += 1
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        detected = sum(c[k] for k in DETECTED)
        print(f"{module}: {detected}/{total} detected ({dict(c)})")


if __name__ == "__main__":
    main(sys.argv[1:])
