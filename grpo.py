r"""GRPO, Dr. GRPO and DAPO: reinforcement learning with verifiable rewards (DeepSeek-R1-Zero style).

Each step samples G completions for each of a batch of prompts, scores them with verify.py (or a reward model),
turns each group's rewards into advantages, and takes clipped policy-gradient steps. As the rollout prefills each
prompt once for its G samples, the training step forwards it once (model(completions, prompts=...)), with the
gradients of scoring each sample alone.

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

KL(pi || pi_ref) per token, --beta times it added to the loss (--kl_estimator; Schulman 2020, "Approximating KL
divergence"), with d = log pi_ref(y_t) - log pi(y_t) on tokens sampled from pi:
  k1  -d                    unbiased, but negative on some samples (high variance)
  k2  d^2 / 2               biased, always >= 0, low variance; its gradient is that of KL(pi || pi_ref) on-policy
  k3  exp(d) - d - 1        unbiased and always >= 0 (DeepSeekMath's choice; the default)
Rewards (verify.compute_rewards, shared with ppo.py) are described under "rewards" in --help.
"""
import argparse
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (ArgumentParser, Run, add_training_args, checkpoint_or_stop, count, finish_run, load_policy, lr_at,
                    make_optimizer, non_negative, non_negative_int, optimizer_step, positive, resume,
                    shared_prompt_micro_batches, step_problems, user_input, world_size)
from reward_model import load_reward_model
from sample import (Engine, ToolUse, add_rl_data_args, add_tool_args, check_sandbox, heldout_accuracy, log_heldout,
                    rl_problems, rollout_metrics, sample_groups)
