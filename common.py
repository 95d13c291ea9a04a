"""The training plumbing every script shares; nothing here is an algorithm. Top to bottom:

  world_size, Run           where a process stands: rank, device, dtype, output folder, metrics JSONL and summary,
                            stop signals, collectives, DDP/FSDP wrapping (Run.start sets the process up)
  unwrap, user_input        the plain module under DDP / FSDP / torch.compile; user mistakes as one-line errors
  add_training_args         the flags every training script has (add_compile_decode_arg: also sample.py's)
  load_model, load_frozen   the policy (or a fresh model) and its tokenizer; read-only models (reference, teacher)
  make_optimizer, lr_at,    AdamW, warmup + cosine schedule, the optimizer step that skips NaN/inf gradients
  optimizer_step
  length_buckets, pad_right token-budgeted micro-batching (sequences, pairs, row chunks) and right padding
  micro_batches, first_loss_position, shared_prompt_micro_batches (RL: each prompt forwarded once per micro-batch)
  step_indices, step_problems  the data of a step as a function of (seed, step, rank): exact resume
  save_checkpoint, checkpoint_or_stop, resume   atomic Hugging Face checkpoints with optimizer state

Imports only model.py and verify.py (for the built-in task's problems).
"""
import argparse
import atexit
import json
import math
import os
import random
import re
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm import tqdm

from model import (LORA_TARGETS, Block, LoraConfig, Tokenizer, Transformer, load_adapter, parse_dtype,
                   read_safetensors, read_safetensors_file, replace_dir, tokenizer_mismatch)
from tools import task_problems


RUN_FILES = ("metrics.jsonl", "summary.json", "final", "curve.png", "traces.jsonl", "traces.stats.json")  # + ckpt-*


