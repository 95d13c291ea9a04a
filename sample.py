"""Batched sampling with a static KV cache, the one rollout function every script uses, and a command line to chat
with or evaluate a checkpoint. Top to bottom: sample_next, generate (right-padded prompts, a static cache), render and
prompt_ids (the chat template), stop_token_ids and rollout (generate -> cut at the first stop token -> decode ->
truncated flags), sample_groups and rollout_metrics (an RL step's scored groups, grpo.py and ppo.py), the problems of
a run and held-out greedy accuracy, evaluate (pass@k, maj@k), the command line.

CPU:
    python sample.py --model ~/.cache/smollm2-135m-instruct --prompt "What is 12+7?"
    python sample.py --eval builtin --n 8                    # the committed tiny model on the built-in task
    python sample.py --eval gsm8k_test.jsonl --model DIR --n 16 --temperature 0.6 --limit 100
    python sample.py --eval builtin --n 8 --compare checkpoints/tiny-sft out/grpo/final
GPU (one device is enough for sampling; --compile_decode auto replays the decode step as CUDA graphs there):
    python sample.py --model DIR --prompt "What is 12+7?" --device cuda    # bf16, decode step as CUDA graphs
    python sample.py --model DIR --eval gsm8k_test.jsonl --n 16 --device cuda --dtype bfloat16 --batch_size 512
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import tools
import verify
from common import (ArgumentParser, Run, add_compile_decode_arg, add_prompt_args, count, dtype_name, load_tokenizer,
                    non_negative, positive, probability, prompt_template, save_checkpoint, unwrap, user_input)
from model import KVCache, Transformer


# How a math problem from a data file becomes the user turn (R1 style: think first, then a boxed answer).
PROMPT_TEMPLATE = ("{question}\nThink step by step inside <think> </think> tags, then give the final answer "
                   "in \\boxed{}.")

# ----------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, uniform=None):
    """Next tokens [B] from logits [B, V]: greedy when temperature == 0, else softmax(z / T) restricted to
    the top-k tokens and to the smallest set whose probability reaches top_p (nucleus, Holtzman et al. 2020),
    drawn by inverse CDF from one uniform number per row (uniform [B], else drawn from generator), so a row's
    draw does not depend on which other rows share the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    cdf = logits.softmax(-1).cumsum(-1)  # [B, V]
    # the first token whose cdf exceeds u * total; (1 - 1e-6) keeps the target below the total despite rounding,
    # so a token of probability 0 is never drawn
    target = uniform[:, None].float() * cdf[:, -1:] * (1 - 1e-6)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def decode_step(model, tokens, positions, mask, cache, cache_pos):
    """One token per sequence through the model: tokens [B, 1] -> logits [B, V]."""
    return model(tokens, mask, positions, cache, cache_pos)[:, -1]


# Compiled once with symbolic shapes, so that no batch bucket or attention length recompiles it (a static compile per
# shape would hit torch's limit of 8 recompiles and silently run eager); on a GPU each shape is captured as a CUDA
# graph of its own, once. generate() runs it without duck shaping (see there).
compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=True)


def use_compiled_decode(choice, device):
    """--compile_decode: 'on', 'off', or 'auto': on for CUDA, where the decode step replays as CUDA graphs (one launch
    instead of ~1,650 kernel launches per step), off on a CPU, where there is nothing to capture."""
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cuda")


def decode_cache(model, batch, length, device, dtype):
    """The compiled decode step's KV cache, kept on the model between calls and replaced only by a larger one: a
    CUDA graph replays on the addresses it was captured with, so a new buffer per rollout would mean new captures
    every rollout (and, past torch's re-record limit, eager decoding). Stale slots of earlier calls are masked."""
    batch, length = batch + 1, length + 1  # a spare row and slot: the compiled step's views of the cache are never
    # the whole buffer, so they are never contiguous (torch.compile guards on whether a view is, and would recompile)
    cache = model.__dict__.get("_decode_cache")  # in __dict__: not a module attribute anything saves
    if cache is not None and cache.buf_k.dtype == dtype and cache.buf_k.device == device:
        if cache.buf_k.shape[1] >= batch and cache.buf_k.shape[3] >= length:
            return cache
        batch, length = max(batch, cache.buf_k.shape[1]), max(length, cache.buf_k.shape[3])
    model.__dict__["_decode_cache"] = None  # free the old buffers before allocating their successor
    model.__dict__["_decode_cache"] = cache = KVCache(model.config, batch, length, device, dtype)
    return cache


