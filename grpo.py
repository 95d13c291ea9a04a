r"""GRPO and the policy-gradient family around it: reinforcement learning with verifiable rewards (DeepSeek-R1-Zero
style), each algorithm a preset over a few separate knobs.

Each step samples G completions for each of a batch of prompts, scores them with verify.py (or a reward model),
turns the rewards into advantages, and takes policy-gradient steps on the model's own tokens (tool outputs are
context). As the rollout prefills each prompt once for its G samples, the training step forwards it once
(model(completions, prompts=...)), with the gradients of scoring each sample alone.

CPU, no arguments: the committed tiny checkpoint on the built-in arithmetic task (a few minutes), printing
held-out greedy accuracy before and after:
    python grpo.py
    python grpo.py --data builtin:tool_arithmetic        # the model runs Python while it reasons (--tools python)
8 GPUs (the --batch_size counts completions over all GPUs; here 64 prompts x 8 samples per step):
    torchrun --nproc_per_node=8 grpo.py --model Qwen2.5-1.5B-Instruct --data gsm8k_train.jsonl \
        --heldout_data gsm8k_test.jsonl --loss dr_grpo --batch_size 512 --group_size 8 --lr 1e-6 \
        --max_new_tokens 1024 --max_steps 500 --micro_batch_tokens 32768 --grad_checkpointing --save_every 50
    bash train_ddp.sh grpo.py 8 --model ... (same flags)

The knobs (each a small function below; r rewards, G a prompt's samples, rho = pi / pi_old per token):
  --baseline     group: b_i = mean(r_group)                     leave_one_out: A_i = G/(G-1) (r_i - mean(r_group))
                 none: A_i = r_i                                 (RLOO: Kool et al. 2019, Ahmadian et al. 2024)
  --adv_norm     group: A_i / (std(r_group) + eps)               batch: (A - mean(A)) / (std(A) + eps) over the whole
                 none                                            batch, every rank (REINFORCE++, Hu 2025)
  --ratio        token: rho_t = pi(y_t) / pi_old(y_t)            sequence: s_i = exp(mean_t log rho_t) over the
                                                                 sequence's loss tokens (GSPO, Zheng et al. 2025)
  --objective    clip: -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)  (PPO; eps_high > eps: DAPO's clip-higher)
                 cispo: -sg(clip(rho, 1 - eps, 1 + eps_high)) A log pi  (MiniMax-M1: every token keeps a gradient)
                 pg: -rho A                                      (the plain importance-weighted policy gradient)
  --aggregation  seq_mean: 1/N sum_i 1/|o_i| sum_t l_it          token_mean: sum_it l_it / sum_i |o_i|
                 token_sum: sum_it l_it / (N x max_new_tokens)   (Dr. GRPO's constant)
--loss is a preset over them (a knob given explicitly wins):
  preset                 baseline       adv_norm  ratio     objective  aggregation  eps / eps_high
  grpo                   group          group     token     clip       seq_mean     0.2 / 0.2     (DeepSeekMath)
  dr_grpo                group          none      token     clip       token_sum    0.2 / 0.2     (Liu et al. 2025)
  dapo                   group          group     token     clip       token_mean   0.2 / 0.28    (Yu et al. 2025;
                         + dynamic sampling of groups whose rewards all equal, soft overlong penalty)
  gspo                   group          group     sequence  clip       seq_mean     3e-4 / 4e-4   (Zheng et al. 2025)
  cispo                  group          group     token     cispo      token_mean   1.0 / 0.28    (no lower bound)
  rloo                   leave_one_out  none      token     clip       seq_mean     0.2 / 0.2
  reinforce_pp           none           batch     token     clip       token_mean   0.2 / 0.2
  reinforce_pp_baseline  group          batch     token     clip       token_mean   0.2 / 0.2

KL(pi || pi_ref) per token, --beta times it added to the loss (--kl_estimator; Schulman 2020, "Approximating KL
divergence"), with d = log pi_ref(y_t) - log pi(y_t) on tokens sampled from pi:
  k1  -d                    unbiased, but negative on some samples (high variance)
  k2  d^2 / 2               biased, always >= 0, low variance; its gradient is that of KL(pi || pi_ref) on-policy
  k3  exp(d) - d - 1        unbiased and always >= 0 (DeepSeekMath's choice; the default)
Sampler and trainer: every step logs k3 between the sampler's log-probs (recorded as it sampled) and the trainer's
(its own forward, pi_old) and the fraction of tokens whose ratio pi_old / pi_sampler lies outside [0.5, 2]; on a
CPU in float32 they agree, on a GPU a bf16 compiled sampler does not. --rollout_correction reweights or masks by
that ratio (truncated importance sampling, Yao et al. 2025; masks: tokens or whole sequences outside
--correction_bounds). --top_entropy_quantile rho trains only on the step's highest-entropy tokens ("Beyond the
80/20 rule", Wang et al. 2025). Rewards (verify.compute_rewards, shared with ppo.py) are under "rewards" in --help.
"""
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (ArgumentParser, Run, add_training_args, checkpoint_or_stop, count, finish_run, load_policy, lr_at,
                    make_optimizer, non_negative, non_negative_int, optimizer_step, pad_right, positive, probability,
                    resume, shared_prompt_micro_batches, step_problems, user_input, world_size)