def world_size():
    """Processes in the run (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", 1))


class Run:
    """Where a training process stands: rank, device, output folder, metrics log and stop requests. Constructing one
    has no side effects (tests build them directly); Run.start(args, script) is what a script calls."""

    def __init__(self, args, script, world=1, rank=0, local_rank=0):
        self.args, self.script = args, script
        self.world, self.rank, self.is_main = world, rank, rank == 0
        self.device = torch.device("cuda", local_rank) if args.device.startswith("cuda") else torch.device(args.device)
        self.dtype = parse_dtype(args.dtype)
        self.amp = self.device.type == "cuda"  # bf16 autocast for matmuls; parameters stay in --dtype
        self.out = Path(args.out)
        self.stop_requested = False
        self.bad_steps = 0
        self.replacing = False  # an earlier run in --out to move aside at the first write (--overwrite)
        self.start_time = time.time()

    @classmethod
    def start(cls, args, script):
        """Set this process up: device, process group (under torchrun), seeds, the output folder (an earlier run
        there is refused unless --resume or --overwrite), and SIGINT/SIGTERM handlers that stop after the step."""
        run = cls(args, script, world_size(), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)))
        if run.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA device available (use --device cpu)")
            torch.cuda.set_device(run.device)
        if run.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
            # torn down before the interpreter exits: a gloo group left to static destructors can abort the process
            # ("terminate called without an active exception") after its run has finished and saved
            atexit.register(dist.destroy_process_group)
        if args.batch_size % run.world:
            raise SystemExit(f"--batch_size {args.batch_size} is not divisible by the world size {run.world}")
        random.seed(args.seed + run.rank)
        torch.manual_seed(args.seed + run.rank)
        error = run.broadcast_str(run.prepare_out() if run.is_main else "")  # every rank stops, not only rank 0
        if error:
            raise SystemExit(f"error: {error}")
        run.barrier()
        for sig in (signal.SIGINT, signal.SIGTERM):  # pre-emption: finish the step, checkpoint, exit non-zero
            signal.signal(sig, run._on_signal)
        return run

    def prepare_out(self):
        """Rank 0, before anything is loaded: "" if --out is ready, else why not. --out must take checkpoints (a
        tiny safetensors file written and read back: a read-only or full disk stops the run now, not after hours),
        and an earlier run there is refused unless --resume or --overwrite. --overwrite never deletes it up front:
        it moves to OUT/.replaced at this run's first write (its model, data and flags checked by then) and is
        deleted after this run's first checkpoint, so a run that fails before that loses nothing."""
        probe = self.out / f".write-probe-{os.getpid()}.safetensors"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            save_file({"probe": torch.arange(4.0)}, probe)
            if not torch.equal(load_file(probe)["probe"], torch.arange(4.0)):
                raise OSError("a test file read back differently")
            probe.unlink()
        except (OSError, SafetensorError, ImportError) as e:  # ImportError: safetensors' save needs numpy
            if probe.parent.is_dir():
                probe.unlink(missing_ok=True)
            return f"cannot write checkpoints to {self.out}: {e}"
        for junk in self.out.glob(".ckpt-*.tmp-*"):  # a save that was killed half-way
            shutil.rmtree(junk, ignore_errors=True)
        earlier, aside = self.earlier_run(), self.out / ".replaced"
        if aside.exists() and not self.args.overwrite:
            return (f"{aside} holds an earlier run that an --overwrite moved aside and then stopped before its first "
                    f"checkpoint: move it back (mv {aside}/* {self.out}/), delete it, or pass --overwrite again")
        if earlier and self.args.resume is None and not self.args.overwrite:  # never mix two runs in one folder
            return (f"{self.out} already holds a run ({', '.join(p.name for p in earlier)}): pass --resume auto to "
                    "continue it, --overwrite to replace it, or another --out")
        self.replacing = self.args.resume is None and bool(earlier or aside.exists())
        return self.check_resume()

    def check_resume(self):
        """--resume, checked before anything is loaded: "" if it names a checkpoint of this run (or is 'auto'), else
        why not. resume() loads it later, and with 'auto' checks each candidate as it tries it."""
        if self.args.resume in (None, "auto"):
            return ""
        try:
            check_same_run(self, Path(self.args.resume), read_training_state(Path(self.args.resume)))
        except (ValueError, OSError) as e:
            return f"--resume {self.args.resume}: {e}"
        return ""

    def earlier_run(self):
        """What a run leaves in --out: its checkpoints, metrics, summary, final folder and curve."""
        return sorted(self.out.glob("ckpt-*")) + [self.out / f for f in RUN_FILES if (self.out / f).exists()]

    def claim_out(self):
        """Called before every write to --out; the first one moves an --overwrite-n run aside (see prepare_out).
        If a replaced run already waits in OUT/.replaced, what lies in OUT is the leftovers of a replacement that
        never saved a checkpoint: they are deleted instead."""
        if not (self.is_main and self.replacing):
            return
        self.replacing = False
        aside = self.out / ".replaced"
        keep = not aside.exists()
        aside.mkdir(exist_ok=True)
        for p in self.earlier_run():
            if keep:
                os.replace(p, aside / p.name)
            else:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

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

    def all_gather(self, values):
        """A 1-D tensor of each rank, concatenated in rank order on every rank (lengths may differ)."""
        if self.world == 1:
            return values
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        n = torch.tensor([len(values)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(sizes))
        padded = torch.zeros(longest, dtype=values.dtype, device=device)
        padded[:len(values)] = values.to(device)
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:int(k)] for p, k in zip(parts, sizes)]).to(values.device)

    def broadcast_str(self, text):
        """Rank 0's string on every rank."""
        if self.world == 1:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def should_stop(self):
        """Whether any rank got a stop signal (all ranks must leave the loop at the same step)."""
        return self.all_sum(float(self.stop_requested)) > 0

    def log(self, step, metrics, pbar=None, show=()):
        """Append a step's metrics to metrics.jsonl; with a progress bar, advance it and show the `show` metrics."""
        if self.is_main:
            self.claim_out()
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix({k: f"{metrics[k]:.3g}" for k in show if k in metrics})

    def write_summary(self, summary, curve=()):
        """summary.json (the run's results with its wall time, world size and exact arguments), then curve.png of
        the `curve` metrics over the steps."""
        if self.is_main:
            self.claim_out()
            summary = {**summary, "wall_time_s": round(time.time() - self.start_time, 1), "world_size": self.world,
                       "args": vars(self.args)}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if curve:
                plot_curve(self.out, curve)
        self.barrier()  # the ranks leave together: none tears the process group down (atexit) under another's feet

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

    def lockstep(self, chunks, *train_models, idle=lambda m, token: m(token)):
        """This rank's training micro-batches as (chunk, sync) pairs, sync marking the step's last one (gradients are
        reduced there). FSDP all-gathers a unit's parameters in every forward and backward, so every rank must run as
        many passes as the busiest: a rank with fewer micro-batches then runs idle passes through `train_models` (a
        1-token forward, a backward of zero) so that the collectives pair up instead of hanging. idle(model, token)
        is that forward; it must call the model's units as often as a real micro-batch does."""
        n = int(self.all_max(len(chunks))) if self.world > 1 and self.args.fsdp else len(chunks)
        for i, chunk in enumerate(chunks):
            yield chunk, i == n - 1
        for i in range(len(chunks), n):
            for m in train_models:
                with self.no_sync(m, sync=i == n - 1), self.autocast():
                    token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                    (idle(m, token).float().sum() * 0.0).backward()

    @contextmanager
    def full_params(self, model):
        """Every parameter whole on every rank inside the block: FSDP all-gathers them once (nothing to do
        otherwise), so generation and saving run on plain tensors and ranks may run different numbers of forward
        passes. Yields the plain module (no DDP / compile wrapper)."""
        model = unwrap(model)
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


