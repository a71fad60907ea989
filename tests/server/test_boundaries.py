"""The shape holds: torch stays in models/, imports go one way (api -> engine -> scheduler -> models), and no
module imports itself back through others. Read from the source (ast), and from a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "models")
TENSOR_LIBRARIES = ("torch", "transformers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """What a module imports when it is imported: module-level statements, not `if TYPE_CHECKING:` blocks nor
    imports inside functions (those run later, when called)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
# A package's own __init__ only names its modules (`from server import metrics` reads as server.metrics).
GRAPH = {
    name: {i for i in runtime_imports(path) if i in MODULES and i != name and i not in PACKAGES}
    for name, path in MODULES.items()
}
PLAIN = ("server.config", "server.errors", "server.features", "server.request", "server.row", "server.detokenizer", "server.speculation", "server.scheduler")


def layer(name: str) -> int:
    """Higher layers may import lower ones, never the reverse."""
    if name.startswith("models"):
        return 0
    if name in PLAIN:  # the scheduler and the plain types it decides with
        return 1
    if name.startswith("server.api") or name in ("server.app", "server.__main__"):
        return 3
    return 2  # the engine and what it runs: admission, steps, outputs, beams, grammars, prompts


def test_imports_go_one_way() -> None:
    wrong = [(a, b) for a, deps in GRAPH.items() for b in deps if layer(b) > layer(a)]
    assert not wrong, f"imports against the layers (api -> engine -> scheduler -> models): {wrong}"


def test_no_module_imports_itself_back() -> None:
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        for dep in sorted(GRAPH[name]):
            if dep == path[0]:
                cycles.append([*path, dep])
            elif dep not in path and dep > path[0]:  # each cycle found once, from its smallest module
                walk(dep, [*path, dep])

    for name in sorted(GRAPH):
        walk(name, [name])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_only_models_imports_torch_or_transformers() -> None:
    leaking = {
        name: sorted(i for i in runtime_imports(path) if i.split(".")[0] in TENSOR_LIBRARIES)
        for name, path in MODULES.items()
        if name.startswith("server")
    }
    assert not {name: found for name, found in leaking.items() if found}


def test_the_api_the_config_and_the_scheduler_import_without_torch() -> None:
    """In a fresh interpreter: every HTTP module, the app, the config, the scheduler, the engine's module and
    `python -m server --help` load neither torch nor transformers (the model loads them, when it loads)."""
    code = """
import sys
import server.app, server.config, server.scheduler, server.engine
import server.api.openai, server.api.anthropic, server.api.responses, server.api.tokens, server.api.ops
from server.__main__ import main
try:
    main(["--help"])
except SystemExit:
    pass
print("loaded:" + ",".join(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "loaded:"
