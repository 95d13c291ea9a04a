"""Generation speed: sample.generate next to transformers' generate on the same model, in one process.

    python -m tests.bench_generate --model ~/.cache/smollm2-135m-instruct            # CPU
    python -m tests.bench_generate --model DIR --device cuda --compile               # GPU, adds CUDA graphs

Prints tokens/s (median of --repeats runs) at batch 1 and 16, 128 new tokens, float32 and bfloat16, the
ratio to transformers, and for batch 1 the memory-bandwidth bound: weight bytes / measured read bandwidth
(the time a decode step needs just to stream every weight once).

Then a GRPO-shaped case: --group_prompts distinct prompts x --group_size samples each, greedy, where every live row
is forced to stop with probability --stop_prob at each step (a forward hook on the lm_head of both models sets the
eos logit high), so lengths are geometric, capped at --new_tokens: long-tailed, as RL completions are. Both
engines see the same hook and the same stop law (their draws differ, so their lengths differ a little); each is
credited with the tokens it actually generated, up to and including the stop token.
"""
import argparse
import statistics
import time

import torch

from model import Transformer, parse_dtype
from sample import Engine, generate


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, repeats, device):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(device, nbytes=512 * 2**20, repeats=5):
    """Bytes per second to read a buffer much larger than any cache (a reduction streams it once)."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / median_time(lambda: x.sum().item(), repeats, device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to time")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes ('' skips them)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    p.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    p.add_argument("--no_reference", action="store_true", help="skip transformers")
    p.add_argument("--group_prompts", type=int, default=8, help="GRPO-shaped case: distinct prompts (0 skips it)")
    p.add_argument("--group_size", type=int, default=8, help="GRPO-shaped case: samples per prompt")
    p.add_argument("--stop_prob", type=float, default=0.02, help="GRPO-shaped case: per-step forced-stop probability")
    args = p.parse_args()

    bandwidth = read_bandwidth(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows, group_rows = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = parse_dtype(dtype_name)
        ours = Transformer.from_pretrained(args.model, dtype=dtype, device=args.device)
        compiled = Engine(ours, compile=True)
        ref = None
        if not args.no_reference:
            from transformers import AutoModelForCausalLM
            ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        for B in [int(b) for b in args.batches.split(",") if b]:
            prompts = [[1] + list(range(100, 116 + i)) for i in range(B)]  # 17..32 tokens, mixed lengths
            n = B * args.new_tokens
            variants = {"ours": lambda: generate(ours, prompts, args.new_tokens, temperature=0)}
            if args.compile:  # one engine: its KV cache (and captured graphs) kept between calls
                variants["ours+compile"] = lambda: compiled.generate(prompts, args.new_tokens, temperature=0)
            if ref is not None:
                ids = torch.zeros(B, max(map(len, prompts)), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, pr in enumerate(prompts):  # left padding, as transformers wants for generation
                    ids[i, -len(pr):], mask[i, -len(pr):] = torch.tensor(pr), 1
                ids, mask = ids.to(args.device), mask.to(args.device)
                variants["transformers"] = lambda: ref.generate(
                    ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                speeds = {k: n / median_time(f, args.repeats, args.device) for k, f in variants.items()}
            bound = bandwidth / weight_bytes if B == 1 else None  # decode steps per second if only weights cost
            for k, v in speeds.items():
                rows.append((dtype_name, B, k, v, v / speeds["transformers"] if "transformers" in speeds else None,
                             v / bound if bound else None))
        if args.group_prompts and ref is not None:
            group_rows += grpo_shaped(args, dtype_name, ours, ref)
    print("\n| dtype | batch | engine | tokens/s | vs transformers | % of bandwidth bound |")
    print("|---|---|---|---|---|---|")
    for d, b, k, v, ratio, frac in rows:
        print(f"| {d} | {b} | {k} | {v:.1f} | {f'{ratio:.2f}x' if ratio else '-'} | "
              f"{f'{100 * frac:.0f}%' if frac else '-'} |")
    if group_rows:
        print(f"\nGRPO-shaped: {args.group_prompts} prompts x {args.group_size} samples, stop probability "
              f"{args.stop_prob} per step, at most {args.new_tokens} tokens; the run of median tokens/s of "
              f"{args.repeats}")
        print("\n| dtype | engine | tokens generated | longest row | seconds | tokens/s | vs transformers |")
        print("|---|---|---|---|---|---|---|")
        for d, k, n, longest, sec, ratio in group_rows:
            print(f"| {d} | {k} | {n} | {longest} | {sec:.2f} | {n / sec:.1f} | {ratio:.2f}x |")


def force_stops(lm_head, eos, stop_prob, seed):
    """A forward hook: at each call, every row's last-position eos logit is raised to win the argmax with
    probability stop_prob (its own draw per row), so live rows stop at geometric lengths."""
    g = torch.Generator().manual_seed(seed)

    def hook(module, inputs, out):
        stop = torch.rand(out.shape[0], generator=g) < stop_prob
        out[:, -1, eos] = torch.where(stop.to(out.device), 1e4, out[:, -1, eos].float()).to(out.dtype)
        return out
    return lm_head.register_forward_hook(hook)


def grpo_shaped(args, dtype_name, ours, ref):
    """[(dtype, engine, tokens generated, longest row, median seconds, speed-up over transformers)]"""
    eos = 0  # any id works: both engines stop on it and the hook forces it
    prompts = [[1] + list(range(200 + 7 * i, 232 + 13 * i)) for i in range(args.group_prompts)]  # 33..124 tokens
    prompts = [p for p in prompts for _ in range(args.group_size)]
    B, P = len(prompts), max(map(len, prompts))
    ids, mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    for i, pr in enumerate(prompts):
        ids[i, -len(pr):], mask[i, -len(pr):] = torch.tensor(pr), 1
    ids, mask = ids.to(args.device), mask.to(args.device)

    results = {}
    for name, model, fn in (
            ("ours", ours, lambda: [len(r.ids) for r in generate(ours, prompts, args.new_tokens, temperature=0,
                                                                 stop_token_ids=[eos])]),
            ("transformers", ref, lambda: generated_lengths(ref.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=eos)[:, P:], eos))):
        times, lengths = [], []
        for r in range(args.repeats + 1):  # the first run warms up
            handle = force_stops(model.lm_head, eos, args.stop_prob, seed=r)
            sync(args.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                lens = fn()
            sync(args.device)
            handle.remove()
            if r:
                times.append(time.perf_counter() - t0)
                lengths.append(lens)
        k = sorted(range(args.repeats), key=lambda i: sum(lengths[i]) / times[i])[(args.repeats - 1) // 2]
        results[name] = (sum(lengths[k]), max(lengths[k]), times[k])  # the run of median tokens/s (the lower one)
    ref_speed = results["transformers"][0] / results["transformers"][2]
    return [(dtype_name, name, n, longest, sec, n / sec / ref_speed) for name, (n, longest, sec) in results.items()]


def generated_lengths(out, eos):
    """transformers' output rows [B, T] (padded with eos after a stop) -> tokens generated per row, stop included."""
    lengths = []
    for row in out.tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


if __name__ == "__main__":
    main()
