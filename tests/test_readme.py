"""The README's notebook examples run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
    BLOCKS = re.findall(r"```python\n(.*?)```", _f.read(), flags=re.S)
# The blocks that run a whole study are end-to-end runs.
_RUNS = [("reduce_jax.run(" in code) for code in BLOCKS]


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2, "README lacks the mapping example or the own-model example"
    assert any("model=model, variables=" in code for code in BLOCKS)


@pytest.mark.parametrize(
    "index",
    [pytest.param(i, marks=[pytest.mark.slow] if run else []) for i, run in enumerate(_RUNS)],
)
def test_readme_python_example_runs(index):
    namespace: dict = {}
    exec(compile(BLOCKS[index], "README.md", "exec"), namespace)  # noqa: S102
    if "groups" in namespace:
        chips = sorted(c for g in namespace["groups"] for c in g)
        assert chips == list(range(len(namespace["servable"])))
    if "summary" in namespace:  # your own model: measured, not retrained, as accurate as itself
        summary, data, own = namespace["summary"], namespace["data"], namespace["own"]
        assert summary.baseline.source == "given" and summary.baseline.steps == 0
        assert summary.baseline.test_accuracy == pytest.approx(
            float((own == data.test_labels).mean()), abs=1e-6
        )
        assert summary.baseline.test_accuracy > 0.8 and summary.baseline.accuracy > 0.8
        assert len(summary.chips.status) == 8
