r"""Supervised fine-tuning (SFT), the built-in reasoning task, and the training plumbing every script shares
(distributed setup, optimizer and schedule, atomic checkpoints and resume, metrics, stop signals).

CPU, no arguments: trains a small model from scratch on the built-in arithmetic task (a few minutes):
    python sft.py
Fine-tune a real checkpoint on chat data:
    python sft.py --model ~/.cache/smollm2-135m-instruct --data chat.jsonl --max_steps 200 --lr 2e-5
8 GPUs (one node; see train_ddp.sh for several nodes):
    torchrun --nproc_per_node=8 sft.py --model DIR --data chat.jsonl --batch_size 128 --lr 2e-5 \
        --micro_batch_tokens 16384 --grad_checkpointing
Write the built-in task out as JSONL files to look at or edit (--builtin_size, --step_fraction and --seed apply;
--step_fraction 0 gives terse answers only, 1 every step written out):
    python sft.py --export_builtin data/ --builtin_size 20000

Data (JSONL, one record per line): {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
or {"prompt": ..., "completion": ...}. Loss is on assistant tokens only. Batches are length-bucketed: each
step's examples are sorted by length and cut into micro-batches of at most --micro_batch_tokens padded tokens
(right padding, so plain causal attention is exact and no packing masks are needed).
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import time
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm import tqdm

from model import Block, ModelConfig, Tokenizer, Transformer, parse_dtype, read_safetensors, replace_dir
from sample import generate, prompt_ids, render
from verify import math_reward, read_jsonl

# ----------------------------------------------------------------------------------------------------
# The built-in task: multi-step arithmetic, generated on the fly, graded by verify.math_reward.
# "Compute 7+5-3+8." -> "<think>\n7+5=12\n12-3=9\n9+8=17\n</think>\n\boxed{17}". The SFT data mixes
# step-by-step solutions with terse ones that write only the final equation: a small model gets many terse
# answers wrong, so RL has something real to find (show the work) and response length grows as it does.


def arithmetic_problem(rng, min_terms=2, max_terms=6, max_value=9, max_total=19):
    """A random problem: {"prompt", "answer", "steps", "expr"}. Running totals stay within [0, max_total], so each
    step is one of a few hundred small facts ("12-3=9") while the whole chain is long; difficulty grows with
    max_terms, max_value and max_total."""
    total = rng.randint(1, max_value)
    expr, steps = str(total), []
    for _ in range(rng.randint(min_terms, max_terms) - 1):
        n = rng.randint(1, max_value)
        can_add, can_sub = total + n <= max_total, total - n >= 0
        op = "+" if can_add and (not can_sub or rng.random() < 0.5) else "-" if can_sub else None
        if op is None:  # neither fits: pick a smaller number that can be subtracted
            n, op = rng.randint(1, total) if total else 0, "-"
            if n == 0:
                n, op = rng.randint(1, max_value), "+"
        new = total + n if op == "+" else total - n
        steps.append(f"{total}{op}{n}={new}")
        expr, total = expr + op + str(n), new
    return {"prompt": f"Compute {expr}.", "answer": str(total), "steps": steps, "expr": expr}


def is_heldout(problem):
    return zlib.crc32(problem["expr"].encode()) % 8 == 0  # a fixed eighth of all problems never appears in training


def builtin_problems(split, n, seed=0, **difficulty):
    """n problems from the train or heldout split (disjoint by construction); same seed, same problems."""
    rng, out = random.Random(f"{split}-{seed}"), []
    while len(out) < n:
        p = arithmetic_problem(rng, **difficulty)
        if is_heldout(p) == (split == "heldout"):
            out.append(p)
    return out


def worked_solution(problem, show_steps=True):
    """The R1-format completion: reasoning in <think>, then the boxed answer."""
    work = "\n".join(problem["steps"]) if show_steps else f"{problem['expr']}={problem['answer']}"
    return f"<think>\n{work}\n</think>\n\\boxed{{{problem['answer']}}}"


def builtin_chats(split, n, seed=0, step_fraction=0.4):
    rng = random.Random(f"style-{split}-{seed}")
    return [[{"role": "user", "content": p["prompt"]},
             {"role": "assistant", "content": worked_solution(p, show_steps=rng.random() < step_fraction)}]
            for p in builtin_problems(split, n, seed)]


def export_builtin(folder, n_train=20000, n_heldout=500, seed=0, step_fraction=0.4):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"builtin_sft_train.jsonl": [{"messages": m} for m in builtin_chats("train", n_train, seed, step_fraction)],
             "builtin_sft_heldout.jsonl": [{"messages": m}
                                           for m in builtin_chats("heldout", n_heldout, seed, step_fraction)],
             "builtin_rl_train.jsonl": [{"prompt": p["prompt"], "answer": p["answer"]}
                                        for p in builtin_problems("train", n_train)],
             "builtin_heldout.jsonl": [{"prompt": p["prompt"], "answer": p["answer"]}
                                       for p in builtin_problems("heldout", n_heldout)]}
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {folder / name} ({len(rows)} records)")


# ----------------------------------------------------------------------------------------------------
# Chat data


def load_chats(path):
    """JSONL of {"messages": [...]} or {"prompt", "completion"} -> list of message lists."""
    chats = []
    for lineno, rec in read_jsonl(path):
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
                raise ValueError(f"{path}:{lineno}: 'messages' must be a list of {{'role', 'content'}} objects")
        elif {"prompt", "completion"} <= rec.keys():
            msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
        else:
            raise ValueError(f"{path}:{lineno}: needs 'messages' or 'prompt' and 'completion' (found {sorted(rec)})")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{path}:{lineno}: no assistant message to train on")
        chats.append(msgs)
    if not chats:
        raise ValueError(f"{path}: no records")
    return chats


def tokenize_chat(tokenizer, messages):
    """Token ids [T] and loss mask [T] (1 on assistant turns, including their end-of-turn token). The text
    before each assistant turn is the template rendered up to the generation prompt; the turn itself is what
    the full rendering adds."""
    ids, mask, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("the chat template renders earlier turns differently once later ones are added; "
                             "train on single-turn examples instead")
        for text, label in ((prefix[len(done):], 0), (full[len(prefix):], 1)):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [label] * len(piece)
        done = full
    return ids, mask


def tokenize_dataset(tokenizer, chats, max_len):
    """Tokenize every chat; longer ones are truncated to max_len (counted), ones left with no assistant token
    are dropped (counted)."""
    examples, truncated, dropped = [], 0, 0
    for msgs in chats:
        ids, mask = tokenize_chat(tokenizer, msgs)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        examples.append((ids, mask))
    return examples, {"truncated": truncated, "dropped": dropped}


def micro_batches(examples, max_tokens, pad_id):
    """Sort (ids, mask) examples by length and cut them into right-padded micro-batches of at most max_tokens
    (rows x longest row). Returns [(rows, inputs [B, T], targets [B, T], loss mask [B, T])], rows being the
    examples' indices; position t predicts token t + 1."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(examples[order[end]][0]) <= max_tokens:
            end += 1
        rows = order[start:end]
        T = max(len(examples[i][0]) for i in rows) - 1
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), pad_id, dtype=torch.long)
        w = torch.zeros(len(rows), T)
        for r, i in enumerate(rows):
            ids, mask = examples[i]
            n = len(ids) - 1
            x[r, :n], y[r, :n], w[r, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(mask[1:])
        out.append((rows, x, y, w))
        start = end
    return out


def first_loss_position(w):
    """The first position of a micro-batch where any row takes loss (w [B, T] -> int); 0 if none does. The
    positions before it (the prompts) need no logits."""
    return int(w.any(0).float().argmax())


def sft_loss_sum(model, x, y, w):
    """sum_t w_t * -log pi(y_t | x_<=t): the caller divides by the number of loss tokens in the whole step."""
    start = first_loss_position(w)
    logits, y, w = model(x, logits_from=start), y[:, start:], w[:, start:]  # logits [B, T - start, V]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")
    return (nll * w.reshape(-1)).sum()


# ----------------------------------------------------------------------------------------------------
# Shared training plumbing (imported by grpo.py, ppo.py, reward_model.py, distill.py)


def add_training_args(p, script, lr, max_steps, batch_size):
    """The flags every training script shares."""
    p.add_argument("--out", default=f"out/{script}", help="output folder: checkpoints, metrics.jsonl, summary.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (each rank derives its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="parameter dtype; on CUDA, matmuls also run under bf16 autocast")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine schedule floor, as a fraction of --lr")
    p.add_argument("--warmup_steps", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--max_steps", type=int, default=max_steps, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=batch_size, help="global batch (all ranks together)")
    p.add_argument("--micro_batch_tokens", type=int, default=8192,
                   help="padded tokens per forward/backward pass; larger steps accumulate gradients")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from, or 'auto' (newest in --out)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of refusing")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over ranks "
                   "(FSDP2) instead of replicating them (DDP): for models that do not fit one GPU with DDP")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive NaN/inf steps")
    return p


class Run:
    """Where a training process stands: rank, device, output folder, metrics log and stop requests."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.is_main = self.rank == 0
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA device available (use --device cpu)")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(args.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if args.batch_size % self.world:
            raise SystemExit(f"--batch_size {args.batch_size} is not divisible by the world size {self.world}")
        self.dtype = parse_dtype(args.dtype)
        self.amp = self.device.type == "cuda"  # bf16 autocast for matmuls; parameters stay in --dtype
        random.seed(args.seed + self.rank)
        torch.manual_seed(args.seed + self.rank)
        self.out = Path(args.out)
        self.stop_requested = False
        self.bad_steps = 0
        self.start_time = time.time()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for junk in self.out.glob(".ckpt-*.tmp-*"):  # a save that was killed half-way
                shutil.rmtree(junk, ignore_errors=True)
            earlier = sorted(self.out.glob("ckpt-*")) + [self.out / f for f in ("metrics.jsonl", "summary.json", "final")
                                                          if (self.out / f).exists()]
            if earlier and not args.resume:  # never mix two runs in one folder, never delete one unasked
                if not args.overwrite:
                    raise SystemExit(f"{self.out} already holds a run ({', '.join(p.name for p in earlier)}): pass "
                                     "--resume auto to continue it, --overwrite to replace it, or another --out")
                for p in earlier:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.barrier()
        for sig in (signal.SIGINT, signal.SIGTERM):  # pre-emption: finish the step, checkpoint, exit non-zero
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def print(self, *a):
        if self.is_main:
            tqdm.write(" ".join(str(x) for x in a))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_sum(self, value):
        """Sum a float (or tensor) over ranks."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t)
        return t if t.dim() else t.item()

    def all_max(self, value):
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def should_stop(self):
        """Whether any rank got a stop signal (all ranks must leave the loop at the same step)."""
        return self.all_sum(float(self.stop_requested)) > 0

    def log(self, step, metrics):
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def write_summary(self, summary):
        if self.is_main:
            summary = {**summary, "wall_time_s": round(time.time() - self.start_time, 1), "world_size": self.world,
                       "args": vars(self.args)}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def wrap(self, model):
        """The model as it trains across ranks; call before make_optimizer. --fsdp: FSDP2, every transformer block
        its own unit, parameters, gradients and optimizer state sharded over ranks (the model is sharded in place);
        otherwise DDP: full replicas, gradients all-reduced in backward. --compile: then torch.compile."""
        if self.world > 1 and self.args.fsdp:
            for block in [m for m in model.modules() if isinstance(m, Block)]:
                fully_shard(block)
            fully_shard(model)
        elif self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.args.compile else model

    @staticmethod
    def no_sync(train_model, sync):
        """Gradient accumulation: skip the gradient all-reduce / reduce-scatter unless `sync` (the last micro-batch)."""
        m = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
        if isinstance(m, torch.nn.parallel.DistributedDataParallel) and not sync:
            return m.no_sync()
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(sync)
        return nullcontext()

    def lockstep(self, chunks, *train_models):
        """This rank's training micro-batches as (chunk, sync) pairs, sync marking the step's last one (gradients are
        reduced there). FSDP all-gathers a unit's parameters in every forward and backward, so every rank must run as
        many passes as the busiest: a rank with fewer micro-batches then runs idle passes through `train_models` (a
        1-token forward, a backward of zero) so that the collectives pair up instead of hanging."""
        n = int(self.all_max(len(chunks))) if self.world > 1 and self.args.fsdp else len(chunks)
        for i, chunk in enumerate(chunks):
            yield chunk, i == n - 1
        for i in range(len(chunks), n):
            for m in train_models:
                with self.no_sync(m, sync=i == n - 1), self.autocast():
                    token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                    (m(token).float().sum() * 0.0).backward()

    @contextmanager
    def full_params(self, model):
        """Every parameter whole on every rank inside the block: FSDP all-gathers them once (nothing to do
        otherwise), so generation and saving run on plain tensors and ranks may run different numbers of forward
        passes. Yields the plain module (no DDP / compile wrapper)."""
        model = getattr(getattr(model, "_orig_mod", model), "module", getattr(model, "_orig_mod", model))
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.set_reshard_after_forward(False)
            u.unshard()
        try:
            yield model
        finally:
            for u in units:
                u.reshard()
                u.set_reshard_after_forward(True)


def load_model(path, run, config=None):
    """A checkpoint folder (model + tokenizer), or with path None a fresh model of `config` with a byte-level
    tokenizer. Ranks start from identical weights: the fresh init is seeded identically everywhere."""
    if path is None:  # <think> and </think> as single tokens, as in Qwen3 and DeepSeek-R1 vocabularies
        tokenizer = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                         "</think>"))
        torch.manual_seed(run.args.seed)
        config.vocab_size, config.eos_token_id = tokenizer.vocab_size, tokenizer.eos_token_id
        model = Transformer(config).to(run.device, run.dtype)
        torch.manual_seed(run.args.seed + run.rank)
    else:
        tokenizer = Tokenizer.from_pretrained(path)
        model = Transformer.from_pretrained(path, dtype=run.dtype, device=run.device)
    model.grad_checkpointing = run.args.grad_checkpointing
    return model, tokenizer


