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


def test_the_wheel_holds_every_package_of_the_product() -> None:
    """`pip install .` (the Docker image) installs what `pyproject.toml` finds: every folder with an
    `__init__.py` under the product's packages, and not the experiments (`benchmarks/`) or the tests."""
    import tomllib

    from setuptools import find_packages

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = set(find_packages(str(ROOT), include=found["include"]))
    roots = ("deebert", "model", "reports", "server", "loadtest")
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for root in roots for init in (ROOT / root).rglob("__init__.py")
    }
    assert packaged == on_disk
    assert "server.routes" in packaged and not any(p.startswith(("benchmarks", "tests")) for p in packaged)


def test_serve_parses_its_flags_and_picks_its_allocator_before_importing_torch() -> None:
    """`deebert serve` re-runs itself on jemalloc: everything up to that point must stay light, or a start pays
    for importing torch and transformers twice."""
    import subprocess
    import sys

    probe = (
        "import sys; from deebert.cli import build_parser; from server.serve import settings_from; "
        "args = build_parser('serve').parse_args(['serve', '--checkpoint', 'x']); settings_from(args); "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'model') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
