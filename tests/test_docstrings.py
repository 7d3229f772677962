"""Docstring examples written as `>>>` run: every one in the package passes doctest.

Examples that need a model or a program built elsewhere are written as plain code after `Example::` instead.
The doctests run in a subprocess, since some register things (a pass, a family) in the process they run in.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import doctest, importlib, pkgutil, sys
import sparsec, sparsec.passes, sparsec.exporters

failed, ran = [], 0
for package in (sparsec, sparsec.passes, sparsec.exporters):
    names = [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in names:
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                 report=False, verbose=False)
        ran += result.attempted
        if result.failed:
            failed.append(name)
print(f"{ran} examples")
if failed:
    print("failed in:", ", ".join(sorted(set(failed))))
    sys.exit(1)
"""


def test_docstring_examples_run():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) > 0  # some examples do run
