r"""GRPO, Dr. GRPO and DAPO: reinforcement learning with verifiable rewards (DeepSeek-R1-Zero style).

Each step samples G completions for each of a batch of prompts, scores them with verify.py (or a reward model),
turns each group's rewards into advantages, and takes clipped policy-gradient steps.

CPU, no arguments: the committed tiny checkpoint on the built-in arithmetic task (a few minutes), printing
held-out greedy accuracy before and after:
    python grpo.py
8 GPUs (the --batch_size counts completions over all GPUs; here 64 prompts x 8 samples per step):
    torchrun --nproc_per_node=8 grpo.py --model Qwen2.5-1.5B-Instruct --data gsm8k_train.jsonl \
        --heldout_data gsm8k_test.jsonl --loss dr_grpo --batch_size 512 --group_size 8 --lr 1e-6 \
        --max_new_tokens 1024 --max_steps 500 --micro_batch_tokens 32768 --grad_checkpointing --save_every 50
    bash train_ddp.sh grpo.py 8 --model ... (same flags)

Loss variants (--loss), one code path with these differences:
  grpo     A_i = (r_i - mean(r)) / (std(r) + eps); per-sequence token mean, then mean over sequences
           (Shao et al. 2024, DeepSeekMath)
  dr_grpo  A_i = r_i - mean(r) (no std); token sum divided by a constant, batch size x max_new_tokens
           (Liu et al. 2025, "Understanding R1-Zero-like training")
  dapo     std-normalised A; token mean over the whole batch; clip-higher (epsilon_high); dynamic sampling
           drops groups whose rewards are all equal; soft overlong penalty (Yu et al. 2025, DAPO)
"""
import argparse
import json
import math
import os
import random
import time

import torch
from tqdm import tqdm

