"""The package's structure, read from its own source with ``ast`` (DESIGN.md, "Layers"): imports only
run down the layers (function-local imports included), there are no import cycles, nothing outside
``methods/`` compares a method's name with a string, and no module grows past 400 lines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nested_svit"

# bottom to top; a module may import from its own package or from a lower layer, never from a peer or above
LAYERS = [
    {"devices"},  # which devices follow CUDA's rules, and every CUDA call
    {"io", "tokens", "config", "seeding", "distributed", "viz", "assets", "version"},
    {"data"},
    {"attention"},
    {"layers"},
    {"execution"},
    {"methods"},
    {"stack"},
    {"precision"},  # which parts run in reduced precision (every decision stays fp32)
    {"model"},
    {"registry"},
    {"checkpoint"},
    {"detection"},
    {"inference"},  # the runs: model spec, batch steps, the one commit loop, part files, jobs
    {"evaluation", "benchmark", "training"},
    {"ray"},  # the optional Ray Data engine: only the CLI imports it (test_core_never_imports_ray)
    {"cli"},
    {"__init__"},  # the package's public surface
]
LAYER = {name: i for i, group in enumerate(LAYERS) for name in group}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every nested_svit module ``path`` imports, at any depth of the file (function-local too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nested_svit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nested_svit":
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if is_package(target) and (is_package(sub) or (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists()) else target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that run up or sideways through the layers, and import cycles."""
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = component(src), component(dst)
            if a == b:
                continue
            if b not in LAYER or a not in LAYER:
                bad.append(f"{src} -> {dst}: {a if a not in LAYER else b} has no layer in DESIGN.md")
            elif LAYER[b] >= LAYER[a]:
                bad.append(f"{src} -> {dst}: {b} is {'a peer' if LAYER[b] == LAYER[a] else 'above'} {a}")
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                bad.append("cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                           else f"cycle: {node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return bad


def test_imports_run_down_the_layers_without_cycles():
    edges = graph()
    assert len(edges) > 50 and all(component(m) in LAYER for m in edges), sorted(m for m in edges if component(m) not in LAYER)
    assert violations(edges) == []


def test_the_check_sees_an_upward_import_and_a_cycle():
    edges = graph()
    edges["nested_svit.tokens"] = edges["nested_svit.tokens"] | {"nested_svit.cli.main"}  # bottom imports top
    assert any("nested_svit.tokens -> nested_svit.cli.main" in v for v in violations(edges))
    cyclic = {"nested_svit.methods.a": {"nested_svit.methods.b"}, "nested_svit.methods.b": {"nested_svit.methods.a"}}
    assert any(v.startswith("cycle") for v in violations(cyclic))
    assert "nested_svit.detection" in graph()["nested_svit"]  # function-local and relative imports count


def _method_names() -> set[str]:
    from nested_svit.methods import METHODS

    return set(METHODS)


def _string_constants(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for e in node.elts for v in _string_constants(e)]
    return []


def name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines of ``source`` that compare anything with a string literal that is a method's name."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(s in names for operand in [node.left, *node.comparators] for s in _string_constants(operand)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith"):
            if any(s in names for a in node.args for s in _string_constants(a)):
                lines.append(node.lineno)
    return lines


def test_no_method_name_compared_outside_methods():
    names = _method_names()
    found = {str(p.relative_to(ROOT)): name_comparisons(p.read_text(), names)
             for p in ROOT.rglob("*.py") if "methods" not in p.relative_to(ROOT).parts}
    assert {k: v for k, v in found.items() if v} == {}
    assert name_comparisons('if config.method == "svit":\n    pass\n', names) == [1]  # the check sees one
    assert name_comparisons('x = cfg.method in ("evit", "ats")\n', names) == [1]


@pytest.mark.parametrize("limit, folder", [(400, ""), (300, "cli")])
def test_modules_stay_small(limit, folder):
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / folder).rglob("*.py")}
    assert {k: n for k, n in sizes.items() if n > limit} == {}


def test_no_module_but_the_engine_switch_imports_ray():
    """The Ray engine is an optional extra: no module but the CLI's engine switch imports it (statically,
    at any depth)."""
    importers = sorted(name for name, imported in graph().items() if not name.startswith("nested_svit.ray")
                       and any(m == "nested_svit.ray" or m.startswith("nested_svit.ray.") for m in imported))
    assert importers == ["nested_svit.cli.engine"], importers


