"""The ComfyUI node pack (plugin-manifests/comfyui) on the installed package: without
SDTI_LIBRARY and without a library beside it, the pack takes both its ctypes layer and
the library from the sdti package, as a ComfyUI user's install does (pip install -r
requirements.txt, no Rust). Its own tests run unchanged (tests/test_nodes.py)."""

import os
import subprocess
import sys

import sdti

from conftest import REPO, TINY_SD


def test_the_pack_runs_on_the_installed_wheel(tmp_path):
    package = os.path.dirname(os.path.abspath(sdti.__file__))
    if "SDTI_LIBRARY" in os.environ or not os.path.isfile(os.path.join(package, "_capi.py")):
        import pytest

        pytest.skip("not an installed wheel (SDTI_LIBRARY is set, or sdti runs from the source tree)")
    env = {k: v for k, v in os.environ.items() if k != "SDTI_LIBRARY"}
    env.update(
        SDTI_TEST_MODEL=TINY_SD,
        SDTI_TEST_OUT=str(tmp_path),
        SDTI_TEST_EXPECT_PACKAGE=package,
        PYTHONDONTWRITEBYTECODE="1",
    )
    script = os.path.join(REPO, "plugin-manifests", "comfyui", "tests", "test_nodes.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "comfyui pack: ok" in done.stdout, done.stdout
    assert f"library: {os.path.join(package, sdti._capi.library_file_name())}" in done.stdout, done.stdout