import verify
from model import token_entropy, token_logprobs
from sample import PROMPT_TEMPLATE, drop_long_prompts, generate, templated_problems
from sft import (Run, add_training_args, builtin_problems, checkpoint_or_stop, first_loss_position, heldout_accuracy,
                 load_frozen, load_model, lr_at, make_optimizer, micro_batches, optimizer_step, prompt_ids, resume,
                 save_checkpoint)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/tiny-sft", help="policy to start from (Hugging Face folder)")
    p.add_argument("--ref_model", default=None, help="frozen reference for the KL term (default: --model)")
    p.add_argument("--reward_model", default=None, help="a reward_model.py folder: its score is added to the reward")
    p.add_argument("--data", default="builtin", help="problems JSONL (prompt/answer, GSM8K or MATH), or 'builtin'")
    p.add_argument("--heldout_data", default=None, help="held-out problems JSONL (default: built-in held-out)")
    p.add_argument("--heldout_problems", type=int, default=500, help="held-out problems for greedy accuracy")
    p.add_argument("--prompt_template", default=PROMPT_TEMPLATE, help="how a --data problem becomes the user turn")
    p.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"], default="grpo", help="loss variant (see above)")
    p.add_argument("--group_size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--mu", type=int, default=1, help="optimisation iterations per rollout batch")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range: ratio in [1 - eps, 1 + eps_high]")
    p.add_argument("--epsilon_high", type=float, default=None, help="upper clip (default: --epsilon; dapo: 0.28)")
    p.add_argument("--beta", type=float, default=0.0, help="KL(pi || pi_ref) coefficient, k3 estimator; 0 skips "
                   "the reference model")
    p.add_argument("--max_new_tokens", type=int, default=64, help="completion length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--top_p", type=float, default=None, help="rollout nucleus sampling")
    p.add_argument("--accuracy_weight", type=float, default=1.0, help="weight of verify.math_reward")
    p.add_argument("--format_weight", type=float, default=0.1, help="weight of verify.format_reward")
    p.add_argument("--strict_format", action="store_true", help="use verify.strict_format_reward (un-gameable)")
    p.add_argument("--language_weight", type=float, default=0.0, help="weight of the language-consistency reward")
    p.add_argument("--language", default="en", help="target language of the chain of thought")
    p.add_argument("--length_reward", choices=["none", "cosine", "kimi", "lcpo", "lcpo_max"], default="none",
                   help="length shaping from verify.py (cosine replaces the accuracy reward)")
    p.add_argument("--target_length", type=int, default=0, help="lcpo / lcpo_max token budget")
    p.add_argument("--overlong_cache", type=int, default=None, help="DAPO soft overlong penalty window (tokens); "
                   "default: 0 (off), dapo: max_new_tokens // 4")
    p.add_argument("--mask_truncated", action="store_true", help="no loss on completions that hit max_new_tokens")
    p.add_argument("--dynamic_sampling", type=int, default=None, help="drop all-equal groups and resample (1/0; "
                   "default: on for dapo)")
    p.add_argument("--max_sampling_rounds", type=int, default=3, help="dynamic sampling: rollout rounds per step")
    p.add_argument("--eval_every", type=int, default=5, help="held-out accuracy every N steps (0: start and end)")
    add_training_args(p, "grpo", lr=1e-4, max_steps=25, batch_size=256)
    args = p.parse_args(argv)
    dapo = args.loss == "dapo"
    args.epsilon_high = args.epsilon_high if args.epsilon_high is not None else (0.28 if dapo else args.epsilon)
    args.dynamic_sampling = bool(dapo if args.dynamic_sampling is None else args.dynamic_sampling)
    args.overlong_cache = args.overlong_cache if args.overlong_cache is not None else (args.max_new_tokens // 4 if dapo else 0)
    if args.batch_size % args.group_size:
        p.error(f"--batch_size {args.batch_size} is not divisible by --group_size {args.group_size}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (args.batch_size // args.group_size) % world:
        p.error(f"--batch_size {args.batch_size} / --group_size {args.group_size} = {args.batch_size // args.group_size}"
                f" prompts per step cannot be split evenly over {world} processes")
    return args


# ----------------------------------------------------------------------------------------------------
# The algorithm: small pure functions on tensors


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps) (DeepSeekMath); without the std when not scale
    (Dr. GRPO). rewards [N] with each group's G samples adjacent -> [N]."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def kl_k3(logp, ref_logp):
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 (Schulman 2020): unbiased for KL(pi || pi_ref), always >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high):
    """PPO's per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with rho = pi / pi_old
    (Schulman et al. 2017; eps_high > eps_low is DAPO's clip-higher). Also returns where the clip is active."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def aggregate(per_token, mask, loss, n_seqs, n_tokens, max_len):
    """Reduce a [B, T] per-token loss to this micro-batch's share of the step's loss. The normalisers count the
    whole step (all micro-batches and ranks) so that gradient accumulation is exact:
      grpo     1/N sum_i 1/|o_i| sum_t l_it          (each sequence weighs the same: long ones dilute per token)
      dr_grpo  1/(N L_max) sum_i sum_t l_it          (every token weighs the same, fixed normaliser)
      dapo     1/(sum_i |o_i|) sum_i sum_t l_it      (every token in the batch weighs the same)"""
    if loss == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if loss == "dr_grpo":
        return (per_token * mask).sum() / (n_seqs * max_len)
    return (per_token * mask).sum() / n_tokens


def all_equal_groups(rewards, group_size):
    """[N] rewards -> [N / G] bool: groups whose rewards are all equal (zero advantage, no signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


# ----------------------------------------------------------------------------------------------------
# Rewards


def compute_rewards(args, problems, completions, lengths, truncated, reward_model=None, prompts_text=None):
    """Per-completion reward components (each a list of floats) and their weighted total. A verifier that raises
    gives 0 for that sample with a warning (verify.safe_reward); verify.is_equiv has its own hard timeout."""
    acc = [verify.safe_reward(verify.math_reward, c, p["answer"]) for c, p in zip(completions, problems)]
    fmt_fn = verify.strict_format_reward if args.strict_format else verify.format_reward
    parts = {"accuracy": acc, "format": [verify.safe_reward(fmt_fn, c) for c in completions]}
    total = [args.accuracy_weight * a + args.format_weight * f for a, f in zip(acc, parts["format"])]
    if args.length_reward == "cosine":  # replaces the 0/1 accuracy term with a length-scaled one
        parts["length"] = [verify.cosine_length_reward(a > 0, n, args.max_new_tokens) for a, n in zip(acc, lengths)]
        total = [t - args.accuracy_weight * a + args.accuracy_weight * l for t, a, l in zip(total, acc, parts["length"])]
    elif args.length_reward == "kimi":
        G = args.group_size
        parts["length"] = [x for i in range(0, len(acc), G) for x in
                           verify.kimi_length_reward(lengths[i:i + G], [a > 0 for a in acc[i:i + G]])]
    elif args.length_reward in ("lcpo", "lcpo_max"):
        fn = verify.lcpo_reward if args.length_reward == "lcpo" else verify.lcpo_max_reward
        parts["length"] = [fn(a > 0, n, args.target_length) - a for a, n in zip(acc, lengths)]  # accuracy counted once
    if args.length_reward in ("kimi", "lcpo", "lcpo_max"):
        total = [t + l for t, l in zip(total, parts["length"])]
    if args.overlong_cache:
        parts["overlong"] = [verify.overlong_penalty(n + 1 if t else n, args.max_new_tokens, args.overlong_cache)
                             for n, t in zip(lengths, truncated)]  # a truncated answer counts as past the limit
        total = [t + o for t, o in zip(total, parts["overlong"])]
    if args.language_weight:
        parts["language"] = [verify.safe_reward(verify.language_consistency_reward, c, args.language) for c in completions]
        total = [t + args.language_weight * x for t, x in zip(total, parts["language"])]
    if reward_model is not None:
        parts["reward_model"] = reward_model.score(prompts_text, completions).tolist()
        total = [t + x for t, x in zip(total, parts["reward_model"])]
    return torch.tensor(total), parts


# ----------------------------------------------------------------------------------------------------
# Rollouts


def problems_for_step(args, run, data, step, round_):
    """This rank's prompts for a step: a function of (seed, step, round, rank) only, so a resumed run sees the
    same data as an uninterrupted one."""
    n = args.batch_size // args.group_size // run.world
    rng = random.Random(f"{args.seed}-{step}-{round_}-{run.rank}")
    return builtin_problems("train", n, seed=rng.randrange(2**31)) if data is None else rng.sample(data, n)


def sample_groups(args, run, policy, tokenizer, problems, seed):
    """Sample group_size completions per problem in one batched generate call (ppo.py's rollout too). Returns
    (problems repeated per sample, prompt ids, completion ids, truncated flags, completion texts)."""
    group_problems = [p for p in problems for _ in range(args.group_size)]
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in group_problems]
    with run.full_params(policy) as model, run.autocast():
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_token_ids=[tokenizer.eos_token_id], seed=seed)
    truncated = [not (o and o[-1] == tokenizer.eos_token_id) for o in outs]
    texts = [tokenizer.decode(o[:-1] if not t else o) for o, t in zip(outs, truncated)]
    return group_problems, prompts, outs, truncated, texts


