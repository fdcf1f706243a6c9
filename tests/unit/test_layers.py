"""The library layer stands alone: importing every lesionml module loads no Prefect and none
of the layers above it (import-linter checks the source; this checks what really loads)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_every_library_module_imports_without_prefect_or_the_upper_layers():
    code = (
        "import importlib, pkgutil, sys, lesionml\n"
        "for m in pkgutil.walk_packages(lesionml.__path__, 'lesionml.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'flows', 'tasks', 'cli'})\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"the library loaded {done.stdout.strip()}"


def test_only_the_tracking_layer_talks_to_mlflow():
    """The stages return results and lesionml/tracking.py logs them; serving_model.py is the
    code of the logged model itself, which MLflow loads."""
    import ast

    importers = set()
    for path in sorted((ROOT / "lesionml").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"lesionml/tracking.py", "lesionml/serving_model.py"}
