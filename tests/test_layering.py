"""Lower packages never import upper ones: kernels < model, parallel, data < train < launch.

model, parallel and data are one level (the model builds its layers on parallel's process groups,
parallel's context-parallel pieces run the model's convolution and attention, the HF export ships
data's tokenizer, synthetic data reads the model's config errors). No package imports benchmarks,
scripts or tests. Every import counts, also one inside a function (deferring an import does not
remove the dependency). Exceptions need an entry in ``ALLOWED`` with the reason; there are none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"kernels": 0, "model": 1, "parallel": 1, "data": 1, "train": 2, "launch": 3}
NEVER = {"benchmarks", "scripts", "tests"}
ALLOWED: dict[tuple[str, str], str] = {}  # (importing module file, imported module) -> why


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``
    (relative imports stay inside it)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module or ""))
    return found


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    """The imports of the file ``path`` (relative to the repository) that break the layering."""
    package = path.parts[0]
    source = path.read_text() if source is None else source
    bad = []
    for line, module in imported_modules(source, package):
        top = module.split(".")[0]
        if (str(path), module) in ALLOWED:
            continue
        if top in NEVER or (top in LEVELS and LEVELS[top] > LEVELS[package]):
            bad.append(f"{path}:{line} imports {module}")
    return bad


def test_no_package_imports_an_upper_one():
    files = sorted(p.relative_to(ROOT) for package in LEVELS for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 50
    bad = [line for path in files for line in upward_imports(path, (ROOT / path).read_text())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source,flagged", [
    ("def f():\n    from train.checkpoint import resolve\n", True),  # deferred, still upward
    ("import launch.pretrain\n", True),
    ("from tests.helpers import distributed\n", True),
    ("from parallel import state\nfrom kernels.kda import chunk_kda\nfrom . import tp\n", False),
])
def test_the_check_sees_deferred_and_plain_imports(source, flagged):
    assert bool(upward_imports(Path("model/example.py"), source)) == flagged
