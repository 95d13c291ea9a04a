"""Batched sampling with a static KV cache: the rollout engine of every RL script, and a command line to
chat with or evaluate a checkpoint.

CPU:
    python sample.py --model ~/.cache/smollm2-135m-instruct --prompt "What is 12+7?"
    python sample.py --eval builtin --n 8                    # the committed tiny model on the built-in task
    python sample.py --eval gsm8k_test.jsonl --model DIR --n 16 --temperature 0.6 --limit 100
    python sample.py --eval builtin --n 8 --compare checkpoints/tiny-sft out/grpo/final
GPU (one device is enough for sampling; compile captures the decode step in a CUDA graph):
    python sample.py --model DIR --prompt "What is 12+7?" --device cuda --dtype bfloat16 --compile
    python sample.py --model DIR --eval gsm8k_test.jsonl --n 16 --device cuda --dtype bfloat16 --batch_size 512
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import verify
from model import KVCache, Tokenizer, Transformer, padding_inputs


# How a math problem from a data file becomes the user turn (R1 style: think first, then a boxed answer).
PROMPT_TEMPLATE = ("{question}\nThink step by step inside <think> </think> tags, then give the final answer "
                   "in \\boxed{}.")

# ----------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next tokens [B] from logits [B, V]: greedy when temperature == 0, else softmax(z / T) restricted to
    the top-k tokens and to the smallest set whose probability reaches top_p (nucleus, Holtzman et al. 2020)."""
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
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_step(model, tokens, positions, mask, cache, cache_pos):
    """One token per sequence through the model: tokens [B, 1] -> logits [B, V]."""
    return model(tokens, mask, positions, cache, cache_pos)[:, -1]


