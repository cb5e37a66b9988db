"""The import graph inside staysafe/ has no cycles, and the light modules stay light (no torch)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "staysafe"
LIGHT = ("staysafe.errors", "staysafe.runs.paths", "staysafe.options", "staysafe.judges", "staysafe.runs.traces",
         "staysafe.methods", "staysafe.records", "staysafe.runs.files", "staysafe.judges.endpoint",
         "staysafe.runs.trace_names",
         "staysafe.queue", "staysafe.cli")


def module_names() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


# In a fresh interpreter: record which staysafe module imports which while it is being executed (module level
# only; an import inside a function runs later), import every module, and report the edges.
RECORD = r"""
import builtins, importlib, json, sys
edges, real = set(), builtins.__import__
def record(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if importer.startswith("staysafe") and name.startswith("staysafe") and level == 0:
        edges.add((importer, name))
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = record
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(edges)))
"""


def fresh(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def graph(edges, modules) -> dict[str, set[str]]:
    g = {m: set() for m in modules}
    for a, b in edges:
        b = b if b in g else b.rsplit(".", 1)[0]  # "from staysafe.judges.base import X" names a module
        if a in g and b in g and a != b:
            g[a].add(b)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's strongly connected component (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def static_edges() -> set[tuple[str, str]]:
    """Every ``from staysafe... import`` in the source, also those inside functions (they run sooner or later)."""
    edges = set()
    for name in module_names():
        path = PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("staysafe"):
                edges.add((name, node.module))
            elif isinstance(node, ast.Import):
                edges.update((name, a.name) for a in node.names if a.name.startswith("staysafe"))
    return edges


def test_module_level_imports_have_no_cycle():
    modules = module_names()
    edges = json.loads(fresh(RECORD, *modules))
    assert edges, "the import hook recorded nothing"
    assert cycles(graph(edges, modules)) == []


def test_function_level_imports_close_no_cycle():
    """Imports inside functions count too: loading a model never imports the alignment stage (models -> aligned
    and embedded below it; align -> models above)."""
    g = graph(static_edges(), module_names())
    assert cycles(g) == []
    assert "staysafe.models.align" not in g["staysafe.models.loading"]
    assert "staysafe.models.align" not in g["staysafe.models.aligned"]


@pytest.mark.parametrize("name", LIGHT)
def test_light_modules_do_not_load_torch(name):
    loaded = json.loads(fresh(f"import json, sys, {name}; print(json.dumps(sorted(sys.modules)))"))
    assert "torch" not in loaded and "transformers" not in loaded, name


def test_the_cli_builds_its_parser_without_torch():
    """`staysafe --help` and every subcommand's help start without loading torch or transformers."""
    loaded = json.loads(fresh("import json, sys, staysafe.cli; staysafe.cli.build_parser(); "
                              "print(json.dumps(sorted(sys.modules)))"))
    assert "torch" not in loaded and "transformers" not in loaded
