"""The research claims the R1 recipe rests on, as experiments on the built-in arithmetic task: each one command that
runs the arms (the same seeds for every arm, at least two per arm) through the real scripts and writes a markdown
table and a PNG into --out. The README's "The papers' claims, measured here" section was made by these commands.

    python -m tests.experiments length_bias        # Dr. GRPO (Liu et al. 2025): lengths of correct / incorrect
    python -m tests.experiments dynamic_sampling   # DAPO: held-out accuracy per generated token, with and without
    python -m tests.experiments distilled          # DeepSeek-R1: RL on a distilled student, before / after
    python -m tests.experiments kl                 # the KL estimators k1 / k2 / k3 with --beta > 0
    python -m tests.experiments all --tiny         # every experiment with tiny settings (what the slow test runs)

Spread is reported as the half-range over seeds (mean +- (max - min) / 2). Needs matplotlib for the PNG.
"""
import argparse
import json
import math
from pathlib import Path

from tests.recipe_smollm2 import stage


def run_script(script, args, out, after=None):
    """One arm of an experiment: a script run to completion in its own process (recipe_smollm2.stage: kept when
    it finished before with the same command); its metrics rows and summary."""
    summary, _ = stage(Path(out).name, script, args, out, print, after)
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()], summary


def spread(values):
    """'mean +- half-range' of a list of per-seed numbers (None entries skipped)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f} +- {(max(values) - min(values)) / 2:.3f}"


def mean_curve(runs, key, x="step"):
    """The per-step mean over seeds of metric `key` (x values from the first seed; steps where a seed has no value
    are skipped)."""
    per_seed = [{r[x]: r[key] for r in rows if r.get(key) is not None} for rows in runs]
    xs = sorted(set.intersection(*(set(p) for p in per_seed)))
    return xs, [sum(p[s] for p in per_seed) / len(per_seed) for s in xs]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def write(out, name, text, plot):
    """The experiment's table (printed and written to NAME.md) and its figure (NAME.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (out / f"{name}.md").write_text(text)
    print(text)
    fig, ax = plt.subplots(figsize=(7, 4))
    plot(ax)
    ax.legend(fontsize=8)
    fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out / name}.md and {out / name}.png")


def grpo_base(args):
    steps, batch = (2, 16) if args.tiny else (args.steps, 256)
    heldout = 16 if args.tiny else 500
    return ["--model", args.model, "--max_steps", steps, "--batch_size", batch, "--heldout_problems", heldout,
            "--device", "cpu"]


# ----------------------------------------------------------------------------------------------------
# 1. Length bias (Liu et al. 2025): the per-sequence token mean of GRPO lets long wrong answers cost less per token


def length_bias(args, out):
    room = 32 if args.tiny else 160  # room to grow: 2.5x the default --max_new_tokens
    arms = {loss: [run_script("grpo.py", [*grpo_base(args), "--loss", loss, "--max_new_tokens", room, "--seed", s,
                                          "--eval_every", 0], out / f"{loss}-seed{s}")
                   for s in args.seeds] for loss in ("grpo", "dr_grpo", "dapo")}
    rows = []
    for loss, runs in arms.items():
        last = [[x for x in r[0] if "completion_len_mean" in x][-1] for r in runs]
        first = [[x for x in r[0] if "completion_len_mean" in x][0] for r in runs]
        rows.append([loss, spread([f["completion_len_incorrect"] for f in first]),
                     spread([l["completion_len_incorrect"] for l in last]),
                     spread([f["completion_len_correct"] for f in first]),
                     spread([l["completion_len_correct"] for l in last]),
                     spread([r[1]["heldout_acc_after"] for r in runs])])
    text = table(["--loss", "incorrect len, first step", "incorrect len, last step", "correct len, first step",
                  "correct len, last step", "held-out acc after"], rows)

    def plot(ax):
        for loss, runs in arms.items():
            rows_ = [r[0] for r in runs]
            line, = ax.plot(*mean_curve(rows_, "completion_len_incorrect"), label=f"{loss}: incorrect")
            ax.plot(*mean_curve(rows_, "completion_len_correct"), "--", color=line.get_color(), label=f"{loss}: correct")
        ax.set_xlabel("step")
        ax.set_ylabel(f"mean completion length (tokens), mean of {len(args.seeds)} seeds")
    write(out, "length_bias", text, plot)


# ----------------------------------------------------------------------------------------------------
# 2. Dynamic sampling (DAPO): all-equal groups carry no gradient; resampling them costs tokens


def dynamic_sampling(args, out):
    every = 1 if args.tiny else 5
    arms = {ds: [run_script("grpo.py", [*grpo_base(args), "--loss", "dapo", "--dynamic_sampling", ds, "--seed", s,
                                        "--eval_every", every], out / f"ds{ds}-seed{s}")
                 for s in args.seeds] for ds in (0, 1)}
    cumulative = {}
    for ds, runs in arms.items():
        cumulative[ds] = []
        for rows, _ in runs:
            total, curve = 0, [(0, rows[0]["heldout_acc"])]
            for r in rows[1:]:
                total += r.get("generated_tokens", 0)
                if "heldout_acc" in r:
                    curve.append((total, r["heldout_acc"]))
            cumulative[ds].append(curve)
    rows = [[f"dapo, dynamic sampling {'on' if ds else 'off'}", spread([r[1]["heldout_acc_after"] for r in runs]),
             spread([c[-1][0] / 1e6 for c in cumulative[ds]]),
             spread([(r[1]["heldout_acc_after"] - r[1]["heldout_acc_before"]) / (c[-1][0] / 1e6)
                     for r, c in zip(runs, cumulative[ds])]),
             spread([sum(x["all_equal_groups_frac"] for x in r[0] if "all_equal_groups_frac" in x) / args.steps
                     for r in runs])]
            for ds, runs in arms.items()]
    text = table(["arm", "held-out acc after", "generated tokens (M)", "acc gain per M tokens",
                  "all-equal groups (mean frac)"], rows)

    def plot(ax):
        for ds, curves in cumulative.items():
            for i, c in enumerate(curves):
                ax.plot([t / 1e6 for t, _ in c], [a for _, a in c], "o-", color=f"C{ds}", alpha=0.8,
                        label=f"dynamic sampling {'on' if ds else 'off'}" if i == 0 else None)
        ax.set_xlabel("generated tokens (millions, dropped groups included)")
        ax.set_ylabel("held-out greedy accuracy")
    write(out, "dynamic_sampling", text, plot)


# ----------------------------------------------------------------------------------------------------
# 3. RL on a distilled student (DeepSeek-R1 section 4.1; the "sober look" caveat: gains within seed noise)


def two_proportion_z(p1, p2, n):
    """z of the difference of two accuracies on the same n problems, each a binomial proportion."""
    se = math.sqrt(max(p1 * (1 - p1) + p2 * (1 - p2), 1e-12) / n)
    return (p2 - p1) / se


def distilled(args, out):
    base = grpo_base(args)
    teacher = run_script("grpo.py", [*base, "--seed", 0, "--eval_every", 0], out / "teacher")[1]
    small = ["--num_prompts", 32, "--samples_per_prompt", 2, "--max_steps", 2, "--batch_size", 8] if args.tiny else []
    student = run_script("distill.py", ["--teacher", teacher["final_checkpoint"], *small, "--heldout_problems",
                                        base[base.index("--heldout_problems") + 1], "--device", "cpu"],
                         out / "student", after=teacher)[1]
    runs = [run_script("grpo.py", [*base, "--model", student["final_checkpoint"], "--seed", s, "--eval_every", 0],
                       out / f"rl-seed{s}", after=student)[1] for s in args.seeds]
    n = runs[0]["heldout_problems"]
    rows = [[s, f"{r['heldout_acc_before']:.3f}", f"{r['heldout_acc_after']:.3f}",
             f"{r['heldout_acc_after'] - r['heldout_acc_before']:+.3f}",
             f"{two_proportion_z(r['heldout_acc_before'], r['heldout_acc_after'], n):.1f}"]
            for s, r in zip(args.seeds, runs)]
    gains = [r["heldout_acc_after"] - r["heldout_acc_before"] for r in runs]
    rows.append(["all seeds", spread([r["heldout_acc_before"] for r in runs]), spread([r["heldout_acc_after"] for r in runs]),
                 spread(gains), "-"])
    significant = all(two_proportion_z(r["heldout_acc_before"], r["heldout_acc_after"], n) > 1.96 for r in runs)
    text = (f"teacher (GRPO from {args.model}): held-out {teacher['heldout_acc_after']:.3f}; distilled student "
            f"({student.get('mode', 'traces')}): {runs[0]['heldout_acc_before']:.3f}\n\n"
            + table(["seed", "student before RL", "after RL", "gain", "z (two-proportion, n=%d)" % n], rows)
            + f"\nsignificant at 5% on every seed (z > 1.96): {'yes' if significant else 'no'}; gain spread over "
              f"seeds {spread(gains)}\n")

    def plot(ax):
        for i, (s, r) in enumerate(zip(args.seeds, runs)):
            ax.plot([0, 1], [r["heldout_acc_before"], r["heldout_acc_after"]], "o-", label=f"student + GRPO, seed {s}")
        ax.axhline(teacher["heldout_acc_after"], color="gray", ls="--", label="teacher")
        ax.set_xticks([0, 1], ["distilled student", "after GRPO"])
        ax.set_ylabel("held-out greedy accuracy")
    write(out, "distilled", text, plot)


# ----------------------------------------------------------------------------------------------------
# 4. The KL estimators (Schulman 2020) with --beta > 0


def kl(args, out):
    arms = {k: [run_script("grpo.py", [*grpo_base(args), "--beta", args.beta, "--kl_estimator", k, "--seed", s,
                                       "--eval_every", 0], out / f"{k}-seed{s}")
                for s in args.seeds] for k in ("k1", "k2", "k3")}
    rows = []
    for k, runs in arms.items():
        train = [[x for x in r[0] if "kl" in x] for r in runs]
        rows.append([k, spread([t[-1]["kl"] for t in train]), spread([min(x["kl"] for x in t) for t in train]),
                     spread([max(x["kl"] for x in t) for t in train]),
                     spread([max(x["grad_norm"] for x in t) for t in train]),
                     sum(x["skipped"] for t in train for x in t), spread([r[1]["heldout_acc_after"] for r in runs])])
    text = (f"--beta {args.beta}; the logged kl is the estimator's own per-token mean\n\n"
            + table(["estimator", "kl, last step", "kl, min over steps", "kl, max over steps", "max grad norm",
                     "skipped steps", "held-out acc after"], rows))

    def plot(ax):
        for k, runs in arms.items():
            ax.plot(*mean_curve([r[0] for r in runs], "kl"), label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(f"per-token KL estimate, mean of {len(args.seeds)} seeds")
    write(out, "kl", text, plot)


EXPERIMENTS = {"length_bias": length_bias, "dynamic_sampling": dynamic_sampling, "distilled": distilled, "kl": kl}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="which experiment to run")
    p.add_argument("--model", default="checkpoints/tiny-sft", help="the policy every arm starts from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, the same for every arm (>= 2)")
    p.add_argument("--steps", type=int, default=25, help="GRPO steps per arm (batch 256 = 32 prompts x 8)")
    p.add_argument("--beta", type=float, default=0.1, help="kl: the KL coefficient")
    p.add_argument("--tiny", action="store_true", help="2 steps x 16 completions, 16 held-out problems (a smoke test)")
    p.add_argument("--out", default="out/experiments", help="folder for every arm's run, the tables and PNGs")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds: at least two seeds per arm, so that the spread can be reported")
    if args.tiny:
        args.steps = 2
    for name in (EXPERIMENTS if args.experiment == "all" else [args.experiment]):
        out = Path(args.out).resolve() / name  # the scripts run from the project folder
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name}")
        EXPERIMENTS[name](args, out)


if __name__ == "__main__":
    main()