def load_frozen(path, run):
    """A model that is only read (a KL reference, a teacher): no gradients, eval mode, bf16 on CUDA (half the
    memory, and the forward runs under bf16 autocast anyway), float32 on CPU."""
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    return Transformer.from_pretrained(path, dtype=dtype, device=run.device).requires_grad_(False).eval()


def make_optimizer(model, args, lr=None):
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr or args.lr, betas=(0.9, 0.95), fused=fused or None)


def lr_at(step, args, lr=None):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at max_steps."""
    peak = lr or args.lr
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return peak * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(run, model, optimizer, lr):
    """Clip, then step, unless the gradient is NaN/inf: then the step is skipped and counted; too many in a
    row stop the run (the last checkpoint stays good). Returns (grad_norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.args.grad_clip)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        run.bad_steps += 1
        run.print(f"non-finite gradient norm ({norm.item()}): step skipped ({run.bad_steps} in a row)")
        if run.bad_steps >= run.args.max_bad_steps:
            raise SystemExit(f"{run.bad_steps} consecutive steps with NaN/inf gradients: stopping; the last "
                             f"checkpoint in {run.out} is intact (lower --lr or check the data)")
        return float("nan"), True
    run.bad_steps = 0
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item(), False


# Checkpoints: out/ckpt-000100/ is a Hugging Face folder (loads in transformers) plus training_state.json and
# optimizer.safetensors (no pickle anywhere). Written to a temporary folder and renamed, so a kill at any moment
# leaves the previous checkpoint intact; `--resume auto` picks the newest complete one.


