"""The DeepSeek-R1 recipe end to end with tiny settings (the README's chain, every stage a few steps): each stage's
output folder loads as the next stage's input, and sample.py --compare evaluates all of them side by side."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--heldout_problems", "8", "--device", "cpu"]
RL = ["--max_steps", "2", "--batch_size", "16", "--group_size", "4", "--eval_every", "0", *SMALL]


def run(*cmd):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_r1_recipe_chain(tmp_path):
    out = tmp_path
    # R1-Zero: RL straight from the base policy, accuracy + format rewards
    run("grpo.py", "--model", "checkpoints/tiny-sft", "--out", str(out / "r1zero"), *RL)
    # R1 1: cold start, SFT on long readable chains of thought (every step written out)
    run("sft.py", "--model", "checkpoints/tiny-sft", "--builtin_size", "64", "--step_fraction", "1", "--max_steps", "2",
        "--batch_size", "8", "--eval_every", "0", "--out", str(out / "cold_start"), *SMALL)
    # R1 2: reasoning RL with the un-gameable format reward and language consistency
    run("grpo.py", "--model", str(out / "cold_start" / "final"), "--strict_format", "--language_weight", "0.1",
        "--out", str(out / "rl1"), *RL)
    # R1 3: rejection sampling from the RL policy (its own teacher) + non-reasoning data, SFT of the base
    run("sft.py", "--export_builtin", str(out / "data"), "--builtin_size", "16", "--step_fraction", "0")
    run("distill.py", "--teacher", str(out / "rl1" / "final"), "--student", "checkpoints/tiny-sft",
        "--mix_data", str(out / "data" / "builtin_sft_train.jsonl"), "--num_prompts", "16", "--samples_per_prompt", "2",
        "--format", "lenient", "--max_steps", "2", "--batch_size", "8", "--lr", "1e-4", "--out", str(out / "rs_sft"),
        *SMALL)
    rs = summary(out / "rs_sft")
    assert rs["train_examples"] == rs["kept"] + 16  # the kept traces plus every non-reasoning example
    # R1 4: the second RL stage
    run("grpo.py", "--model", str(out / "rs_sft" / "final"), "--strict_format", "--language_weight", "0.1",
        "--out", str(out / "rl2"), *RL)
    # distillation of the final policy into a fresh smaller student, both ways
    run("distill.py", "--teacher", str(out / "rl2" / "final"), "--num_prompts", "16", "--samples_per_prompt", "2",
        "--format", "lenient", "--max_steps", "2", "--batch_size", "8", "--out", str(out / "distill_traces"), *SMALL)
    run("distill.py", "--mode", "logits", "--teacher", str(out / "rl2" / "final"), "--max_steps", "2",
        "--batch_size", "8", "--out", str(out / "distill_logits"), *SMALL)
    for stage in ("r1zero", "cold_start", "rl1", "rs_sft", "rl2", "distill_traces", "distill_logits"):
        assert (out / stage / "final" / "model.safetensors").exists(), stage
        assert (out / stage / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stage  # every script draws one

    stages = ["checkpoints/tiny-sft"] + [str(out / s / "final") for s in ("r1zero", "rl1", "rl2", "distill_logits")]
    table = run("sample.py", "--eval", "builtin", "--limit", "4", "--n", "2", "--max_new_tokens", "32",
                "--compare", *stages, "--out", str(out / "eval"))
    header, rows = table.splitlines()[0], {l.split(" | ")[0].strip("| "): l for l in table.splitlines()[2:]}
    assert all(s in header for s in stages) and {"pass@1", "maj@2", "mean_length"} <= rows.keys()
    assert len(list((out / "eval").glob("*/summary.json"))) == len(stages)
