"""The package's layers: no module of reduce_jax imports from a layer above its own.

The layers, bottom to top (docs/architecture.md): the foundation (errors, files, data,
sharding) < hardware/ and nets/ < engine/ < stages/ < config < outputs/ < the run (inputs,
pipeline, seeds) < the public API (reduce_jax/__init__.py). A module may import from its own
layer and the layers below; inside a layer, the imports must not form a cycle. Every import
counts, also one inside a function.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "reduce_jax"

# Bottom to top: (name, modules and subpackages of the layer).
LAYERS = (
    ("foundation", ("errors", "files", "data", "sharding")),
    ("hardware and nets", ("hardware", "nets")),
    ("engine", ("engine",)),
    ("stages", ("stages",)),
    ("config", ("config",)),
    ("outputs", ("outputs",)),
    ("the run", ("inputs", "pipeline", "seeds", "production")),
    ("the public API", ("",)),
)


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of ``module`` (a dotted name under reduce_jax), else None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return len(LAYERS) - 1
    for index, (_, members) in enumerate(LAYERS):
        if parts[1] in members:
            return index
    return None


def package_modules(root: str = ROOT) -> dict[str, str]:
    """Every module of the package: dotted name -> path (a package is its ``__init__.py``)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of reduce_jax that ``source`` (the text of ``module``) imports, anywhere.

    ``from reduce_jax.stages import cost`` is an import of ``reduce_jax.stages.cost`` when that
    is a module in ``known``, else of ``reduce_jax.stages``; relative imports are resolved
    against ``module``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else base)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of reduce_jax it imports (itself left out)."""
    modules = package_modules(root)
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            source = f.read()
        deps = imports(source, module, path.endswith("__init__.py"), set(modules))
        graph[module] = deps - {module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a layer above its own, as readable lines."""
    out = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            mine, theirs = layer_of(module), layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(
                    f"{module} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]}), "
                    "a layer above"
                )
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports (its modules in order, the first repeated at the end), else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


GRAPH = import_graph()


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if layer_of(m) is None)
    assert not unplaced, f"add {unplaced} to a layer here and in docs/architecture.md"
    assert len(GRAPH) > 25  # the walk found the package


def test_no_module_imports_from_a_layer_above():
    assert upward_imports(GRAPH) == []


def test_the_imports_form_no_cycle():
    assert find_cycle(GRAPH) is None


def test_the_layers_are_in_use():
    """The graph is not trivially layered: the stages build on the engine, the engine on the
    hardware model, the pipeline on the stages and the outputs."""
    assert "reduce_jax.engine.population" in GRAPH["reduce_jax.stages.retraining"]
    assert "reduce_jax.hardware.systolic" in GRAPH["reduce_jax.engine.train"]
    assert {"reduce_jax.stages.resilience", "reduce_jax.outputs.summary"} <= GRAPH[
        "reduce_jax.pipeline"
    ]


def _graph_with(module: str, source: str) -> dict[str, set[str]]:
    modules = set(package_modules())
    graph = {m: set(deps) for m, deps in GRAPH.items()}
    graph[module] = imports(source, module, False, modules) - {module}
    return graph


@pytest.mark.parametrize(
    "source",
    [
        "from reduce_jax.outputs import report\n",
        "import reduce_jax.outputs.report\n",
        "def write(x):\n    from reduce_jax.outputs import summary\n    return summary\n",
        "from ..outputs import plots\n",
        "from reduce_jax import pipeline\n",
    ],
)
def test_an_upward_import_is_found(source):
    """engine/progress importing the outputs, or the pipeline, breaks the rule."""
    found = upward_imports(_graph_with("reduce_jax.engine.progress", source))
    assert len(found) == 1 and found[0].startswith("reduce_jax.engine.progress (engine)")


def test_an_import_from_below_is_allowed():
    graph = _graph_with("reduce_jax.engine.progress", "from reduce_jax.hardware import faults\n")
    assert upward_imports(graph) == []


def test_a_cycle_inside_a_layer_is_found():
    graph = _graph_with("reduce_jax.stages.resilience", "from reduce_jax.stages import cost\n")
    assert upward_imports(graph) == []  # same layer
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"reduce_jax.stages.resilience", "reduce_jax.stages.cost"} <= set(cycle)


def test_import_reduce_jax_is_light():
    """The public API loads neither orbax nor matplotlib until `run` is used."""
    code = (
        "import json, sys; import reduce_jax; "
        "print(json.dumps({m: m in sys.modules for m in ('orbax', 'matplotlib')}))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"orbax": False, "matplotlib": False}


if __name__ == "__main__":  # prints the import graph, one module a line
    for _module, _deps in sorted(GRAPH.items()):
        _short = sorted(d.removeprefix(PACKAGE + ".") for d in _deps)
        print(f"{_module.removeprefix(PACKAGE + '.') or PACKAGE} -> {', '.join(_short)}")