# Captured once per (model, batch, cache length): the decode step runs as one CUDA graph on GPU.
compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token_ids=None,
             seed=None, compile=False, on_token=None):
    """Sample continuations for a batch of prompts (lists of token ids, any lengths) -> list of generated
    token-id lists. Each sequence stops at its own stop token, which is kept as its last id; a list without
    one hit max_new_tokens. Prompts are left-padded so every row decodes at the same cache slot.
    on_token(list_of_B_ids) is called after every step (for streaming)."""
    model = getattr(model, "module", model)  # DDP wrapper -> the model
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    S = P + max_new_tokens
    if compile:  # few distinct cache lengths -> few recompilations
        S = -(-S // 128) * 128
    if S > model.config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        valid[i, P - len(p):P] = True
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.embed_tokens.weight.dtype
    cache = KVCache(model.config, B, S, device, dtype)
    stop = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    positions, mask = padding_inputs(valid[:, :P])  # [B, 1, P, P]: the prompt reads only its own slots
    logits = model(ids, mask, positions, cache, torch.arange(P, device=device))[:, -1]
    next_pos = positions[:, -1:] + 1  # [B, 1]
    step = compiled_decode_step if compile else decode_step
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        tok = tok.masked_fill(done, 0)
        out[:, t] = tok
        done |= torch.isin(tok, stop)
        n = t + 1
        if on_token is not None:
            on_token(tok.tolist())
        if t == max_new_tokens - 1 or done.all():
            break
        valid[:, P + t] = True
        # eager attention reads only the slots filled so far; a compiled step keeps one shape: all S slots
        seen = valid[:, None, None, :] if compile else valid[:, None, None, :P + t + 1]
        logits = step(model, tok[:, None], next_pos, seen, cache, torch.tensor([P + t], device=device)).clone()
        next_pos = next_pos + 1

    result = []
    stop_set = set(stop.tolist())
    for row in out[:, :n].tolist():
        end = next((j + 1 for j, x in enumerate(row) if x in stop_set), len(row))
        result.append(row[:end])
    return result


def render(tokenizer, messages, add_generation_prompt):
    """The chat as text, with the checkpoint's chat template; a base model without one gets the turns' contents
    run together, each assistant turn closed by eos."""
    if tokenizer.chat_template is None:
        eos = tokenizer.decode([tokenizer.eos_token_id])
        return "".join(m["content"] + ("" if m["role"] == "user" else eos) for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, text, system=None):
    """Token ids of one user turn (after an optional system message), ready for the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))


def stop_token_ids_for(model_dir, tokenizer):
    """Generation stops at the tokenizer's eos and at every eos id in generation_config.json."""
    ids = {tokenizer.eos_token_id}
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------------
# Evaluation: pass@k, maj@k, lengths and format over a problems file


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


def load_eval_problems(source, template):
    """Problems from a JSONL file (the template turns each question into the user turn), or the built-in task's
    held-out split ('builtin': prompts used as they are, the way the built-in models were trained)."""
    if source == "builtin":
        from sft import builtin_problems  # imported here: sft.py itself imports this file
        return builtin_problems("heldout", 500)
    return templated_problems(source, template)


def powers_of_two(n):
    return [k for k in (2 ** i for i in range(n.bit_length())) if k <= n]


def evaluate(model, tokenizer, problems, n=1, max_new_tokens=512, temperature=0.6, top_p=None, seed=0,
             batch_size=64, stop_token_ids=None, compile=False, samples_file=None):
    """Sample n completions per problem and grade them. Returns the summary dict; writes one JSONL line per sample
    (problem id, completion, extracted answer, reward) when samples_file is given."""
    stop = stop_token_ids or [tokenizer.eos_token_id]
    jobs = [(i, j) for i in range(len(problems)) for j in range(n)]
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    rows = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="eval", leave=False):
        chunk = jobs[start:start + batch_size]
        outs = generate(model, [prompts[i] for i, _ in chunk], max_new_tokens, temperature=temperature, top_p=top_p,
                        stop_token_ids=stop, seed=seed + start, compile=compile)
        for (i, j), out in zip(chunk, outs):
            text = tokenizer.decode(out[:-1] if out and out[-1] in stop else out)
            answer = verify.extract_answer(text)
            rows.append({"id": i, "sample": j, "prompt": problems[i]["prompt"], "completion": text, "answer": answer,
                         "gold": problems[i]["answer"], "length": len(out),
                         "reward": 1.0 if answer is not None and verify.is_equiv(answer, problems[i]["answer"]) else 0.0,
                         "format": verify.format_reward(text)})
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/tiny-sft", help="Hugging Face model folder")
    p.add_argument("--prompt", default="Compute 7+5-3+8.", help="user message (or raw text with --no_chat_template)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--no_chat_template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0, or 0.6 with --eval)")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--eval", default=None, metavar="DATA", help="evaluate on a problems JSONL (prompt/answer, GSM8K or "
                   "MATH format) or 'builtin' (the built-in task's 500 held-out problems)")
    p.add_argument("--n", type=int, default=1, help="--eval: samples per problem (pass@k and maj@k for k = 1, 2, 4.. n)")
    p.add_argument("--limit", type=int, default=None, help="--eval: only the first N problems")
    p.add_argument("--batch_size", type=int, default=64, help="--eval: sequences generated together")
    p.add_argument("--prompt_template", default=PROMPT_TEMPLATE, help="--eval: how a file's question becomes the "
                   "user turn ({question} is replaced)")
    p.add_argument("--out", default="out/eval", help="--eval: folder for samples.jsonl and summary.json")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="--eval: several checkpoints, one "
                   "table (same data, same seeds)")
    args = p.parse_args(argv)
    if args.temperature is None:
        args.temperature = 0.6 if args.eval else 0.0
    return args


def run_eval(args):
    problems = load_eval_problems(args.eval, args.prompt_template)[:args.limit]
    results = {}
    for path in args.compare or [args.model]:
        tokenizer = Tokenizer.from_pretrained(path)
        model = Transformer.from_pretrained(path, dtype=args.dtype, device=args.device)
        name = str(path)
        out = Path(args.out) / (name.strip("/").replace("/", "_") if args.compare else "")  # out/grpo/final -> out_grpo_final
        results[name] = evaluate(model, tokenizer, problems, n=args.n, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 batch_size=args.batch_size, stop_token_ids=stop_token_ids_for(path, tokenizer),
                                 compile=args.compile, samples_file=out / "samples.jsonl")
        (out / "summary.json").write_text(json.dumps({"model": str(path), "data": args.eval, **results[name],
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
    if args.eval or args.compare:
        if not args.eval:
            raise SystemExit("--compare needs --eval DATA (the problems to compare the checkpoints on)")
        return run_eval(args)
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = Transformer.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    prompt = tokenizer.encode(args.prompt) if args.no_chat_template else prompt_ids(tokenizer, args.prompt, args.system)
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
             top_p=args.top_p, stop_token_ids=stop_token_ids_for(args.model, tokenizer), seed=args.seed,
             compile=args.compile, on_token=stream)
    dt = time.time() - t0
    print(f"\n[{len(generated)} tokens in {dt:.2f}s, {len(generated) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