def rollout(args, run, policy, tokenizer, problems, seed, reward_model=None):
    """Sample G completions per problem and score them. Returns a dict of lists."""
    group_problems, prompts, outs, truncated, texts = sample_groups(args, run, policy, tokenizer, problems, seed)
    rewards, parts = compute_rewards(args, group_problems, texts, [len(o) for o in outs], truncated,
                                     reward_model, [p["prompt"] for p in group_problems])
    return {"prompts": prompts, "completions": outs, "texts": texts, "truncated": truncated, "rewards": rewards,
            "parts": parts}


def fill_batch(args, run, policy, tokenizer, data, step, reward_model):
    """One step's rollouts. With dynamic sampling (DAPO) groups whose rewards are all equal are dropped and more
    prompts are sampled until the batch is full (at most --max_sampling_rounds rounds; then dropped groups
    fill the gap, with zero advantage)."""
    G, need = args.group_size, args.batch_size // args.group_size // run.world
    kept, dropped, n_equal, n_groups = [], [], 0, 0
    for round_ in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        problems = problems_for_step(args, run, data, step, round_)
        seed = random.Random(f"sample-{args.seed}-{step}-{round_}-{run.rank}").randrange(2**31)
        r = rollout(args, run, policy, tokenizer, problems, seed, reward_model)
        equal = all_equal_groups(r["rewards"], G).tolist()
        n_equal, n_groups = n_equal + sum(equal), n_groups + len(equal)
        for g, eq in enumerate(equal):
            group = {k: (v[g * G:(g + 1) * G] if k != "parts" else {c: x[g * G:(g + 1) * G] for c, x in v.items()})
                     for k, v in r.items()}
            (dropped if eq and args.dynamic_sampling else kept).append(group)
        if len(kept) >= need:
            break
    groups = (kept + dropped)[:need]
    batch = {k: [x for g in groups for x in g[k]] for k in ("prompts", "completions", "texts", "truncated")}
    batch["rewards"] = torch.cat([g["rewards"] for g in groups])
    batch["parts"] = {c: [x for g in groups for x in g["parts"][c]] for c in groups[0]["parts"]}
    batch["all_equal_frac"] = n_equal / n_groups
    return batch


