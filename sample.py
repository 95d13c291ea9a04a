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
import bisect
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import tools
import verify
from common import (ArgumentParser, Run, add_compile_decode_arg, add_prompt_args, count, dtype_name, json_object,
                    load_tokenizer, non_negative, positive, probability, prompt_template, unwrap, user_input)
from model import KVCache, Tokenizer, Transformer, is_adapter


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


@dataclass
class Rollout:
    """One sampled completion, token for token what training uses: ids, mask and logprobs have one entry per
    completion token, the model's own (mask 1, with the sampler's log pi(y_t)) and tool observations' (mask 0,
    log-prob 0), in order; nothing in ids was decoded and re-encoded. stop: "eos" (its stop token is the last id)
    or "length" (it used up --max_new_tokens). calls: its tools.ToolCalls; turn_capped: it wrote a call past
    --max_turns (not run). text: the completion decoded, without its stop token; own_text: its own tokens only,
    what the rewards grade (a tool's output cannot answer for the model)."""
    prompt: list
    ids: list
    mask: list
    logprobs: list
    stop: str
    calls: list = field(default_factory=list)
    turn_capped: bool = False
    text: str = ""
    own_text: str = ""

    @property
    def truncated(self):
        return self.stop == "length"


def decode_step(model, tokens, positions, mask, cache, cache_pos):
    """One token per row through the model: tokens [B, 1] at their positions [B, 1], written to the cache slots
    cache_pos [B, 1] (each row its own), attending where mask [B, 1, 1, S] is True -> logits [B, V]."""
    return model(tokens, mask, positions, cache, cache_pos)[:, -1]


# Compiled once with symbolic shapes, so that no batch bucket or attention length recompiles it (a static compile per
# shape would hit torch's limit of 8 recompiles and silently run eager); on a GPU each shape is captured as a CUDA
# graph of its own, once. Engine.generate runs it without duck shaping (see there).
compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=True)


def use_compiled_decode(choice, device):
    """--compile_decode: 'on', 'off', or 'auto': on for CUDA, where the decode step replays as CUDA graphs (one launch
    instead of ~1,650 kernel launches per step), off on a CPU, where there is nothing to capture."""
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cuda")