def save_checkpoint(run, step, models, optimizers, tokenizer, state=None, name=None):
    """models / optimizers: {"": policy, "critic": ...}; "" is saved at the top of the folder. Under FSDP the
    weights are gathered for rank 0 and every rank writes its own optimizer shard."""
    final = run.out / (name or f"ckpt-{step:06d}")
    tmp = run.out / f".ckpt-{step:06d}.tmp-{os.getpid() if run.is_main else 0}"
    tmp = Path(broadcast_str(run, str(tmp)))  # rank 0's pid names the folder every rank writes into
    sharded = run.args.fsdp and run.world > 1
    for sub, model in sorted(models.items()):  # "" first: the top-level save replaces the (empty) folder
        with run.full_params(model) as m:
            if run.is_main:
                m.save_pretrained(tmp / sub if sub else tmp, tokenizer=tokenizer)
    run.barrier()
    for key, opt in optimizers.items():
        if run.is_main or sharded:
            tensors, meta = flatten_optimizer(opt.state_dict())
            suffix = f".rank{run.rank}" if sharded else ""
            save_file(tensors, tmp / f"optimizer_{key}{suffix}.safetensors")
            (tmp / f"optimizer_{key}{suffix}.json").write_text(json.dumps(meta))
    run.barrier()
    if run.is_main:
        (tmp / "training_state.json").write_text(json.dumps({"step": step, "world_size": run.world, **(state or {})},
                                                            indent=2))
        replace_dir(tmp, final)
        if name is None:
            for old in sorted(run.out.glob("ckpt-*"))[: -run.args.keep_checkpoints]:
                trash = old.with_name(f".{old.name}.tmp-deleting")  # renamed first: a kill mid-delete leaves no
                os.replace(old, trash)  # half-deleted ckpt-* behind, only junk the next run clears
                shutil.rmtree(trash, ignore_errors=True)
    run.barrier()
    return final


