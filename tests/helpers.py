import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = '/usr/share/datasets/fashion-mnist'
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION), reason='apt-get install dataset-fashion-mnist')


def run(script, *args, timeout=900):
    """Run a script of the project as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
