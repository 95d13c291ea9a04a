r"""Reward models: a transformer with a scalar head, trained on preference pairs with the Bradley-Terry loss
(Ouyang et al. 2022, InstructGPT), and the scoring API that ppo.py and grpo.py call. The same module with a
head on every token is PPO's critic (value model).

CPU, no arguments: starts from the committed tiny SFT checkpoint and learns the built-in preference set
(a correct step-by-step solution over a terse one with a wrong total, a well-formed one over a malformed one),
printing held-out pairwise accuracy (a few minutes):
    python reward_model.py
8 GPUs (the --batch_size counts pairs over all GPUs):
    torchrun --nproc_per_node=8 reward_model.py --model Qwen2.5-1.5B-Instruct --data prefs.jsonl \
        --eval_data prefs_test.jsonl --batch_size 128 --lr 5e-6 --max_steps 1000 --micro_batch_tokens 32768 \
        --grad_checkpointing --save_every 200
Write the built-in preference set out as JSONL:
    python reward_model.py --export_builtin data/
Use it:
    from reward_model import load_reward_model
    rm = load_reward_model("out/reward_model/final", device="cuda", tokenizer_of_policy=policy_tokenizer)
    rm.score(["Compute 7+5."], ["<think>\n7+5=12\n</think>\n\\boxed{12}"])   # tensor [N]

Data (JSONL, one pair a line): {"prompt": ..., "chosen": ..., "rejected": ..., "margin": optional number}.
prompt is a string (the user turn) or a message list; chosen/rejected are strings (the assistant reply) or
message lists that continue the prompt. Both sides are rendered with the tokenizer's chat template.

Saved layout: a Hugging Face sequence-classification folder, so transformers'
AutoModelForSequenceClassification.from_pretrained(folder) gives the same scores:
    config.json            the backbone's config with architectures ["LlamaForSequenceClassification"] (or
                           Qwen2/Qwen3...), num_labels 1, pad_token_id set
    model.safetensors      "model.*" backbone tensors (no lm_head) + "score.weight" [1, hidden]
    tokenizer.json, tokenizer_config.json
The score is read at the last token of each sequence. transformers reads it at the last token that is not
pad_token_id, so sequences never end in the pad token here (trailing pad tokens are dropped).
"""
import dataclasses
import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (ArgumentParser, Run, add_training_args, check_same_tokenizer, checkpoint_or_stop, count,
                    length_buckets, load_tokenizer, lora_config, lr_at, make_optimizer, non_negative_int, optimizer_step,
                    pad_right, resume, save_checkpoint, step_indices, user_input, weights_dtype)
from model import (ModelConfig, Tokenizer, Transformer, hf_name, load_adapter, parse_dtype, peft_config, read_json, read_safetensors,
                   rope_inv_freq, save_folder)
from sample import render
from verify import builtin_problems, read_jsonl, worked_solution

# ----------------------------------------------------------------------------------------------------
# The model: backbone + scalar head


