r"""PPO for language models with a learned critic (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022):
the RLHF recipe, here with a verifier's or a reward model's score as the reward.

Each step samples completions for a batch of prompts and scores them with grpo.py's rewards (verify.compute_rewards:
the verifier, and --reward_model's score when given; see "rewards" in --help).
Every completion token gets the reward -beta * KL(pi || pi_ref) (per-token k1 estimate), and the last one the
sequence score too. A value model (transformer + scalar head per token) estimates the return from each token;
GAE turns rewards and values into advantages; then several epochs of clipped policy and value updates run over
shuffled minibatches of the batch.

CPU, no arguments: the committed tiny checkpoint on the built-in arithmetic task (a few minutes), printing
held-out greedy accuracy before and after:
    python ppo.py
With a learned reward instead of the verifier (train one first: python reward_model.py):
    python ppo.py --reward_model out/reward_model/final --accuracy_weight 0 --format_weight 0
8 GPUs (the --batch_size counts completions over all GPUs):
    torchrun --nproc_per_node=8 ppo.py --model Qwen2.5-1.5B-Instruct --data gsm8k_train.jsonl \
        --heldout_data gsm8k_test.jsonl --batch_size 512 --lr 1e-6 --critic_lr 5e-6 --max_new_tokens 1024 \
        --max_steps 300 --micro_batch_tokens 32768 --grad_checkpointing --save_every 50 --target_kl 6
    bash train_ddp.sh ppo.py 8 --model ... (same flags)

Per step, on [B, T] right-padded prompt + completion tensors, position t predicting token t + 1 (mask: the
positions whose next token is a completion token):
  logp, ref_logp   log pi_old(y_t), log pi_ref(y_t)                            rollout policy, frozen reference
  V_t              critic value of the state after tokens 0..t                 rollout critic
  r_t              -beta (logp_t - ref_logp_t) (+ R(x, y) at the last token)    token_rewards
  A_t, G_t         GAE(gamma, lambda) backwards over completion tokens; G = A + V    gae
  A_t              whitened over the batch's completion tokens                    whiten
  loss             clipped surrogate (grpo.clipped_surrogate) - c_H entropy     policy, token mean
                   0.5 max((V - G)^2, (clip(V, V_old +- eps_v) - G)^2)          critic, token mean
"""
import math
import random
import time

import torch
from tqdm import tqdm

from common import (ArgumentParser, Run, add_training_args, check_same_tokenizer, checkpoint_or_stop, count, finish_run,
                    first_loss_position, fraction, length_buckets, load_policy, lora_config, lr_at, make_optimizer,
                    micro_batches, non_negative, non_negative_int, optimizer_step, positive, resume, step_problems,
                    user_input, weights_dtype, world_size)
from grpo import clipped_surrogate
from model import Tokenizer
from reward_model import RewardModel, last_token_index, load_reward_model
from sample import (Engine, ToolUse, add_rl_data_args, add_tool_args, check_sandbox, heldout_accuracy, log_heldout,
                    rl_data_defaults, rl_problems, rollout_metrics, sample_groups)
