"""The house rule for imports: data flows HTTP → schemas → batcher → engine → model, so `model/` never imports
web code and, in `server/`, only the engine imports `model/`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ("server", "fastapi", "starlette", "uvicorn", "prometheus_client")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_engine_imports_model_code() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n == "model" or n.startswith("model."))
        for path in sorted((ROOT / "server").rglob("*.py"))
        if path.name != "engine.py"
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_model_code_imports_no_web_code() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.split(".")[0] in WEB)
        for path in sorted((ROOT / "model").rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}
