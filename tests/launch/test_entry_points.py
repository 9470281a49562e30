"""The launch scripts import the project from its (editable) install, never by editing ``sys.path``,
so they run by path from any working directory."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _edits_sys_path(tree: ast.AST) -> bool:
    """True when the module calls a method of ``sys.path`` or assigns to it."""
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
            return True
    return False


def test_no_launch_script_edits_sys_path():
    scripts = sorted((ROOT / "launch").glob("*.py"))
    assert scripts
    editing = [p.name for p in scripts if _edits_sys_path(ast.parse(p.read_text()))]
    assert not editing, f"these scripts edit sys.path (the package is installed editable): {editing}"
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))  # the check itself


def test_pretrain_help_runs_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--help"], cwd=tmp_path,
                            env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--train-iters" in result.stdout
