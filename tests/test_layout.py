"""The package's shape: no import cycle between its modules, counting imports inside functions too
(a cycle dodged by a local import is still a cycle), and the README's layout names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "orchestrator"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "orchestrator"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_readme_layout_names_every_module_under_its_package():
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n    jobs/", 1)[0]
    listed: dict[str, set[str]] = {"": set()}
    package = ""
    for line in layout.splitlines():
        if match := re.match(r"\s+([a-z_]+)/\s", line):
            package = match.group(1)
            listed[package] = set()
        listed.setdefault(package, set()).update(re.findall(r"[a-z_]+", line))
    listed[""] |= listed.pop("orchestrator", set())
    missing = sorted(f"{pkg}/{p.stem}" for p in PACKAGE.rglob("*.py") if p.stem != "__init__"
                     for pkg in [p.parent.name if p.parent != PACKAGE else ""] if p.stem not in listed.get(pkg, set()))
    assert not missing, f"README's layout does not name these under their package: {missing}"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(k for k in listed if k), f"README's layout lists packages {sorted(listed)}, the tree has {packages}"


def test_mlflow_is_called_from_the_tracking_package_only():
    """DESIGN.md: MLflow only in the tracking module. Elsewhere no `mlflow` import, and no MLflow client taken from
    tracking to call it directly (a search_runs there read one page, at most 10,000 runs)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tracking":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            calls_client = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "client"
            if calls_client or any(name == "mlflow" or name.startswith("mlflow.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_the_public_api_resolves():
    import orchestrator

    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None, name
    assert orchestrator.TERMS["dkd"].model_fields["warmup_epochs"].default == 0 and "kd" in orchestrator.SHORTHANDS
