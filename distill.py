r"""Reasoning distillation: make a small student reason like a larger teacher, the two ways the literature does it.

  --mode traces  DeepSeek-R1-Distill style (DeepSeek-AI 2025, sections 2.3.3 and 2.4): the teacher samples k
                 reasoning traces per prompt, verify.py keeps the correct, well-formed ones (rejection sampling),
                 the kept traces are written as a chat JSONL dataset (out/distill/traces.jsonl, the format sft.py
                 reads) and the student is fine-tuned on them with sft.py's loop. Teacher and student may have
                 different tokenizers.
  --mode logits  token-level knowledge distillation with the teacher's full next-token distributions: forward KL,
                 reverse KL or GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024), on fixed sequences
                 (teacher samples or dataset completions, teacher-forced) and/or on the student's own samples
                 (on-policy distillation; --on_policy_frac is GKD's lambda). Teacher and student must share a
                 vocabulary.

CPU, no arguments: distils the committed tiny checkpoint (out/grpo/final when it exists) into a fresh 2-layer,
width-64 student on the built-in arithmetic task (a few minutes), printing held-out greedy accuracy of the teacher and
of the student before and after (also in out/distill/summary.json):
    python distill.py                      # traces
    python distill.py --mode logits        # forward KL, half on the student's samples, half on the built-in solutions
Only write the rejection-sampled dataset (e.g. the R1 recipe's self-distillation data, to be mixed with other SFT data):
    python distill.py --teacher out/grpo/final --traces_only --num_prompts 20000 --samples_per_prompt 8
8 GPUs (teacher in bf16; prompts are sharded over ranks):
    torchrun --nproc_per_node=8 distill.py --teacher DeepSeek-R1-Distill-Qwen-7B --student Qwen2.5-1.5B-Instruct \
        --data math_train.jsonl --heldout_data math500.jsonl --num_prompts 20000 --samples_per_prompt 4 \
        --max_new_tokens 4096 --mix_data chat.jsonl --batch_size 128 --lr 1e-5 --max_steps 1000 \
        --micro_batch_tokens 32768 --grad_checkpointing --save_every 100
    torchrun --nproc_per_node=8 distill.py --mode logits --loss jsd --beta 0.5 --on_policy_frac 0.5 \
        --teacher Qwen2.5-7B-Instruct --student Qwen2.5-0.5B-Instruct --data gsm8k_train.jsonl \
        --heldout_data gsm8k_test.jsonl --batch_size 64 --lr 1e-5 --max_steps 500 --max_new_tokens 512 \
        --micro_batch_tokens 16384 --teacher_micro_batch_tokens 8192 --grad_checkpointing

Divergences (per completion token; P = teacher, Q = student, both softmax(z / tau) at --kd_temperature tau, and every
divergence is multiplied by tau^2 so that its gradient keeps the same scale as tau changes, Hinton et al. 2015):
  forward_kl  KL(P || Q) = sum_v P_v log(P_v / Q_v)           mode covering; at tau = 1 it is cross-entropy on the
                                                              teacher's soft labels, gradient Q - P w.r.t. z_student
  reverse_kl  KL(Q || P) = sum_v Q_v log(Q_v / P_v)           mode seeking (MiniLLM, GKD)
  jsd         JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
              (the GKD paper's convention, arXiv:2306.13649). beta = 0.5 is the symmetric Jensen-Shannon divergence (at
              most log 2). Both ends are degenerate (M becomes Q or P and the value goes to 0), so beta must lie in
              (0, 1): JSD_beta / beta -> forward KL as beta -> 0, JSD_beta / (1 - beta) -> reverse KL as beta -> 1; for
              the end points themselves use --loss forward_kl / reverse_kl.
The loss is the mean over every completion token of the step (all micro-batches and ranks), like sft.py's.
"""
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import tools
import verify
from common import (ArgumentParser, Run, add_training_args, checkpoint_or_stop, count, first_loss_position, fraction,
                    load_frozen, load_model, load_tokenizer, lr_at, make_optimizer, micro_batches, non_negative_int,
                    optimizer_step, positive, resume, save_checkpoint, step_problems, user_input)
from model import ModelConfig, tokenizer_mismatch
from sample import (Engine, ToolUse, add_rl_data_args, add_tool_args, check_sandbox, heldout_accuracy, prompt_ids,
                    rl_data_defaults, rl_problems, rollout)
from sft import builtin_chats, load_chats, tokenize_dataset
from sft import train as sft_train

