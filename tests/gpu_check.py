"""One table of the numbers that matter on a GPU, on random weights of Qwen2.5-1.5B's shape (no download):

    python -m tests.gpu_check                        # CUDA: the real sizes
    python -m tests.gpu_check --device cpu --tiny    # a tiny model, seconds (tests/test_engine.py runs this)

Rows: bf16 vs float32 logits, compiled vs eager greedy tokens (CUDA, or --compile), whether rollouts and training run
with SDPA's math kernel disabled, decode tokens/s at batch 1/64/512
next to transformers' generate, a GRPO-shaped rollout (64 prompts x 8 samples, 200-token prompts, long-tailed lengths
of median 300 and max 1024) with its lower bound (weight + KV bytes per step / measured read bandwidth) and peak
memory, eager and with the compiled decode step (CUDA graphs, as RL rollouts run on CUDA by default), and one GRPO
training step on that rollout (tokens/s, MFU, peak memory); a rollout with a 100 ms tool call per row next to the
single-turn one; the sampler/trainer log-prob mismatch; a LoRA training step.
"""
import argparse
import tempfile
import time

import torch

import grpo
from common import Run, shared_prompt_micro_batches
from model import LoraConfig, ModelConfig, Tokenizer, Transformer
from sample import Engine, Rollout, ToolUse, cast_weights
from tools import PYTHON_FORMAT, Tool, ToolRunner

QWEN25_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768,
                   tie_word_embeddings=True, architecture="Qwen2ForCausalLM", qkv_bias=True)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            architecture="Qwen2ForCausalLM", qkv_bias=True)
PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16; MFU is reported against it


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(engine, *args, **kwargs):
    """engine.generate's completions as token ids."""
    return [r.ids for r in engine.generate(*args, **kwargs)]


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_gib(device):
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def read_bandwidth(device, nbytes=2**30):
    x = torch.ones(nbytes // 4, device=device)
    x.sum().item()
    t, _ = timed(lambda: [x.sum() for _ in range(5)], device)
    return 5 * nbytes / t


def forced_lengths(model, lengths, prompt_len, stop):
    """Make a rollout long-tailed on random weights: after a row's first (sampled) token a, it repeats a and emits
    `stop` as its lengths[a % len(lengths)]-th token (a forward hook on the logits of decode steps)."""
    def hook(_, args, out):
        if args[0].shape[1] > 1:
            return out  # the prefill: the first token is sampled from the random model
        a, produced = args[0][:, -1], args[2][:, -1] - prompt_len + 2  # token number this step's logits give
        target = torch.where(produced >= lengths[a % len(lengths)], stop, a)
        return torch.full_like(out, -1e4).scatter(-1, target[:, None, None], 0.0)
    return model.register_forward_hook(hook)


CALL_TEXT = "```python\nprint(6*7)\n```"


def scripted_call(model, prompt_len, length, call):
    """Make every row write `length` tokens (bytes 'a'), the call's bytes from its 3rd token on, then stop (token 2):
    the next token is chosen by rope position (a forward hook on the logits), so a tool's observation fed in
    between takes its place and the rows stay the same length with tools and without."""
    script = torch.tensor([97] * 2 + list(call.encode()) + [97] * length)

    def hook(_, args, kwargs, out):
        lf = kwargs.get("logits_from", 0)
        j = (lf if torch.is_tensor(lf) else args[2][:, -1]) + 1 - prompt_len  # index of the next completion token
        target = torch.where(j >= length - 1, 2, script.to(j.device)[j.clamp(0, len(script) - 1)])
        return torch.full_like(out, -1e4).scatter(-1, target[:, None, None].expand(-1, out.shape[1], 1), 0.0)
    return model.register_forward_hook(hook, with_kwargs=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload (CPU smoke run)")
    p.add_argument("--compile", action="store_true", help="compare compiled greedy tokens also on a CPU")
    p.add_argument("--no_reference", action="store_true", help="skip transformers")
    args = p.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    cfg = ModelConfig(**(TINY if tiny else QWEN25_1_5B))
    groups, G, P, median, max_len = (4, 2, 20, 12, 32) if tiny else (64, 8, 200, 300, 1024)
    batches = (1, 4) if tiny else (1, 64, 512)
    decode_tokens = 8 if tiny else 128
    train_dtype, roll_dtype = torch.float32, torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.inv_freq = model.inv_freq.to(device)
    roll = cast_weights(model, roll_dtype) if roll_dtype != torch.float32 else model
    eager, compiled = Engine(roll), Engine(roll, compile=True)  # compiled: its cache and graphs kept between calls
    g = torch.Generator().manual_seed(0)

    # 1. bf16 vs float32 logits
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=g).to(device)
    with torch.no_grad():
        diff = (cast_weights(model, torch.bfloat16)(x).float() - model(x)).abs().max().item()
    rows.append(("bf16 vs float32 logits, max abs diff (2 x 64 tokens)", f"{diff:.3g}"))

    # 2. compiled vs eager greedy tokens
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 17, 3)]
    if device.type == "cuda" or args.compile:
        rows.append(("compiled == eager greedy tokens (4 prompts x 32)",
                     str(generate(compiled, prompts, 32, temperature=0) == generate(eager, prompts, 32, temperature=0))))
    else:
        rows.append(("compiled == eager greedy tokens", "skipped on CPU (--compile)"))

    # 2b. only the fused attention kernels allowed (SDPA's math kernel would copy K/V to float32 and repeat them
    # per query head): a mixed-length rollout (prefill, decode) and a shared-prompt training pass
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    pairs = [p for p in prompts for _ in range(2)]  # 2 samples of each prompt
    try:
        with sdpa_kernel(fused), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            outs = generate(eager, pairs, 8, temperature=1.0, seed=0)
            [(_, p_ids, p_lens, of_row, c, _)] = shared_prompt_micro_batches(pairs, outs, [[1] * len(o) for o in outs],
                                                                             10**6)
            model(c.to(device), prompts=(p_ids.to(device), p_lens.to(device), of_row.to(device)))[0].sum().backward()
        verdict = "yes"
    except RuntimeError as e:
        verdict = "no: " + str(e).splitlines()[0][:150]
    model.zero_grad(set_to_none=True)
    rows.append(("rollout prefill + decode and shared-prompt training, math kernel disabled", verdict))

    # 3. decode tokens/s next to transformers
    ref = None
    if not args.no_reference:
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as d:
            roll.save_pretrained(d)
            ref = AutoModelForCausalLM.from_pretrained(d, dtype=roll_dtype).to(device).eval()
    for B in batches:
        bp = [[1] + list(range(100, 116 + i % 16)) for i in range(B)]
        never = [cfg.vocab_size + 1]
        generate(eager, bp[:1], 2, temperature=0)  # warm-up
        t, _ = timed(lambda: generate(eager, bp, decode_tokens, temperature=0, stop_token_ids=never), device)
        cell = f"{B * decode_tokens / t:.0f}"
        if ref is not None:
            ids = torch.zeros(B, max(map(len, bp)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, pr in enumerate(bp):
                ids[i, -len(pr):], mask[i, -len(pr):] = torch.tensor(pr), 1
            with torch.no_grad():
                tr, _ = timed(lambda: ref.generate(ids.to(device), attention_mask=mask.to(device),
                                                   max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                                   do_sample=False, pad_token_id=0), device)
            cell += f" (transformers {B * decode_tokens / tr:.0f})"
        rows.append((f"decode tokens/s, batch {B}, {decode_tokens} new tokens", cell))
    ref = None  # free transformers' copy before the long rollouts

    # 4. a GRPO-shaped rollout with long-tailed lengths
    lengths = torch.exp(torch.randn(groups * G, generator=g) * 0.6) * median
    lengths = lengths.round().clamp(1, max_len).long()
    lengths[0] = max_len
    stop = 2
    group_prompts = [torch.randint(3, cfg.vocab_size, (P,), generator=g).tolist() for _ in range(groups)]
    prompts = [pr for pr in group_prompts for _ in range(G)]
    handle = forced_lengths(roll, lengths.to(device), P, stop)
    reset_peak(device)
    t, outs = timed(lambda: generate(eager, prompts, max_len, temperature=1.0, stop_token_ids=[stop], seed=0), device)
    handle.remove()
    got = torch.tensor([len(o) for o in outs])
    weight_bytes = sum(q.numel() * q.element_size() for q in roll.parameters())
    kv_per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * roll_dtype.itemsize
    bandwidth = read_bandwidth(device, 2**26 if tiny else 2**30)
    steps = int(got.max())
    bound = sum(weight_bytes + kv_per_slot * (P + s) * int((got > s).sum()) for s in range(steps)) / bandwidth
    rows.append((f"rollout {groups} x {G}, prompts {P}, lengths median {int(got.median())} max {int(got.max())}",
                 f"{t:.2f} s ({got.sum().item() / t:.0f} tokens/s)"))
    rows.append(("rollout lower bound (weights + live KV bytes per step / read bandwidth)",
                 f"{bound:.2f} s ({bandwidth / 1e9:.0f} GB/s)"))
    rows.append(("rollout peak memory", peak_gib(device)))
    if device.type == "cuda" or args.compile:  # the same rollout with the compiled decode step (RL's default on CUDA)
        run_compiled = lambda: generate(compiled, prompts, max_len, temperature=1.0, stop_token_ids=[stop], seed=0)
        torch._dynamo.reset()  # compiled again with the hook: dynamo does not guard on hooks added later
        handle = forced_lengths(roll, lengths.to(device), P, stop)
        t_first, _ = timed(run_compiled, device)  # compiles once, captures a graph per shape
        t_again, outs_compiled = timed(run_compiled, device)  # replays
        handle.remove()
        rows.append(("rollout, compiled decode step (first call: compile + capture)",
                     f"{t_again:.2f} s (first {t_first:.1f} s; same tokens as eager: {outs_compiled == outs})"))
    else:
        rows.append(("rollout, compiled decode step", "skipped on CPU (--compile)"))

    # 4b. rollouts whose every row makes one tool call mid-way, answered after a fixed 100 ms, next to the same
    # rollout without tools (the same tokens, the call text staying plain text): what pausing costs
    half = max(max_len // 2, 48)  # room for the call and its answer in the tiny run too
    handle = scripted_call(roll, P, half, CALL_TEXT)
    tokenizer = Tokenizer.byte_level()
    slow = Tool("python", PYTHON_FORMAT, lambda calls: (time.sleep(0.1), ("42\n", False))[1])
    tool_use = ToolUse([slow], tokenizer, ToolRunner(workers=64, timeout=10.0))
    t_plain, plain = timed(lambda: eager.generate(prompts, half, temperature=1.0, stop_token_ids=[stop], seed=0), device)
    t_tools, with_tools = timed(lambda: eager.generate(prompts, half, temperature=1.0, stop_token_ids=[stop], seed=0,
                                                       tool_use=tool_use), device)
    handle.remove()
    calls = sum(len(r.calls) for r in with_tools)
    rows.append((f"rollout {groups} x {G}, {half} tokens a row: single-turn / one 100 ms tool call a row",
                 f"{t_plain:.2f} s / {t_tools:.2f} s ({calls} calls, {sum(map(len, (r.ids for r in plain)))} and "
                 f"{sum(len(r.ids) for r in with_tools)} tokens)"))

    # 5. one GRPO training step on that rollout
    run_args = grpo.parse_args(["--group_size", str(G), "--batch_size", str(groups * G), "--max_new_tokens",
                                str(max_len), "--micro_batch_tokens", "4096" if tiny else "32768",
                                "--device", str(device), "--out", tempfile.mkdtemp(), "--overwrite"])
    run = Run(run_args, "gpu_check")
    model.to(train_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    records = [Rollout(p, o, [1] * len(o), [0.0] * len(o), "eos") for p, o in zip(prompts, outs)]
    rewards = torch.rand(len(outs), generator=g).tolist()
    reset_peak(device)
    t, _ = timed(lambda: grpo.policy_loss_step(run, run_args, model, None, optimizer, records, rewards, 1e-6), device)
    tokens = sum(len(pr) + len(o) for pr, o in zip(prompts, outs))  # as if each sample were trained on alone
    forwarded = sum(len(pr) for pr in {tuple(p) for p in prompts}) + sum(map(len, outs))  # each prompt once
    mfu = 6 * model.num_params() * forwarded / t / PEAK_BF16_FLOPS
    rows.append((f"GRPO training step ({tokens} sample tokens, {forwarded} forwarded)",
                 f"{tokens / t:.0f} sample tokens/s, {t:.2f} s"))
    rows.append(("training MFU (6 N forwarded tokens / s / 989 TFLOP/s)",
                 f"{100 * mfu:.1f}%" if device.type == "cuda" else "-"))
    rows.append(("training peak memory", peak_gib(device)))

    # 6. sampler vs trainer: the rollout engine's log-probs (bf16 weights, the compiled step on CUDA) against the
    # trainer's (float32 weights under bf16 autocast) on the same tokens: what grpo.py logs every step
    sampler = compiled if device.type == "cuda" else eager
    sampled = sampler.generate(group_prompts, 64, temperature=1.0, seed=1)
    k3 = outside = count = 0.0
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        for r in sampled:
            trainer, _ = model(torch.tensor([r.prompt + r.ids[:-1]], device=device),
                               targets=torch.tensor([r.ids], device=device), logits_from=len(r.prompt) - 1)
            a, b = grpo.sampler_mismatch(trainer[0].float(), torch.tensor(r.logprobs, device=device),
                                         torch.ones(len(r.ids), device=device))
            k3, outside, count = k3 + a, outside + b, count + len(r.ids)
    rows.append((f"sampler vs trainer log-probs ({int(count)} tokens): k3 per token, ratio outside [0.5, 2]",
                 f"{k3 / count:.2e}, {outside / count:.2%}"))

    # 7. a LoRA GRPO step (r 16 on every projection; the base frozen in bf16 on CUDA), next to the full step above
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lora_model = cast_weights(model, base_dtype).add_adapters(LoraConfig(rank=16, alpha=32.0)).train()
    optimizer = model = None  # the full model's state out of the measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lora_opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-6)
    reset_peak(device)
    t, _ = timed(lambda: grpo.policy_loss_step(run, run_args, lora_model, None, lora_opt, records, rewards, 1e-6),
                 device)
    adapters = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    rows.append((f"LoRA GRPO training step (r 16, {adapters:,} adapter parameters, base {base_dtype})",
                 f"{tokens / t:.0f} sample tokens/s, {t:.2f} s, peak {peak_gib(device)}"))

    name = "tiny" if tiny else "Qwen2.5-1.5B shape"
    print(f"\n| check ({name}, {device}, random weights) | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