from reward_model import load_reward_model
from sample import (Engine, ToolUse, add_rl_data_args, add_tool_args, check_sandbox, heldout_accuracy, log_heldout,
                    rl_data_defaults, rl_problems, rollout_metrics, sample_groups)
from tools import default_checkpoint
from verify import add_reward_args


# --loss: the knobs each preset sets (see the table above); a knob given on the command line wins
PRESETS = {
    "grpo": dict(baseline="group", adv_norm="group", ratio="token", objective="clip", aggregation="seq_mean"),
    "dr_grpo": dict(baseline="group", adv_norm="none", ratio="token", objective="clip", aggregation="token_sum"),
    "dapo": dict(baseline="group", adv_norm="group", ratio="token", objective="clip", aggregation="token_mean",
                 epsilon_high=0.28, dynamic_sampling=1),
    "gspo": dict(baseline="group", adv_norm="group", ratio="sequence", objective="clip", aggregation="seq_mean",
                 epsilon=3e-4, epsilon_high=4e-4),
    "cispo": dict(baseline="group", adv_norm="group", ratio="token", objective="cispo", aggregation="token_mean",
                  epsilon=1.0, epsilon_high=0.28),
    "rloo": dict(baseline="leave_one_out", adv_norm="none", ratio="token", objective="clip", aggregation="seq_mean"),
    "reinforce_pp": dict(baseline="none", adv_norm="batch", ratio="token", objective="clip", aggregation="token_mean"),
    "reinforce_pp_baseline": dict(baseline="group", adv_norm="batch", ratio="token", objective="clip",
                                  aggregation="token_mean"),
}
KNOB_DEFAULTS = dict(epsilon=0.2, epsilon_high=None, dynamic_sampling=0)  # what a preset does not set


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="policy to start from (Hugging Face folder; default: the built-in "
                   "task's committed tiny policy, checkpoints/tiny-sft for a file)")
    p.add_argument("--ref_model", default=None, help="frozen reference for the KL term (default: --model)")
    add_rl_data_args(p, max_new_tokens=64)
    p.add_argument("--loss", choices=list(PRESETS), default="grpo", help="the algorithm: a preset of the knobs "
                   "below (table above)")
    g = p.add_argument_group("knobs", "each overrides the --loss preset's (default: the preset's)")
    g.add_argument("--baseline", choices=("group", "leave_one_out", "none"), default=None, help="what is subtracted "
                   "from a sample's reward")
    g.add_argument("--adv_norm", choices=("group", "batch", "none"), default=None, help="what the advantage is "
                   "divided by: its group's reward std, or the whole batch's std after centering")
    g.add_argument("--ratio", choices=("token", "sequence"), default=None, help="importance ratio per token, or one "
                   "per sequence (GSPO)")
    g.add_argument("--objective", choices=("clip", "cispo", "pg"), default=None, help="the per-token loss")
    g.add_argument("--aggregation", choices=("seq_mean", "token_mean", "token_sum"), default=None,
                   help="how per-token losses become the step's loss")
    g.add_argument("--epsilon", type=positive, default=None, help="clip: ratio in [1 - eps, 1 + eps_high] (0.2)")
    g.add_argument("--epsilon_high", type=positive, default=None, help="upper clip (default: --epsilon)")
    g.add_argument("--dynamic_sampling", type=int, choices=(0, 1), default=None, help="drop all-equal groups and "
                   "resample (1/0)")
    p.add_argument("--group_size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--mu", type=count, default=1, help="optimisation iterations per rollout batch")
    p.add_argument("--beta", type=non_negative, default=0.0, help="KL(pi || pi_ref) coefficient; 0 skips the "
                   "reference model")
    p.add_argument("--kl_estimator", choices=["k1", "k2", "k3"], default="k3", help="per-token KL estimate (see above)")
    p.add_argument("--entropy_coef", type=non_negative, default=0.0, help="entropy bonus: -coef x H(pi) per token")
    p.add_argument("--top_entropy_quantile", type=probability, default=None, metavar="RHO", help="train only on the "
                   "step's RHO fraction of highest-entropy tokens (over every rank; 0.2 in the paper)")
    p.add_argument("--rollout_correction", choices=("none", "token_tis", "seq_tis", "token_mask", "seq_mask"),
                   default="none", help="sampler/trainer mismatch: weight each token (or sequence) by "
                   "min(pi_old / pi_sampler, C), or drop those whose ratio lies outside --correction_bounds")
    p.add_argument("--correction_bounds", type=positive, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                   help="--rollout_correction: masks keep ratios in [LOW, HIGH]; TIS caps the weight at HIGH (C)")
    p.add_argument("--old_logprobs", choices=("trainer", "sampler"), default="trainer", help="pi_old: the trainer's "
                   "forward (exact in the trainer's numerics), or the log-probs the sampler recorded (skips a "
                   "forward pass when --mu > 1)")
    p.add_argument("--mask_truncated", action="store_true", help="no loss on completions that hit max_new_tokens")
    p.add_argument("--max_sampling_rounds", type=count, default=3, help="dynamic sampling: rollout rounds per step")
    p.add_argument("--eval_every", type=non_negative_int, default=5, help="held-out accuracy every N steps (0: start "
                   "and end)")
    add_training_args(p, "grpo", lr=1e-4, max_steps=25, batch_size=256)
    add_reward_args(p)
    add_tool_args(p)
    args = rl_data_defaults(p.parse_args(argv), 64)
    args.model = args.model or default_checkpoint(args.data)
    for knob, value in {**KNOB_DEFAULTS, **PRESETS[args.loss]}.items():  # the preset fills what was not given
        if getattr(args, knob) is None:
            setattr(args, knob, value)
    args.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    args.dynamic_sampling = bool(args.dynamic_sampling)
    if args.overlong_cache is None:  # DAPO's soft overlong penalty over the last quarter of the budget
        args.overlong_cache = args.max_new_tokens // 4 if args.loss == "dapo" else 0
    check_combination(p, args)
    return args


