"""Peak memory (RSS) of GRPO steps on a real checkpoint, full fine-tuning next to LoRA, each arm a grpo.py run in a
child process of its own (its peak read with getrusage at its exit):

    python -m tests.bench_lora_memory --model ~/.cache/smollm2-135m-instruct        # CPU, a few minutes

The full run holds float32 weights, their gradients and two AdamW moments (16 bytes per parameter) and, with
--beta > 0, a float32 reference model; the LoRA run the same weights frozen (4 bytes; bf16 on CUDA), the adapters'
states, and no reference (the base with the adapters switched off is the reference).
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = ("import atexit, resource, runpy, sys\n"
        "atexit.register(lambda: print(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', "
        "file=sys.stderr))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def peak_rss_gb(argv):
    """Run grpo.py with argv in a child process -> its peak resident memory (GB)."""
    proc = subprocess.run([sys.executable, "-c", PEAK, "grpo.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    line = next(l for l in proc.stderr.splitlines() if l.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/smollm2-135m-instruct"), help="a checkpoint folder")
    p.add_argument("--steps", type=int, default=2, help="GRPO steps per arm")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (the full run loads a reference)")
    args = p.parse_args()
    common = ["--model", args.model, "--max_steps", args.steps, "--batch_size", 32, "--group_size", 8,
              "--max_new_tokens", 64, "--heldout_problems", 8, "--eval_every", 0, "--beta", args.beta,
              "--device", "cpu"]
    rows = []
    for name, extra in (("full fine-tuning", []), ("LoRA r 16, all projections", ["--lora_rank", 16, "--lr", 5e-5])):
        with tempfile.TemporaryDirectory() as out:
            rows.append((name, peak_rss_gb([*map(str, common), *map(str, extra), "--out", out])))
    print(f"\n| GRPO, {Path(args.model).name}, CPU float32, --beta {args.beta} | peak RSS |\n|---|---|")
    for name, gb in rows:
        print(f"| {name} | {gb:.2f} GB |")


if __name__ == "__main__":
    main()
