"""The package's shape: imports point one way (no cycle, even through function-level imports), the layers keep
their order, and no file grows past ~400 lines without saying why."""

import ast
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "detr_jax")
MAX_LINES = 400
# Lower layers never import higher ones: entry points -> train / evaluate / inference -> losses, matcher, data,
# models -> box_ops (STYLE.md).
HIGHER = {"detr_jax.training.loop", "detr_jax.evaluation.coco", "detr_jax.inference", "detr_jax.cli"}
LOWER_PACKAGES = ("detr_jax.models", "detr_jax.data", "detr_jax.ops.box_ops", "detr_jax.criterion.set_losses", "detr_jax.criterion.matcher",
                  "detr_jax.criterion.mask_losses", "detr_jax.evaluation.postprocess", "detr_jax.evaluation.postprocess_panoptic")


def _modules():
    """{module name: path} of every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return out


def _imports(path, modules):
    """The package modules `path` imports, anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg itself.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph():
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "detr_jax.training.loop" in graph and graph["detr_jax.training.loop"]  # the walk found the package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_the_entry_points():
    bad = {m: sorted(deps & HIGHER) for m, deps in _graph().items()
           if m.startswith(LOWER_PACKAGES) and deps & HIGHER}
    assert not bad, bad


def test_no_file_is_over_400_lines_without_a_reason():
    """A longer file says why in its module docstring ("Longer than 400 lines: ...")."""
    long = {}
    for module, path in _modules().items():
        text = open(path).read()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and "Longer than 400 lines" not in doc:
            long[module] = len(text.splitlines())
    assert not long, long


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m not in (
    "detr_jax.data.sources.tfds_coco", "detr_jax.data.sources.coco_like", "detr_jax.data.sources.coco_panoptic_like")))
def test_every_module_imports(module):
    importlib.import_module(module)
