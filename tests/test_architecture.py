"""The layering of the package, checked on the source: no import cycle inside ``visionattn.tasks``, and the
model library (``visionattn`` without its command line) never imports the tasks layer."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"visionattn.tasks": ROOT / "tasks", "visionattn.kernels": ROOT / "kernels", "visionattn": ROOT / "visionattn"}


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents or path.parent == folder:
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([package, *parts])
    raise AssertionError(path)


def _imports(path: Path) -> set[str]:
    """Every ``visionattn...`` module imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("visionattn")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visionattn"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = sorted(PACKAGES[package].rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def test_tasks_have_no_import_cycle():
    graph = _graph("visionattn.tasks")
    assert len(graph) >= 10
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_task_plugins_sit_on_the_runtime_not_on_the_trainer():
    graph = _graph("visionattn.tasks")
    for plugin in ("classification", "segmentation", "detection", "run", "runtime", "task"):
        assert "visionattn.tasks.trainer" not in graph[f"visionattn.tasks.{plugin}"], plugin
    assert "visionattn.tasks.trainer" not in graph["visionattn.tasks.segment"]


def test_the_model_library_does_not_import_the_tasks_layer():
    for path in sorted((ROOT / "visionattn").rglob("*.py")):
        if path.name == "cli.py":
            continue
        bad = [m for m in _imports(path) if m.startswith("visionattn.tasks")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_sources_cite_papers_and_upstream_code_not_files_outside_the_repository():
    for folder in ("visionattn", "kernels", "tasks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            assert "shared/reference" not in path.read_text(), f"{path.relative_to(ROOT)} cites shared/reference"