from tools import default_checkpoint
from verify import add_reward_args


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="policy to start from (Hugging Face folder; default: the built-in "
                   "task's committed tiny policy, checkpoints/tiny-sft for a file)")
    p.add_argument("--ref_model", default=None, help="frozen reference for the KL term (default: --model)")
    add_rl_data_args(p, max_new_tokens=64)
    p.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"], default="grpo", help="loss variant (see above)")
    p.add_argument("--group_size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--mu", type=count, default=1, help="optimisation iterations per rollout batch")
    p.add_argument("--epsilon", type=positive, default=0.2, help="clip range: ratio in [1 - eps, 1 + eps_high]")
    p.add_argument("--epsilon_high", type=positive, default=None, help="upper clip (default: --epsilon; dapo: 0.28)")
    p.add_argument("--beta", type=non_negative, default=0.0, help="KL(pi || pi_ref) coefficient; 0 skips the "
                   "reference model")
    p.add_argument("--kl_estimator", choices=["k1", "k2", "k3"], default="k3", help="per-token KL estimate (see above)")
    p.add_argument("--mask_truncated", action="store_true", help="no loss on completions that hit max_new_tokens")
    p.add_argument("--dynamic_sampling", type=int, choices=(0, 1), default=None, help="drop all-equal groups and "
                   "resample (1/0; default: on for dapo)")
    p.add_argument("--max_sampling_rounds", type=count, default=3, help="dynamic sampling: rollout rounds per step")
    p.add_argument("--eval_every", type=non_negative_int, default=5, help="held-out accuracy every N steps (0: start "
                   "and end)")
    add_training_args(p, "grpo", lr=1e-4, max_steps=25, batch_size=256)
    add_reward_args(p)
    add_tool_args(p)
    args = p.parse_args(argv)
    args.model = args.model or default_checkpoint(args.data)
    dapo = args.loss == "dapo"
    args.epsilon_high = args.epsilon_high if args.epsilon_high is not None else (0.28 if dapo else args.epsilon)
    args.dynamic_sampling = bool(dapo if args.dynamic_sampling is None else args.dynamic_sampling)
    args.overlong_cache = args.overlong_cache if args.overlong_cache is not None else (args.max_new_tokens // 4 if dapo else 0)
    if args.group_size < 2:
        p.error(f"--group_size {args.group_size}: GRPO compares the samples of a prompt with each other, so it needs "
                "at least 2 (one sample has zero advantage and nothing to learn from)")
    if args.batch_size % args.group_size:
        p.error(f"--batch_size {args.batch_size} is not divisible by --group_size {args.group_size}")
    world = world_size()
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


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, d = log pi_ref - log pi (see the
    top): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d ** 2
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
# Rollouts


@dataclass
class Group:
    """The G samples of one prompt: their Rollouts, rewards and reward components."""
    records: list
    rewards: list
    parts: dict


@dataclass
class Batch:
    """One step's rollouts (a prompt's samples adjacent), their rewards and components, the fraction of groups
    whose rewards were all equal and the tokens the policy generated (dropped groups' too)."""
    records: list
    rewards: list
    parts: dict
    all_equal_frac: float
    generated_tokens: int


def fill_batch(run, args, engine, tokenizer, data, step, reward_model, tool_use=None):
    """One step's rollouts. With dynamic sampling (DAPO) groups whose rewards are all equal are dropped and more
    prompts are sampled until the batch is full (at most --max_sampling_rounds rounds; then dropped groups
    fill the gap, with zero advantage). Every rank runs the same number of rounds: until all of them are full."""
    G, need = args.group_size, args.batch_size // args.group_size // run.world
    kept, dropped, n_equal, n_groups, generated = [], [], 0, 0, 0
    for round_ in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        problems = step_problems(run, need, data, step, round_)
        seed = random.Random(f"sample-{args.seed}-{step}-{round_}-{run.rank}").randrange(2**31)
        records, rewards, parts = sample_groups(run, args, engine, tokenizer, problems, seed, reward_model, tool_use)
        equal = all_equal_groups(torch.tensor(rewards), G).tolist()
        generated += sum(sum(r.mask) for r in records)  # dropped groups cost tokens too
        n_equal, n_groups = n_equal + sum(equal), n_groups + len(equal)
        for g, eq in enumerate(equal):
            s = slice(g * G, (g + 1) * G)
            group = Group(records[s], rewards[s], {c: x[s] for c, x in parts.items()})
            (dropped if eq and args.dynamic_sampling else kept).append(group)
        if run.all_sum(float(len(kept) < need)) == 0:  # decided together: FSDP gathers weights in every round
            break
    groups = (kept + dropped)[:need]
    return Batch([r for g in groups for r in g.records], [x for g in groups for x in g.rewards],
                 {c: [x for g in groups for x in g.parts[c]] for c in groups[0].parts}, n_equal / n_groups, generated)


# ----------------------------------------------------------------------------------------------------
# Training


def policy_loss_step(run, args, train_model, ref_model, optimizer, records, rewards, lr):
    """mu optimisation iterations on one rollout batch (Rollouts, their rewards). pi_old (and pi_ref) log-probs come
    from the trainer's own forward pass, computed once without gradient (for mu = 1, pi_old = pi_theta detached: the
    ratio is exactly 1). Each micro-batch forwards each of its distinct prompts once for all of the prompt's samples.
    Only the model's own tokens take loss (mask 1): tool observations are context, out of the loss and of every
    count that normalises it (and of KL, entropy and the clip fraction)."""
    weights = [[0] * len(r.mask) if args.mask_truncated and r.truncated else list(r.mask) for r in records]
    adv = group_advantages(torch.tensor(rewards), args.group_size, scale=args.loss != "dr_grpo").to(run.device)
    n_seqs = run.all_sum(len(weights))
    n_tokens = run.all_sum(sum(map(sum, weights)))
    # (rows, completions [B, T], loss mask [B, T], prompts: (ids [U, P], lengths [U], which prompt each row follows))
    chunks = [(rows, c.to(run.device), w.to(run.device), tuple(t.to(run.device) for t in (p_ids, p_lens, of_row)))
              for rows, p_ids, p_lens, of_row, c, w in shared_prompt_micro_batches(
                  [r.prompt for r in records], [r.ids for r in records], weights, args.micro_batch_tokens)]
    stats = {"kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
    old, ref = [], []
    with torch.no_grad(), run.autocast(), run.full_params(train_model):  # FSDP: gathered once, not per chunk
        for rows, c, w, prompts in chunks:
            old.append(train_model(c, prompts=prompts)[0] if args.mu > 1 else None)
            ref.append(ref_model(c, prompts=prompts)[0] if ref_model is not None else None)
    for it in range(args.mu):
        for i, ((rows, c, w, prompts), sync) in enumerate(run.lockstep(chunks, train_model, idle=idle_pass)):
            with run.no_sync(train_model, sync), run.autocast():
                logp, entropy = train_model(c, prompts=prompts)  # [B, T]: no [B, T, V] kept
                old_logp = old[i] if old[i] is not None else logp.detach()
                per_token, clipped = clipped_surrogate(logp, old_logp, adv[rows, None], args.epsilon, args.epsilon_high)
                if ref[i] is not None:
                    kl = kl_penalty(logp, ref[i], args.kl_estimator)
                    per_token = per_token + args.beta * kl
                    stats["kl"] += ((kl * w).sum() / n_tokens).item() / args.mu
                loss = aggregate(per_token, w, args.loss, n_seqs, n_tokens, args.max_new_tokens)
                (loss * run.world).backward()  # DDP averages over ranks; the normalisers already count all ranks
            stats["clip_frac"] += ((clipped * w).sum() / n_tokens).item() / args.mu
            if it == 0:
                with torch.no_grad():
                    stats["entropy"] += ((entropy.detach() * w).sum() / n_tokens).item()
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr)
    stats = {k: run.all_sum(v) for k, v in stats.items()}
    return {**stats, "grad_norm": grad_norm, "skipped": skipped}


def idle_pass(model, token):
    """Run.lockstep's forward on a rank with fewer micro-batches: a 1-token prompt and a 2-token completion, which
    calls every unit twice (prompt, then completion), as a real micro-batch does."""
    one = torch.ones_like(token)  # [1, 1]
    return model(one.expand(1, 2), prompts=(one, one[0], one[0] - 1))[0]  # prompt length 1, its row 0


def main(argv=None):
    args = parse_args(argv)
    run = Run.start(args, "grpo")
    with user_input():
        policy, tokenizer, ref_model = load_policy(run, args, args.beta)
        data, heldout = rl_problems(args, [(tokenizer, policy.config.max_position_embeddings)])
        check_sandbox(run, args, (data or []) + heldout)
        reward_model = load_reward_model(args.reward_model, run.device, tokenizer_of_policy=tokenizer)
        tool_use = ToolUse.from_args(args, tokenizer)

    train_model = run.wrap(policy)
    engine = Engine.for_run(run, policy)
    optimizer = make_optimizer(args, policy)
    state = resume(run, {"": policy}, {"policy": optimizer})
    step = state.get("step", 0)
    acc_before = state.get("heldout_acc_before")
    if acc_before is None:  # kept in the checkpoint, so a resumed run reports it too
        acc_before, _ = log_heldout(run, 0, engine, tokenizer, heldout, args.max_new_tokens, tool_use, say="before")

    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc=f"{args.loss}")
    while step < args.max_steps:
        t0 = time.time()
        batch = fill_batch(run, args, engine, tokenizer, data, step, reward_model, tool_use)
        t_gen = time.time() - t0
        stats = policy_loss_step(run, args, train_model, ref_model, optimizer, batch.records, batch.rewards,
                                 lr_at(args, step))
        t_train = time.time() - t0 - t_gen
        step += 1
        generated = run.all_sum(batch.generated_tokens)
        metrics = {**rollout_metrics(run, batch.records, batch.rewards, batch.parts, tool_use is not None),
                   "all_equal_groups_frac": run.all_sum(batch.all_equal_frac) / run.world,
                   **stats, "lr": lr_at(args, step - 1), "gen_s": t_gen, "train_s": t_train,
                   "generated_tokens": generated, "tokens_per_s": generated / (time.time() - t0)}
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            metrics["heldout_acc"], metrics["heldout_mean_length"] = heldout_accuracy(
                run, engine, tokenizer, heldout, args.max_new_tokens, tool_use=tool_use)
        run.log(step, metrics, pbar, show=("reward", "accuracy", "completion_len_mean"))
        checkpoint_or_stop(run, step, {"": policy}, {"policy": optimizer}, tokenizer, {"heldout_acc_before": acc_before})
    pbar.close()

    acc, mean_len = log_heldout(run, step, engine, tokenizer, heldout, args.max_new_tokens, tool_use)
    run.print(f"held-out greedy accuracy: {acc_before:.3f} -> {acc:.3f} ({len(heldout)} problems)")
    finish_run(run, step, {"": policy}, {"policy": optimizer}, tokenizer, {"heldout_acc_before": acc_before},
               {"heldout_acc_before": acc_before, "heldout_acc_after": acc, "heldout_mean_length_after": mean_len,
                "heldout_problems": len(heldout)}, curve=("reward", "accuracy", "heldout_acc", "completion_len_mean"))


if __name__ == "__main__":
    main()