DEFAULT_TEACHERS = ("out/grpo/final", "checkpoints/tiny-sft")  # the first that exists is the default --teacher


def parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["traces", "logits"], default="traces",
                   help="traces: rejection-sampled teacher traces + SFT; logits: token-level KD (see above)")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: the first of "
                   f"{', '.join(DEFAULT_TEACHERS)} that exists)")
    p.add_argument("--student", default=None, help="student model folder (default: a fresh model of --n_layer, "
                   "--n_embd, --n_head with the byte-level tokenizer)")
    p.add_argument("--n_layer", type=count, default=2, help="fresh student: layers")
    p.add_argument("--n_embd", type=count, default=64, help="fresh student: hidden size")
    p.add_argument("--n_head", type=count, default=4, help="fresh student: attention heads")
    add_rl_data_args(p, max_new_tokens=96, temperature=None)  # --temperature: 0.7 for traces, 1.0 for logits
    p.add_argument("--gen_batch_size", type=count, default=256, help="sequences per generate call")
    # traces mode
    p.add_argument("--num_prompts", type=count, default=2000, help="traces: prompts the teacher answers (all ranks)")
    p.add_argument("--samples_per_prompt", type=count, default=4, help="traces: k, traces sampled per prompt")
    p.add_argument("--keep", choices=["all", "shortest"], default="all",
                   help="traces: keep every verified trace, or only the shortest (--max_per_prompt shortest if set)")
    p.add_argument("--max_per_prompt", type=non_negative_int, default=0,
                   help="traces: keep at most this many per prompt (0: no cap)")
    p.add_argument("--format", choices=["strict", "lenient", "none"], default="strict",
                   help="traces: format check besides a correct answer (verify.strict_format_reward / format_reward)")
    p.add_argument("--traces_file", default=None, help="traces: the dataset written (default: OUT/traces.jsonl)")
    p.add_argument("--traces_only", action="store_true", help="traces: write the dataset and stop (no student)")
    p.add_argument("--mix_data", action="append", default=[],
                   help="traces: chat JSONL of extra SFT examples trained on together with the traces (repeatable)")
    p.add_argument("--max_len", type=count, default=1024,
                   help="longer SFT (traces, --mix_data) and --kd_data examples are truncated")
    # logits mode
    p.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl",
                   help="logits: the divergence (see above)")
    p.add_argument("--beta", type=float, default=0.5, help="logits: JSD's beta, in (0, 1)")
    p.add_argument("--kd_temperature", type=positive, default=1.0, help="logits: tau, softmax temperature of both models")
    p.add_argument("--on_policy_frac", type=fraction, default=0.5,
                   help="logits: lambda, the fraction of each step's sequences sampled by the student")
    p.add_argument("--kd_data", default=None, help="logits: the other (teacher-forced) sequences: 'teacher' (the "
                   "teacher samples completions of --data prompts), 'builtin' (the built-in task's worked solutions) "
                   "or a chat JSONL whose assistant turns are scored (default: builtin with --data builtin, else "
                   "teacher)")
    p.add_argument("--teacher_micro_batch_tokens", type=count, default=None,
                   help="logits: padded tokens per teacher forward pass (default: --micro_batch_tokens)")
    add_training_args(p, "distill", lr=3e-3, max_steps=400, batch_size=64)
    add_tool_args(p)
    return p


def parse_args(argv=None):
    p = parser()
    args = rl_data_defaults(p.parse_args(argv), 96)
    args.teacher = args.teacher or next((t for t in DEFAULT_TEACHERS if Path(t, "config.json").exists()),
                                        DEFAULT_TEACHERS[-1])
    args.kd_data = args.kd_data or ("builtin" if tools.is_builtin(args.data) else "teacher")
    args.temperature = args.temperature if args.temperature is not None else (0.7 if args.mode == "traces" else 1.0)
    args.traces_file = args.traces_file or os.path.join(args.out, "traces.jsonl")
    args.teacher_micro_batch_tokens = args.teacher_micro_batch_tokens or args.micro_batch_tokens
    if args.loss == "jsd" and not 0 < args.beta < 1:
        p.error(f"--beta {args.beta}: JSD_beta needs 0 < beta < 1 (it is 0 at both ends); "
                "use --loss forward_kl (beta -> 0) or --loss reverse_kl (beta -> 1)")
    if args.traces_only and args.mode != "traces":
        p.error("--traces_only belongs to --mode traces")
    if not 0 <= args.on_policy_frac <= 1:
        p.error(f"--on_policy_frac {args.on_policy_frac} must lie in [0, 1]")
    return args