def checkpoint_or_stop(run, step, models, optimizers, tokenizer, state=None):
    """End of a training step: a checkpoint every --save_every steps; on SIGINT / SIGTERM a checkpoint, then exit
    130 (continue with --resume auto)."""
    stop = run.should_stop()
    if stop or (run.args.save_every and step % run.args.save_every == 0 and step < run.args.max_steps):
        save_checkpoint(run, step, models, optimizers, tokenizer, state)
    if stop:
        run.print(f"stopped at step {step}; continue with --resume auto")
        raise SystemExit(130)


def broadcast_str(run, text):
    if run.world == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def latest_checkpoint(out):
    ckpts = sorted(p for p in Path(out).glob("ckpt-*") if (p / "training_state.json").exists())
    return ckpts[-1] if ckpts else None


def resume(run, models, optimizers):
    """Restore weights and optimizer state from --resume; returns the saved training state ({} if none).
    metrics.jsonl lines past the checkpoint are dropped so the log reads as one uninterrupted run."""
    path = run.args.resume
    if path is None:
        return {}
    path = latest_checkpoint(run.out) if path == "auto" else Path(path)
    if path is None:
        run.print(f"--resume auto: no checkpoint in {run.out}, starting fresh")
        return {}
    if not (path / "training_state.json").exists():
        raise SystemExit(f"--resume {path}: not a checkpoint folder (no training_state.json)")
    state = json.loads((path / "training_state.json").read_text())
    sharded = run.args.fsdp and run.world > 1
    if sharded and state.get("world_size") != run.world:
        raise SystemExit(f"--resume {path}: saved by {state.get('world_size')} FSDP ranks, this run has {run.world} "
                         "(sharded optimizer state needs the same number)")
    for sub, model in models.items():
        load_weights(getattr(getattr(model, "_orig_mod", model), "module", model), path / sub if sub else path)
    for key, opt in optimizers.items():
        suffix = f".rank{run.rank}" if sharded else ""
        meta = json.loads((path / f"optimizer_{key}{suffix}.json").read_text())
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.load_state_dict(unflatten_optimizer(load_file(path / f"optimizer_{key}{suffix}.safetensors"), meta, params))
    run.barrier()
    if run.is_main and (run.out / "metrics.jsonl").exists():
        lines = (run.out / "metrics.jsonl").read_text().splitlines()
        kept = [l for l in lines if json.loads(l).get("step", 0) <= state["step"]]
        (run.out / "metrics.jsonl").write_text("".join(l + "\n" for l in kept))
    run.print(f"resumed from {path} at step {state['step']}")
    return state