from tools import default_checkpoint
from verify import add_reward_args


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="policy to start from (Hugging Face folder; default: the built-in "
                   "task's committed tiny policy, checkpoints/tiny-sft for a file)")
    p.add_argument("--ref_model", default=None, help="frozen reference for the KL penalty (default: --model)")
    p.add_argument("--critic_model", default=None, help="value model init: a reward-model or causal LM folder "
                   "(default: --reward_model if given, else --model)")
    add_rl_data_args(p, max_new_tokens=64)
    p.add_argument("--group_size", type=count, default=1, help="completions sampled per prompt")
    p.add_argument("--kl_coef", type=non_negative, default=0.02, help="beta: initial KL(pi || pi_ref) penalty per token")
    p.add_argument("--target_kl", type=non_negative, default=0.0, help="adaptive KL controller target (nats per "
                   "sequence; 0: fixed beta)")
    p.add_argument("--kl_horizon", type=count, default=10000, help="adaptive KL controller horizon (sequences)")
    p.add_argument("--gamma", type=fraction, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=fraction, default=1.0, help="GAE lambda (1: the critic is only a baseline, which a "
                   "fresh critic can be; lower values lean on its estimates and cut variance once it is good)")
    p.add_argument("--epsilon", type=positive, default=0.2, help="policy clip range: ratio in [1 - eps, 1 + eps]")
    p.add_argument("--value_clip", type=positive, default=0.2, help="value clip range around the rollout values")
    p.add_argument("--entropy_coef", type=non_negative, default=0.0, help="entropy bonus coefficient")
    p.add_argument("--ppo_epochs", type=count, default=1, help="passes over each rollout batch (more reuse each sample; "
                   "on CPU the default spends the time on fresh samples instead)")
    p.add_argument("--n_minibatches", type=count, default=2, help="optimizer steps per pass (minibatches per rank)")
    p.add_argument("--critic_lr", type=positive, default=1e-3, help="critic peak learning rate (--lr is the policy's)")
    p.add_argument("--eval_every", type=non_negative_int, default=5, help="held-out accuracy every N steps (0: start and end)")
    add_training_args(p, "ppo", lr=1e-4, max_steps=25, batch_size=256)
    add_reward_args(p)
    add_tool_args(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = rl_data_defaults(p.parse_args(argv), 64)
    args.model = args.model or default_checkpoint(args.data)
    world = world_size()
    if args.batch_size % (args.group_size * world):
        p.error(f"--batch_size {args.batch_size} is not divisible by --group_size {args.group_size} x {world} ranks")
    if args.batch_size // world < args.n_minibatches:
        p.error(f"--n_minibatches {args.n_minibatches} is more than the {args.batch_size // world} sequences per rank")
    return args


# ----------------------------------------------------------------------------------------------------
# The algorithm: small pure functions on [B, T] tensors (mask = 1 on the positions that emit a completion token)


def token_rewards(scores, logp, ref_logp, mask, kl_coef):
    """r_t = -beta * (log pi(y_t) - log pi_ref(y_t)) on completion tokens (k1 estimate of KL(pi || pi_ref)),
    and r_T += R(x, y) on the last one (Ziegler et al. 2019). scores [B] -> (rewards [B, T], kl [B, T])."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    rewards[torch.arange(len(scores)), last_token_index(mask)] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lambda A_{t+1} (Schulman et al. 2016), run
    backwards over each row's own tokens (mask 1): t + 1 is the row's next model token, so a tool observation
    between two of them (mask 0) is skipped as if it were not there, and the value after the last one is 0 (the
    episode is over). Returns (advantages [B, T], returns G_t = A_t + V_t [B, T]), zero off the mask."""
    adv, next_adv, next_value = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        mine = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mask[:, t]
        next_adv = torch.where(mine, a, next_adv)  # off the mask (an observation, padding): carried over unchanged
        next_value = torch.where(mine, values[:, t], next_value)
    return adv, (adv + values) * mask


def masked_mean_var(x, mask, all_sum=None):
    """Mean and (biased) variance of x over mask, over all ranks when all_sum (sums a number across ranks)."""
    total = all_sum or (lambda v: v)
    n = total((mask.sum()).item())
    mean = total((x * mask).sum().item()) / n
    var = total((((x - mean) ** 2) * mask).sum().item()) / n
    return mean, var


def whiten(x, mask, all_sum=None, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch; 0 off the mask."""
    mean, var = masked_mean_var(x, mask, all_sum)
    return (x - mean) / math.sqrt(var + eps) * mask


def clipped_value_loss(values, old_values, returns, clip):
    """0.5 max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2) per token (PPO2's value clipping);
    also returns where the clipped term is the larger one."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float()


def explained_variance(values, returns, mask, all_sum=None):
    """1 - Var(G - V) / Var(G) over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_g = masked_mean_var(returns, mask, all_sum)[1]
    return 1 - masked_mean_var(returns - values, mask, all_sum)[1] / max(var_g, 1e-8)


def adaptive_kl_coef(beta, kl, target, n_steps, horizon):
    """beta <- beta (1 + clip((KL - target) / target, -0.2, 0.2) n_steps / horizon) (Ziegler et al. 2019)."""
    error = min(max((kl - target) / target, -0.2), 0.2)
    return beta * (1 + error * n_steps / horizon)


# ----------------------------------------------------------------------------------------------------
# Rollouts


def row_chunks(lengths, rows, max_tokens):
    """rows cut into length-bucketed pieces of at most max_tokens padded tokens: [(rows, T)], T the longest."""
    return [([rows[i] for i in b], max(lengths[rows[i]] for i in b))
            for b in length_buckets([lengths[r] for r in rows], max_tokens)]


@torch.no_grad()
def prepare_batch(run, args, policy, ref_model, critic, records, rewards, kl_coef, pad_id):
    """Rollouts and their rewards -> the tensors PPO trains on: x, y, mask, old logp, old values, advantages,
    returns [B, T]. mask is 1 on the model's own tokens only: prompts and tool observations are context."""
    examples = [(r.prompt + r.ids, [0] * len(r.prompt) + r.mask) for r in records]
    [(rows, x, y, mask)] = micro_batches(examples, math.inf, pad_id)  # one right-padded batch, sorted by length
    x, y, mask = x.to(run.device), y.to(run.device), mask.to(run.device)
    scores = torch.tensor(rewards, dtype=torch.float)[rows].to(run.device)
    lengths = [len(examples[r][0]) - 1 for r in rows]
    logp, ref_logp, values = (torch.zeros_like(mask) for _ in range(3))
    # FSDP: both models gathered once, so ranks may run different numbers of micro-batches
    with run.full_params(policy) as policy, run.full_params(critic) as critic:
        for idx, T in row_chunks(lengths, range(len(rows)), args.micro_batch_tokens):
            s = first_loss_position(mask[idx, :T])  # log-probs only from the first completion token on
            with run.autocast():
                logp[idx, s:T] = policy(x[idx, :T], targets=y[idx, s:T], logits_from=s)[0]
                ref_logp[idx, s:T] = (ref_model(x[idx, :T], targets=y[idx, s:T], logits_from=s)[0] if ref_model
                                      else logp[idx, s:T])
                values[idx, :T] = critic(x[idx, :T])
    rewards, kl = token_rewards(scores, logp, ref_logp, mask, kl_coef)
    adv, returns = gae(rewards, values * mask, mask, args.gamma, args.lam)
    return {"x": x, "y": y, "mask": mask, "lengths": lengths, "logp": logp, "values": values * mask,
            "returns": returns, "adv": whiten(adv, mask, run.all_sum), "kl": kl.sum(1),
            "explained_variance": explained_variance(values * mask, returns, mask, run.all_sum)}


# ----------------------------------------------------------------------------------------------------
# Training


def ppo_update(run, args, step, train_policy, train_critic, opt_policy, opt_critic, data):
    """ppo_epochs passes over this rank's rollouts, each in n_minibatches shuffled minibatches; one optimizer
    step of each model per minibatch. Losses are token means over the minibatch on all ranks."""
    stats = {k: 0.0 for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy")}
    n_updates = args.ppo_epochs * args.n_minibatches
    B = len(data["lengths"])
    # shuffles follow from (seed, step, rank) alone, so a resumed run takes the same minibatches
    gen = torch.Generator().manual_seed(random.Random(f"ppo-{args.seed}-{step}-{run.rank}").randrange(2**31))
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(B, generator=gen).tolist()
        for mb in range(args.n_minibatches):
            rows = perm[mb * B // args.n_minibatches:(mb + 1) * B // args.n_minibatches]
            n_tokens = run.all_sum(data["mask"][rows].sum().item())
            chunks = row_chunks(data["lengths"], rows, args.micro_batch_tokens)
            for (idx, T), sync in run.lockstep(chunks, train_policy, train_critic):
                s = first_loss_position(data["mask"][idx, :T])  # positions s..T-1 carry the loss
                x, y, w = data["x"][idx, :T], data["y"][idx, s:T], data["mask"][idx, s:T]
                with run.no_sync(train_policy, sync), run.no_sync(train_critic, sync), run.autocast():
                    logp, entropy = train_policy(x, targets=y, logits_from=s)  # [b, T - s]: no [b, T, V] kept
                    pg, clipped = clipped_surrogate(logp, data["logp"][idx, s:T], data["adv"][idx, s:T],
                                                    args.epsilon, args.epsilon)
                    entropy = entropy if args.entropy_coef else entropy.detach()  # [b, T - s]
                    policy_loss = ((pg - args.entropy_coef * entropy) * w).sum() / n_tokens
                    (policy_loss * run.world).backward()  # DDP averages over ranks; n_tokens counts all ranks
                    vf, vclipped = clipped_value_loss(train_critic(x)[:, s:], data["values"][idx, s:T],
                                                      data["returns"][idx, s:T], args.value_clip)
                    value_loss = (vf * w).sum() / n_tokens
                    (value_loss * run.world).backward()
                for k, v in (("policy_loss", policy_loss.item()), ("value_loss", value_loss.item()),
                             ("clip_frac", (clipped * w).sum().item() / n_tokens),
                             ("value_clip_frac", (vclipped * w).sum().item() / n_tokens),
                             ("entropy", (entropy.detach() * w).sum().item() / n_tokens)):
                    stats[k] += v / n_updates
            policy_norm, skipped_p = optimizer_step(run, train_policy, opt_policy, lr_at(args, step))
            critic_norm, skipped_c = optimizer_step(run, train_critic, opt_critic, lr_at(args, step, args.critic_lr))
    stats = {k: run.all_sum(v) for k, v in stats.items()}
    return {**stats, "grad_norm": policy_norm, "critic_grad_norm": critic_norm, "skipped": skipped_p or skipped_c}


def main(argv=None):
    args = parse_args(argv)
    run = Run.start(args, "ppo")
    with user_input():
        policy, tokenizer, ref_model = load_policy(run, args, args.kl_coef)  # beta = 0 (no controller): no reference
        reward_model = load_reward_model(args.reward_model, run.device, tokenizer_of_policy=tokenizer)
        critic_path = args.critic_model or args.reward_model or args.model
        check_same_tokenizer(Tokenizer.from_pretrained(critic_path), tokenizer, what="critic")  # it reads policy ids
        critic = RewardModel.from_pretrained(critic_path, dtype=weights_dtype(run), device=run.device,
                                             lora=lora_config(args))
        critic.backbone.grad_checkpointing = args.grad_checkpointing
        data, heldout = rl_problems(args, [(tokenizer, policy.config.max_position_embeddings)])
        check_sandbox(run, args, (data or []) + heldout)
        tool_use = ToolUse.from_args(args, tokenizer)

    train_policy, train_critic = run.wrap(policy), run.wrap(critic)
    opt_policy, opt_critic = make_optimizer(args, policy), make_optimizer(args, critic, lr=args.critic_lr)
    models, optimizers = {"": policy, "critic": critic}, {"policy": opt_policy, "critic": opt_critic}
    engine = Engine.for_run(run, policy)
    state = resume(run, models, optimizers)
    step, kl_coef = state.get("step", 0), state.get("kl_coef", args.kl_coef)
    acc_before = state.get("heldout_acc_before")
    if acc_before is None:  # kept in the checkpoint, so a resumed run reports it too
        acc_before, _ = log_heldout(run, 0, engine, tokenizer, heldout, args.max_new_tokens, tool_use, say="before")

    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc="ppo")
    while step < args.max_steps:
        t0 = time.time()
        problems = step_problems(run, args.batch_size // args.group_size // run.world, data, step)
        seed = random.Random(f"sample-{args.seed}-{step}-{run.rank}").randrange(2**31)
        records, rewards, parts = sample_groups(run, args, engine, tokenizer, problems, seed, reward_model, tool_use)
        t_gen = time.time() - t0
        prepared = prepare_batch(run, args, policy, ref_model, critic, records, rewards, kl_coef, tokenizer.pad_token_id)
        stats = ppo_update(run, args, step, train_policy, train_critic, opt_policy, opt_critic, prepared)
        t_train = time.time() - t0 - t_gen
        step += 1
        n = run.all_sum(len(records))
        kl = run.all_sum(prepared["kl"].sum().item()) / n  # nats per sequence: sum over its tokens of k1
        metrics = {**rollout_metrics(run, records, rewards, parts, tool_use is not None),
                   "kl": kl, "kl_coef": kl_coef, **stats, "explained_variance": prepared["explained_variance"],
                   "lr": lr_at(args, step - 1), "critic_lr": lr_at(args, step - 1, args.critic_lr),
                   "gen_s": t_gen, "train_s": t_train}
        if args.target_kl > 0:
            kl_coef = adaptive_kl_coef(kl_coef, kl, args.target_kl, n, args.kl_horizon)
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            metrics["heldout_acc"], metrics["heldout_mean_length"] = heldout_accuracy(
                run, engine, tokenizer, heldout, args.max_new_tokens, tool_use=tool_use)
        run.log(step, metrics, pbar, show=("reward", "accuracy", "kl", "explained_variance"))
        ckpt_state = {"heldout_acc_before": acc_before, "kl_coef": kl_coef}
        checkpoint_or_stop(run, step, models, optimizers, tokenizer, ckpt_state)
    pbar.close()

    acc, mean_len = log_heldout(run, step, engine, tokenizer, heldout, args.max_new_tokens, tool_use)
    run.print(f"held-out greedy accuracy: {acc_before:.3f} -> {acc:.3f} ({len(heldout)} problems)")
    finish_run(run, step, models, optimizers, tokenizer, {"heldout_acc_before": acc_before, "kl_coef": kl_coef},
               {"heldout_acc_before": acc_before, "heldout_acc_after": acc, "heldout_mean_length_after": mean_len,
                "heldout_problems": len(heldout), "final_kl_coef": kl_coef}, curve=("reward", "accuracy", "heldout_acc", "kl"))


if __name__ == "__main__":
    main()