# ----------------------------------------------------------------------------------------------------
# Training


def policy_loss_step(args, run, train_model, ref_model, optimizer, batch, lr):
    """mu optimisation iterations on one rollout batch. pi_old (and pi_ref) log-probs come from the trainer's own
    forward pass, computed once without gradient (for mu = 1, pi_old = pi_theta detached: the ratio is exactly 1)."""
    examples = [(p + c, [0] * len(p) + [0 if args.mask_truncated and t else 1] * len(c))
                for p, c, t in zip(batch["prompts"], batch["completions"], batch["truncated"])]
    adv = group_advantages(batch["rewards"], args.group_size, scale=args.loss != "dr_grpo").to(run.device)
    n_seqs = run.all_sum(len(examples))
    n_tokens = run.all_sum(sum(sum(m) for _, m in examples))
    chunks = []  # (rows, x, y, w, start): log-probs (and logits) only from the first completion token on
    for rows, x, y, w in micro_batches(examples, args.micro_batch_tokens, 0):
        start = first_loss_position(w)
        chunks.append((rows, x, y[:, start:], w[:, start:], start))
    stats = {"kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
    old, ref = [], []
    with torch.no_grad(), run.autocast(), run.full_params(train_model):  # FSDP: gathered once, not per chunk
        for rows, x, y, w, start in chunks:
            x, y = x.to(run.device), y.to(run.device)
            old.append(token_logprobs(train_model(x, logits_from=start), y) if args.mu > 1 else None)
            ref.append(token_logprobs(ref_model(x, logits_from=start), y) if ref_model is not None else None)
    for it in range(args.mu):
        for i, ((rows, x, y, w, start), sync) in enumerate(run.lockstep(chunks, train_model)):
            x, y, w = x.to(run.device), y.to(run.device), w.to(run.device)
            with run.no_sync(train_model, sync), run.autocast():
                logits = train_model(x, logits_from=start)  # [B, T - start, V]
                logp = token_logprobs(logits, y)  # [B, T]
                old_logp = old[i] if old[i] is not None else logp.detach()
                per_token, clipped = clipped_surrogate(logp, old_logp, adv[rows, None], args.epsilon, args.epsilon_high)
                if ref[i] is not None:
                    kl = kl_k3(logp, ref[i])
                    per_token = per_token + args.beta * kl
                    stats["kl"] += ((kl * w).sum() / n_tokens).item() / args.mu
                loss = aggregate(per_token, w, args.loss, n_seqs, n_tokens, args.max_new_tokens)
                (loss * run.world).backward()  # DDP averages over ranks; the normalisers already count all ranks
            stats["clip_frac"] += ((clipped * w).sum() / n_tokens).item() / args.mu
            if it == 0:
                with torch.no_grad():
                    stats["entropy"] += ((token_entropy(logits.detach()) * w).sum() / n_tokens).item()
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr)
    stats = {k: run.all_sum(v) for k, v in stats.items()}
    return {**stats, "grad_norm": grad_norm, "skipped": skipped}


def rl_problems(args, tokenizer, max_positions):
    """(training problems, or None for the built-in task's endless stream; held-out problems). Prompts that leave
    no room for --max_new_tokens within the context are dropped and counted."""
    data = None if args.data == "builtin" else drop_long_prompts(
        templated_problems(args.data, args.prompt_template), tokenizer, args.max_new_tokens, max_positions, args.data)
    if args.heldout_data is None:
        return data, builtin_problems("heldout", args.heldout_problems)
    heldout = templated_problems(args.heldout_data, args.prompt_template)[:args.heldout_problems]
    return data, drop_long_prompts(heldout, tokenizer, args.max_new_tokens, max_positions, args.heldout_data)


def heldout_before(run, args, policy, tokenizer, heldout, state):
    """Held-out greedy accuracy of the starting policy (kept in the checkpoint, so a resumed run reports it too)."""
    if state.get("heldout_acc_before") is not None:
        return state["heldout_acc_before"]
    acc, mean_len = heldout_accuracy(run, policy, tokenizer, heldout, args.max_new_tokens)
    run.print(f"held-out greedy accuracy before: {acc:.3f} (mean length {mean_len:.1f})")
    run.log(0, {"heldout_acc": acc, "heldout_mean_length": mean_len})
    return acc


