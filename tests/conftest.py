"""Shared test setup: the `slow` marker and the real SmolLM2-135M-Instruct folder (built by
../shared/tools/make_smollm2.sh; point SMOLLM2_DIR at it, default ~/.cache/smollm2-135m-instruct)."""
import os
import subprocess
from pathlib import Path

import pytest

SMOLLM2_DIR = Path(os.path.expanduser(os.environ.get("SMOLLM2_DIR", "~/.cache/smollm2-135m-instruct")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (minutes); deselect with -m 'not slow'")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A script run with subprocess.run(check=True, capture_output=True) that fails: show the end of its stderr
    (the script's own traceback) in the report, which otherwise shows only the exit status."""
    report = yield
    error = call.excinfo.value if call.excinfo else None
    if isinstance(error, subprocess.CalledProcessError) and error.stderr:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
        report.sections.append(("stderr of the failed command (last 6000 characters)", stderr[-6000:]))
    return report


@pytest.fixture(scope="session")
def smollm2_dir():
    if not (SMOLLM2_DIR / "model.safetensors").exists():
        pytest.skip(f"SmolLM2-135M-Instruct not found at {SMOLLM2_DIR}: build it with "
                    f"`bash ../shared/tools/make_smollm2.sh {SMOLLM2_DIR}` or set SMOLLM2_DIR")
    return SMOLLM2_DIR