def check_combination(p, args):
    """Refuse, with argparse's one line, what cannot work or means nothing."""
    if args.group_size < 2:
        p.error(f"--group_size {args.group_size}: GRPO compares the samples of a prompt with each other, so it needs "
                "at least 2 (one sample has zero advantage and nothing to learn from)")
    if args.batch_size % args.group_size:
        p.error(f"--batch_size {args.batch_size} is not divisible by --group_size {args.group_size}")
    world = world_size()
    if (args.batch_size // args.group_size) % world:
        p.error(f"--batch_size {args.batch_size} / --group_size {args.group_size} = {args.batch_size // args.group_size}"
                f" prompts per step cannot be split evenly over {world} processes")
    if args.objective == "cispo" and args.ratio == "sequence":
        p.error("--objective cispo with --ratio sequence: CISPO weights each token by its own clipped ratio")
    if args.adv_norm == "group" and args.baseline == "none":
        p.error("--adv_norm group with --baseline none: dividing raw rewards by their group's spread has no baseline "
                "to center them (use --adv_norm batch: REINFORCE++)")
    if args.rollout_correction != "none" and args.old_logprobs == "sampler":
        p.error(f"--rollout_correction {args.rollout_correction} with --old_logprobs sampler: pi_old is then the "
                "sampler's own, so the correction ratio is always 1")
    if args.correction_bounds[0] >= args.correction_bounds[1]:
        p.error(f"--correction_bounds {args.correction_bounds[0]} {args.correction_bounds[1]}: LOW must be below HIGH")


# ----------------------------------------------------------------------------------------------------
# The algorithm: small pure functions on tensors


def group_baseline(rewards, group_size):
    """A_i = r_i - mean(r_group): rewards [N], each group's G samples adjacent -> [N]."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def leave_one_out_baseline(rewards, group_size):
    """A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(r_group)) (RLOO: each sample's baseline is the mean of the
    group's others, so it does not depend on the sample itself)."""
    return group_baseline(rewards, group_size) * group_size / (group_size - 1)


def group_std_norm(adv, rewards, group_size, eps=1e-4):
    """A_i / (std(r_group) + eps), std unbiased (DeepSeekMath's GRPO)."""
    return (adv.view(-1, group_size) / (rewards.view(-1, group_size).std(dim=1, keepdim=True) + eps)).view(-1)


def batch_whiten(adv, all_sum=lambda x: x, eps=1e-8):
    """(A - mean(A)) / (std(A) + eps) over the whole batch: every rank's samples (all_sum sums a number across
    ranks), no grouping (REINFORCE++)."""
    n = all_sum(float(len(adv)))
    mean = all_sum(adv.sum().item()) / n
    var = all_sum(((adv - mean) ** 2).sum().item()) / max(n - 1, 1)
    return (adv - mean) / (var ** 0.5 + eps)


def advantages(rewards, args, all_sum=lambda x: x):
    """One advantage per sample from its reward: --baseline, then --adv_norm (see the table at the top)."""
    G = args.group_size
    adv = {"group": lambda: group_baseline(rewards, G), "leave_one_out": lambda: leave_one_out_baseline(rewards, G),
           "none": lambda: rewards.clone()}[args.baseline]()
    if args.adv_norm == "group":
        return group_std_norm(adv, rewards, G)
    if args.adv_norm == "batch":
        return batch_whiten(adv, all_sum)
    return adv


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, d = log pi_ref - log pi (see the
    top): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d ** 2
    return torch.exp(d) - d - 1


def importance_ratio(logp, old_logp, mask, level="token"):
    """rho [B, T]: per token pi / pi_old; per sequence (GSPO) s_i = exp(mean_t log(pi / pi_old)) over row i's loss
    tokens, the same value at each of them (its gradient flows through every token's log pi)."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    seq = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.exp(seq).expand_as(logp)


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, ratio=None):
    """PPO's per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with rho = pi / pi_old (Schulman et
    al. 2017; eps_high > eps_low is DAPO's clip-higher), or with a given ratio (GSPO's per sequence). Also returns
    where the clip is active."""
    ratio = torch.exp(logp - old_logp) if ratio is None else ratio
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def cispo_loss(logp, ratio, adv, eps_low, eps_high):
    """CISPO's per-token loss -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi (MiniMax-M1, 2025): the weight is
    clipped, not the update, so every token keeps its gradient. Also returns where the weight was clipped."""
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -weight.detach() * adv * logp, (weight != ratio).float()


def policy_objective(logp, old_logp, adv, mask, args):
    """The per-token policy loss of --objective with the --ratio importance ratio -> (loss [B, T], clipped [B, T])."""
    if args.objective == "clip" and args.ratio == "token":
        return clipped_surrogate(logp, old_logp, adv, args.epsilon, args.epsilon_high)
    ratio = importance_ratio(logp, old_logp, mask, args.ratio)
    if args.objective == "cispo":
        return cispo_loss(logp, ratio, adv, args.epsilon, args.epsilon_high)
    if args.objective == "pg":
        return -ratio * adv, torch.zeros_like(ratio)
    return clipped_surrogate(logp, old_logp, adv, args.epsilon, args.epsilon_high, ratio)


def aggregate(per_token, mask, how, n_seqs, n_tokens, max_len):
    """Reduce a [B, T] per-token loss to this micro-batch's share of the step's loss. The normalisers count the
    whole step (all micro-batches and ranks) so that gradient accumulation is exact:
      seq_mean    1/N sum_i 1/|o_i| sum_t l_it          (each sequence weighs the same: long ones dilute per token)
      token_sum   1/(N L_max) sum_i sum_t l_it          (every token weighs the same, fixed normaliser: Dr. GRPO)
      token_mean  1/(sum_i |o_i|) sum_i sum_t l_it      (every token in the batch weighs the same: DAPO)"""
    if how == "seq_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if how == "token_sum":
        return (per_token * mask).sum() / (n_seqs * max_len)
    if how == "token_mean":
        return (per_token * mask).sum() / n_tokens
    raise ValueError(f"unknown aggregation {how!r}")


def rollout_correction(old_logp, sampler_logp, mask, mode, low, high):
    """The weight [B, T] of each loss token for the sampler/trainer mismatch, from r = pi_old / pi_sampler (detached):
    token_tis min(r_t, C), seq_tis min(prod_t r_t, C) (truncated importance sampling, C = high); token_mask 1 where
    low <= r_t <= high, seq_mask 1 for a sequence whose prod_t r_t lies there, else 0; none: 1."""
    log_r = (old_logp - sampler_logp).detach() * mask
    if mode == "none":
        return torch.ones_like(log_r)
    r = torch.exp(log_r if mode.startswith("token") else log_r.sum(1, keepdim=True).expand_as(log_r))
    if mode.endswith("tis"):
        return r.clamp(max=high)
    return ((r >= low) & (r <= high)).float()


def sampler_mismatch(trainer_logp, sampler_logp, mask):
    """(sum over loss tokens of k3 = exp(d) - d - 1 with d = log pi_trainer - log pi_sampler, an estimate of
    KL(sampler || trainer); the number of tokens whose ratio pi_trainer / pi_sampler lies outside [0.5, 2])."""
    d = (trainer_logp - sampler_logp).detach()
    k3 = ((torch.exp(d) - d - 1) * mask).sum().item()
    outside = (((d < -math.log(2)) | (d > math.log(2))).float() * mask).sum().item()
    return k3, outside


def top_entropy_mask(entropies, masks, rho, all_gather=lambda t: t):
    """1 on the loss tokens whose entropy is among the step's highest rho fraction, over every rank (all_gather
    concatenates a 1-D tensor across ranks), else 0: the "forking" tokens of "Beyond the 80/20 rule" (Wang et al.
    2025). entropies, masks: the step's [B, T] tensors, micro-batch by micro-batch."""
    values = all_gather(torch.cat([e[m > 0].float().flatten() for e, m in zip(entropies, masks)]))
    if len(values) == 0:
        return [torch.zeros_like(m) for m in masks]
    threshold = torch.topk(values, max(1, math.ceil(rho * len(values)))).values[-1]
    return [((e >= threshold) & (m > 0)).float() for e, m in zip(entropies, masks)]


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
    """mu optimisation iterations on one rollout batch (Rollouts, their rewards). pi_old comes from the trainer's own
    forward pass (for mu = 1 the training forward itself, detached: rho is exactly 1), or with --old_logprobs
    sampler from the log-probs the sampler recorded; pi_ref (and the entropies --top_entropy_quantile ranks) from one
    forward pass without gradient. Each micro-batch forwards each of its distinct prompts once for all of the
    prompt's samples. Only the model's own tokens take loss (mask 1): tool observations are context, out of the loss
    and of every count that normalises it (and of KL, entropy and the clip fraction)."""
    weights = [[0] * len(r.mask) if args.mask_truncated and r.truncated else list(r.mask) for r in records]
    adv = advantages(torch.tensor(rewards), args, run.all_sum).to(run.device)
    # (rows, completions [B, T], loss mask [B, T], the sampler's log-probs [B, T], prompts: (ids [U, P], lengths [U],
    # which prompt each row follows))
    chunks = [(rows, c.to(run.device), w.to(run.device),
               pad_right([records[i].logprobs for i in rows], 0.0, torch.float, c.shape[1]).to(run.device),
               tuple(t.to(run.device) for t in (p_ids, p_lens, of_row)))
              for rows, p_ids, p_lens, of_row, c, w in shared_prompt_micro_batches(
                  [r.prompt for r in records], [r.ids for r in records], weights, args.micro_batch_tokens)]
    old, ref, keep = no_grad_pass(run, args, train_model, ref_model, chunks)
    n_seqs = run.all_sum(len(weights))
    n_all = run.all_sum(sum(map(sum, weights)))  # every loss token: what the logged means count
    n_tokens = n_all if keep is None else run.all_sum(sum(k.sum().item() for k in keep))  # those that take loss
    stats = {"kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "mismatch_k3": 0.0, "mismatch_outside_frac": 0.0}
    for it in range(args.mu):
        for i, ((rows, c, w, sampled, prompts), sync) in enumerate(run.lockstep(chunks, train_model, idle=idle_pass)):
            with run.no_sync(train_model, sync), run.autocast():
                logp, entropy = train_model(c, prompts=prompts)  # [B, T]: no [B, T, V] kept
                old_logp = old[i] if old[i] is not None else sampled if args.old_logprobs == "sampler" else logp.detach()
                loss_w = w if keep is None else keep[i]
                if args.rollout_correction != "none":
                    loss_w = loss_w * rollout_correction(old_logp, sampled, w, args.rollout_correction,
                                                         *args.correction_bounds)
                per_token, clipped = policy_objective(logp, old_logp, adv[rows, None], loss_w, args)
                if ref[i] is not None:
                    kl = kl_penalty(logp, ref[i], args.kl_estimator)
                    per_token = per_token + args.beta * kl
                    stats["kl"] += ((kl * w).sum() / n_all).item() / args.mu
                if args.entropy_coef:
                    per_token = per_token - args.entropy_coef * entropy
                loss = aggregate(per_token, loss_w, args.aggregation, n_seqs, n_tokens, args.max_new_tokens)
                (loss * run.world).backward()  # DDP averages over ranks; the normalisers already count all ranks
            stats["clip_frac"] += ((clipped * w).sum() / n_all).item() / args.mu
            if it == 0:
                k3, outside = sampler_mismatch(old_logp, sampled, w)
                stats["mismatch_k3"] += k3 / n_all
                stats["mismatch_outside_frac"] += outside / n_all
                stats["entropy"] += ((entropy.detach() * w).sum() / n_all).item()
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr)
    stats = {k: run.all_sum(v) for k, v in stats.items()}
    return {**stats, "grad_norm": grad_norm, "skipped": skipped}


@torch.no_grad()
def no_grad_pass(run, args, train_model, ref_model, chunks):
    """One forward pass without gradient over the step's micro-batches, for what the training passes need before
    they start: pi_old when --mu > 1 (from the trainer, unless --old_logprobs sampler), pi_ref when --beta > 0, and
    the loss tokens --top_entropy_quantile keeps. -> ([old log-probs or None], [ref log-probs or None], [keep mask]
    or None), one entry per micro-batch."""
    trainer_old = args.mu > 1 and args.old_logprobs == "trainer"
    old, ref, entropies = [], [], []
    with run.autocast(), run.full_params(train_model):  # FSDP: gathered once, not per chunk
        for rows, c, w, sampled, prompts in chunks:
            logp, entropy = train_model(c, prompts=prompts) if trainer_old or args.top_entropy_quantile else (None, None)
            old.append(logp if trainer_old else None)
            entropies.append(entropy)
            ref.append(ref_model(c, prompts=prompts)[0] if ref_model is not None else None)
    keep = None
    if args.top_entropy_quantile:
        keep = top_entropy_mask(entropies, [w for _, _, w, _, _ in chunks], args.top_entropy_quantile, run.all_gather)
    return old, ref, keep


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
