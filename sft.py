r"""Supervised fine-tuning (SFT): the cold start of the DeepSeek-R1 recipe, on chat data or the built-in task's
worked solutions (verify.builtin_problems), with the loss on assistant tokens only.

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
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (ArgumentParser, Run, add_training_args, checkpoint_or_stop, count, first_loss_position, fraction,
                    load_model, lr_at, make_optimizer, micro_batches, non_negative_int, optimizer_step, resume,
                    save_checkpoint, step_indices, user_input)
from model import ModelConfig
from sample import Engine, ToolUse, add_tool_args, check_sandbox, drop_long_prompts, heldout_accuracy, render
from tools import BUILTIN_TASKS, is_builtin, observation_spans, task_problems, task_solution, task_tools, tool_formats
from verify import read_jsonl

# ----------------------------------------------------------------------------------------------------
# The built-in task as chats. The SFT data mixes step-by-step solutions with terse ones that write only the final
# equation: a small model gets many terse answers wrong, so RL has something real to find (show the work).


def builtin_chats(task, split, n, seed=0, step_fraction=0.4):
    """Chats of a built-in task (tools.TASKS), a step_fraction of them showing every step (for a tool task: calling
    the tool)."""
    rng = random.Random(f"style-{split}-{seed}")
    return [[{"role": "user", "content": p["prompt"]},
             {"role": "assistant", "content": task_solution(task, p, show_steps=rng.random() < step_fraction)}]
            for p in task_problems(task, split, n, seed)]


def export_builtin(folder, task="builtin", n_train=20000, n_heldout=500, seed=0, step_fraction=0.4):
    """The task as JSONL files: SFT chats and RL problems (what verify.load_problems reads back), train and held-out."""
    folder, name = Path(folder), task.split(":")[-1]  # builtin_*.jsonl, countdown_*.jsonl
    folder.mkdir(parents=True, exist_ok=True)
    record = lambda p: {k: p[k] for k in ("prompt", "answer", "numbers", "target", "names", "statements", "solution")
                        if k in p}
    files = {f"{name}_sft_train.jsonl": [{"messages": m} for m in builtin_chats(task, "train", n_train, seed,
                                                                                 step_fraction)],
             f"{name}_sft_heldout.jsonl": [{"messages": m} for m in builtin_chats(task, "heldout", n_heldout, seed,
                                                                                   step_fraction)],
             f"{name}_rl_train.jsonl": [record(p) for p in task_problems(task, "train", n_train)],
             f"{name}_heldout.jsonl": [record(p) for p in task_problems(task, "heldout", n_heldout)]}
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
        check_messages(msgs, f"{path}:{lineno}")
        chats.append(msgs)
    if not chats:
        raise ValueError(f"{path}: no records")
    return chats


ROLES = ("system", "user", "assistant")


def check_messages(msgs, where):
    """A chat to train on: known roles, string contents, at least one assistant turn (ValueError naming where)."""
    for m in msgs:
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: a {m['role']} message's content must be a string, got {m['content']!r:.60}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: no assistant message to train on")


def tokenize_chat(tokenizer, messages, formats=()):
    """Token ids [T] and loss mask [T] (1 on assistant turns, including their end-of-turn token). The text
    before each assistant turn is the template rendered up to the generation prompt; the turn itself is what
    the full rendering adds. The outputs of the tools in `formats` (tools.ToolFormat) inside an assistant turn are
    context, mask 0, encoded as a rollout feeds them (on their own, as plain text)."""
    ids, mask, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(f"the chat template of {tokenizer.name_or_path} renders an assistant turn differently from "
                             "what its generation prompt starts (DeepSeek-R1-Distill's drops the <think> part of past "
                             "turns), or earlier turns differently once later ones follow: pass --chat_template FILE "
                             "with a template that keeps each turn as the model writes it")
        turn, start = full[len(prefix):], 0
        pieces = [(prefix[len(done):], 0)]
        for a, b in observation_spans(turn, formats):
            pieces += [(turn[start:a], 1), (turn[a:b], None)]
            start = b
        for text, label in pieces + [(turn[start:], 1)]:
            piece = tokenizer.encode(text) if label is not None else tokenizer.encode_ordinary(text)
            ids += piece
            mask += [label or 0] * len(piece)
        done = full
    return ids, mask


def tokenize_dataset(tokenizer, chats, max_len, formats=()):
    """Tokenize every chat (tool outputs of `formats` masked); longer ones are truncated to max_len (counted), ones
    left with no assistant token are dropped (counted)."""
    examples, truncated, dropped = [], 0, 0
    for msgs in chats:
        ids, mask = tokenize_chat(tokenizer, msgs, formats)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        examples.append((ids, mask))
    return examples, {"truncated": truncated, "dropped": dropped}


def sft_loss_sum(model, x, y, w):
    """sum_t w_t * -log pi(y_t | x_<=t): the caller divides by the number of loss tokens in the whole step. Through
    the log-prob path (model(x, targets=y)): the logits are made a chunk of rows at a time, never [B, T, V] at once."""
    start = first_loss_position(w)
    logp, _ = model(x, targets=y[:, start:], logits_from=start)  # [B, T - start]
    return -(logp * w[:, start:]).sum()


# ----------------------------------------------------------------------------------------------------
# Evaluation and the loop


@torch.no_grad()
def eval_loss(run, model, examples, micro_batch_tokens, pad_id):
    total = count = 0.0
    with run.full_params(model) as m:  # FSDP: gathered once, so ranks may run different numbers of micro-batches
        for _, x, y, w in micro_batches(examples[run.rank::run.world], micro_batch_tokens, pad_id):
            with run.autocast():
                total += sft_loss_sum(m, x.to(run.device), y.to(run.device), w.to(run.device)).item()
            count += w.sum().item()
    return run.all_sum(total) / max(1.0, run.all_sum(count))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="Hugging Face folder to fine-tune (default: a fresh small model)")
    p.add_argument("--data", default="builtin", help="chat JSONL file, or a built-in task's worked solutions: "
                   f"{', '.join(BUILTIN_TASKS)} ('builtin': arithmetic)")
    p.add_argument("--eval_data", default=None, help="held-out chat JSONL (default: builtin held-out, or none)")
    p.add_argument("--builtin_size", type=count, default=50000, help="training examples of the built-in task")
    p.add_argument("--step_fraction", type=fraction, default=0.4,
                   help="built-in task: fraction of solutions that show every step (the rest are terse)")
    p.add_argument("--heldout_problems", type=count, default=500, help="built-in task: held-out problems for greedy "
                   "accuracy, and as many held-out chats for the held-out loss")
    p.add_argument("--max_new_tokens", type=count, default=96, help="built-in task: completion length limit of the "
                   "held-out greedy accuracy (with the task's tool)")
    p.add_argument("--max_len", type=count, default=1024, help="longer examples are truncated (and counted)")
    p.add_argument("--eval_every", type=non_negative_int, default=100, help="held-out loss every N steps (0: never)")
    p.add_argument("--export_builtin", default=None, metavar="DIR", help="write the built-in task as JSONL "
                   "(SFT chats, RL problems; train and held-out) into DIR and exit")
    add_tool_args(p)
    p.add_argument("--n_layer", type=count, default=4, help="fresh model: layers")
    p.add_argument("--n_embd", type=count, default=128, help="fresh model: hidden size")
    p.add_argument("--n_head", type=count, default=4, help="fresh model: attention heads")
    p.add_argument("--max_positions", type=count, default=512, help="fresh model: context length (rope positions)")
    add_training_args(p, "sft", lr=3e-3, max_steps=500, batch_size=64)
    return p.parse_args(argv)


def train(run, args, model, tokenizer, train, evals=None):
    """The SFT loop (distill.py runs it too): token-mean cross-entropy on the loss-masked examples, for
    args.max_steps steps of args.batch_size examples, resuming from args.resume. Returns (steps, tokens)."""
    train_model = run.wrap(model)
    optimizer = make_optimizer(args, model)
    step = resume(run, {"": model}, {"policy": optimizer}).get("step", 0)
    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc=run.script)
    tokens_seen = 0
    while step < args.max_steps:
        t0 = time.time()
        batch = [train[i] for i in step_indices(len(train), args.batch_size, step, args.seed)][run.rank::run.world]
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
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr_at(args, step))
        step += 1
        tokens = run.all_sum(n_tokens)
        tokens_seen += tokens
        metrics = {"loss": run.all_sum(loss_sum) / n_loss_tokens, "lr": lr_at(args, step - 1), "grad_norm": grad_norm,
                   "skipped": skipped, "tokens_per_s": tokens / (time.time() - t0)}
        if evals and args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            metrics["eval_loss"] = eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id)
        run.log(step, metrics, pbar, show=("loss", "lr"))
        checkpoint_or_stop(run, step, {"": model}, {"policy": optimizer}, tokenizer)
    pbar.close()
    save_checkpoint(run, step, {"": model}, {"policy": optimizer}, tokenizer)
    return step, tokens_seen


def main(argv=None):
    args = parse_args(argv)
    if args.export_builtin:
        return export_builtin(args.export_builtin, args.data, args.builtin_size, seed=args.seed,
                              step_fraction=args.step_fraction)
    run = Run.start(args, "sft")
    config = ModelConfig(hidden_size=args.n_embd, intermediate_size=3 * args.n_embd, num_hidden_layers=args.n_layer,
                         num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
                         max_position_embeddings=args.max_positions)
    builtin = is_builtin(args.data)
    with user_input():
        model, tokenizer = load_model(run, args.model, config)
        train_chats = (builtin_chats(args.data, "train", args.builtin_size, args.seed, args.step_fraction) if builtin
                       else load_chats(args.data))
        eval_chats = load_chats(args.eval_data) if args.eval_data else (
            builtin_chats(args.data, "heldout", args.heldout_problems, args.seed, args.step_fraction) if builtin else None)
        formats = tool_formats(task_tools(args), args.tool_formats).values()  # their outputs: no loss
        examples, stats = tokenize_dataset(tokenizer, train_chats, args.max_len, formats)
        evals = tokenize_dataset(tokenizer, eval_chats, args.max_len, formats)[0] if eval_chats else None
        tool_use = ToolUse.from_args(args, tokenizer) if builtin else None
        check_sandbox(run, args, [])
    if not examples:
        raise SystemExit(f"{args.data}: every example was dropped (no assistant tokens within --max_len {args.max_len})")
    run.print(f"{len(examples)} training examples ({stats['truncated']} truncated to {args.max_len} tokens, "
              f"{stats['dropped']} dropped); model {model.num_params() / 1e6:.2f}M parameters")
    heldout = drop_long_prompts(task_problems(args.data, "heldout", args.heldout_problems, args.seed), tokenizer,
                                args.max_new_tokens, model.config.max_position_embeddings,
                                f"{args.data} held-out") if builtin else None

    before = eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id) if evals else None
    steps, tokens = train(run, args, model, tokenizer, examples, evals)
    final = save_checkpoint(run, steps, {"": model}, {}, tokenizer, name="final")
    summary = {"steps": steps, "tokens": tokens, "train_examples": len(examples), **stats, "eval_loss_before": before,
               "eval_loss_after": eval_loss(run, model, evals, args.micro_batch_tokens, tokenizer.pad_token_id) if evals else None,
               "final_checkpoint": str(final)}
    if heldout:
        summary["heldout_acc"], summary["heldout_mean_length"] = heldout_accuracy(
            run, Engine.for_run(run, model), tokenizer, heldout, args.max_new_tokens, tool_use=tool_use)
        run.print(f"held-out greedy accuracy: {summary['heldout_acc']:.3f} on {len(heldout)} problems")
    run.write_summary(summary, curve=("loss", "eval_loss"))
    run.print(f"saved {final}")


if __name__ == "__main__":
    main()
