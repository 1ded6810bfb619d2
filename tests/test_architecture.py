"""The house rules, read from the source: no import circles, and no stage imports another stage.

Every `import` counts, module-level or inside a function: a lazy import only hides a circle until the day both
ends are loaded in a new order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import selfalign

SRC = Path(selfalign.__file__).resolve().parent
STAGES = "selfalign.stages"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each selfalign module and the selfalign modules it imports (`from a import b` counts a.b when b is one)."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "selfalign.runtime.loader" in graph["selfalign.stages.eval"]  # imported inside run()
    assert "selfalign.runtime.families" in graph["selfalign.config"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_module_that_imports_it_back():
    assert circles(import_graph()) == []


def test_stages_and_the_sweep_callback_import_no_stage():
    graph = import_graph()
    offenders = {
        name: sorted(m for m in imported if m.startswith(f"{STAGES}."))
        for name, imported in graph.items()
        if name.startswith(f"{STAGES}.") or name == "selfalign.sweep"
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    # only the stage table knows every stage; the pipeline reaches its steps through it
    assert STAGES in graph["selfalign.stages.pipeline"]


def test_one_decoding_engine():
    """Every generation goes through `runtime/generate.py` over the batcher: nothing in the package calls a model's
    own `.generate(...)`, and only the LoRA module names adapters per row for PEFT (`adapter_names`)."""
    model_generate, adapter_names = [], []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                model_generate.append(f"{module_name(path)}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value == "adapter_names":
                adapter_names.append(module_name(path))
    assert model_generate == []
    assert sorted(set(adapter_names)) == ["selfalign.runtime.lora"]
