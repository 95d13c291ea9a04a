"""The DeepSeek-R1 recipe on a real open-weights model, on a laptop: SmolLM2-135M-Instruct on the built-in arithmetic
task. Three stages, each a plain command of this project (printed as it runs, so it can be copied), and one table:

  base       the checkpoint as it ships: held-out greedy accuracy (sample.py --eval, temperature 0)
  cold start sft.py on a few hundred of the task's worked solutions, in the model's own chat template
  RL         grpo.py from the SFT checkpoint, accuracy + format rewards

Every stage is scored on the same held-out problems (the first --heldout_problems of the built-in held-out split),
greedy, with the same --max_new_tokens.

    python -m tests.recipe_smollm2                                   # the README's "Real model" table (CPU)
    python -m tests.recipe_smollm2 --tiny --out /tmp/recipe          # 2 SFT steps, 2 GRPO steps (the slow test)
    SMOLLM2_DIR=... python -m tests.recipe_smollm2                   # another copy of the checkpoint
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(name, script, args, out, log, after=None):
    """Run one stage to completion. A stage that finished before with the same command is kept, unless the stage it
    starts from (`after`) ran again: a rerun only does what changed."""
    out = Path(out)
    cmd = [script, *map(str, args), "--out", str(out)] + (["--overwrite"] if script != "sample.py" else [])
    command = "python " + " ".join(cmd)
    log(f"[{name}] {command}")
    done = (out / "summary.json").exists() and (out / "command.txt").read_text() == command
    if not done or (after is not None and after["ran"]):
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(command)  # a stage reruns when its command changed
        t0 = time.time()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        (out / "stage_wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "ran": not done or (after is not None and after["ran"])}, float((out / "stage_wall_s.txt").read_text())


def main(argv=None):
    default_model = os.environ.get("SMOLLM2_DIR", os.path.expanduser("~/.cache/smollm2-135m-instruct"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model, help="SmolLM2-135M-Instruct folder (tests/make_smollm2.py)")
    p.add_argument("--heldout_problems", type=int, default=200, help="held-out problems every stage is scored on")
    p.add_argument("--max_new_tokens", type=int, default=96, help="completion limit, in evaluation and rollouts")
    p.add_argument("--sft_examples", type=int, default=400, help="worked solutions for the cold start")
    p.add_argument("--sft_steps", type=int, default=50, help="SFT optimizer steps")
    p.add_argument("--sft_lr", type=float, default=1e-4, help="SFT peak learning rate")
    p.add_argument("--grpo_steps", type=int, default=30, help="GRPO steps")
    p.add_argument("--grpo_lr", type=float, default=5e-6, help="GRPO peak learning rate")
    p.add_argument("--batch_size", type=int, default=64, help="GRPO completions per step")
    p.add_argument("--group_size", type=int, default=8, help="GRPO G")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--tiny", action="store_true", help="a smoke test: 8 held-out problems, 2 SFT and 2 GRPO steps")
    p.add_argument("--out", default="out/recipe_smollm2", help="one folder per stage, and recipe.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.heldout_problems, args.max_new_tokens, args.sft_examples = 8, 24, 16
        args.sft_steps, args.grpo_steps, args.batch_size, args.group_size = 2, 2, 8, 4
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--seed", args.seed, "--device", "cpu"]

    base, t_base = stage("base", "sample.py", ["--model", args.model, "--eval", "builtin", "--limit",
                                               args.heldout_problems, "--n", 1, "--temperature", 0,
                                               "--max_new_tokens", args.max_new_tokens, *common], out / "base", print)
    sft, t_sft = stage("cold start", "sft.py", [
        "--model", args.model, "--data", "builtin", "--builtin_size", args.sft_examples, "--max_steps", args.sft_steps,
        "--batch_size", 16, "--lr", args.sft_lr, "--warmup_steps", min(5, args.sft_steps), "--eval_every", 0,
        "--heldout_problems", args.heldout_problems, *common], out / "sft", print)
    rl, t_rl = stage("RL", "grpo.py", [
        "--model", sft["final_checkpoint"], "--max_steps", args.grpo_steps, "--batch_size", args.batch_size,
        "--group_size", args.group_size, "--lr", args.grpo_lr, "--warmup_steps", min(3, args.grpo_steps),
        "--max_new_tokens", args.max_new_tokens, "--heldout_problems", args.heldout_problems, "--eval_every", 0,
        *common], out / "grpo", print, after=sft)

    base_acc = base["pass@1"]
    rows = [("SmolLM2-135M-Instruct as shipped", base_acc, "-", t_base),
            (f"cold-start SFT, {args.sft_examples} worked solutions x {args.sft_steps * 16 / args.sft_examples:.1f} "
             f"epochs", sft["heldout_acc"], sft["heldout_mean_length"], t_sft),
            (f"GRPO, {args.grpo_steps} steps x ({args.batch_size // args.group_size} prompts x {args.group_size})",
             rl["heldout_acc_after"], rl["heldout_mean_length_after"], t_rl)]
    lines = [f"| stage | held-out greedy accuracy ({args.heldout_problems} problems) | mean length | wall time |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {l if l == '-' else f'{l:.1f}'} | {t / 60:.1f} min |" for n, a, l, t in rows]
    lines.append(f"| whole recipe | | | {(t_base + t_sft + t_rl) / 60:.1f} min |")
    text = "\n".join(lines) + "\n"
    (out / "recipe.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