def load_weights(model, folder):
    """A checkpoint's weights into a plain or an FSDP-sharded model (then each rank keeps its own shard)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    param = next(model.parameters())
    device = param.device_mesh.device_type if isinstance(param, DTensor) else param.device
    tensors = read_safetensors(folder, dtype=param.dtype, device=device)
    if not units:
        return model.load_hf_state_dict(tensors, source=str(folder))
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_hf_state_dict(tensors, source=str(folder), assign=True)
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))


def flatten_optimizer(sd):
    """optimizer.state_dict() -> (tensors for safetensors, JSON-able rest). A sharded (FSDP) value is saved as this
    rank's shard, its placement noted so that resume rebuilds it."""
    tensors, scalars, placements = {}, {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, DTensor):
                placements[f"{idx}.{k}"] = {"placements": [str(p) for p in v.placements], "shape": list(v.shape)}
                v = v.to_local()
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "placements": placements}


def unflatten_optimizer(tensors, meta, params=None):
    state = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = key.split(".", 1)
        if key in meta.get("placements", {}):
            saved = meta["placements"][key]
            places = [Replicate() if p == "Replicate()" else Shard(int(re.search(r"\d+", p).group()))
                      for p in saved["placements"]]
            shape = torch.Size(saved["shape"])  # the global shape: shards may be uneven (259 rows over 2 ranks)
            v = DTensor.from_local(v.to(params[int(idx)].device), params[int(idx)].device_mesh, places, shape=shape,
                                   stride=torch.empty(shape, device="meta").stride())
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_accuracy(run, model, tokenizer, problems, max_new_tokens=96, batch_size=256):
    """Greedy accuracy (verify.math_reward) and mean completion length over problems, split across ranks."""
    mine = problems[run.rank::run.world]
    correct = length = 0.0
    with run.full_params(model) as m:  # once, outside the loop: ranks may have different numbers of chunks
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            prompts = [prompt_ids(tokenizer, p["prompt"]) for p in chunk]
            with run.autocast():
                outs = generate(m, prompts, max_new_tokens, temperature=0, stop_token_ids=[tokenizer.eos_token_id])
            for p, o in zip(chunk, outs):
                correct += math_reward(tokenizer.decode(o), p["answer"])
                length += len(o)
    return run.all_sum(correct) / len(problems), run.all_sum(length) / len(problems)