# ----------------------------------------------------------------------------------------------------
# Logit distillation: the divergences, per token, in float32


def token_divergence(student_logits, teacher_logits, loss, beta=0.5, temperature=1.0):
    """Divergence between teacher P = softmax(z_t / tau) and student Q = softmax(z_s / tau), times tau^2, per row:
    [N, V], [N, V] -> [N] float32. loss: forward_kl KL(P||Q), reverse_kl KL(Q||P), jsd JSD_beta(P||Q)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # log Q  [N, V]
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # log P  [N, V]
    if loss == "forward_kl":
        d = (logp.exp() * (logp - logq)).sum(-1)  # KL(P || Q) = sum_v P_v (log P_v - log Q_v)
    elif loss == "reverse_kl":
        d = (logq.exp() * (logq - logp)).sum(-1)  # KL(Q || P) = sum_v Q_v (log Q_v - log P_v)
    elif loss == "jsd":
        # log M = log(beta P + (1 - beta) Q), computed from the logs (no underflow for tiny probabilities)
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), dim=0)
        # JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)
        d = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {loss!r}")
    return d * temperature ** 2


def divergence_head_loss(teacher_h, teacher_w, mask, loss, beta=0.5, temperature=1.0, vocab_size=None):
    """Logit distillation as a loss over the student's logits a chunk of rows at a time (Transformer.forward's
    head_loss: the student's [B, T, V] logits are never held whole, nor kept for backward): for the chunk's rows,
    sum_t mask_t D(P_t, Q_t) with the teacher's logits made from its hidden states teacher_h [B, T, C_t] and lm_head
    weight teacher_w there (no gradient), both cut to the tokenizer's vocab_size (checkpoints pad their embedding
    past it, by different amounts). The caller divides by the step's number of completion tokens."""
    hidden, weights = teacher_h.reshape(-1, teacher_h.shape[-1]), mask.reshape(-1).float()

    def chunk_loss(student_logits, rows):
        with torch.no_grad():
            teacher_logits = F.linear(hidden[rows].to(teacher_w.dtype), teacher_w).float()
        V = vocab_size or student_logits.shape[-1]
        return (token_divergence(student_logits[:, :V], teacher_logits[:, :V], loss, beta, temperature)
                * weights[rows]).sum()
    return chunk_loss


