"""Seconds per GRPO step: grpo.py next to TRL's GRPOTrainer, same model, same batch, same machine, one process.

    pip install trl                      # the benchmark's only extra; never needed by the scripts
    python -m tests.bench_grpo --model ~/.cache/smollm2-135m-instruct
    python -m tests.bench_grpo --model DIR --device cuda
    python -m tests.bench_grpo --model DIR --train_only      # training tokens/s only, no TRL needed

Batch: 8 prompts x 4 completions, 64 prompt tokens and exactly 64 completion tokens each (no stop token), beta 0,
one optimisation iteration, float32 on CPU (bf16 autocast on GPU for both). Rewards are random so every group has
a non-zero advantage. Prints the median step time over --steps steps after one warm-up step, split into
generation and the rest (scoring and training). --train_only times the training part alone on one fixed batch:
a plain torch forward + backward (cross-entropy on the logits), the lean log-prob path (model(x, targets=y),
logits never kept), a plain training step (forward + backward, clip, AdamW) and grpo.policy_loss_step, in completion
tokens/s, median of 4 rounds that run every variant in turn.
"""
import argparse
import random
import statistics
import tempfile
import time

import torch

import grpo
from common import Run
from model import Tokenizer, Transformer
from sample import Rollout, generate


def prompts_of_64_tokens(tokenizer, n, seed=0):
    rng = random.Random(seed)
    words = "the a of to and in is that for it as with was on be by this are at from or have an they which".split()
    out = []
    while len(out) < n:
        text = " ".join(rng.choice(words) for _ in range(80))
        ids = tokenizer.encode(text)[:64]
        out.append(ids)
    return out


def time_ours(args, policy, tokenizer, prompts):
    """One GRPO step = generate G completions per prompt, score, one clipped policy-gradient update."""
    run_args = grpo.parse_args(["--group_size", "4", "--batch_size", "32", "--max_new_tokens", "64", "--lr", "1e-6",
                                "--micro_batch_tokens", "4096", "--device", args.device,
                                "--out", tempfile.mkdtemp(), "--overwrite"])
    run = Run(run_args, "bench")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    never = [policy.config.vocab_size + 1]  # no stop token: every completion is exactly 64 tokens

    def step():
        t0 = time.perf_counter()
        group_prompts = [p for p in prompts for _ in range(4)]
        with run.autocast():
            records = generate(policy, group_prompts, 64, temperature=1.0, stop_token_ids=never)
        sync(args.device)
        t_gen = time.perf_counter() - t0
        grpo.policy_loss_step(run, run_args, policy, None, optimizer, records, torch.rand(32).tolist(), 1e-6)
        sync(args.device)
        return time.perf_counter() - t0, t_gen

    return [step() for _ in range(args.steps + 1)][1:]


def time_training(args, policy, prompts, rows=16, new_tokens=64, steps=4):
    """Completion tokens/s of one training forward + backward on `rows` sequences: plain logits + cross-entropy,
    the log-prob path, and a whole grpo.policy_loss_step (optimizer step included)."""
    import torch.nn.functional as F
    run_args = grpo.parse_args(["--group_size", "4", "--batch_size", str(rows), "--max_new_tokens", str(new_tokens),
                                "--micro_batch_tokens", "100000", "--device", args.device,
                                "--out", tempfile.mkdtemp(), "--overwrite"])
    run = Run(run_args, "bench")
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, policy.config.vocab_size, (new_tokens,), generator=g).tolist() for _ in range(rows)]
    group_prompts = [prompts[i // 4 % len(prompts)] for i in range(rows)]
    x = torch.tensor([p + c for p, c in zip(group_prompts, completions)], device=args.device)
    s = len(group_prompts[0]) - 1
    inp, y = x[:, :-1], x[:, s + 1:]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    records = [Rollout(p, c, [1] * len(c), [0.0] * len(c), "eos") for p, c in zip(group_prompts, completions)]
    rewards = torch.rand(rows, generator=g).tolist()
    def plain_step():
        F.cross_entropy(policy(inp, logits_from=s).flatten(0, 1).float(), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
    variants = {
        "plain forward+backward (logits, cross-entropy)":
            lambda: F.cross_entropy(policy(inp, logits_from=s).flatten(0, 1).float(), y.flatten()).backward(),
        "log-prob path forward+backward (model(x, targets=y))":
            lambda: policy(inp, targets=y, logits_from=s)[0].mean().neg().backward(),
        "plain training step (forward+backward, clip, AdamW step)": plain_step,
        "grpo.policy_loss_step (log-prob path, clip, AdamW step)":
            lambda: grpo.policy_loss_step(run, run_args, policy, None, optimizer, records, rewards, 0.0)}
    times = {name: [] for name in variants}
    for r in range(steps + 1):  # rounds of every variant in turn, so drift over time hits them all alike
        for name, fn in variants.items():
            sync(args.device)
            t0 = time.perf_counter()
            with run.autocast():
                fn()
            sync(args.device)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            policy.zero_grad(set_to_none=True)
    return {name: rows * new_tokens / statistics.median(t) for name, t in times.items()}


def time_trl(args, tokenizer_dir, prompts_text):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    gen_time, steps = [0.0], []
    original_generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = original_generate(*a, **kw)
        sync(args.device)
        gen_time[0] += time.perf_counter() - t0
        return out
    model.generate = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            gen_time[0], self.t0 = 0.0, time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync(args.device)
            steps.append((time.perf_counter() - self.t0, gen_time[0]))

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, num_generations=4,
                        max_completion_length=64, max_steps=args.steps + 1, learning_rate=1e-6, beta=0.0,
                        logging_steps=1000, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                        bf16=args.device != "cpu", temperature=1.0, generation_kwargs={"min_new_tokens": 64},
                        dataloader_num_workers=0, seed=0)
    data = Dataset.from_list([{"prompt": t} for t in prompts_text * (args.steps + 2)])
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [random.random() for _ in completions],
                          args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return steps[1:]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder (SmolLM2-135M architecture in the README)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--train_only", action="store_true", help="time the training step's parts only (no TRL)")
    args = p.parse_args()
    tokenizer = Tokenizer.from_pretrained(args.model)
    prompts = prompts_of_64_tokens(tokenizer, 8)
    policy = Transformer.from_pretrained(args.model, dtype=torch.float32, device=args.device)
    if args.train_only:
        print("\n| training pass (16 x (64 prompt + 64 completion) tokens) | completion tokens/s |\n|---|---|")
        for name, speed in time_training(args, policy, prompts).items():
            print(f"| {name} | {speed:.0f} |")
        return
    ours = time_ours(args, policy, tokenizer, prompts)
    del policy
    theirs = time_trl(args, args.model, [tokenizer.decode(ids) for ids in prompts])
    print("\n| trainer | s/step | generation s | scoring + training s |")
    print("|---|---|---|---|")
    for name, rows in (("grpo.py", ours), ("TRL GRPOTrainer", theirs)):
        total, gen = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"| {name} | {total:.2f} | {gen:.2f} | {total - gen:.2f} |")
    print(f"\nspeed-up: {statistics.median(r[0] for r in theirs) / statistics.median(r[0] for r in ours):.2f}x")


if __name__ == "__main__":
    main()