@torch.no_grad()
def eval_loss(run, model, examples, micro_batch_tokens, pad_id):
    total = count = 0.0
    with run.full_params(model) as m:  # FSDP: gathered once, so ranks may run different numbers of micro-batches
        for _, x, y, w in micro_batches(examples[run.rank::run.world], micro_batch_tokens, pad_id):
            with run.autocast():
                total += sft_loss_sum(m, x.to(run.device), y.to(run.device), w.to(run.device)).item()
            count += w.sum().item()
    return run.all_sum(total) / max(1.0, run.all_sum(count))


# ----------------------------------------------------------------------------------------------------
# SFT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face folder to fine-tune (default: a fresh small model)")
    p.add_argument("--data", default="builtin", help="chat JSONL file, or 'builtin' for the arithmetic task")
    p.add_argument("--eval_data", default=None, help="held-out chat JSONL (default: builtin held-out, or none)")
    p.add_argument("--builtin_size", type=int, default=50000, help="training examples of the built-in task")
    p.add_argument("--step_fraction", type=float, default=0.4,
                   help="built-in task: fraction of solutions that show every step (the rest are terse)")
    p.add_argument("--heldout_problems", type=int, default=500, help="built-in held-out problems for greedy accuracy")
    p.add_argument("--max_len", type=int, default=1024, help="longer examples are truncated (and counted)")
    p.add_argument("--eval_every", type=int, default=100, help="held-out loss every N steps (0: never)")
    p.add_argument("--export_builtin", default=None, metavar="DIR", help="write the built-in task as JSONL "
                   "(SFT chats, RL problems; train and held-out) into DIR and exit")
    p.add_argument("--n_layer", type=int, default=4, help="fresh model: layers")
    p.add_argument("--n_embd", type=int, default=128, help="fresh model: hidden size")
    p.add_argument("--n_head", type=int, default=4, help="fresh model: attention heads")
    add_training_args(p, "sft", lr=3e-3, max_steps=500, batch_size=64)
    return p.parse_args(argv)