def unwrap(model):
    """The module itself under torch.compile (._orig_mod) and DDP (.module); FSDP2 shards in place (no wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@contextmanager
def user_input():
    """Around a script's setup (data files, model folders, resuming): a mistake there is the user's, or the machine's
    (a full disk), reported as one line naming the file or flag and exit status 1 instead of a traceback. Errors in
    training keep theirs."""
    try:
        yield
    except (ValueError, OSError, SafetensorError) as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Flags: argparse with one-line errors, and the types that check each flag's range as it is parsed


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's line breaks (its command lines) and prints each flag's default, where its help
    does not already say it (and not for switches off by default, or flags with no default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose --help shows each flag's default and whose errors are one line (the flag and why) instead of
    the usage message of forty flags."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def flag_type(convert, ok, needs):
    """An argparse type: convert(text), accepted when ok(value), else 'must be <needs>, got <text>'."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {needs}, got {text!r}")
        return value
    return parse


count = flag_type(int, lambda n: n >= 1, "an integer >= 1")
non_negative_int = flag_type(int, lambda n: n >= 0, "an integer >= 0")
positive = flag_type(float, lambda x: 0 < x < math.inf, "a number > 0")
non_negative = flag_type(float, lambda x: 0 <= x < math.inf, "a number >= 0")
probability = flag_type(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
fraction = flag_type(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
dtype_name = flag_type(lambda s: s if parse_dtype_or_none(s) else None, bool, "float32, bfloat16 or float16")
prompt_template = flag_type(str, lambda t: "{question}" in t, "a template containing {question} (where the problem "
                            "goes)")


def parse_dtype_or_none(name):
    try:
        return parse_dtype(name)
    except ValueError:
        return None


def json_object(text):
    """argparse type: a JSON object ('{"enable_thinking": false}')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text}")
    return value


def add_prompt_args(p):
    """How every script that builds prompts renders them: the checkpoint's own chat template, unless told."""
    p.add_argument("--system", default=None, help="a system message before every chat that has none")
    p.add_argument("--chat_template", default=None, metavar="FILE", help="a jinja chat template replacing the "
                   "checkpoint's, e.g. one that keeps DeepSeek-R1-Distill's reasoning in past turns for SFT")
    p.add_argument("--chat_template_kwargs", type=json_object, default={}, metavar="JSON",
                   help='variables for the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    return p


def load_tokenizer(args, path):
    """path's tokenizer (None: the byte-level one of fresh models) with --chat_template, --chat_template_kwargs and
    --system applied."""
    tokenizer = Tokenizer.from_pretrained(path) if path is not None else Tokenizer.byte_level(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"))  # as Qwen3, R1
    template = Path(args.chat_template).read_text() if args.chat_template else None
    return tokenizer.set_prompt_options(template, args.chat_template_kwargs, args.system)


def add_compile_decode_arg(p):
    """--compile_decode, shared by the training scripts and sample.py (sample.use_compiled_decode reads it)."""
    p.add_argument("--compile_decode", default="auto", choices=("auto", "on", "off"), help="torch.compile the decode "
                   "step of rollouts and evaluation: auto = on a GPU (CUDA graphs), off on a CPU")


def add_training_args(p, script, lr, max_steps, batch_size):
    """The flags every training script shares (the prompt flags among them)."""
    add_prompt_args(p)
    p.add_argument("--out", default=f"out/{script}", help="output folder: checkpoints, metrics.jsonl, summary.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (each rank derives its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                   help="cpu or cuda")
    p.add_argument("--dtype", type=dtype_name, default="float32", help="parameter dtype (float32, bfloat16, float16); "
                   "on CUDA, matmuls also run under bf16 autocast")
    p.add_argument("--lr", type=positive, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--min_lr_ratio", type=fraction, default=0.1, help="cosine schedule floor, as a fraction of --lr")
    p.add_argument("--warmup_steps", type=non_negative_int, default=10, help="linear warmup steps")
    p.add_argument("--weight_decay", type=non_negative, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=positive, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--max_steps", type=count, default=max_steps, help="optimizer steps")
    p.add_argument("--batch_size", type=count, default=batch_size, help="global batch (all ranks together)")
    p.add_argument("--micro_batch_tokens", type=count, default=8192,
                   help="padded tokens per forward/backward pass; larger steps accumulate gradients")
    p.add_argument("--save_every", type=non_negative_int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep_checkpoints", type=count, default=2, help="how many step checkpoints to keep (>= 1; the "
                   "final folder is extra)")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from, or 'auto' (newest in --out); "
                   "the run's arguments must be the saved ones (see --allow_changed)")
    p.add_argument("--allow_changed", default="", metavar="FLAGS", help="--resume: flags that may differ from the "
                   "checkpoint's run, comma-separated (e.g. lr,data: a deliberate change); others are refused")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of refusing (it "
                   "is moved to OUT/.replaced and deleted once this run has saved a checkpoint)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_compile_decode_arg(p)
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over ranks "
                   "(FSDP2) instead of replicating them (DDP): for models that do not fit one GPU with DDP")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--max_bad_steps", type=count, default=5, help="stop after this many consecutive NaN/inf steps")
    g = p.add_argument_group("LoRA", "low-rank adapters on a frozen base (Hu et al. 2021): the base in bf16 on CUDA, "
                             "the adapters and their optimizer state in float32; a LoRA run's KL reference is the "
                             "base itself; the final folder holds the merged weights and the adapter in PEFT's layout")
    g.add_argument("--lora_rank", type=non_negative_int, default=0, help="r (0: train every weight)")
    g.add_argument("--lora_alpha", type=positive, default=None, help="alpha: the update is (alpha / r) B A x "
                   "(default: 2 r)")
    g.add_argument("--lora_dropout", type=fraction, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora_targets", default=",".join(LORA_TARGETS), help="the projections that get adapters, "
                   "comma-separated")
    g.add_argument("--lora_from", default=None, metavar="DIR", help="start from a saved adapter (PEFT's layout, e.g. "
                   "a LoRA run's final folder)")
    return p


# ----------------------------------------------------------------------------------------------------
# Models and the optimizer


def load_model(run, path, config=None):
    """A checkpoint folder (model + tokenizer), or with path None a fresh model of `config` with a byte-level
    tokenizer. Ranks start from identical weights: the fresh init is seeded identically everywhere. With
    --lora_rank the checkpoint is the frozen base (bf16 on CUDA) of float32 adapters (--lora_from: saved ones)."""
    tokenizer = load_tokenizer(run.args, path)
    lora = lora_config(run.args)
    if path is None:
        if lora is not None:
            raise ValueError("--lora_rank adapts a trained checkpoint: give --model (a fresh model trains in full)")
        torch.manual_seed(run.args.seed)
        config.vocab_size, config.eos_token_id = tokenizer.vocab_size, tokenizer.eos_token_id
        model = Transformer(config).to(run.device, run.dtype)
        torch.manual_seed(run.args.seed + run.rank)
    else:
        torch.manual_seed(run.args.seed)  # adapters start identical on every rank
        model = Transformer.from_pretrained(path, dtype=weights_dtype(run), device=run.device, lora=lora)
        torch.manual_seed(run.args.seed + run.rank)
        if run.args.lora_from:
            load_adapter(model, run.args.lora_from)
    model.grad_checkpointing = run.args.grad_checkpointing
    return model, tokenizer


def lora_config(args):
    """The run's LoraConfig (--lora_rank, --lora_alpha, --lora_dropout, --lora_targets), or None."""
    if not getattr(args, "lora_rank", 0):
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or not targets:
        raise ValueError(f"--lora_targets {args.lora_targets}: choose among {', '.join(LORA_TARGETS)}")
    return LoraConfig(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout, targets)


def weights_dtype(run):
    """The dtype a trained model is loaded in: --dtype, except a LoRA run's frozen base on CUDA, bf16."""
    return torch.bfloat16 if lora_config(run.args) is not None and run.device.type == "cuda" else run.dtype


class WithoutAdapters:
    """The base of a LoRA policy, called like a model: its forward with the adapters switched off. The KL reference
    of a LoRA run, at no memory (TRL does the same)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with unwrap(self.model).adapters_off():
            return self.model(*args, **kwargs)


def load_policy(run, args, kl_coef):
    """An RL run's policy (args.model) and tokenizer, and its frozen KL reference (args.ref_model, default the
    policy's starting point), loaded only when kl_coef > 0: no memory and no forward pass otherwise. The reference
    reads the policy's token ids, so its tokenizer must be the policy's."""
    policy, tokenizer = load_model(run, args.model)
    if kl_coef > 0 and args.ref_model is not None:
        check_same_tokenizer(Tokenizer.from_pretrained(args.ref_model), tokenizer, what="reference model")
    if kl_coef <= 0:
        return policy, tokenizer, None
    if policy.config.lora is not None and args.ref_model is None:
        return policy, tokenizer, WithoutAdapters(policy)
    return policy, tokenizer, load_frozen(run, args.ref_model or args.model)


def check_same_tokenizer(model_tokenizer, policy_tokenizer, what="reward model"):
    """A model that reads the policy's token ids (reference, critic, reward model) must share its tokenizer."""
    why = tokenizer_mismatch(model_tokenizer, policy_tokenizer)
    if why:
        raise ValueError(f"the {what}'s tokenizer ({model_tokenizer.name_or_path}) differs from the policy's "
                         f"({policy_tokenizer.name_or_path}): {why}. Use a {what} made from the policy's checkpoint "
                         "(or one with the same tokenizer).")


def load_frozen(run, path):
    """A model that is only read (a KL reference, a teacher): no gradients, eval mode, bf16 on CUDA (half the
    memory, and the forward runs under bf16 autocast anyway), float32 on CPU."""
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    return Transformer.from_pretrained(path, dtype=dtype, device=run.device).requires_grad_(False).eval()


def make_optimizer(args, model, lr=None):
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr or args.lr, betas=(0.9, 0.95), fused=fused or None)


def lr_at(args, step, lr=None):
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


# ----------------------------------------------------------------------------------------------------
# Micro-batches and the data of each step


def length_buckets(lengths, max_tokens, rows_per_item=1):
    """Indices sorted by length, cut into buckets whose padded size (rows_per_item x items x the longest length)
    stays within max_tokens; an item longer than that gets a bucket of its own. rows_per_item is 2 for preference
    pairs (chosen and rejected share the bucket's width). -> [[index, ...], ...]"""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and rows_per_item * (end + 1 - start) * lengths[order[end]] <= max_tokens:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def pad_right(seqs, pad, dtype=torch.long, min_width=0):
    """Lists of numbers -> [B, T] tensor, each row padded on the right with `pad` to the longest (or min_width)."""
    out = torch.full((len(seqs), max(min_width, *(len(s) for s in seqs))), pad, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return out


def micro_batches(examples, max_tokens, pad_id):
    """(ids, mask) examples -> length-bucketed, right-padded micro-batches of at most max_tokens padded tokens:
    [(rows, inputs [B, T], targets [B, T], loss mask [B, T])], rows being the examples' indices; position t predicts
    token t + 1 (right padding: plain causal attention is exact, no packing masks needed)."""
    out = []
    for rows in length_buckets([len(examples[i][0]) for i in range(len(examples))], max_tokens):
        ids, masks = [examples[i][0] for i in rows], [examples[i][1] for i in rows]
        out.append((rows, pad_right([s[:-1] for s in ids], pad_id), pad_right([s[1:] for s in ids], pad_id),
                    pad_right([m[1:] for m in masks], 0, torch.float)))
    return out


def shared_prompt_micro_batches(prompts, completions, weights, max_tokens):
    """RL training micro-batches in which each distinct prompt is forwarded once for all of its samples (the
    prompts= mode of Transformer.forward): [(rows, prompt_ids [U, P], prompt_lens [U], prompt_of_row [B],
    completions [B, T], loss mask [B, T])], rows being the samples' indices. Rows are ordered by prompt, then
    completion length, and cut where the padded tokens forwarded (U x P + B x T) would pass max_tokens; a prompt
    whose samples fall in two micro-batches is forwarded in each. T is at least 2, so that every micro-batch
    forwards some completion tokens (FSDP: every rank calls each unit as often)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i], len(completions[i])))
    cuts, U, T = [], 0, 0  # the micro-batches' rows; the last one's distinct prompts and widest completion
    for n, i in enumerate(order):
        U, T = U + (n == 0 or prompts[i] != prompts[order[n - 1]]), max(T, 2, len(completions[i]))
        if n == 0 or U * len(prompts[i]) + (len(cuts[-1]) + 1) * T > max_tokens:  # prompt i: the longest so far
            cuts.append([])
            U, T = 1, max(2, len(completions[i]))
        cuts[-1].append(i)
    out = []
    for rows in cuts:
        index = {}  # distinct prompt -> its row in prompt_ids
        of_row = torch.tensor([index.setdefault(tuple(prompts[i]), len(index)) for i in rows])
        out.append((rows, pad_right(list(index), 0), torch.tensor([len(p) for p in index]), of_row,
                    pad_right([completions[i] for i in rows], 0, min_width=2),
                    pad_right([weights[i] for i in rows], 0, torch.float, min_width=2)))
    return out


def first_loss_position(w):
    """The first position of a micro-batch where any row takes loss (w [B, T] -> int); 0 if none does. The
    positions before it (the prompts) need no logits."""
    return int(w.any(0).float().argmax())


def step_indices(n, batch_size, step, seed):
    """The global batch of a step over a dataset of n examples: a seeded permutation per epoch, so any step's
    examples follow from the step number alone (exact resume). Each rank then takes its [rank::world] share."""
    epoch, offset = divmod(step, max(1, n // batch_size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return order[offset * batch_size:(offset + 1) * batch_size]


def step_problems(run, n, data, step, round_=0):
    """This rank's n prompts of an RL step: a function of (seed, step, round, rank) only, so a resumed run sees the
    same data as an uninterrupted one. data None is the endless train split of the built-in task --data names."""
    rng = random.Random(f"{run.args.seed}-{step}-{round_}-{run.rank}")
    if data is None:
        return task_problems(run.args.data, "train", n, seed=rng.randrange(2**31))
    return rng.sample(data, n) if n <= len(data) else [rng.choice(data) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# The metrics log and its picture


def read_metrics(path):
    """The records of a metrics.jsonl. A line that does not parse is a crash mid-append (a torn last line): it is
    dropped, not fatal, so the run can still resume."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curve(out, keys):
    """out/curve.png: one panel per metric of out/metrics.jsonl among keys (those that were logged), over the steps.
    matplotlib is not a requirement: without it, one line says how to get the picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{out / 'curve.png'} not drawn: matplotlib is not installed (pip install matplotlib)")
        return
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: points for k, points in series.items() if points}
    if not series:
        return
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 1 + 1.8 * len(series)), sharex=True, squeeze=False)
    for ax, (k, points) in zip(axes[:, 0], series.items()):
        ax.plot(*zip(*points), "o-" if len(points) <= 20 else "-", markersize=3)
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.savefig(out / "curve.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: out/ckpt-000100/ is a Hugging Face folder (loads in transformers) plus training_state.json and
# optimizer.safetensors (no pickle anywhere). Written to a temporary folder and renamed, so a kill at any moment
# leaves the previous checkpoint intact; `--resume auto` picks the newest complete one.


def save_checkpoint(run, step, models, optimizers, tokenizer, state=None, name=None):
    """models / optimizers: {"": policy, "critic": ...}; "" is saved at the top of the folder. Under FSDP the
    weights are gathered for rank 0 and every rank writes its own optimizer shard. A save that fails (a full disk)
    removes its temporary folder and stops the run naming the checkpoint; the previous one stays intact."""
    final = run.out / (name or f"ckpt-{step:06d}")
    tmp = run.out / f".ckpt-{step:06d}.tmp-{os.getpid() if run.is_main else 0}"
    tmp = Path(run.broadcast_str(str(tmp)))  # rank 0's pid names the folder every rank writes into
    run.claim_out()
    try:
        write_checkpoint(run, tmp, models, optimizers, tokenizer,
                         {"step": step, "world_size": run.world, "identity": run_identity(run), **(state or {})},
                         final=name is not None)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"error: could not save {final}: {e}") from None
    if run.is_main:
        replace_dir(tmp, final)
        shutil.rmtree(run.out / ".replaced", ignore_errors=True)  # a run --overwrite replaced: now really gone
        if name is None:
            for old in sorted(run.out.glob("ckpt-*"))[: -run.args.keep_checkpoints]:
                trash = old.with_name(f".{old.name}.tmp-deleting")  # renamed first: a kill mid-delete leaves no
                os.replace(old, trash)  # half-deleted ckpt-* behind, only junk the next run clears
                shutil.rmtree(trash, ignore_errors=True)
    run.barrier()
    return final


def write_checkpoint(run, tmp, models, optimizers, tokenizer, state, final=False):
    """The checkpoint's files into folder tmp: each model's Hugging Face folder, the optimizers' state (every FSDP
    rank its own shard) and training_state.json."""
    sharded = run.args.fsdp and run.world > 1
    for sub, model in sorted(models.items()):  # "" first: the top-level save replaces the (empty) folder
        with run.full_params(model) as m:
            if run.is_main:  # LoRA: a step checkpoint holds the adapters only, the final folder merged weights too
                lora = getattr(getattr(m, "config", None), "lora", None)
                m.save_pretrained(tmp / sub if sub else tmp, tokenizer=tokenizer,
                                  base=getattr(run.args, "model", None), adapter_only=not final and lora is not None)
    run.barrier()
    for key, opt in optimizers.items():
        if run.is_main or sharded:
            tensors, meta = flatten_optimizer(opt.state_dict())
            suffix = f".rank{run.rank}" if sharded else ""
            save_file(tensors, tmp / f"optimizer_{key}{suffix}.safetensors")
            (tmp / f"optimizer_{key}{suffix}.json").write_text(json.dumps(meta))
    run.barrier()
    if run.is_main:
        (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.rglob("*"):  # optimizer files too: the same modes as the model folders (safetensors makes 0600)
            f.chmod(0o755 if f.is_dir() else 0o644)


def finish_run(run, step, models, optimizers, tokenizer, state=None, summary=None, curve=()):
    """The end of a training run: the last step's checkpoint (with `state`, what resume needs), the final Hugging Face
    folder of models[""], summary.json (`summary` with the steps and the final folder) and curve.png of the `curve`
    metrics. -> the final folder."""
    save_checkpoint(run, step, models, optimizers, tokenizer, state)
    final = save_checkpoint(run, step, {"": models[""]}, {}, tokenizer, name="final")
    run.write_summary({**(summary or {}), "steps": step, "final_checkpoint": str(final)}, curve)
    run.print(f"saved {final}")
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


# Flags that change how a run executes or reports, not what it computes: free to differ on --resume. Every other
# flag defines the run and must match the checkpoint's, unless named in --allow_changed.
OPERATIONAL_FLAGS = {"resume", "allow_changed", "overwrite", "out", "max_steps", "save_every", "keep_checkpoints",
                     "eval_every", "device", "compile", "compile_decode", "micro_batch_tokens",
                     "teacher_micro_batch_tokens", "gen_batch_size", "grad_checkpointing", "max_bad_steps", "fsdp",
                     "require_sandbox"}


def run_identity(run):
    """What a checkpoint records of the run that made it, and resume checks: the script and its defining flags."""
    args = {k: v for k, v in vars(run.args).items() if k not in OPERATIONAL_FLAGS}
    return {"script": run.script, "args": json.loads(json.dumps(args))}  # as JSON will give it back


def checkpoints(out):
    """The complete step checkpoints in out, newest first."""
    return sorted((p for p in Path(out).glob("ckpt-*") if (p / "training_state.json").exists()), reverse=True)


def latest_checkpoint(out):
    found = checkpoints(out)
    return found[0] if found else None


def resume(run, models, optimizers):
    """Restore weights and optimizer state from --resume; returns the saved training state ({} if none). The
    checkpoint must come from the same script with the same defining flags (--allow_changed names exceptions). With
    --resume auto a checkpoint that does not load (truncated, corrupt, of another shape) gives way to the previous
    one, saying so. metrics.jsonl lines past the checkpoint are dropped so the log reads as one uninterrupted run."""
    if run.args.resume is None:
        return {}
    auto = run.args.resume == "auto"
    candidates = checkpoints(run.out) if auto else [Path(run.args.resume)]
    if not candidates:  # the steps an earlier attempt logged will be run (and logged) again: not twice in the log
        run.print(f"--resume auto: no checkpoint in {run.out}, starting fresh")
        if run.is_main:
            (run.out / "metrics.jsonl").unlink(missing_ok=True)
        return {}
    for i, path in enumerate(candidates):
        try:
            state = read_training_state(path)
            check_same_run(run, path, state)
            load_checkpoint(run, path, state, models, optimizers)
            error = ""
        except (ValueError, OSError, SafetensorError, KeyError) as e:
            error = f"--resume {path}: {e}"
        if run.all_max(float(bool(error))) == 0:  # every rank loaded it
            break
        if not auto or i == len(candidates) - 1 or error.startswith(f"--resume {path}: another run"):
            raise SystemExit(f"error: {error or f'--resume {path}: another rank could not load it'}")
        run.print(f"{error or f'{path}: another rank could not load it'}; falling back to {candidates[i + 1]}")
    if run.is_main and (run.out / "metrics.jsonl").exists():
        kept = [r for r in read_metrics(run.out / "metrics.jsonl") if r.get("step", 0) <= state["step"]]
        (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run.print(f"resumed from {path} at step {state['step']}")
    return state


def read_training_state(path):
    if not (path / "training_state.json").exists():
        raise ValueError("not a checkpoint folder (no training_state.json)")
    state = json.loads((path / "training_state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("training_state.json has no step")
    return state


def check_same_run(run, path, state):
    """A checkpoint continues only the run that saved it: the same script and defining flags."""
    saved, now = state.get("identity"), run_identity(run)
    if saved is None:  # written before checkpoints recorded their run: nothing to compare
        run.print(f"{path} does not record the run that made it: its flags cannot be checked")
        return
    if saved["script"] != now["script"]:
        raise ValueError(f"another run: saved by {saved['script']}.py, not {now['script']}.py")
    allowed = {f.strip().lstrip("-") for f in run.args.allow_changed.split(",") if f.strip()}
    changed = [k for k in sorted(set(saved["args"]) | set(now["args"]))
               if saved["args"].get(k) != now["args"].get(k) and k not in allowed]
    if changed:
        diffs = ", ".join(f"--{k} {saved['args'].get(k)!r} -> {now['args'].get(k)!r}" for k in changed)
        raise ValueError(f"another run: its flags differ ({diffs}); pass --allow_changed {','.join(changed)} if "
                         "that is deliberate")


def load_checkpoint(run, path, state, models, optimizers):
    """Weights and optimizer state of checkpoint path into models and optimizers (in place)."""
    sharded = run.args.fsdp and run.world > 1
    if sharded and state.get("world_size") != run.world:
        raise ValueError(f"saved by {state.get('world_size')} FSDP ranks, this run has {run.world} (sharded "
                         "optimizer state needs the same number)")
    for sub, model in models.items():
        load_weights(unwrap(model), path / sub if sub else path)
    for key, opt in optimizers.items():
        suffix = f".rank{run.rank}" if sharded else ""
        meta = json.loads((path / f"optimizer_{key}{suffix}.json").read_text())
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.load_state_dict(unflatten_optimizer(load_file(path / f"optimizer_{key}{suffix}.safetensors"), meta, params))


def load_weights(model, folder):
    """A checkpoint's weights into a plain or an FSDP-sharded model (then each rank keeps its own shard); a LoRA
    model's adapters only (its base is the run's --model)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if getattr(getattr(model, "config", None), "lora", None) is not None:
        return load_adapters(model, folder, units)
    param = next(model.parameters())
    device = param.device_mesh.device_type if isinstance(param, DTensor) else param.device
    tensors = read_safetensors(folder, dtype=param.dtype, device=device)
    if not units:
        return model.load_hf_state_dict(tensors, source=str(folder))
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_hf_state_dict(tensors, source=str(folder), assign=True)
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))


def load_adapters(model, folder, units):
    """A checkpoint's LoRA adapters (PEFT's layout) into a plain or FSDP-sharded model."""
    if not units:
        return load_adapter(model, folder)
    tensors = read_safetensors_file(Path(folder) / "adapter" / "adapter_model.safetensors")
    names = model.adapter_names()
    if set(names) != set(tensors):
        raise ValueError(f"{folder}: its adapters do not match this model's (another --lora_rank or --lora_targets?)")
    set_model_state_dict(model, {names[k]: v for k, v in tensors.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


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
    """The inverse of flatten_optimizer; with params, a saved moment whose shape is not its parameter's (a checkpoint
    of another model) is refused here rather than at the first optimizer step."""
    state = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = key.split(".", 1)
        if params is not None and (int(idx) >= len(params) or torch.is_tensor(v) and v.dim() and key not in
                                   meta.get("placements", {}) and v.shape != params[int(idx)].shape):
            raise ValueError(f"optimizer state {key} does not fit this model's parameter {idx} (another model?)")
        if key in meta.get("placements", {}):
            saved = meta["placements"][key]
            places = [Replicate() if p == "Replicate()" else Shard(int(re.search(r"\d+", p).group()))
                      for p in saved["placements"]]
            shape = torch.Size(saved["shape"])  # the global shape: shards may be uneven (259 rows over 2 ranks)
            v = DTensor.from_local(v.to(params[int(idx)].device), params[int(idx)].device_mesh, places, shape=shape,
                                   stride=torch.empty(shape, device="meta").stride())
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
