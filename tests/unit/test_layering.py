"""The package's layering, read from its imports (every `import`, including those under TYPE_CHECKING
and inside functions): no cycle, each layer imports only the ones below it, the domain does no I/O."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "gateway"
# Bottom to top. `config` and `logs` are schema and set-up that any layer may use.
LAYERS = ["domain", "psp", "psp_sim", "store", "shared", "feed", "risk", "processing", "runtime", "api", "cli"]
ANYWHERE = {"config", "logs", "_fastpath"}
# Modules whose use means I/O: the domain layer imports none of them (pathlib's pure paths are fine).
IO_MODULES = {"os", "socket", "sqlite3", "psycopg", "redis", "confluent_kafka", "httpx", "subprocess",
              "threading", "asyncio", "shutil", "tempfile", "urllib.request", "io"}
IO_CALLS = re.compile(r"\bopen\(|\.read_text\(|\.write_text\(|\.read_bytes\(|os\.environ|getenv\(|\bPath\(")
MODULE_LINES_MAX = 500
FUNCTION_LINES_MAX = 120


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of this package (and every outside module, unprefixed) that `name` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                candidate = f"{module}.{a.name}"
                found.add(candidate if candidate in MODULES else module)
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert cycles == []


def test_each_layer_imports_only_the_layers_below_it() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for name, deps in GRAPH.items():
        own = _layer(name)
        for dep in deps:
            other = _layer(dep)
            if own in rank and other in rank and rank[other] > rank[own]:
                upward.append(f"{name} -> {dep}")
    assert upward == []
    assert {_layer(m) for m in MODULES} - set(LAYERS) - ANYWHERE - {""} == set(), "a module outside every layer"


def test_the_domain_does_no_io_and_imports_no_other_layer() -> None:
    offenders = []
    for name, path in MODULES.items():
        if _layer(name) != "domain":
            continue
        for module in _imports(name, path):
            # The Rust core's pure functions (card-number scan, currency table) sit below every layer.
            if module.startswith("gateway.") and _layer(module) not in ("domain", "_fastpath"):
                offenders.append(f"{name} imports {module}")
            if module.split(".")[0] in IO_MODULES or module in IO_MODULES:
                offenders.append(f"{name} imports {module} (I/O)")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # docstrings may name what the code does not do
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                node.value.value = ""
        if IO_CALLS.search(ast.unparse(tree)):  # the code without comments and docstrings
            offenders.append(f"{name} opens files or reads the environment")
    assert offenders == []


def test_one_module_decodes_the_wal_payment_record() -> None:
    decoders = [name for name, path in MODULES.items() if "msgspec.json.Decoder(" in path.read_text()
                and "payment" in path.read_text() and _layer(name) in ("store", "feed", "runtime")]
    assert decoders == [], "WAL records are decoded by gateway.domain.records only"


def test_no_module_or_function_is_too_long() -> None:
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MODULE_LINES_MAX:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES_MAX:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []
