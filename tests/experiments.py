"""The research claims the R1 recipe rests on, as experiments on the built-in arithmetic task: each one command that
runs the arms (the same seeds for every arm, at least two per arm) through the real scripts and writes a markdown
table and a PNG into --out. The README's "The papers' claims, measured here" section was made by these commands.

    python -m tests.experiments length_bias        # Dr. GRPO (Liu et al. 2025): lengths of correct / incorrect
    python -m tests.experiments dynamic_sampling   # DAPO: held-out accuracy per generated token, with and without
    python -m tests.experiments distilled          # DeepSeek-R1: RL on a distilled student, before / after
    python -m tests.experiments kl                 # the KL estimators k1 / k2 / k3 with --beta > 0
    python -m tests.experiments objectives         # GRPO, GSPO, CISPO, RLOO, REINFORCE++-baseline, 80/20 entropy (mu 2)
    python -m tests.experiments tools              # tool tasks: no-tool SFT, tool SFT, tool GRPO (tiny models)
    python -m tests.experiments concise            # Fatemi et al.: a second RL stage on sometimes-solved problems
    python -m tests.experiments knights_transfer   # Logic-RL: GRPO on knights, held-out knights and arithmetic
                                                   # (SmolLM2-135M-Instruct, --smollm2 DIR; README's run took 1.8 h)
    python -m tests.experiments smollm2_tools      # SmolLM2: tool SFT + GRPO with Python vs the same without tools
    python -m tests.experiments smollm2_lora       # SmolLM2: GRPO with LoRA from the recipe's SFT checkpoint
    python -m tests.experiments all --tiny         # every experiment with tiny settings (what the slow test runs)

Spread is reported as the half-range over seeds (mean +- (max - min) / 2). Needs matplotlib for the PNG.
"""
import argparse
import json
import math
import os
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


# ----------------------------------------------------------------------------------------------------
# 5. The policy-gradient menu (grpo.py's presets) side by side, with mu = 2 so that the ratio and the clip matter


OBJECTIVES = {"grpo": ["--loss", "grpo"], "gspo": ["--loss", "gspo"], "cispo": ["--loss", "cispo"],
              "rloo": ["--loss", "rloo"], "reinforce_pp_baseline": ["--loss", "reinforce_pp_baseline"],
              "grpo-top20-entropy": ["--loss", "grpo", "--top_entropy_quantile", 0.2]}


def objectives(args, out):
    every = 1 if args.tiny else 5
    chosen = {k: OBJECTIVES[k] for k in ("gspo", "grpo-top20-entropy")} if args.tiny else OBJECTIVES  # smoke test
    arms = {name: [run_script("grpo.py", [*grpo_base(args), *flags, "--mu", 2, "--seed", s, "--eval_every", every],
                              out / f"{name}-seed{s}") for s in args.seeds] for name, flags in chosen.items()}
    rows = []
    for name, runs in arms.items():
        train = [[x for x in r[0] if "entropy" in x] for r in runs]
        rows.append([name, spread([r[1]["heldout_acc_before"] for r in runs]),
                     spread([r[1]["heldout_acc_after"] for r in runs]),
                     spread([t[0]["entropy"] for t in train]), spread([t[-1]["entropy"] for t in train]),
                     spread([sum(x["clip_frac"] for x in t) / len(t) for t in train]),
                     spread([max(x["mismatch_k3"] for x in t) for t in train])])
    text = (f"{args.model}, built-in arithmetic, {args.steps} steps x 256 completions, --mu 2, seeds "
            f"{', '.join(map(str, args.seeds))}\n\n"
            + table(["arm", "held-out acc before", "held-out acc after", "entropy, first step", "entropy, last step",
                     "clip fraction (mean over steps)", "sampler/trainer k3 (max)"], rows))

    def plot(ax):
        for name, runs in arms.items():
            ax.plot(*mean_curve([r[0] for r in runs], "heldout_acc"), "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out greedy accuracy, mean of {len(args.seeds)} seeds")
    write(out, "objectives", text, plot)


# ----------------------------------------------------------------------------------------------------
# 6. Tool tasks on tiny models: the best no-tool policy, the tool SFT policy, and GRPO with the tool


TOOL_TASKS = {"tool_arithmetic": "builtin:tool_arithmetic", "search": "builtin:search"}


def tools(args, out):
    import tools as task_table
    sft_small = ["--max_steps", 4, "--builtin_size", 64, "--batch_size", 8] if args.tiny else []
    rows, curves = [], {}
    for name, task in list(TOOL_TASKS.items())[:1 if args.tiny else None]:
        checkpoint = task_table.TASKS[task].checkpoint
        if not Path(checkpoint).exists():
            print(f"{checkpoint} missing: skipping {task}")
            continue
        heldout = 16 if args.tiny else 500
        no_tool = run_script("sft.py", ["--data", task, "--step_fraction", 0, "--tools", "none", *sft_small,
                                        "--heldout_problems", heldout, "--device", "cpu"], out / f"{name}-no-tool-sft")[1]
        base = [*grpo_base(args)[2:], "--data", task, "--model", checkpoint, "--eval_every", 0]
        runs = [run_script("grpo.py", [*base, "--seed", s], out / f"{name}-grpo-seed{s}") for s in args.seeds]
        curves[name] = [r[0] for r in runs]
        calls = [[x["tool_calls_per_sample"] for x in r[0] if "tool_calls_per_sample" in x] for r in runs]
        rows.append([task, f"{no_tool['heldout_acc']:.3f}", spread([r[1]["heldout_acc_before"] for r in runs]),
                     spread([r[1]["heldout_acc_after"] for r in runs]), spread([c[0] for c in calls]),
                     spread([c[-1] for c in calls])])
    text = (f"held-out greedy accuracy ({16 if args.tiny else 500} problems); GRPO {args.steps} steps x 256 completions "
            f"from the committed tool SFT checkpoint, seeds {', '.join(map(str, args.seeds))}\n\n"
            + table(["task", "no-tool SFT policy (no tools)", "tool SFT policy", "after tool GRPO",
                     "tool calls / sample, first step", "last step"], rows))

    def plot(ax):
        for name, runs in curves.items():
            ax.plot(*mean_curve(runs, "tool_calls_per_sample"), label=f"{name}: tool calls per sample")
            ax.plot(*mean_curve(runs, "accuracy"), "--", label=f"{name}: sample accuracy")
        ax.set_xlabel("GRPO step")
    write(out, "tools", text, plot)


# ----------------------------------------------------------------------------------------------------
# 7. Concise reasoning (Fatemi et al. 2025): a second, short RL stage on the few problems solved only sometimes


def concise(args, out):
    import tools as task_table
    base = grpo_base(args)
    first = run_script("grpo.py", [*base, "--seed", 0, "--eval_every", 0], out / "stage1")[1]
    n_problems, samples = (32, 4) if args.tiny else (512, 8)
    pool = out / "train_problems.jsonl"  # the built-in training split as a file, prompts as the model saw them
    pool.write_text("".join(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n"
                            for p in task_table.task_problems("builtin", "train", n_problems, seed=7)))
    rates_dir = out / "pass_rates"
    stage("pass rates", "sample.py", ["--model", first["final_checkpoint"], "--eval", pool, "--prompt_template",
                                      "{question}", "--n", samples, "--temperature", 1.0, "--max_new_tokens", 64,
                                      "--device", "cpu"], rates_dir, print)
    rewards = {}
    for line in (rates_dir / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        rewards.setdefault(r["id"], []).append(r["reward"])
    problems = [json.loads(l) for l in pool.read_text().splitlines()]
    sometimes = [problems[i] for i, r in sorted(rewards.items()) if 0 < sum(r) < len(r)]
    (out / "sometimes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sometimes))
    steps = 2 if args.tiny else 10
    arm_data = {"sometimes-solved problems": out / "sometimes.jsonl", "all problems": "builtin"}
    arms = {name: [run_script("grpo.py", [*base, "--model", first["final_checkpoint"], "--data", data,
                                          "--prompt_template", "{question}", "--max_steps", steps, "--seed", s,
                                          "--eval_every", 0], out / f"{name.split()[0]}-seed{s}")[1]
                   for s in args.seeds] for name, data in arm_data.items()}
    rows = [[name, len(sometimes) if "sometimes" in name else "endless", spread([r["heldout_acc_before"] for r in runs]),
             spread([r["heldout_acc_after"] for r in runs]),
             spread([first["heldout_mean_length_after"]] * len(runs)),
             spread([r["heldout_mean_length_after"] for r in runs])] for name, runs in arms.items()]
    text = (f"first stage: GRPO from {args.model} (held-out {first['heldout_acc_after']:.3f}); {len(sometimes)} of "
            f"{n_problems} training problems solved by 1 to {samples - 1} of {samples} samples; second stage "
            f"{steps} steps, seeds {', '.join(map(str, args.seeds))}\n\n"
            + table(["second stage on", "problems", "held-out acc before", "after", "held-out mean length before",
                     "after"], rows))

    def plot(ax):
        for i, (name, runs) in enumerate(arms.items()):
            for j, r in enumerate(runs):
                ax.plot([r["heldout_mean_length_after"]], [r["heldout_acc_after"]], "o", color=f"C{i}",
                        label=name if j == 0 else None)
        ax.plot([first["heldout_mean_length_after"]], [first["heldout_acc_after"]], "k*", label="after stage 1")
        ax.set_xlabel("held-out mean completion length (tokens)")
        ax.set_ylabel("held-out greedy accuracy")
    write(out, "concise", text, plot)


# ----------------------------------------------------------------------------------------------------
# 8-10. On the real SmolLM2-135M-Instruct (--smollm2): tools against no tools, LoRA, and transfer from logic puzzles


def smollm2_stages(args, out, name, data, sft_flags=(), grpo_flags=(), seed=0, sft_from=None, rl_name=None,
                   tokens=None):
    """The recipe's cold start (sft.py on a few hundred worked solutions of `data`) and GRPO from it, on SmolLM2:
    (SFT summary, (GRPO metrics, GRPO summary)); each stage kept when it finished before with the same command."""
    n = 16 if args.tiny else 400
    heldout = 8 if args.tiny else args.smollm2_heldout
    tokens = tokens or args.smollm2_tokens
    sft = sft_from or run_script("sft.py", [
        "--model", args.smollm2, "--data", data, "--builtin_size", n, "--max_steps", 2 if args.tiny else 50,
        "--batch_size", 16, "--lr", 1e-4, "--warmup_steps", 2 if args.tiny else 5, "--eval_every", 0,
        "--heldout_problems", heldout, "--max_new_tokens", tokens, "--seed", 0, "--device", "cpu",
        *sft_flags], out / f"{name}-sft")[1]
    rl = run_script("grpo.py", [
        "--model", sft["final_checkpoint"], "--data", data, "--max_steps", 2 if args.tiny else args.smollm2_steps,
        "--batch_size", 8 if args.tiny else args.smollm2_batch, "--group_size", 4 if args.tiny else 8, "--lr", 5e-6,
        "--warmup_steps", 1 if args.tiny else 3, "--max_new_tokens", tokens, "--heldout_problems", heldout,
        "--eval_every", 0, "--seed", seed, "--device", "cpu", *grpo_flags], out / f"{rl_name or name}-grpo-seed{seed}")
    return sft, rl


def smollm2_tools(args, out):
    arms = {"with the python tool": ("tools", ["--step_fraction", 0.5], []),
            "without tools": ("no-tools", ["--step_fraction", 0, "--tools", "none"], ["--tools", "none"])}
    rows = []
    for label, (name, sft_flags, grpo_flags) in arms.items():
        sft, (metrics, rl) = smollm2_stages(args, out, name, "builtin:tool_arithmetic", sft_flags, grpo_flags)
        calls = [x.get("tool_calls_per_sample") for x in metrics if "reward" in x]
        rows.append([label, f"{sft['heldout_acc']:.3f}", f"{rl['heldout_acc_before']:.3f}",
                     f"{rl['heldout_acc_after']:.3f}", f"{calls[0] or 0:.2f} -> {calls[-1] or 0:.2f}"])
    text = (f"SmolLM2-135M-Instruct on builtin:tool_arithmetic, {args.smollm2_heldout} held-out problems, greedy\n\n"
            + table(["recipe", "after cold-start SFT", "GRPO before", "GRPO after", "tool calls / sample"], rows))
    write(out, "smollm2_tools", text, lambda ax: ax.bar([r[0] for r in rows], [float(r[3]) for r in rows],
                                                  label="held-out greedy accuracy after GRPO"))


def smollm2_lora(args, out):
    sft = run_script("sft.py", [
        "--model", args.smollm2, "--data", "builtin", "--builtin_size", 16 if args.tiny else 400,
        "--max_steps", 2 if args.tiny else 50, "--batch_size", 16, "--lr", 1e-4, "--warmup_steps", 2 if args.tiny else 5,
        "--eval_every", 0, "--heldout_problems", 8 if args.tiny else args.smollm2_heldout, "--seed", 0,
        "--device", "cpu"], out / "sft")[1]  # the recipe's cold start (tests/recipe_smollm2.py)
    rows = []
    for lr in args.lora_lrs:
        _, (metrics, rl) = smollm2_stages(args, out, f"lora-lr{lr}", "builtin", grpo_flags=[
            "--lora_rank", 16, "--lr", lr], sft_from=sft)
        rows.append([f"LoRA r 16 (all projections), lr {lr:g}", f"{rl['heldout_acc_before']:.3f}",
                     f"{rl['heldout_acc_after']:.3f}", f"{rl['wall_time_s'] / 60:.1f} min"])
    text = (f"GRPO from the recipe's cold-start SFT checkpoint (SmolLM2-135M-Instruct), {args.smollm2_steps} steps x "
            f"{args.smollm2_batch} completions, {args.smollm2_heldout} held-out problems\n\n"
            + table(["run", "held-out before", "held-out after", "wall time"], rows))
    write(out, "smollm2_lora", text, lambda ax: ax.bar([f"lr {lr:g}" for lr in args.lora_lrs], [float(r[2]) for r in rows],
                                                 label="held-out greedy accuracy after GRPO"))


def knights_transfer(args, out):
    arms = {"knights": ("builtin:knights", "builtin"), "arithmetic control": ("builtin", "builtin:knights")}
    tokens = 48 if args.tiny else 384  # room for the longest worked knights solution
    before, after = {}, {}  # (seed, task) and (arm, seed, task) -> greedy held-out accuracy
    for seed in args.seeds:
        sft = None
        for arm, (task, other) in arms.items():
            name = arm.split()[0]
            sft, (_, rl) = smollm2_stages(args, out, "knights", "builtin:knights", seed=seed, sft_from=sft,
                                          grpo_flags=["--data", task], rl_name=name,
                                          tokens=tokens)  # both arms from the knights cold start
            # grpo.py scores its own task before and after; the other task is scored here, after only: its "before"
            # is the other arm's (both arms start from the one cold-start checkpoint)
            before[seed, task], after[arm, seed, task] = rl["heldout_acc_before"], rl["heldout_acc_after"]
            after[arm, seed, other] = heldout_score(args, out / f"eval-{name}-after-seed{seed}",
                                                    rl["final_checkpoint"], other, tokens)
    rows = [[arm, seed, *(f"{x:.3f}" for task in ("builtin:knights", "builtin")
                          for x in (before[seed, task], after[arm, seed, task]))]
            for seed in args.seeds for arm in arms]
    text = (f"SmolLM2-135M-Instruct: cold-start SFT on knights worked solutions, then GRPO ({args.smollm2_steps} steps "
            f"x {args.smollm2_batch} completions) on knights or, as a control, on arithmetic; greedy accuracy on "
            f"{args.smollm2_heldout} held-out problems of both tasks (the trained task scored by grpo.py, the other by "
            f"sample.py --eval)\n\n"
            + table(["GRPO on", "seed", "knights before", "knights after", "arithmetic before", "arithmetic after"],
                    rows))

    def plot(ax):  # each run's held-out accuracy after GRPO on both tasks; the dashed lines are the cold start's
        x = range(len(rows))
        for i, (task, col) in enumerate((("knights", 3), ("arithmetic", 5))):
            ax.bar([k + 0.4 * i for k in x], [float(r[col]) for r in rows], width=0.4, color=f"C{i}",
                   label=f"{task}, after GRPO")
            ax.axhline(float(rows[0][col - 1]), color=f"C{i}", linestyle="--", label=f"{task}, cold start")
        ax.set_xticks([k + 0.2 for k in x], [f"on {r[0].split()[0]}\nseed {r[1]}" for r in rows], fontsize=8)
        ax.set_ylabel("held-out greedy accuracy")
    write(out, "knights_transfer", text, plot)


def heldout_score(args, out, model, task, tokens):
    """Greedy held-out accuracy of a checkpoint on a built-in task (sample.py --eval)."""
    summary, _ = stage(f"eval {task}", "sample.py", [
        "--model", model, "--eval", task, "--limit", 8 if args.tiny else args.smollm2_heldout, "--n", 1,
        "--temperature", 0, "--max_new_tokens", tokens, "--device", "cpu"],
        out / task.replace(":", "_"), print)
    return summary["pass@1"]


EXPERIMENTS = {"length_bias": length_bias, "dynamic_sampling": dynamic_sampling, "distilled": distilled, "kl": kl,
               "objectives": objectives, "tools": tools, "concise": concise, "smollm2_tools": smollm2_tools,
               "smollm2_lora": smollm2_lora, "knights_transfer": knights_transfer}
SMOLLM2 = ("smollm2_tools", "smollm2_lora", "knights_transfer")  # not in `all`: hours on a CPU


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="which experiment to run")
    p.add_argument("--model", default="checkpoints/tiny-sft", help="the policy every arm starts from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, the same for every arm (>= 2)")
    p.add_argument("--steps", type=int, default=25, help="GRPO steps per arm (batch 256 = 32 prompts x 8)")
    p.add_argument("--beta", type=float, default=0.1, help="kl: the KL coefficient")
    p.add_argument("--tiny", action="store_true", help="2 steps x 16 completions, 16 held-out problems (a smoke test)")
    p.add_argument("--smollm2", default=os.environ.get("SMOLLM2_DIR", os.path.expanduser("~/.cache/smollm2-135m-instruct")),
                   help="SmolLM2-135M-Instruct folder (tests/make_smollm2.py), for the smollm2_* and knights experiments")
    p.add_argument("--smollm2_steps", type=int, default=30, help="GRPO steps on SmolLM2")
    p.add_argument("--smollm2_batch", type=int, default=64, help="completions per GRPO step on SmolLM2 (groups of 8)")
    p.add_argument("--smollm2_heldout", type=int, default=200, help="held-out problems of the SmolLM2 experiments")
    p.add_argument("--smollm2_tokens", type=int, default=96, help="--max_new_tokens of the SmolLM2 experiments")
    p.add_argument("--lora_lrs", type=float, nargs="+", default=[5e-5], help="smollm2_lora: the learning rates tried")
    p.add_argument("--out", default="out/experiments", help="folder for every arm's run, the tables and PNGs")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds: at least two seeds per arm, so that the spread can be reported")
    if args.tiny:
        args.steps = 2
    for name in ([e for e in EXPERIMENTS if e not in SMOLLM2] if args.experiment == "all" else [args.experiment]):
        out = Path(args.out).resolve() / name  # the scripts run from the project folder
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name}")
        EXPERIMENTS[name](args, out)


if __name__ == "__main__":
    main()
