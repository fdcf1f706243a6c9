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
