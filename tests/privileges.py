"""Permission tests as root: file modes do not stop root, so a test of "Permission denied"
re-runs itself in a child pytest whose process lacks the capabilities that let root ignore
them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; dropped with setpriv(1)). It is still uid 0, so
the interpreter and the checkout stay readable; the file modes the test sets now apply."""
import os
import shutil
import subprocess
import sys

import pytest

MARK = "EDGESTAR_TEST_WITHOUT_DAC_OVERRIDE"


def ran_without_override(request) -> bool:
    """As root: run this test in a child without the override capabilities, assert it passed
    there (not skipped) and return True (the caller returns). Otherwise False: run it here."""
    if os.geteuid() != 0 or os.environ.get(MARK):
        return False
    if shutil.which("setpriv") is None:
        pytest.skip("as root, testing file permissions needs setpriv(1) (util-linux) to drop CAP_DAC_OVERRIDE")
    res = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                          "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                         cwd=request.config.rootpath, env=dict(os.environ, **{MARK: "1"}),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    return True
