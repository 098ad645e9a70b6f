"""The package's shape: the folder tree is the architecture (README, Layout). Imports point one way between the
layers (no cycle, even through function-level imports); nothing imports the training package but entry points;
at most 8 modules sit directly in detr_jax/; no function is over 80 lines, no file over ~400 without saying why."""

import ast
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "detr_jax")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 8
# Declarative config functions: one line per field with its comment, read as a table.
LONG_FUNCTIONS_ALLOWED = {"detr_jax.config.base_config"}

# What each layer may import (besides itself). Entry points (experiments/, benchmarks/, tests/) may import anything.
#   ops -> models, data, criterion -> weights, evaluation, config -> inference, export, training
ALLOWED = {
    "ops": set(),
    "models": {"ops"},
    "data": {"ops"},
    "criterion": {"ops"},
    "weights": {"models", "ops"},
    "evaluation": {"data", "models", "ops"},
    "config": {"criterion", "data", "models", "ops"},
    "cli": set(),
    "inference": {"data", "evaluation", "models", "ops", "weights"},
    "export": {"data", "evaluation", "inference", "models", "ops", "weights"},
    "training": {"config", "criterion", "data", "evaluation", "models", "ops", "weights"},
}


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


def _layer(module):
    """detr_jax.criterion.matcher -> "criterion"; detr_jax -> None (the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


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


def test_every_layer_is_listed():
    layers = {_layer(m) for m in _modules()} - {None}
    assert layers == set(ALLOWED), layers ^ set(ALLOWED)


def test_imports_point_one_way_between_the_layers():
    """Data and models never import training or evaluation; only entry points import training; ops import nothing."""
    bad = {}
    for module, deps in _graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        wrong = sorted(d for d in deps if _layer(d) not in ALLOWED[layer] | {layer})
        if wrong:
            bad[module] = wrong
    assert not bad, bad


def test_the_layer_check_sees_a_wrong_import():
    assert _layer("detr_jax.training.loop") not in ALLOWED["data"]
    assert "training" not in ALLOWED["evaluation"] and "evaluation" not in ALLOWED["models"]
    assert not any("training" in allowed for layer, allowed in ALLOWED.items() if layer != "training")


def test_at_most_8_modules_directly_in_the_package():
    top = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def _long_functions(path, module, limit=MAX_FUNCTION_LINES):
    """{qualified name: lines} of the functions of `path` longer than `limit` lines (decorators and docstring
    included)."""
    long = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    if child.end_lineno - start + 1 > limit and name not in LONG_FUNCTIONS_ALLOWED:
                        long[name] = child.end_lineno - start + 1
                walk(child, name)

    walk(ast.parse(open(path).read()), module)
    return long


def test_no_function_is_over_80_lines():
    long = {}
    for module, path in _modules().items():
        long.update(_long_functions(path, module))
    assert not long, long


def test_the_function_length_check_counts_lines(tmp_path):
    source = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    source.write_text(f"def fits():\n{body[:body.rfind(chr(10))]}\n\n\ndef over():\n{body}\n")
    assert _long_functions(str(source), "m") == {"m.over": 81}  # 80 lines fit (the boundary), 81 do not


def test_no_file_is_over_400_lines_without_a_reason():
    """A longer file says why in its module docstring ("Longer than 400 lines: ...")."""
    long = {}
    for module, path in _modules().items():
        text = open(path).read()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_FILE_LINES and "Longer than 400 lines" not in doc:
            long[module] = len(text.splitlines())
    assert not long, long


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m not in (
    "detr_jax.data.sources.tfds_coco", "detr_jax.data.sources.coco_like", "detr_jax.data.sources.coco_panoptic_like")))
def test_every_module_imports(module):
    importlib.import_module(module)