def train(run, args, model, tokenizer, train, evals=None):
    """The SFT loop (distill.py runs it too): token-mean cross-entropy on the loss-masked examples, for
    args.max_steps steps of args.batch_size examples, resuming from args.resume. Returns (steps, tokens)."""
    train_model = run.wrap(model)
    optimizer = make_optimizer(model, args)
    step = resume(run, {"": model}, {"policy": optimizer}).get("step", 0)
    per_epoch = max(1, len(train) // args.batch_size)
    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc=run.script)
    tokens_seen = 0
    while step < args.max_steps:
        t0 = time.time()
        # a seeded permutation per epoch: any step's examples follow from the step number alone (exact resume)
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
        batch = [train[i] for i in order[offset * args.batch_size:(offset + 1) * args.batch_size]][run.rank::run.world]
        n_loss_tokens = run.all_sum(sum(sum(m[1:]) for _, m in batch))
        loss_sum, n_tokens = 0.0, 0
        chunks = micro_batches(batch, args.micro_batch_tokens, tokenizer.pad_token_id)
        for (_, x, y, w), sync in run.lockstep(chunks, train_model):
            x, y, w = x.to(run.device), y.to(run.device), w.to(run.device)
            with run.no_sync(train_model, sync), run.autocast():
                loss = sft_loss_sum(train_model, x, y, w)
                (loss * run.world / n_loss_tokens).backward()  # DDP averages over ranks; we want the global token mean
            loss_sum += loss.item()
            n_tokens += x.numel()
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr_at(step, args))
        step += 1
        tokens = run.all_sum(n_tokens)
        tokens_seen += tokens
        metrics = {"loss": run.all_sum(loss_sum) / n_loss_tokens, "lr": lr_at(step - 1, args), "grad_norm": grad_norm,
                   "skipped": skipped, "tokens_per_s": tokens / (time.time() - t0)}
        if evals and args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            metrics["eval_loss"] = eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id)
        run.log(step, metrics)
        pbar.update(1)
        pbar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}")
        checkpoint_or_stop(run, step, {"": model}, {"policy": optimizer}, tokenizer)
    pbar.close()
    save_checkpoint(run, step, {"": model}, {"policy": optimizer}, tokenizer)
    return step, tokens_seen


def main(argv=None):
    args = parse_args(argv)
    if args.export_builtin:
        return export_builtin(args.export_builtin, args.builtin_size, seed=args.seed, step_fraction=args.step_fraction)
    run = Run(args, "sft")
    config = ModelConfig(hidden_size=args.n_embd, intermediate_size=3 * args.n_embd, num_hidden_layers=args.n_layer,
                         num_attention_heads=args.n_head, num_key_value_heads=args.n_head, max_position_embeddings=512)
    model, tokenizer = load_model(args.model, run, config)
    builtin = args.data == "builtin"
    train_chats = builtin_chats("train", args.builtin_size, args.seed, args.step_fraction) if builtin else load_chats(args.data)
    eval_chats = load_chats(args.eval_data) if args.eval_data else (
        builtin_chats("heldout", 500, args.seed, args.step_fraction) if builtin else None)
    examples, stats = tokenize_dataset(tokenizer, train_chats, args.max_len)
    evals = tokenize_dataset(tokenizer, eval_chats, args.max_len)[0] if eval_chats else None
    if not examples:
        raise SystemExit(f"{args.data}: every example was dropped (no assistant tokens within --max_len {args.max_len})")
    run.print(f"{len(examples)} training examples ({stats['truncated']} truncated to {args.max_len} tokens, "
              f"{stats['dropped']} dropped); model {model.num_params() / 1e6:.2f}M parameters")
    heldout = builtin_problems("heldout", args.heldout_problems, args.seed) if builtin else None

    before = eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id) if evals else None
    steps, tokens = train(run, args, model, tokenizer, examples, evals)
    final = save_checkpoint(run, steps, {"": model}, {}, tokenizer, name="final")
    summary = {"steps": steps, "tokens": tokens, "train_examples": len(examples), **stats, "eval_loss_before": before,
               "eval_loss_after": eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id) if evals else None,
               "final_checkpoint": str(final)}
    if heldout:
        summary["heldout_acc"], summary["heldout_mean_length"] = heldout_accuracy(run, model, tokenizer, heldout)
        run.print(f"held-out greedy accuracy: {summary['heldout_acc']:.3f} on {len(heldout)} problems")
    run.write_summary(summary)
    run.print(f"saved {final}")


if __name__ == "__main__":
    main()
