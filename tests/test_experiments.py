"""The SmolLM2 recipe and the research-claim experiments, end to end with tiny settings (slow): every stage runs,
its outputs load in transformers, and each experiment writes its table and PNG."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_smollm2_recipe_runs_end_to_end_and_loads_in_transformers(smollm2_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.recipe_smollm2", "--tiny", "--model", str(smollm2_dir),
                          "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
    assert "python sft.py --model" in out and "python grpo.py --model" in out  # each stage's command, to copy
    table = (tmp_path / "recipe.md").read_text()
    assert table.count("\n") == 6 and "SmolLM2-135M-Instruct as shipped" in table and "whole recipe" in table
    grpo_summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert grpo_summary["steps"] == 2 and grpo_summary["heldout_problems"] == 8
    transformers = pytest.importorskip("transformers")
    import torch
    from model import Transformer
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for stage in ("sft", "grpo"):
        folder = tmp_path / stage / "final"
        ours = Transformer.from_pretrained(folder, dtype=torch.float32)(ids)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        assert (ours - ref).abs().max() < 1e-3, stage
        transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_every_experiment_writes_its_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    subprocess.run([sys.executable, "-m", "tests.experiments", "all", "--tiny", "--out", str(tmp_path)],
                   cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    for name, arms in {"length_bias": ("grpo", "dr_grpo", "dapo"), "dynamic_sampling": ("on", "off"),
                       "distilled": ("seed", "significant"), "kl": ("k1", "k2", "k3"),
                       "objectives": ("gspo", "grpo-top20-entropy"), "tools": ("builtin:tool_arithmetic",),
                       "concise": ("sometimes-solved problems", "all problems")}.items():
        table = (tmp_path / name / f"{name}.md").read_text()
        assert all(a in table for a in arms), (name, table)
        png = (tmp_path / name / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name
    # the same seeds in every arm: each arm's run folder per seed
    assert sorted(p.name for p in (tmp_path / "kl").iterdir() if p.is_dir()) == \
        [f"{k}-seed{s}" for k in ("k1", "k2", "k3") for s in (0, 1)]


@pytest.mark.slow
def test_knights_transfer_runs_tiny(tmp_path):
    """Logic-RL's transfer experiment with tiny settings, wired end to end: the knights cold start, GRPO on knights
    and on arithmetic (the control) for both seeds, each scored greedy on both tasks. The committed tiny-knights model
    stands in for SmolLM2 (the same commands; on SmolLM2 the tiny run takes about 10 minutes on 2 cores)."""
    pytest.importorskip("matplotlib")
    subprocess.run([sys.executable, "-m", "tests.experiments", "knights_transfer", "--tiny", "--smollm2",
                    "checkpoints/tiny-knights", "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                   text=True, check=True)
    lines = (tmp_path / "knights_transfer" / "knights_transfer.md").read_text().splitlines()
    rows = [l.split(" | ") for l in lines if l.startswith("| knights |") or l.startswith("| arithmetic control |")]
    assert sorted((r[0].strip("| "), r[1]) for r in rows) == [("arithmetic control", "0"), ("arithmetic control", "1"),
                                                                ("knights", "0"), ("knights", "1")], lines
    assert all(0 <= float(x.strip(" |")) <= 1 for r in rows for x in r[2:]), lines
    png = (tmp_path / "knights_transfer" / "knights_transfer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiments_refuse_a_single_seed(capsys):
    from tests import experiments
    with pytest.raises(SystemExit):
        experiments.main(["kl", "--seeds", "0"])
    assert "at least two seeds" in capsys.readouterr().err
