"""The layering of SPEC's architecture, enforced: import-linter's contracts (pyproject `[tool.importlinter]`) hold, the
tool does flag a violation, and the torch-free modules stay torch-free when imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
needs_linter = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (dev extra)")


@needs_linter
def test_every_layering_contract_is_kept():
    out = subprocess.run([LINT_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout, out.stdout[-2000:]


@needs_linter
def test_the_linter_flags_a_transitive_violation(tmp_path):
    """Negative control: a library module that reaches mlflow through a helper breaks a contract like ours."""
    pkg = tmp_path / "fakelib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("from fakelib import helper\n")
    (pkg / "helper.py").write_text("def f():\n    import mlflow\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["fakelib"]\ninclude_external_packages = true\n\n'
        '[[tool.importlinter.contracts]]\nname = "no mlflow"\ntype = "forbidden"\nsource_modules = ["fakelib.engine"]\n'
        'forbidden_modules = ["mlflow"]\n'
    )
    out = subprocess.run([LINT_IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "fakelib.engine -> fakelib.helper" in out.stdout and "fakelib.helper -> mlflow" in out.stdout, out.stdout


@pytest.mark.parametrize("module", ["sarmerge.layout", "sarmerge.errors", "sarmerge.cli"])
def test_torch_free_modules_import_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