def batch_bucket(n, device_type, compile):
    """Rows a decode step runs for n live rows: n itself on a CPU (eager); otherwise the next multiple of 8: tensor-core
    friendly, padding rows under 10% from 80 live rows on, and for the compiled step one CUDA graph per multiple of 8
    (as vLLM captures its decode graphs), compiled once for all of them."""
    return n if device_type == "cpu" and not compile else -(-n // 8) * 8


def cast_weights(model, dtype, into=None):
    """The model's weights in dtype, for inference: a new Transformer without adapters (a LoRA model's merged
    W + (alpha / r) B A: rollouts sample the policy being trained), or `into` (an earlier copy) refreshed in place
    (tied weights stay tied, rope frequencies stay float32). Loaded strictly: a weight the copy lacks, or one it has
    and the model not, is an error, never silently left out. Rollouts on a GPU decode from a bf16 copy of float32
    training weights: every step then reads 2-byte weights and casts nothing, also inside a compiled graph."""
    weights = {n: w.detach() for n, w in model.merged_weights().items()}
    if into is None:
        with torch.device("meta"):
            into = Transformer(dataclasses.replace(model.config, lora=None))
        into.load_state_dict({n: w.to(dtype) for n, w in weights.items()}, strict=False, assign=True)
        if model.config.tie_word_embeddings:
            into.lm_head.weight = into.embed_tokens.weight
        into.eval().requires_grad_(False)
    else:
        for name, p in into.named_parameters():
            p.copy_(weights[name])
    missing = {n for n, _ in into.named_parameters()} ^ set(weights)
    if missing:
        raise ValueError(f"cast_weights: the copy and the model disagree on {sorted(missing)[:5]}")
    into.inv_freq, into.generation_config = model.inv_freq, model.generation_config
    return into


@dataclass
class ToolUse:
    """How rows call tools in Engine.generate: the tools (tools.Tool), the tokenizer that finds their delimiters in
    the model's bytes and encodes their outputs, the pool that runs the calls (tools.ToolRunner), and the limits:
    calls per row (past it a call does not pause the row, so it can still answer) and observation tokens (a longer
    output is cut in the middle)."""
    tools: list
    tokenizer: Tokenizer
    runner: tools.ToolRunner
    max_turns: int = 4
    max_observation_tokens: int = 256

    @classmethod
    def from_args(cls, args, tokenizer):
        """The --tools flags of a script (None without tools)."""
        found = tools.make_tools(args)
        runner = tools.ToolRunner(args.tool_workers, args.tool_timeout + 2)  # the tools time their own calls out
        return cls(found, tokenizer, runner, args.max_turns, args.max_observation_tokens) if found else None


@dataclass
class Rows:
    """The decode batch on the device, one entry per batch row: which prompt row it is (B: a padding row), the token
    it feeds next, the tokens it emitted so far (n: model and observation tokens), its prompt's length (where its
    rope positions continue), whether it is done or waiting for a tool, and an observation being fed to it (forced
    tokens: forced[forced_at:forced_end]); logits [W, V] of its next token."""
    row: torch.Tensor
    tok: torch.Tensor
    n: torch.Tensor
    length: torch.Tensor
    done: torch.Tensor
    waiting: torch.Tensor
    fed: torch.Tensor  # whether tok is a token the row emitted this step (else a placeholder)
    forced: torch.Tensor
    forced_at: torch.Tensor
    forced_end: torch.Tensor
    logits: torch.Tensor

    def select(self, keep):
        return Rows(**{k: v[keep] for k, v in vars(self).items()})


@dataclass
class Outputs:
    """What each prompt row emitted (row B takes the writes of rows that emit nothing): ids [B + 1, M], own [B + 1,
    M] (True: the model sampled it; False: an observation), logp [B + 1, M] (the sampler's log pi of each sampled
    token, 0 on observations) and n [B + 1] (tokens emitted)."""
    ids: torch.Tensor
    own: torch.Tensor
    logp: torch.Tensor
    n: torch.Tensor

    @classmethod
    def empty(cls, B, M, device):
        return cls(torch.zeros(B + 1, M, dtype=torch.long, device=device),
                   torch.zeros(B + 1, M, dtype=torch.bool, device=device),
                   torch.zeros(B + 1, M, dtype=torch.float32, device=device),
                   torch.zeros(B + 1, dtype=torch.long, device=device))


class Engine:
    """Generation from one model, and what the compiled decode step keeps between calls: CUDA graphs replay on the
    addresses they were captured with, so the KV cache and the weight copy they read are made once and kept here
    (replaced only by a larger cache). compile: run the decode step through compiled_decode_step. dtype: decode
    from a copy of the weights in dtype (bf16 rollouts of float32 training weights)."""

    def __init__(self, model, compile=False, dtype=None):
        self.model, self.compile, self.dtype = unwrap(model), compile, dtype
        self.cache = None  # the compiled step's KVCache
        self.copy = None  # the compiled step's weight copy

    @classmethod
    def for_run(cls, run, model):
        """The engine of a script's model: compiled as --compile_decode says; bf16 weights under CUDA autocast."""
        return cls(model, use_compiled_decode(run.args.compile_decode, run.device),
                   torch.bfloat16 if run.amp else None)

    def weights(self):
        """The module to decode with: the model, or a copy of its weights in self.dtype (kept and refreshed in place
        when compiled). A LoRA model whose frozen base is already in self.dtype decodes as it is, its small float32
        adapters applied in each forward: no copy of the base."""
        if self.dtype is None or all(p.dtype == self.dtype for n, p in self.model.named_parameters()
                                     if not is_adapter(n)):
            return self.model
        if not self.compile:
            return cast_weights(self.model, self.dtype)
        self.copy = cast_weights(self.model, self.dtype, into=self.copy)
        return self.copy

    def kv_cache(self, config, batch, length, device, dtype):
        """A cache of at least batch rows and length slots: a fresh one eager; compiled, the kept one (stale slots of
        earlier calls are masked), replaced by a larger one when it is too small."""
        if not self.compile:
            return KVCache(config, batch, length, device, dtype)
        batch, length = batch + 1, length + 1  # a spare row and slot: the compiled step's views of the cache are
        # never the whole buffer, so never contiguous (torch.compile guards on whether a view is, and would recompile)
        cache = self.cache
        if cache is not None and cache.buf_k.dtype == dtype and cache.buf_k.device == device:
            if cache.buf_k.shape[1] >= batch and cache.buf_k.shape[3] >= length:
                return cache
            batch, length = max(batch, cache.buf_k.shape[1]), max(length, cache.buf_k.shape[3])
        self.cache = None  # free the old buffers before allocating their successor
        self.cache = KVCache(config, batch, length, device, dtype)
        return self.cache

    @torch.inference_mode()
    @torch.fx.experimental._config.patch(use_duck_shape=False)  # for compiled_decode_step: sizes that happen to be
    # equal in its first call (4 rows and 4 layers, 128 rows and 128 slots) must not be assumed equal forever
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token_ids=None,
                 seed=None, tool_use=None, on_token=None, check_every=None):
        """Sample a completion of each prompt (lists of token ids, any lengths) -> [Rollout] (rollout() decodes their
        text). A row stops at its own stop token, kept as its last id, or once it has emitted max_new_tokens (its
        model tokens and tool observations together). With tool_use a row pauses when the model closes a tool call:
        the call runs in the pool while the other rows decode, then its output is fed to the row (observation
        tokens, mask 0) and the row goes on. on_token(tokens) after every step: each prompt row's token, or None.

        The steps, each a method below: prefill (each distinct prompt once; its rows copy its keys and values), then
        per step emit (sample a token, or take the observation's next one; record it), the host's checks every
        check_every steps (1 on a CPU, 8 on a GPU: the loop's only host syncs): tool calls (check_tools) and
        finished rows leaving the batch (compact), and feed (the emitted tokens through the model, each row at its
        own cache slot: rows paused for a tool fall behind the others)."""
        model = self.weights()
        device = model.embed_tokens.weight.device
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        first = {}  # distinct prompt -> its row in the prefill
        share = [first.setdefault(tuple(p), len(first)) for p in prompts]  # prompt row i is prefilled as share[i]
        B, M, P = len(prompts), max_new_tokens, max(map(len, first))
        S = P + M
        if S > model.config.max_position_embeddings:
            raise ValueError(f"generate: prompt ({P}) + max_new_tokens ({M}) exceeds the model's "
                             f"max_position_embeddings ({model.config.max_position_embeddings})")
        if self.compile:  # cache lengths in steps of 128: the attention lengths the compiled step sees
            S = min(-(-S // 128) * 128, model.config.max_position_embeddings)
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else model.embed_tokens.weight.dtype
        W = batch_bucket(B, device.type, True) if self.compile else B  # compiled: a bucket's width from the start
        cache = self.kv_cache(model.config, W, S, device, dtype)
        rows = self.prefill(model, list(first), share, W, P, cache, tool_use.max_observation_tokens if tool_use else 1)
        out = Outputs.empty(B, M, device)
        stop = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        check_every = check_every or (1 if device.type == "cpu" else 8)
        step = compiled_decode_step if self.compile else decode_step
        host = [RowTools() for _ in range(B)] if tool_use else None
        t = hi = since = 0  # steps taken; the most tokens any row has emitted (bounded); steps since the last check
        paused = False  # whether a row waits for a tool (it feeds at its next free slot: one more slot to attend)
        while True:
            uniform = torch.rand(B + 1, generator=generator, device=device)[rows.row] if temperature > 0 else None
            self.emit(rows, out, stop, M, temperature, top_k, top_p, uniform)
            if on_token is not None:
                emitted = torch.full((B + 1,), -1, dtype=torch.long, device=device)
                emitted[torch.where(rows.fed, rows.row, B)] = rows.tok
                on_token([x if x >= 0 else None for x in emitted[:B].tolist()])
            t, hi, since = t + 1, min(hi + 1, M), since + 1
            if tool_use is None and t == M:
                break  # every row has emitted its budget
            if since == check_every:
                if tool_use is not None:
                    hi, paused = check_tools(rows, out, host, tool_use, since, M)
                since = 0
                rows, live = self.compact(rows, cache, P + hi, B)
                if live == 0:
                    break
            self.feed(step, model, rows, cache, P, M, self.attention_length(P + hi + paused, S))
        return self.records(prompts, out, host, stop_token_ids, M)

    def attention_length(self, filled, S):
        """Cache slots a decode step attends over: those filled so far; compiled, rounded up to 128, so that each
        (batch bucket, length) shape is captured once and replayed for 128 steps of every rollout."""
        return min(S, -(-filled // 128) * 128 if self.compile else filled)

    @staticmethod
    def prefill(model, distinct, share, W, P, cache, observation_width):
        """Each distinct prompt forwarded once, right-padded to P (plain causal attention: SDPA's fused kernels, no
        mask), the lm_head at its last token only; then each of the W batch rows starts from a copy of its prompt's
        keys and values (padding rows past the B prompt rows: of row 0, done from the start). -> Rows."""
        device, U, B = cache.buf_k.device, len(distinct), len(share)
        ids = torch.zeros(U, P, dtype=torch.long, device=device)
        for i, p in enumerate(distinct):
            ids[i, :len(p)] = torch.tensor(p, device=device)
        length = torch.tensor([len(p) for p in distinct], device=device)
        cache.select_rows(U)
        slots = torch.arange(P, device=device)
        logits = model(ids, None, slots.expand(U, P), cache, slots, logits_from=length - 1)[:, -1]  # [U, V]
        index = torch.tensor(share + [0] * (W - B), device=device)
        if U < W:
            cache.select_rows(index, P)
        row = torch.arange(W, device=device).clamp(max=B)
        zeros = torch.zeros(W, dtype=torch.long, device=device)
        return Rows(row=row, tok=zeros, n=zeros.clone(), length=length[index], done=row == B, waiting=row < 0,
                    fed=row < 0, forced=torch.zeros(W, observation_width, dtype=torch.long, device=device),
                    forced_at=zeros.clone(), forced_end=zeros.clone(), logits=logits[index])

    @staticmethod
    def emit(rows, out, stop, M, temperature, top_k, top_p, uniform):
        """Each row's next token: sampled from its logits, or the next token of the observation being fed to it;
        recorded in out with whether the model sampled it and its log-prob log pi(y_t) = log softmax(z)[y_t] (the
        model's own distribution, at temperature 1: what the trainer computes). Waiting and done rows emit nothing
        (their writes go to out's spare row B)."""
        sampled = sample_next(rows.logits, temperature, top_k, top_p, uniform=uniform)
        forcing = rows.forced_at < rows.forced_end
        forced = rows.forced.gather(1, rows.forced_at.clamp(max=rows.forced.shape[1] - 1)[:, None]).squeeze(1)
        tok = torch.where(forcing, forced, sampled)
        emit = ~rows.done & ~rows.waiting
        r, c = torch.where(emit, rows.row, len(out.n) - 1), torch.where(emit, rows.n, 0)
        out.ids[r, c] = tok
        out.own[r, c] = ~forcing
        logp = rows.logits.float().log_softmax(-1).gather(1, sampled[:, None]).squeeze(1)
        out.logp[r, c] = torch.where(forcing, 0.0, logp)
        rows.forced_at += (forcing & emit).long()
        rows.n += emit.long()
        out.n[r] = rows.n
        rows.done |= (emit & ~forcing & torch.isin(tok, stop)) | (rows.n >= M)
        rows.tok, rows.fed = tok, emit

    @staticmethod
    def feed(step, model, rows, cache, P, M, L):
        """The emitted tokens through the model -> rows.logits. A row's token goes to its own slot P + i (i: its index
        in the completion; a row that emitted nothing feeds a placeholder at its next free slot, overwritten later)
        at rope position prompt length + i, and attends to its prompt's slots and its own filled ones among the
        first L."""
        index = (rows.n - rows.fed.long()).clamp(max=M - 1)  # [W]
        slots = torch.arange(L, device=rows.n.device)
        seen = (slots < rows.length[:, None]) | ((slots >= P) & (slots <= P + index[:, None]))  # [W, L]
        rows.logits = step(model, rows.tok[:, None], (rows.length + index)[:, None], seen[:, None, None], cache,
                           (P + index)[:, None]).clone()

    def compact(self, rows, cache, filled, B):
        """Finished rows leave the batch (a host sync): the live ones are kept, padded to batch_bucket(live) rows with
        copies of a live row marked done, their first `filled` cache slots moved in place. -> (rows, live rows)."""
        live = (~rows.done).nonzero().squeeze(1)
        if len(live) == 0:
            return rows, 0
        size = batch_bucket(len(live), rows.n.device.type, self.compile)
        if size < len(rows.row):
            keep = torch.cat([live, live[:1].expand(size - len(live))])
            cache.select_rows(keep, filled)
            rows = rows.select(keep)
            rows.row[len(live):], rows.done[len(live):] = B, True
        return rows, len(live)

    @staticmethod
    def records(prompts, out, host, stop_token_ids, M):
        """The rollouts, read back from the device at once."""
        B = len(prompts)
        table = torch.cat([out.ids[:B], out.own[:B].long(), out.n[:B, None]], 1).tolist()
        logp = out.logp[:B].tolist()
        stop = set(stop_token_ids or [])
        result = []
        for i, row in enumerate(table):
            n = row[-1]
            ids, own = row[:n], row[M:M + n]
            result.append(Rollout(list(prompts[i]), ids, own, logp[i][:n],
                                  "eos" if n and own[-1] and ids[-1] in stop else "length",
                                  host[i].calls if host else [], host[i].capped if host else False))
        return result


@dataclass
class RowTools:
    """A prompt row's tool use, on the host: its model text since its last observation as bytes (ends: where each of
    its tokens ends in them; start: the completion index of the first), the completion tokens read so far, its calls,
    the call it waits for (future, ToolCall, tool, the box of its start time) and whether it wrote a call past
    max_turns."""
    text: bytearray = field(default_factory=bytearray)
    ends: list = field(default_factory=list)
    start: int = 0
    seen: int = 0
    calls: list = field(default_factory=list)
    pending: tuple = None
    capped: bool = False

    def read(self, tokenizer, ids, own, first):
        """The row's tokens at completion indices first.. : the model's own ones extend its text (observations and
        anything before start are not its text)."""
        for j, (i, mine) in enumerate(zip(ids, own)):
            if mine and first + j >= self.start:
                self.text += tokenizer.token_bytes(i)
                self.ends.append(len(self.text))
        self.seen = first + len(ids)

    def find_call(self, tool_list):
        """The first call the text closes: (tool, the call's text, the completion index just past the token that
        closes it), or None. Delimiters are matched on bytes, so one split across tokens is found too."""
        best = None
        for tool in tool_list:
            opening, closing = tool.format.call_open.encode(), tool.format.call_close.encode()
            o = self.text.find(opening)
            c = self.text.find(closing, o + len(opening)) if o >= 0 else -1
            if c >= 0 and (best is None or c + len(closing) < best[2]):
                best = (tool, bytes(self.text[o + len(opening):c]).decode("utf-8", "replace"), c + len(closing))
        if best is None:
            return None
        tool, body, end = best
        return tool, body, self.start + bisect.bisect_left(self.ends, end) + 1

    def drop_through(self, cut):
        """Forget the text of the tokens before completion index cut (a call that was not run)."""
        k = cut - self.start - 1
        base = self.ends[k]
        self.text, self.ends, self.start = self.text[base:], [e - base for e in self.ends[k + 1:]], cut

    def restart(self, start):
        """The model's text begins anew at completion index start (after a call, and its observation)."""
        self.text, self.ends, self.start = bytearray(), [], start


def check_tools(rows, out, host, tool_use, window, M):
    """The host's look at a batch with tools, every check_every steps. Each row's tokens since the last look extend
    its text; a row whose text closes a tool call is cut right after the call (tokens sampled past it are discarded,
    never trained on), paused, and its call started in the pool, unless it has made max_turns calls (then it goes
    on). A paused row whose call has answered is fed the observation. If every live row is paused, wait for an
    answer. Device state is changed in place; -> (the most tokens a live row has emitted, whether a row is paused)."""
    B = len(host)
    cols = (rows.n[:, None] - window + torch.arange(window, device=rows.n.device)).clamp(min=0)  # [W, window]
    table = torch.cat([rows.row[:, None], rows.n[:, None], rows.done[:, None].long(), rows.waiting[:, None].long(),
                       out.ids[rows.row[:, None], cols], out.own[rows.row[:, None], cols].long()], 1).tolist()
    state = {}  # batch index -> [prompt row, n, done, waiting, observation tokens or None]
    for i, (r, n, done, waiting, *window_tokens) in enumerate(table):
        if r == B:
            continue
        state[i] = [r, n, done, waiting, None]
        row = host[r]
        fresh = n - row.seen
        row.read(tool_use.tokenizer, window_tokens[window - fresh:window], window_tokens[2 * window - fresh:], row.seen)
        while not waiting and (found := row.find_call(tool_use.tools)) and found[2] < M:
            tool, text, cut = found
            if len(row.calls) >= tool_use.max_turns:  # past the cap the call is not run: the row goes on
                row.capped = True
                row.drop_through(cut)
                continue
            calls = [c.text for c in row.calls if c.tool == tool.name] + [text]
            future, call, started = tool_use.runner.submit(tool, calls)
            row.calls.append(call)
            row.pending, row.seen = (future, call, tool, started), cut
            row.restart(cut)
            state[i][1:4] = [cut, False, True]
            waiting = True
    answer_calls(state, host, tool_use, M)
    apply_tool_changes(rows, out, state)
    live = [s for s in state.values() if not s[2]]
    return max((s[1] for s in live), default=0), any(s[3] for s in live)


def answer_calls(state, host, tool_use, M):
    """Paused rows whose call has answered get its observation (state[i][4]); if every live row is paused, wait for
    the first answer (or timeout) first."""
    while True:
        for s in state.values():
            r, n, _, waiting, _ = s
            pending = host[r].pending
            if waiting and pending and tool_use.runner.ready(pending[0], pending[1], pending[3]):
                ids = observation_ids(tool_use, pending[2], pending[1].output, M - n)
                s[3:5] = [False, ids]
                host[r].pending = None
                host[r].restart(n + len(ids))
        waits = [host[s[0]].pending for s in state.values() if not s[2] and s[3]]
        if not waits or len(waits) < sum(not s[2] for s in state.values()):
            return
        deadline = tool_use.runner.next_deadline([(p[0], p[1], p[3]) for p in waits])
        concurrent.futures.wait([p[0] for p in waits], return_when=concurrent.futures.FIRST_COMPLETED,
                                timeout=0.05 if deadline is None else max(0.0, deadline - time.monotonic()))


def apply_tool_changes(rows, out, state):
    """The host's decisions back on the device: rewound and paused rows, rows fed an observation."""
    index = torch.tensor(list(state), dtype=torch.long)
    if not len(index):
        return
    values = torch.tensor([s[1:4] for s in state.values()], dtype=torch.long)  # n, done, waiting
    device = rows.n.device
    index, values = index.to(device), values.to(device)
    rows.n[index], rows.done[index], rows.waiting[index] = values[:, 0], values[:, 1].bool(), values[:, 2].bool()
    rows.fed[index] &= ~values[:, 2].bool()  # a paused row's token (past its call) is not fed
    out.n[rows.row[index]] = values[:, 0]
    for i, s in state.items():
        if s[4] is not None:  # an observation to feed
            ids = torch.tensor(s[4][:rows.forced.shape[1]], dtype=torch.long, device=device)
            rows.forced[i, :len(ids)] = ids
            rows.forced_at[i], rows.forced_end[i] = 0, len(ids)


def observation_ids(tool_use, tool, output, budget):
    """The tokens fed to a row after its call: result_open + output + result_close, encoded as text (never special
    tokens), the output cut in the middle to fit --max_observation_tokens; at most `budget` tokens (what is left of
    the row's --max_new_tokens)."""
    encode = tool_use.tokenizer.encode_ordinary
    ids = encode(tool.format.observation(output))
    most = tool_use.max_observation_tokens
    if len(ids) > most:
        head, tail = encode(tool.format.result_open), encode(tool.format.result_close)
        body = encode(output.rstrip("\n"))
        room = max(2, most - len(head) - len(tail) - len(encode(f"\n...[{len(body)} tokens cut]...\n")))
        marker = encode(f"\n...[{len(body) - room} tokens cut]...\n")
        ids = head + body[:room // 2] + marker + body[len(body) - (room - room // 2):] + tail
    return ids[:min(most, budget)]


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


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token_ids=None,
             seed=None, compile=False, tool_use=None, on_token=None, check_every=None):
    """Engine(model, compile).generate(...): sampling from a model once, without keeping an engine."""
    return Engine(model, compile).generate(prompts, max_new_tokens, temperature, top_k, top_p, stop_token_ids, seed,
                                           tool_use, on_token, check_every)


@torch.no_grad()
def rollout(run, engine, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=None, top_k=None, seed=0,
            batch_size=None, desc=None, tool_use=None):
    """The rollout of every script: engine.generate over the prompt ids (batch_size rows at a time, batch i seeded
    seed + i; the one stop rule, stop_token_ids), then each completion's text decoded. -> [Rollout]."""
    stop = stop_token_ids(engine.model, tokenizer)
    batch_size = batch_size or max(1, len(prompts))
    records = []
    with run.full_params(engine.model):  # FSDP: gathered once for the whole rollout
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None or not run.is_main, leave=False):
            records += engine.generate(prompts[i:i + batch_size], max_new_tokens, temperature, top_k, top_p, stop,
                                       seed + i, tool_use)
    for r in records:
        end = len(r.ids) - (r.stop == "eos")
        r.text = tokenizer.decode(r.ids[:end])
        r.own_text = tokenizer.decode([i for i, m in zip(r.ids[:end], r.mask) if m]) if r.calls else r.text
    return records


def sample_groups(run, args, engine, tokenizer, problems, seed, reward_model=None, tool_use=None):
    """An RL step's rollouts (grpo.py, ppo.py): args.group_size completions per problem in one rollout (each prompt
    tokenized and prefilled once for its group), scored by verify.compute_rewards on the model's own text and
    token counts. -> (the Rollouts, the samples of a problem adjacent; their rewards; the reward components)."""
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    records = rollout(run, engine, tokenizer, [q for q in prompts for _ in range(args.group_size)], args.max_new_tokens,
                      args.temperature, args.top_p, seed=seed, tool_use=tool_use)
    grouped = [p for p in problems for _ in range(args.group_size)]
    rewards, parts = verify.compute_rewards(args, grouped, [r.own_text for r in records],
                                            [sum(r.mask) for r in records], [r.truncated for r in records],
                                            reward_model)
    return records, rewards, parts


def rollout_metrics(run, records, rewards, parts, with_tools=False):
    """What an RL step logs about its rollouts, over all ranks (one all-reduce): reward mean and std, accuracy, every
    other reward component as reward_<name> (verify.REWARD_HELP), the model's completion lengths in its own tokens
    (all, correct and incorrect ones: the length bias of Dr. GRPO shows as incorrect completions growing), how the
    rows stopped (eos, the length budget) and, with tools, calls per sample, the fraction of calls that failed,
    observation tokens per sample, the tool seconds of the step and the fraction that hit --max_turns."""
    lengths = [sum(r.mask) for r in records]
    correct = [a >= 1 for a in parts["accuracy"]]
    calls = [c for r in records for c in r.calls]
    sums = {"n": len(records), "reward": sum(rewards), "reward_sq": sum(x * x for x in rewards),
            "accuracy": sum(parts["accuracy"]), **{f"reward_{k}": sum(v) for k, v in parts.items() if k != "accuracy"},
            "len": sum(lengths), "n_correct": sum(correct), "len_correct": sum(l for l, c in zip(lengths, correct) if c),
            "truncated": sum(r.truncated for r in records), "calls": len(calls),
            "errors": sum(c.error for c in calls), "observation": sum(len(r.ids) - l for r, l in zip(records, lengths)),
            "tool_s": sum(c.seconds for c in calls), "capped": sum(r.turn_capped for r in records)}
    total = dict(zip(sums, run.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    n, mean = total["n"], total["reward"] / total["n"]
    metrics = {"reward": mean, "reward_std": math.sqrt(max(0.0, total["reward_sq"] / n - mean ** 2)),
               "accuracy": total["accuracy"] / n,
               **{k: total[k] / n for k in sums if k.startswith("reward_") and k != "reward_sq"},
               "completion_len_mean": total["len"] / n, "completion_len_max": run.all_max(max(lengths)),
               "completion_len_correct": total["len_correct"] / total["n_correct"] if total["n_correct"] else None,
               "completion_len_incorrect": ((total["len"] - total["len_correct"]) / (n - total["n_correct"])
                                            if n > total["n_correct"] else None),
               "truncated_frac": total["truncated"] / n, "stop_eos_frac": 1 - total["truncated"] / n}
    if with_tools:
        metrics.update(tool_calls_per_sample=total["calls"] / n, observation_tokens_per_sample=total["observation"] / n,
                       tool_error_frac=total["errors"] / total["calls"] if total["calls"] else None,
                       tool_s=total["tool_s"], turn_capped_frac=total["capped"] / n)
    return metrics


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
    if not kept:
        raise SystemExit(f"error: {source}: no problem's prompt + --max_new_tokens {max_new_tokens} fits the model's "
                         f"context of {max_positions} tokens")
    if len(kept) < len(problems):
        print(f"{source}: dropped {len(problems) - len(kept)} of {len(problems)} problems whose prompt + "
              f"{max_new_tokens} new tokens exceeds the context ({max_positions})", file=sys.stderr)
    return kept


def load_eval_problems(source, template, n=500):
    """Problems from a JSONL file (the template turns each question into the user turn), or the built-in task's
    held-out split of a built-in task (tools.BUILTIN_TASKS: prompts used as they are, the way the built-in models
    were trained)."""
    return tools.task_problems(source, "heldout", n) if tools.is_builtin(source) else templated_problems(source, template)


def add_rl_data_args(p, max_new_tokens, temperature=1.0):
    """The problem and rollout flags of every script that samples from prompts (grpo.py, ppo.py, distill.py), read by
    rl_problems and the rollouts (their --max_new_tokens then set by rl_data_defaults). temperature None: the
    script chooses (and checks) its own default."""
    p.add_argument("--data", default="builtin", help="problems JSONL (prompt/answer, GSM8K or MATH; code, Countdown "
                   f"or knights records), or a built-in task: {', '.join(tools.BUILTIN_TASKS)} ('builtin': arithmetic)")
    p.add_argument("--heldout_data", default=None, help="held-out problems JSONL (default: the task's held-out split)")
    p.add_argument("--heldout_problems", type=count, default=500, help="held-out problems for greedy accuracy")
    p.add_argument("--prompt_template", type=prompt_template, default=PROMPT_TEMPLATE,
                   help="how a --data problem becomes the user turn ({question} is replaced)")
    p.add_argument("--max_new_tokens", type=count, default=None, help=f"completion length limit (default: "
                   f"{max_new_tokens}, or what a built-in task's worked solutions need)")
    p.add_argument("--temperature", type=positive, default=temperature, help="rollout sampling temperature (> 0: "
                   "RL learns from the differences between samples)")
    p.add_argument("--top_p", type=probability, default=None, help="rollout nucleus sampling mass, in (0, 1]")
    return p


def add_tool_args(p):
    """The tool flags of every script (grpo.py, ppo.py, distill.py, sample.py sample with them; sft.py masks their
    outputs): tools.make_tools and ToolUse read them."""
    g = p.add_argument_group("tools", "calls to tools while the model writes (tools.py)")
    g.add_argument("--tools", default="", help="comma-separated: python (Qwen2.5-Math's ```python blocks, run in the "
                   "sandbox), search (<search>query</search>, BM25 over --corpus), or module:function (your own, a "
                   "callable text -> text); their outputs are context, out of every loss (default: the built-in "
                   "task's tool, if it has one; 'none': no tools)")
    g.add_argument("--tool_formats", type=json_object, default={}, metavar="JSON", help='delimiters per tool, e.g. '
                   '\'{"search": ["<query>", "</query>", "<docs>", "</docs>"]}\' (call open, call close, result '
                   'open, result close)')
    g.add_argument("--max_turns", type=count, default=4, help="tool calls per sample; past it a call is not run and "
                   "the sample goes on (so it can still answer)")
    g.add_argument("--max_observation_tokens", type=count, default=256, help="a longer tool output is cut in the "
                   "middle")
    g.add_argument("--tool_timeout", type=positive, default=10.0, help="seconds a call may take (python: its "
                   "sandbox's limit too)")
    g.add_argument("--tool_memory_mb", type=count, default=1024, help="memory cap of a python or user tool call")
    g.add_argument("--tool_workers", type=count, default=os.cpu_count() or 1, help="tool calls run at once")
    g.add_argument("--corpus", default=None, help="search: a JSONL corpus of {id, title, text} (default: the "
                   "built-in knowledge base of builtin:search)")
    g.add_argument("--search_top_k", type=count, default=tools.DEFAULT_SEARCH_K, help="search: documents per call")
    g.add_argument("--search_max_chars", type=count, default=tools.DEFAULT_MAX_CHARS, help="search: characters of "
                   "each document's text")
    g.add_argument("--require_sandbox", action="store_true", help="refuse to run model-written code (code rewards, "
                   "the python tool) unless the sandbox has its namespaces and read-only mounts here")
    return p


def check_sandbox(run, args, problems):
    """Before model-written code runs (code problems, the python tool): say once how the sandbox contains it here
    (verify.sandbox_mode), and with --require_sandbox refuse a weak one (ValueError naming the flag)."""
    code = any("tests" in p or ("inputs" in p and "outputs" in p) for p in problems or ())
    if not (code or "python" in tools.tool_names(tools.task_tools(args))):
        return
    run.print(f"code sandbox: {verify.sandbox_mode()}")
    if args.require_sandbox:
        try:
            verify.require_sandbox()
        except RuntimeError as e:
            raise ValueError(f"--require_sandbox: {e}") from None


def rl_data_defaults(args, max_new_tokens):
    """After parsing: --max_new_tokens, if not given, is the script's default (max_new_tokens) or what the built-in
    task's worked solutions need, if more."""
    if args.max_new_tokens is None:
        args.max_new_tokens = tools.default_max_new_tokens(args.data, max_new_tokens)
    return args


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
        source = args.data if builtin else "builtin"
        heldout = tools.task_problems(source, "heldout", args.heldout_problems)
    else:
        source, heldout = args.heldout_data, load_eval_problems(args.heldout_data, args.prompt_template)
    return data, fitting(heldout[:args.heldout_problems], source)


@torch.no_grad()
def heldout_accuracy(run, engine, tokenizer, problems, max_new_tokens=96, batch_size=256, tool_use=None):
    """Greedy accuracy and mean completion length (the model's own tokens) over problems, split across ranks."""
    mine = problems[run.rank::run.world]
    records = rollout(run, engine, tokenizer, [prompt_ids(tokenizer, p["prompt"]) for p in mine], max_new_tokens,
                      temperature=0.0, batch_size=batch_size, tool_use=tool_use)
    correct = sum(verify.safe_reward(verify.accuracy_reward, p, r.own_text) for r, p in zip(records, mine))
    return run.all_sum(correct) / len(problems), run.all_sum(sum(sum(r.mask) for r in records)) / len(problems)


def log_heldout(run, step, engine, tokenizer, problems, max_new_tokens, tool_use=None, say=None):
    """heldout_accuracy logged at `step` as heldout_acc and heldout_mean_length (and printed, saying when, if `say`
    names the moment) -> (accuracy, mean length)."""
    acc, mean_len = heldout_accuracy(run, engine, tokenizer, problems, max_new_tokens, tool_use=tool_use)
    run.log(step, {"heldout_acc": acc, "heldout_mean_length": mean_len})
    if say:
        run.print(f"held-out greedy accuracy {say}: {acc:.3f} (mean length {mean_len:.1f}, {len(problems)} problems)")
    return acc, mean_len


def powers_of_two(n):
    return [k for k in (2 ** i for i in range(n.bit_length())) if k <= n]


def evaluate(run, engine, tokenizer, problems, n=1, max_new_tokens=512, temperature=0.6, top_p=None, seed=0,
             batch_size=64, samples_file=None, tool_use=None):
    """Sample n completions per problem and grade them (the model's own text). Returns the summary dict (with
    tools: calls per sample too); writes one JSONL line per sample (problem id, completion, extracted answer,
    reward, its tool calls) when samples_file is given."""
    jobs = [(i, j) for i in range(len(problems)) for j in range(n)]
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in problems]
    records = rollout(run, engine, tokenizer, [prompts[i] for i, _ in jobs], max_new_tokens, temperature, top_p,
                      seed=seed, batch_size=batch_size, desc="eval", tool_use=tool_use)
    rows = [{"id": i, "sample": j, "prompt": problems[i]["prompt"], "completion": r.text,
             "answer": verify.extract_answer(r.own_text), "gold": problems[i].get("answer"), "length": sum(r.mask),
             "reward": verify.safe_reward(verify.accuracy_reward, problems[i], r.own_text),
             "format": verify.format_reward(r.own_text), "stop": r.stop,
             **({"tool_calls": [vars(c) for c in r.calls]} if tool_use else {})} for (i, j), r in zip(jobs, records)]
    if samples_file:
        Path(samples_file).parent.mkdir(parents=True, exist_ok=True)
        Path(samples_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_problem = [rows[i * n:(i + 1) * n] for i in range(len(problems))]
    summary = {"problems": len(problems), "samples_per_problem": n,
               "pass@1": sum(r["reward"] for r in rows) / len(rows),
               "mean_length": sum(r["length"] for r in rows) / len(rows),
               "max_length": max(r["length"] for r in rows),
               "well_formed": sum(r["format"] for r in rows) / len(rows)}
    if tool_use:
        summary["tool_calls_per_sample"] = sum(len(r.calls) for r in records) / len(records)
    for k in powers_of_two(n):  # unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), averaged
        summary[f"pass@{k}"] = sum(verify.pass_at_k(n, int(sum(r["reward"] for r in g)), k) for g in by_problem) / len(problems)
    for k in powers_of_two(n):  # majority vote over the first k samples, answers grouped by is_equiv
        summary[f"maj@{k}"] = sum(verify.maj_at_k([r["answer"] for r in g], g[0]["gold"], k) for g in by_problem) / len(problems)
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
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
                   "MATH format; code, Countdown or knights records) or a built-in task's held-out problems: "
                   f"{', '.join(tools.BUILTIN_TASKS)}")
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
    add_tool_args(p)
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
        check_sandbox(run, args, problems)
    results = {}
    for name, out in folders.items():
        with user_input():
            tokenizer = load_tokenizer(args, name)
            model = Transformer.from_pretrained(name, dtype=args.dtype, device=args.device)
            tool_use = ToolUse.from_args(args, tokenizer)
        results[name] = evaluate(run, Engine(model, use_compiled_decode(args.compile_decode, args.device)), tokenizer,
                                 problems, n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                 samples_file=out / "samples.jsonl", tool_use=tool_use)
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
        tool_use = ToolUse.from_args(args, tokenizer)
        check_sandbox(Run(args, "sample"), args, [])
    prompt = tokenizer.encode(args.prompt) if args.no_chat_template else prompt_ids(tokenizer, args.prompt)
    generated = []
    printed = ""

    def stream(tokens):  # decode everything so far and print the new suffix (multi-byte characters arrive whole);
        nonlocal printed  # tool calls and their outputs stream as the model writes and reads them
        if tokens[0] is None:  # waiting for a tool
            return
        generated.append(tokens[0])
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    t0 = time.time()
    generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, stop_token_ids=stop_token_ids(model, tokenizer), seed=args.seed,
             compile=use_compiled_decode(args.compile_decode, args.device), tool_use=tool_use, on_token=stream)
    dt = time.time() - t0
    print(f"\n[{len(generated)} tokens in {dt:.2f}s, {len(generated) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