@torch.no_grad()
def teacher_hidden(run, teacher, x, max_tokens, logits_from=0):
    """The teacher's final hidden states [B, T - logits_from, C] for a micro-batch x [B, T], at most max_tokens
    padded tokens per forward pass (a teacher much larger than the student needs smaller pieces), no gradient."""
    rows = max(1, max_tokens // x.shape[1])
    with run.autocast():
        return torch.cat([teacher.hidden(x[i:i + rows])[:, logits_from:] for i in range(0, x.shape[0], rows)])


# ----------------------------------------------------------------------------------------------------
# Trace distillation: rejection sampling


FORMAT_CHECKS = {"strict": verify.strict_format_reward, "lenient": verify.format_reward, "none": None}


def is_verified(problem, text, truncated, fmt="strict"):
    """A trace is kept iff it ended by itself (not cut at max_new_tokens), its final answer is right
    (verify.accuracy_reward: math, Countdown, or every test of a code problem passed) and it is well formed (the --format check; the <think> tag may come from the prompt)."""
    check = FORMAT_CHECKS[fmt]
    return (not truncated and verify.safe_reward(verify.accuracy_reward, problem, text) == 1.0
            and (check is None or verify.safe_reward(check, text, require_open_tag=False) == 1.0))


def select_traces(problems, samples, keep="all", max_per_prompt=0, fmt="strict"):
    """Rejection sampling. samples[i] = the Rollouts sampled for problems[i], graded on the model's own text. Per
    problem, of the verified traces keep all (in sampling order, at most max_per_prompt if > 0) or, with
    keep='shortest', the shortest one (the max_per_prompt shortest if > 0; ties in sampling order). Returns
    [(problem, text, n_tokens)]: the whole text, tool calls and their outputs included (sft.py masks the outputs)."""
    kept = []
    for problem, group in zip(problems, samples):
        ok = [r for r in group if is_verified(problem, r.own_text, r.truncated, fmt)]
        if keep == "shortest":
            ok = sorted(ok, key=lambda r: len(r.ids))[:max_per_prompt or 1]  # sorted() is stable
        elif max_per_prompt:
            ok = ok[:max_per_prompt]
        kept += [(problem, r.text, len(r.ids)) for r in ok]
    return kept


def write_traces(path, kept):
    """The kept traces as a chat JSONL dataset ({"messages": [user, assistant]}, what sft.py reads), written to a
    temporary file and renamed, so a kill never leaves half a dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for problem, text, n in kept:
            f.write(json.dumps({"messages": [{"role": "user", "content": problem["prompt"]},
                                             {"role": "assistant", "content": text}],
                                "answer": problem.get("answer"), "n_tokens": n}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def sample_completions(run, args, engine, tokenizer, problems, n, seed, tool_use=None):
    """n samples per problem (sample.rollout, --gen_batch_size rows at a time) -> per problem, its n Rollouts."""
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    records = rollout(run, engine, tokenizer, [q for q in prompts for _ in range(n)], args.max_new_tokens,
                      args.temperature, args.top_p, seed=seed, batch_size=args.gen_batch_size, tool_use=tool_use)
    return [records[j * n:(j + 1) * n] for j in range(len(problems))]


def make_traces(run, args, engine, tokenizer, problems, tool_use=None):
    """Every rank samples its shard of the prompts, the kept traces are gathered, rank 0 writes the dataset.
    Returns the statistics (keep rate, lengths)."""
    mine = problems[run.rank::run.world]
    seed = random.Random(f"traces-{args.seed}-{run.rank}").randrange(2**31)
    samples = sample_completions(run, args, engine, tokenizer, mine, args.samples_per_prompt, seed, tool_use)
    kept = select_traces(mine, samples, args.keep, args.max_per_prompt, args.format)
    with_trace = run.all_sum(len({id(p) for p, _, _ in kept}))  # prompts with at least one kept trace
    if run.world > 1:
        every = [None] * run.world
        dist.all_gather_object(every, kept)
        kept = [t for rank_kept in every for t in rank_kept]
    n_samples = run.all_sum(sum(len(g) for g in samples))
    stats = {"sampled": int(n_samples), "kept": len(kept), "keep_rate": len(kept) / max(1, n_samples),
             "prompts_with_trace": with_trace / max(1, len(problems)),
             "mean_trace_len": sum(n for _, _, n in kept) / max(1, len(kept)),
             "max_trace_len": max((n for _, _, n in kept), default=0),
             "mean_sample_len": run.all_sum(sum(len(r.ids) for g in samples for r in g)) / max(1, n_samples),
             "truncated_frac": run.all_sum(sum(r.truncated for g in samples for r in g)) / max(1, n_samples)}
    if run.is_main:
        run.claim_out()  # the run's first write: an --overwrite-n earlier run moves aside now
        write_traces(args.traces_file, kept)
        Path(args.traces_file).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    run.barrier()
    return stats


# ----------------------------------------------------------------------------------------------------
# Logit distillation: each step's sequences


def step_sequences(run, args, engines, tokenizer, data, kd_examples, step, tool_use=None):
    """This rank's sequences for a step, as (ids, mask) with the mask on completion tokens: a fraction lambda sampled
    by the student (on-policy), the rest sampled by the teacher or taken from --kd_data. GKD flips a lambda-coin per
    batch; a fixed fraction per batch has the same expectation and less variance. The prompts are a function of
    (seed, step, rank) only, so a resumed run sees the same data."""
    n = args.batch_size // run.world
    n_on = round(args.on_policy_frac * n)
    rng = random.Random(f"kd-{args.seed}-{step}-{run.rank}")
    problems = step_problems(run, n, data, step)
    examples, stats = [], {}
    for who, part in (("student", problems[:n_on]), ("teacher", problems[n_on:])):
        if not part:
            continue
        if who == "teacher" and kd_examples is not None:  # dataset completions
            examples += [kd_examples[rng.randrange(len(kd_examples))] for _ in part]
            continue
        seed = random.Random(f"kd-{args.seed}-{step}-{run.rank}-{who}").randrange(2**31)
        records = [g[0] for g in sample_completions(run, args, engines[who], tokenizer, part, 1, seed, tool_use)]
        examples += [(r.prompt + r.ids, [0] * len(r.prompt) + r.mask) for r in records]  # observations: no loss
        stats[f"{who}_sample_acc"] = sum(verify.safe_reward(verify.accuracy_reward, p, r.own_text)
                                         for r, p in zip(records, part))
        stats[f"{who}_sample_len"] = float(sum(sum(r.mask) for r in records))
        stats[f"{who}_samples"] = float(len(part))
    return examples, stats


def train_logits(run, args, student, teacher, engines, tokenizer, data, kd_examples, tool_use=None):
    """The KD loop, shaped like sft.train: per step, sample sequences, score them with the teacher micro-batch by
    micro-batch, and step on the token-mean divergence. Returns the number of steps done."""
    train_model = run.wrap(student)  # DDP / FSDP (which shards the student in place) / compile: before the optimizer
    optimizer = make_optimizer(args, student)
    step = resume(run, {"": student}, {"policy": optimizer}).get("step", 0)
    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc=f"distill {args.loss}")
    while step < args.max_steps:
        t0 = time.time()
        examples, stats = step_sequences(run, args, engines, tokenizer, data, kd_examples, step, tool_use)
        t_gen = time.time() - t0
        n_tokens = run.all_sum(sum(sum(m[1:]) for _, m in examples))
        loss_sum = 0.0
        chunks = micro_batches(examples, args.micro_batch_tokens, tokenizer.pad_token_id)
        for (_, x, _, w), sync in run.lockstep(chunks, train_model):
            start = first_loss_position(w)  # neither model needs logits over the prompt
            x, w = x.to(run.device), w[:, start:].to(run.device)
            t_h = teacher_hidden(run, teacher, x, args.teacher_micro_batch_tokens, start)  # [B, T', C_t], no grad
            kd = divergence_head_loss(t_h, teacher.lm_head.weight, w, args.loss, args.beta, args.kd_temperature,
                                      tokenizer.vocab_size)
            with run.no_sync(train_model, sync), run.autocast():
                loss = train_model(x, logits_from=start, head_loss=kd)  # logits a chunk of rows at a time
                (loss * run.world / n_tokens).backward()  # DDP averages over ranks; we want the global token mean
            loss_sum += loss.item()
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr_at(args, step))
        step += 1
        stats = {k: run.all_sum(v) for k, v in sorted(stats.items())}
        metrics = {"loss": run.all_sum(loss_sum) / n_tokens, "lr": lr_at(args, step - 1), "grad_norm": grad_norm,
                   "skipped": skipped, "gen_s": t_gen, "tokens_per_s": n_tokens / (time.time() - t0)}
        for who in ("student", "teacher"):
            if stats.get(f"{who}_samples"):
                metrics[f"{who}_sample_acc"] = stats[f"{who}_sample_acc"] / stats[f"{who}_samples"]
                metrics[f"{who}_sample_len"] = stats[f"{who}_sample_len"] / stats[f"{who}_samples"]
        run.log(step, metrics, pbar, show=("loss", "student_sample_acc"))
        checkpoint_or_stop(run, step, {"": student}, {"policy": optimizer}, tokenizer)
    pbar.close()
    save_checkpoint(run, step, {"": student}, {"policy": optimizer}, tokenizer)
    return step


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    run = Run.start(args, "distill")
    with user_input():
        # The teacher only runs forward: no gradient, bf16 on GPU (it may be much larger than the student)
        teacher = load_frozen(run, args.teacher)
        teacher_tok = load_tokenizer(args, args.teacher)
        student = student_tok = None
        if not args.traces_only:
            config = ModelConfig(hidden_size=args.n_embd, intermediate_size=3 * args.n_embd,
                                 num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                                 num_key_value_heads=args.n_head, max_position_embeddings=512)
            student, student_tok = load_model(run, args.student, config)
        reason = tokenizer_mismatch(teacher_tok, student_tok) if args.mode == "logits" and student else None
        if reason:
            student_name = args.student or "byte_level (a fresh student)"
            raise SystemExit(f"--mode logits needs one vocabulary, but the teacher's tokenizer ({args.teacher}) and "
                             f"the student's ({student_name}) differ: {reason}. Use a student with the teacher's "
                             "tokenizer, or --mode traces (it distils through text and works across tokenizers).")
        # prompts that leave no room for max_new_tokens in either model's context are dropped (and reported)
        models = [(teacher, teacher_tok)] + ([(student, student_tok)] if student is not None else [])
        data, heldout = rl_problems(args, [(tok, m.config.max_position_embeddings) for m, tok in models])
        check_sandbox(run, args, (data or []) + heldout)
        formats = tools.tool_formats(tools.task_tools(args), args.tool_formats).values()  # their outputs: no loss
        teacher_tools = ToolUse.from_args(args, teacher_tok)
        student_tools = ToolUse.from_args(args, student_tok) if student is not None else None
    teacher_engine = Engine.for_run(run, teacher)
    student_engine = Engine.for_run(run, student) if student is not None else None

    summary = {"mode": args.mode, "teacher": args.teacher, "student": args.student or "fresh"}
    summary["teacher_acc"] = heldout_accuracy(run, teacher_engine, teacher_tok, heldout, args.max_new_tokens,
                                              tool_use=teacher_tools)[0]
    run.print(f"teacher {args.teacher}: held-out greedy accuracy {summary['teacher_acc']:.3f} "
              f"({len(heldout)} problems)")
    if student is not None:
        run.print(f"student: {student.num_params() / 1e6:.2f}M parameters (teacher {teacher.num_params() / 1e6:.2f}M)")
        summary["student_acc_before"] = heldout_accuracy(run, student_engine, student_tok, heldout,
                                                         args.max_new_tokens, tool_use=student_tools)[0]
        run.print(f"student held-out greedy accuracy before: {summary['student_acc_before']:.3f}")

    if args.mode == "traces":
        stats_file = Path(args.traces_file).with_suffix(".stats.json")
        reuse = args.resume and Path(args.traces_file).exists() and stats_file.exists()  # written before the restart
        if reuse:
            stats = json.loads(stats_file.read_text())
        else:
            problems = (tools.task_problems(args.data, "train", args.num_prompts, args.seed) if data is None
                        else random.Random(args.seed).sample(data, min(args.num_prompts, len(data))))
            t0 = time.time()
            stats = make_traces(run, args, teacher_engine, teacher_tok, problems, teacher_tools)
            stats["sampling_s"] = round(time.time() - t0, 1)
        summary.update(stats)
        run.print(f"traces: kept {stats['kept']} of {stats['sampled']} (keep rate {stats['keep_rate']:.3f}; "
                  f"{stats['prompts_with_trace']:.1%} of prompts have one), mean length {stats['mean_trace_len']:.1f} "
                  f"tokens (all samples {stats['mean_sample_len']:.1f}, {stats['truncated_frac']:.1%} truncated); "
                  f"{'reused' if reuse else 'wrote'} {args.traces_file}")
        summary["traces_file"] = args.traces_file
        del teacher, teacher_engine  # not needed any more: free its memory before training
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        if args.traces_only:
            run.write_summary(summary)
            return
        # read the file back: every rank trains on exactly the dataset a user can inspect and reuse
        chats = load_chats(args.traces_file) if stats["kept"] else []
        chats += [c for f in args.mix_data for c in load_chats(f)]
        examples, tok_stats = tokenize_dataset(student_tok, chats, args.max_len, formats)
        if not examples:
            raise SystemExit("no training examples: no trace passed verification (try more --samples_per_prompt, "
                             "another --temperature or --format lenient) and no --mix_data")
        run.print(f"SFT on {len(examples)} examples ({stats['kept']} traces + {len(chats) - stats['kept']} from "
                  f"--mix_data; {tok_stats['truncated']} truncated, {tok_stats['dropped']} dropped)")
        steps, _ = sft_train(run, args, student, student_tok, examples)
        summary["train_examples"] = len(examples)
    else:
        kd_examples = None
        if args.kd_data != "teacher":
            task = args.data if tools.is_builtin(args.data) else "builtin"
            chats = builtin_chats(task, "train", 20000, args.seed) if args.kd_data == "builtin" else load_chats(args.kd_data)
            kd_examples = tokenize_dataset(student_tok, chats, args.max_len, formats)[0]
        engines = {"student": student_engine, "teacher": teacher_engine}
        steps = train_logits(run, args, student, teacher, engines, student_tok, data, kd_examples, student_tools)

    summary["student_acc_after"], summary["student_mean_length_after"] = heldout_accuracy(
        run, student_engine, student_tok, heldout, args.max_new_tokens, tool_use=student_tools)
    final = save_checkpoint(run, steps, {"": student}, {}, student_tok, name="final")
    summary.update(steps=steps, final_checkpoint=str(final))
    run.print(f"held-out greedy accuracy: teacher {summary['teacher_acc']:.3f}, student "
              f"{summary['student_acc_before']:.3f} -> {summary['student_acc_after']:.3f} ({len(heldout)} problems); "
              f"saved {final}")
    run.write_summary(summary, curve=("loss", "eval_loss", "student_sample_acc"))


if __name__ == "__main__":
    main()