def batch_bucket(n, device_type, compile):
    """Rows a decode step runs for n live rows: n itself on a CPU (eager); otherwise the next multiple of 8: tensor-core
    friendly, padding rows under 10% from 80 live rows on, and for the compiled step one CUDA graph per multiple of 8
    (as vLLM captures its decode graphs), compiled once for all of them."""
    return n if device_type == "cpu" and not compile else -(-n // 8) * 8


@torch.inference_mode()
@torch.fx.experimental._config.patch(use_duck_shape=False)  # for compiled_decode_step: sizes that happen to be equal
# in its first call (4 rows and 4 layers, 128 rows and 128 slots) must not be assumed equal forever (a recompile)
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token_ids=None,
             seed=None, compile=False, on_token=None, check_every=None):
    """Sample continuations for a batch of prompts (lists of token ids, any lengths) -> list of generated
    token-id lists. Each sequence stops at its own stop token, which is kept as its last id; a list without
    one hit max_new_tokens. Prompts are right-padded, so the prefill is plain causal attention (SDPA's fused kernels,
    no mask), and every row decodes at the same cache slot after the longest prompt, its padding slots masked.
    on_token(list_of_B_ids) is called after every step (for streaming).

    Work done once: a prompt that repeats (an RL group's samples) is prefilled once and its keys/values copied to
    each of its rows; the prefill runs the lm_head at the last prompt position only. Rows that finished leave
    the batch every check_every steps (1 on CPU, 8 on GPU: the loop's only host syncs); the rest are compacted in
    place (KVCache.select_rows) to batch_bucket(live rows) rows, and attention reads only the slots filled so far
    (compile: rounded up to 128). compile runs the decode step through compiled_decode_step, on a KV cache kept
    with the model (decode_cache), so that its CUDA graphs are captured once per shape and replayed in every call."""
    model = unwrap(model)
    device = model.embed_tokens.weight.device
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    first = {}  # distinct prompt -> its row in the prefill
    share = [first.setdefault(tuple(p), len(first)) for p in prompts]  # prompt row i is prefilled as row share[i]
    distinct = list(first)
    B, U, P = len(prompts), len(distinct), max(len(p) for p in distinct)
    S = P + max_new_tokens
    if S > model.config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    if compile:  # cache lengths in steps of 128: the attention lengths the compiled step sees
        S = min(-(-S // 128) * 128, model.config.max_position_embeddings)
    ids = torch.zeros(U, P, dtype=torch.long, device=device)
    valid = torch.zeros(U, S, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    for i, p in enumerate(distinct):
        ids[i, :len(p)] = torch.tensor(p, device=device)
        valid[i, :len(p)] = True
    lengths = valid.sum(1)  # [U]
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.embed_tokens.weight.dtype
    W = batch_bucket(B, device.type, compile) if compile else B  # compiled: a bucket's width from the first step
    cache = decode_cache(model, W, S, device, dtype) if compile else KVCache(model.config, B, S, device, dtype)
    stop = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    check_every = check_every or (1 if device.type == "cpu" else 8)

    cache.select_rows(U)
    # the prefill writes slots 0..P-1 with plain causal attention; logits at each prompt's last token only
    slots = torch.arange(P, device=device)
    logits = model(ids, None, slots.expand(U, P), cache, slots, logits_from=lengths - 1)[:, -1]  # [U, V]
    if U < W:  # every row of a shared prompt starts from a copy of its keys and values (padding rows: of row 0)
        share = torch.tensor(share + [0] * (W - B), device=device)
        cache.select_rows(share, P)
        logits, lengths, valid = logits[share], lengths[share], valid[share]
    bias = torch.zeros(W, S, dtype=dtype, device=device).masked_fill(~valid, float("-inf"))  # additive mask
    next_pos = lengths[:, None].clone()  # [B, 1]: rope positions (each row continues its prompt), advanced on device
    cache_pos = torch.tensor([P], device=device)  # the slot this step writes
    step = compiled_decode_step if compile else decode_step
    rows = torch.arange(W, device=device).clamp(max=B)  # the prompt row of each batch row; B: a padding row
    out = torch.zeros(B + 1, max_new_tokens, dtype=torch.long, device=device)  # row B: padding rows write here
    done = rows == B  # padding rows are done from the start
    n = 0
    for t in range(max_new_tokens):
        uniform = torch.rand(B + 1, generator=generator, device=device)[rows] if temperature > 0 else None
        tok = sample_next(logits, temperature, top_k, top_p, uniform=uniform)
        tok = tok.masked_fill(done, 0)
        out[rows, t] = tok
        done |= torch.isin(tok, stop)
        n = t + 1
        if on_token is not None:
            on_token(out[:B, t].tolist())
        if t == max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0:
            live = (~done).nonzero().squeeze(1)  # a host sync: only every check_every steps
            if len(live) == 0:
                break
            size = batch_bucket(len(live), device.type, compile)
            if size < len(rows):  # finished rows leave; padding rows (copies of a live row) are marked done
                keep = torch.cat([live, live[:1].expand(size - len(live))])
                cache.select_rows(keep, P + t)
                tok, next_pos, bias, rows, done = tok[keep], next_pos[keep], bias[keep], rows[keep], done[keep]
                rows[len(live):], done[len(live):] = B, True
        bias[:, P + t] = 0
        # attention reads only the slots filled so far; compiled, that length rounded up to 128 slots, so each
        # (batch bucket, length) shape is captured once and replayed for 128 steps of every rollout (contiguous:
        # one memory layout for every length)
        if compile:
            seen = bias[:, None, None, :min(S, -(-(P + t + 1) // 128) * 128)].contiguous()
        else:
            seen = bias[:, None, None, :P + t + 1]
        logits = step(model, tok[:, None], next_pos, seen, cache, cache_pos).clone()
        next_pos += 1
        cache_pos += 1

    result = []
    stop_set = set(stop.tolist())
    for row in out[:B, :n].tolist():
        end = next((j + 1 for j, x in enumerate(row) if x in stop_set), len(row))
        result.append(row[:end])
    return result


def render(tokenizer, messages, add_generation_prompt):
    """The chat as text, with the checkpoint's chat template (after --system's message, when the chat has no system
    message of its own); a base model without one gets the turns' contents run together, each assistant turn closed
    by eos."""
    if tokenizer.system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": tokenizer.system}, *messages]
    if tokenizer.chat_template is None:
        eos = tokenizer.decode([tokenizer.eos_token_id])
        return "".join(m["content"] + ("" if m["role"] == "user" else eos) for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, text):
    """Token ids of one user turn, ready for the assistant's reply."""
    return tokenizer.encode(render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True))


def stop_token_ids(model, tokenizer):
    """The one stop rule of every rollout: the tokenizer's eos and every eos id of the checkpoint's
    generation_config.json (Llama 3.1 lists three: end_of_text, eom, eot)."""
    eos = unwrap(model).generation_config.get("eos_token_id")
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    return sorted(i for i in ids if i is not None)


def cast_weights(model, dtype, keep=False):
    """The model with its weights in dtype: itself if they are, else a copy for inference (tied weights stay tied,
    rope frequencies stay float32). Rollouts on a GPU decode from a bf16 copy of float32 training weights: every
    step then reads 2-byte weights and casts nothing, also inside a compiled graph. keep (the compiled decode step):
    the copy stays with the model and is refreshed in place on the next call, so a captured CUDA graph finds the
    weights at the addresses it was captured with (at the cost of holding the copy while training)."""
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    copy = model.__dict__.get("_cast_copy")  # in __dict__, not a submodule: never in parameters() or state_dict()
    if keep and copy is not None and copy.embed_tokens.weight.dtype == dtype:
        for p, q in zip(model.parameters(), copy.parameters()):
            q.copy_(p.detach())
    else:
        with torch.device("meta"):
            copy = Transformer(model.config)
        copy.load_state_dict({n: p.detach().to(dtype) for n, p in model.named_parameters()}, strict=False, assign=True)
        if model.config.tie_word_embeddings:
            copy.lm_head.weight = copy.embed_tokens.weight
        copy.eval().requires_grad_(False)
        if keep:
            model.__dict__["_cast_copy"] = copy
    copy.inv_freq, copy.generation_config = model.inv_freq, model.generation_config
    return copy


@torch.no_grad()
def rollout(run, model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=None, top_k=None, seed=0,
            batch_size=None, desc=None):
    """The rollout of every script: generate from prompt ids (batch_size rows at a time, batch i seeded seed + i),
    cut each row at its first stop token, decode. Returns (completion ids, ending with the stop token unless
    truncated; texts, without it; truncated flags: hit max_new_tokens without a stop token). The decode step is
    compiled as the run's --compile_decode says (auto: CUDA graphs on a GPU)."""
    compile = use_compiled_decode(run.args.compile_decode, run.device)
    stop = stop_token_ids(model, tokenizer)
    batch_size = batch_size or max(1, len(prompts))
    outs = []
    with run.full_params(model) as plain:  # FSDP: gathered once for the whole rollout
        # GPU: float32 master weights are cast to bf16 once per rollout (a copy), not by autocast in every step
        plain = cast_weights(plain, torch.bfloat16, keep=compile) if run.amp else plain
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None or not run.is_main, leave=False):
            outs += generate(plain, prompts[i:i + batch_size], max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, stop_token_ids=stop, seed=seed + i, compile=compile)
    truncated = [not (o and o[-1] in stop) for o in outs]
    texts = [tokenizer.decode(o if t else o[:-1]) for o, t in zip(outs, truncated)]
    return outs, texts, truncated


def sample_groups(run, args, policy, tokenizer, problems, seed, reward_model=None):
    """An RL step's rollouts (grpo.py, ppo.py): args.group_size completions per problem in one rollout, scored by
    verify.compute_rewards. Returns a dict of lists, the samples of a problem adjacent."""
    problems = [p for p in problems for _ in range(args.group_size)]
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    outs, texts, truncated = rollout(run, policy, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                     seed=seed)
    rewards, parts = verify.compute_rewards(args, problems, texts, [len(o) for o in outs], truncated, reward_model)
    return {"prompts": prompts, "completions": outs, "texts": texts, "truncated": truncated, "rewards": rewards,
            "parts": parts}


def rollout_metrics(run, rewards, parts, completions, truncated):
    """What an RL step logs about its rollouts, over all ranks: reward mean and std, accuracy, every other reward
    component as reward_<name> (verify.REWARD_HELP), completion lengths (all, correct and incorrect ones: the length
    bias of Dr. GRPO shows as incorrect completions growing) and the truncated fraction."""
    n = run.all_sum(len(completions))
    lengths = [len(c) for c in completions]
    total_len = run.all_sum(sum(lengths))
    n_correct = run.all_sum(sum(a >= 1 for a in parts["accuracy"]))
    len_correct = run.all_sum(sum(l for l, a in zip(lengths, parts["accuracy"]) if a >= 1))
    mean = run.all_sum(sum(rewards)) / n
    return {"reward": mean, "reward_std": math.sqrt(max(0.0, run.all_sum(sum(r * r for r in rewards)) / n - mean ** 2)),
            "accuracy": run.all_sum(sum(parts["accuracy"])) / n,
            **{f"reward_{k}": run.all_sum(sum(v)) / n for k, v in parts.items() if k != "accuracy"},
            "completion_len_mean": total_len / n, "completion_len_max": run.all_max(max(lengths)),
            "completion_len_correct": len_correct / n_correct if n_correct else None,
            "completion_len_incorrect": (total_len - len_correct) / (n - n_correct) if n > n_correct else None,
            "truncated_frac": run.all_sum(sum(truncated)) / n}


# ----------------------------------------------------------------------------------------------------
# Problems, held-out accuracy and evaluation (pass@k, maj@k, lengths and format over a problems file)


def templated_problems(path, template):
    """The problems of a JSONL file (verify.load_problems), each question put into the prompt template."""
    return [{**p, "prompt": template.replace("\\n", "\n").replace("{question}", p["prompt"])}
            for p in verify.load_problems(path)]


def drop_long_prompts(problems, tokenizer, max_new_tokens, max_positions, source="data"):
    """Problems whose prompt leaves room for max_new_tokens within the context; the others are dropped, counted
    and reported (a prompt that does not fit is never silently cut)."""
    kept = [p for p in problems if len(prompt_ids(tokenizer, p["prompt"])) + max_new_tokens <= max_positions]
    if len(kept) < len(problems):
        print(f"{source}: dropped {len(problems) - len(kept)} of {len(problems)} problems whose prompt + "
              f"{max_new_tokens} new tokens exceeds the context ({max_positions})", file=sys.stderr)
    if not kept:
        raise SystemExit(f"{source}: no problem fits the context of {max_positions} tokens with "
                         f"max_new_tokens {max_new_tokens}")
    return kept


def load_eval_problems(source, template, n=500):
    """Problems from a JSONL file (the template turns each question into the user turn), or the built-in task's
    held-out split of a built-in task ('builtin', 'builtin:countdown': prompts used as they are, the way the built-in
    models were trained)."""
    return tools.task_problems(source, "heldout", n) if tools.is_builtin(source) else templated_problems(source, template)


def add_rl_data_args(p, max_new_tokens, temperature=1.0):
    """The problem and rollout flags of every script that samples from prompts (grpo.py, ppo.py, distill.py), read by
    rl_problems and the rollouts. temperature None: the script chooses (and checks) its own default."""
    p.add_argument("--data", default="builtin", help="problems JSONL (prompt/answer, GSM8K or MATH; code or "
                   "Countdown records), or a built-in task: 'builtin' (arithmetic) or 'builtin:countdown'")
    p.add_argument("--heldout_data", default=None, help="held-out problems JSONL (default: the task's held-out split)")
    p.add_argument("--heldout_problems", type=count, default=500, help="held-out problems for greedy accuracy")
    p.add_argument("--prompt_template", type=prompt_template, default=PROMPT_TEMPLATE,
                   help="how a --data problem becomes the user turn ({question} is replaced)")
    p.add_argument("--max_new_tokens", type=count, default=max_new_tokens, help="completion length limit")
    p.add_argument("--temperature", type=positive, default=temperature, help="rollout sampling temperature (> 0: "
                   "RL learns from the differences between samples)")
    p.add_argument("--top_p", type=probability, default=None, help="rollout nucleus sampling mass, in (0, 1]")
    return p


def rl_problems(args, models):
    """The problems of an RL (or distillation) run: (training problems, None for the built-in task's endless
    stream; held-out problems). models: [(tokenizer, max_positions)]; prompts that leave no room for
    --max_new_tokens in one of them are dropped and counted."""
    def fitting(problems, source):
        for tokenizer, max_positions in models:
            problems = drop_long_prompts(problems, tokenizer, args.max_new_tokens, max_positions, source)
        return problems
    builtin = tools.is_builtin(args.data)
    data = None if builtin else fitting(templated_problems(args.data, args.prompt_template), args.data)
    if args.heldout_data is None:  # the task's own held-out split (the arithmetic task's for a file)
        return data, tools.task_problems(args.data if builtin else "builtin", "heldout", args.heldout_problems)
    heldout = load_eval_problems(args.heldout_data, args.prompt_template)[:args.heldout_problems]
    return data, fitting(heldout, args.heldout_data)


@torch.no_grad()
def heldout_accuracy(run, model, tokenizer, problems, max_new_tokens=96, batch_size=256):
    """Greedy accuracy and mean completion length over problems, split across ranks."""
    mine = problems[run.rank::run.world]
    outs, texts, _ = rollout(run, model, tokenizer, [prompt_ids(tokenizer, p["prompt"]) for p in mine],
                             max_new_tokens, temperature=0.0, batch_size=batch_size)
    correct = sum(verify.safe_reward(verify.accuracy_reward, p, t) for t, p in zip(texts, mine))
    return run.all_sum(correct) / len(problems), run.all_sum(sum(len(o) for o in outs)) / len(problems)


def heldout_before(run, args, model, tokenizer, heldout, state):
    """Held-out greedy accuracy of the starting policy (kept in the checkpoint, so a resumed run reports it too)."""
    if state.get("heldout_acc_before") is not None:
        return state["heldout_acc_before"]
    acc, mean_len = heldout_accuracy(run, model, tokenizer, heldout, args.max_new_tokens)
    run.print(f"held-out greedy accuracy before: {acc:.3f} (mean length {mean_len:.1f})")
    run.log(0, {"heldout_acc": acc, "heldout_mean_length": mean_len})
    return acc


def finish_rl_run(run, args, step, models, optimizers, tokenizer, heldout, state, curve=()):
    """The end of an RL run (grpo.py, ppo.py): held-out greedy accuracy after training, the last step's checkpoint
    (with `state`, what resume needs), the final Hugging Face folder and summary.json."""
    policy = models[""]
    acc, mean_len = heldout_accuracy(run, policy, tokenizer, heldout, args.max_new_tokens)
    run.log(step, {"heldout_acc": acc, "heldout_mean_length": mean_len})
    save_checkpoint(run, step, models, optimizers, tokenizer, state)
    final = save_checkpoint(run, step, {"": policy}, {}, tokenizer, name="final")
    before = state["heldout_acc_before"]
    run.print(f"held-out greedy accuracy: {before:.3f} -> {acc:.3f} ({len(heldout)} problems); saved {final}")
    run.write_summary({"heldout_acc_before": before, "heldout_acc_after": acc, "heldout_mean_length_after": mean_len,
                       "heldout_problems": len(heldout), "steps": step, "final_checkpoint": str(final),
                       **{f"final_{k}": v for k, v in state.items() if k != "heldout_acc_before"}}, curve)


def powers_of_two(n):
    return [k for k in (2 ** i for i in range(n.bit_length())) if k <= n]


def evaluate(run, model, tokenizer, problems, n=1, max_new_tokens=512, temperature=0.6, top_p=None, seed=0,
             batch_size=64, samples_file=None):
    """Sample n completions per problem and grade them. Returns the summary dict; writes one JSONL line per sample
    (problem id, completion, extracted answer, reward) when samples_file is given."""
    jobs = [(i, j) for i in range(len(problems)) for j in range(n)]
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    outs, texts, _ = rollout(run, model, tokenizer, [prompts[i] for i, _ in jobs], max_new_tokens, temperature, top_p,
                             seed=seed, batch_size=batch_size, desc="eval")
    rows = [{"id": i, "sample": j, "prompt": problems[i]["prompt"], "completion": text,
             "answer": verify.extract_answer(text), "gold": problems[i].get("answer"), "length": len(out),
             "reward": verify.safe_reward(verify.accuracy_reward, problems[i], text),
             "format": verify.format_reward(text)} for (i, j), out, text in zip(jobs, outs, texts)]
    if samples_file:
        Path(samples_file).parent.mkdir(parents=True, exist_ok=True)
        Path(samples_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_problem = [rows[i * n:(i + 1) * n] for i in range(len(problems))]
    summary = {"problems": len(problems), "samples_per_problem": n,
               "pass@1": sum(r["reward"] for r in rows) / len(rows),
               "mean_length": sum(r["length"] for r in rows) / len(rows),
               "max_length": max(r["length"] for r in rows),
               "well_formed": sum(r["format"] for r in rows) / len(rows)}
    for k in powers_of_two(n):  # unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), averaged
        summary[f"pass@{k}"] = sum(verify.pass_at_k(n, int(sum(r["reward"] for r in g)), k) for g in by_problem) / len(problems)
    for k in powers_of_two(n):  # majority vote over the first k samples, answers grouped by is_equiv
        summary[f"maj@{k}"] = sum(verify.maj_at_k([r["answer"] for r in g], g[0]["gold"], k) for g in by_problem) / len(problems)
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/tiny-sft", help="Hugging Face model folder")
    p.add_argument("--prompt", default="Compute 7+5-3+8.", help="user message (or raw text with --no_chat_template)")
    p.add_argument("--no_chat_template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--max_new_tokens", type=count, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=non_negative, default=None, help="0 = greedy (default: 0, or 0.6 with --eval)")
    p.add_argument("--top_k", type=count, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=probability, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                   help="cpu or cuda")
    p.add_argument("--dtype", type=dtype_name, default=None, help="float32, bfloat16 or float16 (default: float32 on a "
                   "CPU, bfloat16 on a GPU, whatever the checkpoint stores)")
    add_compile_decode_arg(p)
    p.add_argument("--eval", default=None, metavar="DATA", help="evaluate on a problems JSONL (prompt/answer, GSM8K or "
                   "MATH format; code or Countdown records) or a built-in task's 500 held-out problems ('builtin', "
                   "'builtin:countdown')")
    p.add_argument("--n", type=count, default=1, help="--eval: samples per problem (pass@k and maj@k for k = 1, 2, "
                   "4.. n)")
    p.add_argument("--limit", type=count, default=None, help="--eval: only the first N problems")
    p.add_argument("--batch_size", type=count, default=64, help="--eval: sequences generated together")
    p.add_argument("--prompt_template", type=prompt_template, default=PROMPT_TEMPLATE, help="--eval: how a file's "
                   "question becomes the user turn ({question} is replaced)")
    p.add_argument("--out", default="out/eval", help="--eval: folder for samples.jsonl and summary.json")
    p.add_argument("--overwrite", action="store_true", help="--eval: replace an evaluation already in --out")
    add_prompt_args(p)
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="--eval: several checkpoints, one "
                   "table (same data, same seeds)")
    args = p.parse_args(argv)
    if args.compare and not args.eval:
        p.error("--compare needs --eval DATA (the problems to compare the checkpoints on)")
    if args.temperature is None:
        args.temperature = 0.6 if args.eval else 0.0
    if args.dtype is None:  # float32 on a CPU (bf16 matmuls are slow there), bf16 on a GPU
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


def eval_folders(args):
    """{checkpoint: the folder its samples.jsonl and summary.json go to}, checked before anything is evaluated: an
    evaluation already there is refused unless --overwrite, and each folder must be writable."""
    folders = {str(path): Path(args.out) / (str(path).strip("/").replace("/", "_") if args.compare else "")
               for path in args.compare or [args.model]}  # --compare out/grpo/final -> OUT/out_grpo_final
    for folder in folders.values():
        done = [f for f in ("summary.json", "samples.jsonl") if (folder / f).exists()]
        if done and not args.overwrite:
            raise ValueError(f"{folder} already holds an evaluation ({', '.join(done)}): pass --overwrite to replace "
                             "it, or another --out")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    return folders


def run_eval(args):
    run = Run(args, "sample")
    with user_input():
        folders = eval_folders(args)
        problems = load_eval_problems(args.eval, args.prompt_template)[:args.limit]
    results = {}
    for name, out in folders.items():
        with user_input():
            tokenizer = load_tokenizer(args, name)
            model = Transformer.from_pretrained(name, dtype=args.dtype, device=args.device)
        results[name] = evaluate(run, model, tokenizer, problems, n=args.n, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 batch_size=args.batch_size, samples_file=out / "samples.jsonl")
        (out / "summary.json").write_text(json.dumps({"model": name, "data": args.eval, **results[name],
                                                      "args": vars(args)}, indent=2) + "\n")
        del model
    keys = list(next(iter(results.values())))
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for r in results.values()) + " |")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.eval:
        return run_eval(args)
    with user_input():
        tokenizer = load_tokenizer(args, args.model)
        model = Transformer.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    prompt = tokenizer.encode(args.prompt) if args.no_chat_template else prompt_ids(tokenizer, args.prompt)
    generated = []
    printed = ""

    def stream(tokens):  # decode everything so far and print the new suffix (multi-byte characters arrive whole)
        nonlocal printed
        generated.append(tokens[0])
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    t0 = time.time()
    generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, stop_token_ids=stop_token_ids(model, tokenizer), seed=args.seed,
             compile=use_compiled_decode(args.compile_decode, args.device), on_token=stream)
    dt = time.time() - t0
    print(f"\n[{len(generated)} tokens in {dt:.2f}s, {len(generated) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
