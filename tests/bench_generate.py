"""Generation speed: sample.generate next to transformers' generate on the same model, in one process.

    python -m tests.bench_generate --model ~/.cache/smollm2-135m-instruct            # CPU
    python -m tests.bench_generate --model DIR --device cuda --compile               # GPU, adds CUDA graphs

Prints tokens/s (median of --repeats runs) at batch 1 and 16, 128 new tokens, float32 and bfloat16, the
ratio to transformers, and for batch 1 the memory-bandwidth bound: weight bytes / measured read bandwidth
(the time a decode step needs just to stream every weight once).
"""
import argparse
import statistics
import time

import torch

from model import Transformer, parse_dtype
from sample import generate


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
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    p.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    p.add_argument("--no_reference", action="store_true", help="skip transformers")
    args = p.parse_args()

    bandwidth = read_bandwidth(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = parse_dtype(dtype_name)
        ours = Transformer.from_pretrained(args.model, dtype=dtype, device=args.device)
        ref = None
        if not args.no_reference:
            from transformers import AutoModelForCausalLM
            ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        for B in map(int, args.batches.split(",")):
            prompts = [[1] + list(range(100, 116 + i)) for i in range(B)]  # 17..32 tokens, mixed lengths
            n = B * args.new_tokens
            variants = {"ours": lambda: generate(ours, prompts, args.new_tokens, temperature=0)}
            if args.compile:
                variants["ours+compile"] = lambda: generate(ours, prompts, args.new_tokens, temperature=0, compile=True)
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
    print("\n| dtype | batch | engine | tokens/s | vs transformers | % of bandwidth bound |")
    print("|---|---|---|---|---|---|")
    for d, b, k, v, ratio, frac in rows:
        print(f"| {d} | {b} | {k} | {v:.1f} | {f'{ratio:.2f}x' if ratio else '-'} | "
              f"{f'{100 * frac:.0f}%' if frac else '-'} |")


if __name__ == "__main__":
    main()