def main(argv=None):
    args = parse_args(argv)
    run = Run(args, "grpo")
    policy, tokenizer = load_model(args.model, run)
    # beta = 0: no reference model at all (no memory, no forward pass)
    ref_model = load_frozen(args.ref_model or args.model, run) if args.beta > 0 else None
    reward_model = None
    if args.reward_model:
        from reward_model import load_reward_model
        reward_model = load_reward_model(args.reward_model, device=run.device, tokenizer_of_policy=tokenizer)
    data, heldout = rl_problems(args, tokenizer, policy.config.max_position_embeddings)

    train_model = run.wrap(policy)
    optimizer = make_optimizer(policy, args)
    state = resume(run, {"": policy}, {"policy": optimizer})
    step = state.get("step", 0)
    acc_before = heldout_before(run, args, policy, tokenizer, heldout, state)

    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc=f"{args.loss}")
    while step < args.max_steps:
        t0 = time.time()
        batch = fill_batch(args, run, policy, tokenizer, data, step, reward_model)
        t_gen = time.time() - t0
        stats = policy_loss_step(args, run, train_model, ref_model, optimizer, batch, lr_at(step, args))
        t_train = time.time() - t0 - t_gen
        step += 1
        lengths = torch.tensor([len(c) for c in batch["completions"]], dtype=torch.float)
        n = run.all_sum(len(lengths))
        rewards = batch["rewards"]
        metrics = {"reward": run.all_sum(rewards.sum().item()) / n,
                   "reward_std": math.sqrt(max(0.0, run.all_sum((rewards ** 2).sum().item()) / n
                                               - (run.all_sum(rewards.sum().item()) / n) ** 2)),
                   **{f"reward_{k}": run.all_sum(sum(v)) / n for k, v in batch["parts"].items()},
                   "accuracy": run.all_sum(sum(batch["parts"]["accuracy"])) / n,
                   "completion_len_mean": run.all_sum(lengths.sum().item()) / n,
                   "completion_len_max": run.all_max(lengths.max().item()),
                   "truncated_frac": run.all_sum(sum(batch["truncated"])) / n,
                   "all_equal_groups_frac": run.all_sum(batch["all_equal_frac"]) / run.world,
                   **stats, "lr": lr_at(step - 1, args), "gen_s": t_gen, "train_s": t_train,
                   "tokens_per_s": run.all_sum(lengths.sum().item()) / (time.time() - t0)}
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            metrics["heldout_acc"], metrics["heldout_mean_length"] = heldout_accuracy(
                run, policy, tokenizer, heldout, args.max_new_tokens)
        run.log(step, metrics)
        pbar.update(1)
        pbar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                         len=f"{metrics['completion_len_mean']:.0f}")
        ckpt_state = {"heldout_acc_before": acc_before}
        checkpoint_or_stop(run, step, {"": policy}, {"policy": optimizer}, tokenizer, ckpt_state)
    pbar.close()

    acc_after, len_after = heldout_accuracy(run, policy, tokenizer, heldout, args.max_new_tokens)
    run.log(step, {"heldout_acc": acc_after, "heldout_mean_length": len_after})
    save_checkpoint(run, step, {"": policy}, {"policy": optimizer}, tokenizer, {"heldout_acc_before": acc_before})
    final = save_checkpoint(run, step, {"": policy}, {}, tokenizer, name="final")
    run.print(f"held-out greedy accuracy: {acc_before:.3f} -> {acc_after:.3f} ({len(heldout)} problems); saved {final}")
    run.write_summary({"heldout_acc_before": acc_before, "heldout_acc_after": acc_after,
                       "heldout_mean_length_after": len_after, "heldout_problems": len(heldout), "steps": step,
                       "final_checkpoint": str(final)})
    if run.is_main:
        plot_curve(run.out)


def plot_curve(out):
    """reward and accuracy per step as a PNG, when matplotlib is installed (it is not a requirement)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["reward"] for r in train], label="reward")
    ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="sample accuracy")
    held = [r for r in rows if "heldout_acc" in r]
    ax.plot([r["step"] for r in held], [r["heldout_acc"] for r in held], "o-", label="held-out greedy accuracy")
    ax.set_xlabel("step")
    ax.legend()
    fig.savefig(out / "curve.png", dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()
