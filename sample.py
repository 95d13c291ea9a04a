"""Batched sampling with a static KV cache: the rollout engine of every RL script, and a command line to
chat with or evaluate a checkpoint.

CPU:
    python sample.py --model ~/.cache/smollm2-135m-instruct --prompt "What is 12+7?"
GPU (one device is enough for sampling; compile captures the decode step in a CUDA graph):
    python sample.py --model DIR --prompt "What is 12+7?" --device cuda --dtype bfloat16 --compile
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import KVCache, Tokenizer, Transformer, padding_inputs, parse_dtype


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

    positions, mask = padding_inputs(valid[:, :P])
    mask = F.pad(mask, (0, S - P), value=False)  # [B, 1, P, S]: slots after the prompt are still empty
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
        logits = step(model, tok[:, None], next_pos, valid[:, None, None, :], cache,
                      torch.tensor([P + t], device=device)).clone()
        next_pos = next_pos + 1

    result = []
    stop_set = set(stop.tolist())
    for row in out[:, :n].tolist():
        end = next((j + 1 for j, x in enumerate(row) if x in stop_set), len(row))
        result.append(row[:end])
    return result


def stop_token_ids_for(model_dir, tokenizer):
    """Generation stops at the tokenizer's eos and at every eos id in generation_config.json."""
    ids = {tokenizer.eos_token_id}
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/tiny-sft", help="Hugging Face model folder")
    p.add_argument("--prompt", default="What is 12+7?", help="user message (or raw text with --no_chat_template)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--no_chat_template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    return p.parse_args(argv)


def build_prompt(tokenizer, text, system=None, chat=True):
    """Token ids of a user turn rendered with the checkpoint's chat template (or raw text)."""
    if not chat or tokenizer.chat_template is None:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def main(argv=None):
    args = parse_args(argv)
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = Transformer.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    prompt = build_prompt(tokenizer, args.prompt, args.system, chat=not args.no_chat_template)
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