class RewardModel(nn.Module):
    """Transformer backbone (no lm_head) + a linear head giving one scalar per position: [B, T] -> [B, T].
    As a reward model, the score of a sequence is the head at its last token; as PPO's critic, the head at
    position t is V(s_t), the value of the state after tokens 0..t."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # built tied, so the unused lm_head is only a view of the embedding: no extra memory, and no
        # parameter that gets no gradient (DDP would stop on it). The saved config keeps cfg's own flag.
        self.backbone = Transformer(dataclasses.replace(cfg, tie_word_embeddings=True))
        self.head = nn.Linear(cfg.hidden_size, 1, bias=False)  # saved as "score.weight", HF's name
        nn.init.zeros_(self.head.weight)  # a fresh head says r = 0 to everything: BT loss starts at log 2
        self.tokenizer = None  # set by load_reward_model; needed by .score()

    def forward(self, idx, attention_mask=None):
        """idx [B, T] -> one scalar per position [B, T], float32."""
        # sum over the size-1 dim rather than squeeze: a fresh tensor, not a view (FSDP2's backward hook needs one)
        return self.head(self.backbone.hidden(idx, attention_mask)).float().sum(-1)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, lora=None):
        """A reward-model folder (*ForSequenceClassification: backbone + score head), or any causal LM folder
        (*ForCausalLM: its lm_head is dropped and the head starts at zero). lora (a LoraConfig): the backbone
        becomes the frozen base of float32 adapters; the head trains in full, in float32 (PEFT's modules_to_save)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} not found (a Hugging Face model folder needs config.json)")
        hf = json.loads(config_file.read_text())
        arch = (hf.get("architectures") or ["?"])[0]
        if arch.endswith("ForSequenceClassification"):
            if len(hf.get("id2label") or {"0": ""}) != 1 or hf.get("num_labels", 1) != 1:
                raise ValueError(f"{config_file}: a reward model has one label (a scalar score); this has "
                                 f"{hf.get('num_labels', len(hf.get('id2label', {})))}")
            hf = {**hf, "architectures": [arch.replace("ForSequenceClassification", "ForCausalLM")]}
        cfg = ModelConfig.from_hf(hf, source=str(config_file))
        tensors = read_safetensors(path, dtype=parse_dtype(dtype), device=device)
        if arch.endswith("ForSequenceClassification") and "score.weight" not in tensors:
            raise ValueError(f"{path}: config says {arch} but there is no score.weight tensor")
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(cfg)
        model.load_hf_state_dict(tensors, source=str(path), assign=True)
        model.backbone.inv_freq = rope_inv_freq(model.backbone.config, device=device)
        if lora is not None:
            model.backbone.add_adapters(lora)
            model.config.lora = lora
            model.head.float().requires_grad_(True)
        return model

    def adapter_names(self):
        """{key in PEFT's adapter_model.safetensors (a sequence classifier): our parameter name}: the backbone's
        adapters and the whole head."""
        names = {k: f"backbone.{n}" for k, n in self.backbone.adapter_names().items()}
        return {**names, "base_model.model.score.weight": "head.weight"}

    def load_hf_state_dict(self, tensors, source="checkpoint", assign=False):
        """Backbone tensors as named in Hugging Face ("model.*"; an lm_head is ignored) and "score.weight" (a
        fresh zero head when absent). assign: adopt the tensors (meta init), else copy into the parameters."""
        tensors = dict(tensors)
        score = tensors.pop("score.weight", None)
        tensors.pop("lm_head.weight", None)
        self.backbone.load_hf_state_dict(tensors, source=source, assign=assign)
        w = self.backbone.embed_tokens.weight
        if score is None:
            score = torch.zeros(1, self.config.hidden_size, dtype=w.dtype, device=w.device)
        elif tuple(score.shape) != (1, self.config.hidden_size):
            raise ValueError(f"{source}: score.weight has shape {tuple(score.shape)}, expected "
                             f"(1, {self.config.hidden_size}) (one label)")
        self.head.load_state_dict({"weight": score.to(w.dtype)}, assign=assign)

    def save_pretrained(self, path, tokenizer=None, base=None, adapter_only=False):
        """The Hugging Face sequence-classification folder described at the top (model.save_folder: atomic, the
        same file modes as a policy folder). With adapters: merged weights, and beside them the adapters and the
        head in PEFT's layout (adapter_only: those alone)."""
        dtype = self.backbone.embed_tokens.weight.dtype
        hf = self.config.to_hf(dtype)
        pad = tokenizer.pad_token_id if tokenizer is not None else hf.get("pad_token_id")
        hf.update(architectures=[self.config.architecture.replace("ForCausalLM", "ForSequenceClassification")],
                  num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad)
        tensors = {hf_name(n): p for n, p in self.backbone.merged_weights().items()}
        extra_json, adapter = {}, {}
        if self.config.lora is not None:
            extra_json["adapter/adapter_config.json"] = peft_config(self.config.lora, base, "SEQ_CLS", ["score"])
            params = dict(self.named_parameters())
            adapter["adapter/adapter_model.safetensors"] = {k: params[n] for k, n in self.adapter_names().items()}
        tensors = {} if adapter_only else {**tensors, "score.weight": self.head.weight.to(dtype)}
        save_folder(path, hf, tensors, tokenizer, extra_json, adapter)

    @torch.no_grad()
    def score(self, prompts, responses, batch_size=64):
        """Scores [N] (float32, CPU) of responses (strings) to prompts (strings or message lists)."""
        if self.tokenizer is None:
            raise ValueError("RewardModel.score needs a tokenizer: load the model with load_reward_model(path)")
        seqs = [pair_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        device, out = self.head.weight.device, []
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_pairs(seqs[i:i + batch_size], self.tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            out.append(last_token_values(self(ids), mask))  # right padding: plain causal attention is exact
        return torch.cat(out).cpu() if out else torch.zeros(0)


def last_token_index(mask):
    """[B, T] 1 = token -> [B] index of each row's last token (left or right padding)."""
    return mask.shape[1] - 1 - mask.flip(1).float().argmax(1)


def last_token_values(values, mask):
    """values [B, T], mask [B, T] -> [B]: the head read at each sequence's last token."""
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def load_reward_model(path, device="cpu", tokenizer_of_policy=None, dtype=None):
    """A trained reward model ready to .score(prompts, responses), frozen, in eval mode (None for path None). A folder
    without a score head (a causal LM, whose fresh head would score every response 0) is refused, and so, with
    tokenizer_of_policy, is a reward model whose tokenizer differs from the policy's."""
    if path is None:
        return None
    arch = (read_json(Path(path) / "config.json").get("architectures") or ["?"])[0]
    if not arch.endswith("ForSequenceClassification"):
        raise ValueError(f"--reward_model {path}: a {arch} folder, not a reward model (no score head, so every reward "
                         "would be 0); train one with reward_model.py")
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer_of_policy is not None:
        check_same_tokenizer(tokenizer, tokenizer_of_policy)
    device = torch.device(device)
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rm = RewardModel.from_pretrained(path, dtype=dtype, device=device).eval().requires_grad_(False)
    rm.tokenizer = tokenizer
    return rm


# ----------------------------------------------------------------------------------------------------
# Preference data


def as_messages(x, role, where):
    """A string (one turn of `role`) or a message list -> message list."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                   and isinstance(m["content"], str) for m in x):
        return x
    raise ValueError(f"{where}: expected a string or a list of {{'role', 'content'}} messages, got {x!r:.80}")


def pair_ids(tokenizer, prompt, response):
    """Token ids of prompt + response rendered as one chat, ending at the end of the response's turn."""
    messages = as_messages(prompt, "user", "prompt") + as_messages(response, "assistant", "response")
    ids = tokenizer.encode(render(tokenizer, messages, add_generation_prompt=False))
    while ids and ids[-1] == tokenizer.pad_token_id:  # see the top: the score token must not be the pad token
        ids.pop()
    return ids


def load_pairs(path):
    """JSONL of {"prompt", "chosen", "rejected", "margin"?} -> list of dicts with message lists."""
    pairs = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not {"chosen", "rejected"} <= rec.keys():
            raise ValueError(f"{where}: needs 'chosen' and 'rejected' (and usually 'prompt'); found {sorted(rec)}")
        margin = rec.get("margin")
        if margin is not None and not isinstance(margin, (int, float)):
            raise ValueError(f"{where}: 'margin' must be a number, got {margin!r}")
        pair = {"prompt": as_messages(rec.get("prompt", []), "user", where), "margin": margin,
                "chosen": as_messages(rec["chosen"], "assistant", where),
                "rejected": as_messages(rec["rejected"], "assistant", where), "kind": rec.get("kind", "all")}
        if pair["chosen"] == pair["rejected"]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response (the pair teaches nothing)")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


# The built-in preference set. chosen: a correct worked solution of a built-in problem; rejected: a spoiled one.
#   lazy          (default) chosen shows every step; rejected writes only the final equation, with a wrong total:
#                 the failure a small model shows when it skips the work (problems of 3+ terms, so they differ)
#   malformed     (default) the same solution without </think>, with an unboxed answer, or cut off mid-reasoning
#   wrong_answer  the same solution whose boxed answer is not the result its reasoning reached
#   broken_step   one step's arithmetic is off; later steps carry the wrong total on (self-consistent)
# The default kinds show in the response's shape, which the ~1M-parameter model learns in a few dozen steps. The
# last two need the model to compare numbers or check arithmetic: trained on them for 150-400 steps, a tiny
# reward model stayed at 50-60% on them (a linear probe on the SFT model's hidden states found no trace of them
# either). Add them with --builtin_kinds for larger models; summary.json reports accuracy per kind.
KINDS = ("lazy", "malformed", "wrong_answer", "broken_step")
DEFAULT_KINDS = "lazy,malformed"


def spoil(problem, kind, show_steps, rng):
    """A rejected response for problem, spoiled the `kind` way (show_steps: the chosen solution's style)."""
    off = rng.choice([-3, -2, -1, 1, 2, 3])
    good = worked_solution(problem, show_steps)
    if kind == "lazy":
        return worked_solution({**problem, "answer": str(int(problem["answer"]) + off)}, show_steps=False)
    if kind == "wrong_answer":
        return good.replace(f"\\boxed{{{problem['answer']}}}", f"\\boxed{{{int(problem['answer']) + off}}}")
    if kind == "broken_step":
        parsed = [re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", s).groups() for s in problem["steps"]]
        broken, total, steps = rng.randrange(len(parsed)), int(parsed[0][0]), []
        for i, (_, op, n, _) in enumerate(parsed):
            new = total + int(n) if op == "+" else total - int(n)
            new += off if i == broken else 0
            steps.append(f"{total}{op}{n}={new}")
            total = new
        return worked_solution({**problem, "steps": steps, "answer": str(total)}, show_steps=True)
    way = rng.randrange(3)  # malformed
    if way == 0:
        return good.replace("</think>\n", "")
    if way == 1:
        return good.replace(f"\\boxed{{{problem['answer']}}}", problem["answer"])
    return good[:rng.randrange(len("<think>\n") + 1, good.index("</think>"))]


def builtin_pairs(split, n, seed=0, kinds=DEFAULT_KINDS):
    """n preference pairs on the train or heldout problems of verify.builtin_problems (disjoint splits); each pair's
    kind is drawn uniformly from the comma-separated kinds that fit its problem."""
    kinds = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"unknown preference kinds {sorted(set(kinds) - set(KINDS))}; known: {', '.join(KINDS)}")
    rng, pairs = random.Random(f"pairs-{split}-{seed}-{','.join(kinds)}"), []
    for p in builtin_problems(split, 2 * n, seed):  # 2n: 2-term problems (a quarter) have no lazy pair
        fits = [k for k in kinds if k != "lazy" or len(p["steps"]) > 1]
        if not fits or len(pairs) == n:
            continue
        kind = rng.choice(fits)
        show_steps = kind in ("lazy", "broken_step") or rng.random() < 0.5  # the work to skip, or a step to break
        pairs.append({"prompt": p["prompt"], "chosen": worked_solution(p, show_steps),
                      "rejected": spoil(p, kind, show_steps, rng), "kind": kind})
    return pairs


def export_builtin(folder, n_train, n_heldout, kinds=DEFAULT_KINDS):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("builtin_pref_train.jsonl", builtin_pairs("train", n_train, kinds=kinds)),
                       ("builtin_pref_heldout.jsonl", builtin_pairs("heldout", n_heldout, kinds=kinds))):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {folder / name} ({len(rows)} pairs)")


def tokenize_pairs(tokenizer, pairs, max_len, margin=0.0):
    """[(chosen ids, rejected ids, margin, kind)]; pairs with a side longer than max_len are dropped (counted).
    A pair without its own margin gets `margin`."""
    out, dropped = [], 0
    for p in pairs:
        prompt = as_messages(p["prompt"], "user", "prompt")
        c, r = pair_ids(tokenizer, prompt, p["chosen"]), pair_ids(tokenizer, prompt, p["rejected"])
        if max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        m = p.get("margin")
        out.append((c, r, float(margin if m is None else m), p.get("kind", "all")))
    return out, dropped


def pad_pairs(seqs, pad_id):
    """Lists of ids -> right-padded ids [B, T] and mask [B, T] (1 = token)."""
    return pad_right(seqs, pad_id), pad_right([[1] * len(s) for s in seqs], 0)


def pair_micro_batches(pairs, max_tokens, pad_id):
    """Length-bucketed micro-batches of pairs, at most max_tokens padded tokens each (both sides count). Each is
    (rows, ids [2n, T], mask [2n, T], margins [n]): the n chosen sequences first, then the n rejected ones."""
    out = []
    for rows in length_buckets([max(len(c), len(r)) for c, r, *_ in pairs], max_tokens, rows_per_item=2):
        ids, mask = pad_pairs([pairs[i][0] for i in rows] + [pairs[i][1] for i in rows], pad_id)
        out.append((rows, ids, mask, torch.tensor([pairs[i][2] for i in rows])))
    return out


# ----------------------------------------------------------------------------------------------------
# The loss and its metrics


def bt_loss(r_chosen, r_rejected, margin=0.0):
    """-log sigmoid(r(x, y_c) - r(x, y_r) - m) per pair (Bradley-Terry; the margin m as in Llama 2): [N] -> [N]."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def pair_stats(r_chosen, r_rejected):
    """Sums over pairs of: chosen scored strictly higher (a tie counts as wrong), and the reward gap."""
    return {"correct": (r_chosen > r_rejected).float().sum().item(), "gap": (r_chosen - r_rejected).sum().item()}


def pair_scores(model, ids, mask, device):
    """(r_chosen [n], r_rejected [n]) of one micro-batch from pair_micro_batches."""
    ids, mask = ids.to(device), mask.to(device)
    r = last_token_values(model(ids), mask)  # right padding: no attention mask needed
    return r.chunk(2)


@torch.no_grad()
def evaluate(run, model, pairs, micro_batch_tokens, pad_id):
    """Held-out loss, pairwise accuracy and mean reward gap (overall and per kind), split across ranks."""
    mine, rc, rr, rows = pairs[run.rank::run.world], [], [], []
    with run.full_params(model) as m:  # FSDP: gathered once, so ranks may run different numbers of micro-batches
        for r, ids, mask, _ in pair_micro_batches(mine, micro_batch_tokens, pad_id):
            with run.autocast():
                c, j = pair_scores(m, ids, mask, run.device)
            rc, rr, rows = rc + [c.cpu()], rr + [j.cpu()], rows + r
    rc, rr = (torch.cat(rc), torch.cat(rr)) if rows else (torch.zeros(0), torch.zeros(0))
    margins, kinds = torch.tensor([mine[i][2] for i in rows]), [mine[i][3] for i in rows]
    out = {}
    for kind in ["all", *sorted({p[3] for p in pairs} - {"all"})]:  # the same keys, in the same order, on every rank
        sel = torch.tensor([kind in ("all", k) for k in kinds], dtype=torch.bool)
        n = max(1.0, run.all_sum(sel.sum().item()))
        stats = pair_stats(rc[sel], rr[sel])
        if kind == "all":
            out["heldout_loss"] = run.all_sum(bt_loss(rc[sel], rr[sel], margins[sel]).sum().item()) / n
            out["heldout_reward_gap"] = run.all_sum(stats["gap"]) / n
        out["heldout_pair_acc" + ("" if kind == "all" else f"_{kind}")] = run.all_sum(stats["correct"]) / n
    return out


# ----------------------------------------------------------------------------------------------------
# Training


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default="checkpoints/tiny-sft",
                   help="checkpoint to start from: any causal LM folder (fresh head) or a reward-model folder")
    p.add_argument("--data", default="builtin", help="preference JSONL (prompt/chosen/rejected), or 'builtin'")
    p.add_argument("--eval_data", default=None, help="held-out preference JSONL (default: built-in held-out, or none)")
    p.add_argument("--builtin_size", type=count, default=5000, help="built-in training pairs")
    p.add_argument("--heldout_pairs", type=count, default=500, help="built-in held-out pairs")
    p.add_argument("--builtin_kinds", default=DEFAULT_KINDS, help=f"built-in rejected kinds, comma-separated, from "
                   f"{', '.join(KINDS)} (see the source)")
    p.add_argument("--margin", type=float, default=0.0, help="margin m in -log sigmoid(r_c - r_r - m) for pairs "
                   "without their own 'margin' field")
    p.add_argument("--max_len", type=count, default=1024, help="pairs with a side longer than this are dropped (counted)")
    p.add_argument("--eval_every", type=non_negative_int, default=20, help="held-out metrics every N steps (0: start and end)")
    p.add_argument("--export_builtin", default=None, metavar="DIR", help="write the built-in pairs as JSONL and exit")
    add_training_args(p, "reward_model", lr=1e-3, max_steps=60, batch_size=32)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.export_builtin:
        return export_builtin(args.export_builtin, args.builtin_size, args.heldout_pairs, args.builtin_kinds)
    run = Run.start(args, "reward_model")
    builtin = args.data == "builtin"
    kinds = args.builtin_kinds
    with user_input():
        tokenizer = load_tokenizer(args, args.model)
        torch.manual_seed(args.seed)  # adapters start identical on every rank
        model = RewardModel.from_pretrained(args.model, dtype=weights_dtype(run), device=run.device,
                                            lora=lora_config(args))
        if args.lora_from:
            load_adapter(model, args.lora_from)
        model.backbone.grad_checkpointing = args.grad_checkpointing
        train_pairs = builtin_pairs("train", args.builtin_size, args.seed, kinds) if builtin else load_pairs(args.data)
        eval_pairs = load_pairs(args.eval_data) if args.eval_data else (
            builtin_pairs("heldout", args.heldout_pairs, args.seed, kinds) if builtin else None)
        train, dropped = tokenize_pairs(tokenizer, train_pairs, args.max_len, args.margin)
        evals = tokenize_pairs(tokenizer, eval_pairs, args.max_len, args.margin)[0] if eval_pairs else None
    if not train:
        raise SystemExit(f"{args.data}: every pair was dropped (longer than --max_len {args.max_len})")
    run.print(f"{len(train)} training pairs ({dropped} dropped as longer than {args.max_len} tokens); "
              f"{len(evals or [])} held-out; model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    pad = tokenizer.pad_token_id

    train_model = run.wrap(model)
    optimizer = make_optimizer(args, model)
    state = resume(run, {"": model}, {"reward_model": optimizer})
    step = state.get("step", 0)
    before = state.get("heldout_before")
    if evals and before is None:
        before = evaluate(run, model, evals, args.micro_batch_tokens, pad)
        run.print(f"held-out pairwise accuracy before training: {before['heldout_pair_acc']:.3f}")
        run.log(step, before)
    pbar = tqdm(total=args.max_steps, initial=step, disable=not run.is_main, desc="reward_model")
    while step < args.max_steps:
        t0 = time.time()
        batch = [train[i] for i in step_indices(len(train), args.batch_size, step, args.seed)][run.rank::run.world]
        n_pairs = run.all_sum(len(batch))
        sums, n_tokens = {"loss": 0.0, "correct": 0.0, "gap": 0.0}, 0
        chunks = pair_micro_batches(batch, args.micro_batch_tokens, pad)
        for (rows, ids, mask, margins), sync in run.lockstep(chunks, train_model):
            with run.no_sync(train_model, sync), run.autocast():
                rc, rr = pair_scores(train_model, ids, mask, run.device)
                loss = bt_loss(rc, rr, margins.to(run.device)).sum()
                (loss * run.world / n_pairs).backward()  # DDP averages over ranks; we want the mean over all pairs
            sums["loss"] += loss.item()
            for k, v in pair_stats(rc.detach(), rr.detach()).items():
                sums[k] += v
            n_tokens += ids.numel()
        lr = lr_at(args, step)
        grad_norm, skipped = optimizer_step(run, train_model, optimizer, lr)
        step += 1
        metrics = {"loss": run.all_sum(sums["loss"]) / n_pairs, "pair_acc": run.all_sum(sums["correct"]) / n_pairs,
                   "reward_gap": run.all_sum(sums["gap"]) / n_pairs, "lr": lr, "grad_norm": grad_norm,
                   "skipped": skipped, "tokens_per_s": run.all_sum(n_tokens) / (time.time() - t0)}
        if evals and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            metrics.update(evaluate(run, model, evals, args.micro_batch_tokens, pad))
        run.log(step, metrics, pbar, show=("loss", "pair_acc"))
        ckpt_state = {"heldout_before": before}
        checkpoint_or_stop(run, step, {"": model}, {"reward_model": optimizer}, tokenizer, ckpt_state)
    pbar.close()

    after = evaluate(run, model, evals, args.micro_batch_tokens, pad) if evals else {}
    if after:
        run.log(step, after)
    save_checkpoint(run, step, {"": model}, {"reward_model": optimizer}, tokenizer, {"heldout_before": before})
    final = save_checkpoint(run, step, {"": model}, {}, tokenizer, name="final")
    summary = {**after, "heldout_pair_acc_before": (before or {}).get("heldout_pair_acc"), "steps": step,
               "train_pairs": len(train), "dropped_pairs": dropped, "heldout_pairs": len(evals or []),
               "final_checkpoint": str(final)}
    run.write_summary(summary, curve=("loss", "pair_acc", "heldout_pair_acc"))
    if after:
        run.print(f"held-out pairwise accuracy: {summary['heldout_pair_acc_before']:.3f} -> "
                  f"{after['heldout_pair_acc']:.3f}, reward gap {after['heldout_reward_gap']:.2f}")
    run.print(f"saved {final}")


if __name__ == "__main__":
    main()