@pytest.mark.slow
def test_core_never_imports_ray():
    """Importing the library (or running its CLI parser) does not import ray."""
    code = ("import sys, importlib, nested_svit; importlib.import_module('nested_svit.cli.main').build_parser(); "
            "print(any(k == 'ray' or k.startswith('ray.') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def _outside_cli() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]


def argparse_imports(source: str) -> list[int]:
    """Lines of ``source`` that import argparse (at any depth)."""
    tree = ast.parse(source)
    return [n.lineno for n in ast.walk(tree) if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "argparse"
                                                                                    for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "argparse")]


def private_imports(source: str) -> list[str]:
    """``from <another nested_svit module> import _name`` in ``source`` (its own package's modules count as
    other modules too: a private name stays in its module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nested_svit")):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def torch_saves(source: str) -> list[int]:
    """Lines of ``source`` that call ``torch.save`` (or ``save`` imported from torch)."""
    tree = ast.parse(source)
    from_torch = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                  for a in n.names if a.name == "save"}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == "save" and getattr(n.func.value, "id", None) == "torch")
        or (isinstance(n.func, ast.Name) and n.func.id in from_torch))]


def test_the_library_below_the_cli_takes_no_argparse_no_private_names_and_the_cli_saves_nothing():
    """The CLI parses and prints: nothing below it sees an ``argparse`` object; no module reaches into
    another's private names; writing files of models is the checkpoint package's (no ``torch.save`` in
    ``cli/``)."""
    assert {str(p.relative_to(ROOT)): argparse_imports(p.read_text()) for p in _outside_cli()
            if argparse_imports(p.read_text())} == {}
    assert {str(p.relative_to(ROOT)): private_imports(p.read_text()) for p in ROOT.rglob("*.py")
            if private_imports(p.read_text())} == {}
    assert {str(p.relative_to(ROOT)): torch_saves(p.read_text()) for p in (ROOT / "cli").rglob("*.py")
            if torch_saves(p.read_text())} == {}
    # the checks see what they look for
    assert argparse_imports("def f():\n    import argparse\n") == [2]
    assert argparse_imports("from argparse import Namespace\n") == [1]
    assert torch_saves("import torch\ntorch.save(x, p)\n") == [2]
    assert torch_saves("from torch import save as s\ns(x, p)\n") == [2]
    assert private_imports("from .inference.parts import _hidden\n") == ["inference.parts._hidden"]


# what writes files, draws pictures or builds an output's record: the library's modules, never the CLI's
WRITERS = {"nested_svit.io", "nested_svit.viz", "nested_svit.detection.vis", "nested_svit.inference.writers",
           "nested_svit.inference.pictures", "nested_svit.inference.provenance", "nested_svit.evaluation.results"}
WRITING_LIBRARIES = {"pyarrow", "PIL", "matplotlib"}
WRITING_CALLS = {"to_parquet", "to_csv", "to_json", "write_text", "write_bytes", "savefig", "write_table", "dump"}
RUN_INTERNALS = {"store", "rows", "finish", "merge"}  # a job's parts: the library's to merge and write


def writing_in(source: str) -> list[str]:
    """What in ``source`` writes a file or reaches into a job's parts: imports of writing libraries,
    calls that write, ``open`` for writing, attributes of a run's store."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in WRITING_LIBRARIES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in WRITING_LIBRARIES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in WRITING_CALLS or (name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                                                 and set(a.value) & set("wax") for a in node.args[1:])):
                found.append(f"{name}() line {node.lineno}")
        elif isinstance(node, ast.Attribute) and node.attr in RUN_INTERNALS:
            found.append(f".{node.attr} line {node.lineno}")
    return found


def test_the_cli_parses_and_prints_and_the_library_writes_every_output():
    """``cli/`` holds no writer, no record builder and no picture code: it imports none of the modules
    that write, draw or build records, calls nothing that writes a file, and never touches a job's parts
    (a ``predict`` hands the library one job, ``inference.predict``, and prints the summary it gets back)."""
    edges = graph()
    cli = {name: sorted(imported & WRITERS) for name, imported in edges.items() if name.startswith("nested_svit.cli")}
    assert {k: v for k, v in cli.items() if v} == {}
    assert {str(p.relative_to(ROOT)): writing_in(p.read_text()) for p in (ROOT / "cli").rglob("*.py")
            if writing_in(p.read_text())} == {}
    predict = (ROOT / "cli" / "predict.py").read_text()
    assert predict.count("predict(job,") == 1 and "summary = predict(" in predict
    # the check sees what it looks for
    assert writing_in("import pyarrow.parquet as pq\n") == ["pyarrow.parquet"]
    assert writing_in("rows.to_csv(out)\n") == ["to_csv() line 1"]
    assert writing_in("with open(p, 'a') as f:\n    pass\n") == ["open() line 1"]
    assert writing_in("open(p).read()\n") == []
    assert writing_in("job.store.remove()\n") == [".store line 1"]
