"""A decoder-only transformer for the Llama / Qwen2 / Qwen2.5 / Qwen3 / SmolLM families, its KV cache,
Hugging Face safetensors checkpoints in and out, and the tokenizer (tiktoken built from tokenizer.json).

One Transformer class covers every family; config.json decides the small differences:
  Llama 3.x, SmolLM/SmolLM2  plain attention, optional "llama3" RoPE frequency scaling
  Qwen2, Qwen2.5, R1-Distill  bias on the q/k/v projections
  Qwen3                       RMSNorm on each head's queries and keys, explicit head_dim

    from model import Transformer, Tokenizer
    model = Transformer.from_pretrained("path/to/hf_folder", dtype=torch.bfloat16, device="cuda")
    tok = Tokenizer.from_pretrained("path/to/hf_folder")
    logits = model(torch.tensor([tok.encode("Hello")]))        # [B, T, V]
    model.save_pretrained("out/my_model", tokenizer=tok)        # loads in transformers and vLLM

Parameter names are the Hugging Face names minus the leading "model.", so checkpoints map one to one.
"""
import functools
import json
import math
import os
import re
import shutil
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name):
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; anything else is a clear error."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------
# Config


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on the projections named in targets: W x + (alpha / rank) B A x, with A
    [rank, in] and B [out, rank], B zero at the start (the adapted model starts as the base)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = LORA_TARGETS


@dataclass
class ModelConfig:
    vocab_size: int = 262
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # Llama/Qwen3 "attention_bias": bias on q/k/v *and* o
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged
    lora: LoraConfig | None = None  # adapters on the projections (training); never written to config.json

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d, source="config.json"):
        """Read a Hugging Face config.json dict (hub style with rope_theta/rope_scaling, or transformers 5
        style with rope_parameters)."""
        arch = (d.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{source}: missing required field {key!r}")
        if d.get("use_sliding_window") or d.get("mlp_bias"):
            raise ValueError(f"{source}: sliding-window attention and MLP biases are not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3, linear)")
        known = {"architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "attention_bias", "bos_token_id", "eos_token_id", "model_type", "torch_dtype", "dtype"}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            architecture=arch, qkv_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias")),
            o_bias=arch != "Qwen2ForCausalLM" and bool(d.get("attention_bias")), qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            extra={k: v for k, v in d.items() if k not in known})

    def to_hf(self, dtype=torch.float32):
        """The config.json dict transformers and vLLM read (hub style: top-level rope_theta / rope_scaling)."""
        d = dict(self.extra)
        d.update(architectures=[self.architecture], model_type=MODEL_TYPES[self.architecture],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
                 rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                 max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                 torch_dtype=str(dtype).removeprefix("torch."))
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.o_bias
        return d


# ----------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * g, normalised in float32 and cast back before g (as the reference does)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x)


class Linear(nn.Linear):
    """nn.Linear, optionally with a LoRA adapter (lora: a LoraConfig), and a faster inference path for a few rows of
    input on CPU (the decode step), where F.linear's matrix-vector product reads W on one core. There y^T = W x^T is
    computed as a batched product over 4 row blocks of W, which runs on every core and streams W up to 2x faster
    (tests/bench_generate.py). Training, GPUs, autocast, half precision and small weights (where the extra ops cost
    more than they save) take F.linear."""

    def __init__(self, in_features, out_features, bias=False, lora=None):
        super().__init__(in_features, out_features, bias=bias)
        self.lora, self.lora_on = lora, True  # lora_on: False gives the base layer (the KL reference of a LoRA run)
        if lora is not None:
            self.lora_A = nn.Parameter(torch.empty(lora.rank, in_features, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.empty(out_features, lora.rank, dtype=torch.float32))
            self.reset_adapter()

    def reset_adapter(self):
        """A as nn.Linear initialises its weight (and PEFT its A), B = 0: the adapted layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = self.base_forward(x)
        if self.lora is not None and self.lora_on:
            h = F.dropout(x, self.lora.dropout, self.training) if self.lora.dropout else x
            y = y + F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(y.dtype) * (
                self.lora.alpha / self.lora.rank)  # (alpha / r) B A x
        return y

    def merged_weight(self):
        """W + (alpha / r) B A, in W's dtype (W itself without an adapter)."""
        if self.lora is None:
            return self.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * (self.lora.alpha / self.lora.rank)
        return (self.weight.float() + delta).to(self.weight.dtype)

    def base_forward(self, x):
        rows = x.numel() // self.in_features
        if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or rows > 256
                or self.weight.dtype != torch.float32 or self.weight.numel() < 2**18 or self.out_features % 4):
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(4, self.out_features // 4, self.in_features)  # a view: no copy of W
        xt = x.reshape(rows, self.in_features).T.expand(4, self.in_features, rows)
        y = torch.bmm(w, xt).view(self.out_features, rows).T  # [rows, out]
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).contiguous()


def lora_of(cfg, name):
    """The LoraConfig of projection `name` (None: no adapter there)."""
    return cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None


def rope_inv_freq(cfg, device=None):
    """theta_i = base^(-2i/d) (Su et al. 2021), optionally rescaled for long context (Llama 3.1 "llama3")."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s and s.get("rope_type", s.get("type")) == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
        factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos * theta_i. x: [B, H, T, D]; cos, sin: [B, 1, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)  # stays bf16 under autocast


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.qkv_bias or cfg.o_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.head_dim, bias, lora_of(cfg, "q_proj"))
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias, lora_of(cfg, "k_proj"))
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias, lora_of(cfg, "v_proj"))
        self.o_proj = Linear(self.n_head * self.head_dim, cfg.hidden_size, cfg.o_bias, lora_of(cfg, "o_proj"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # [B, H, T, D]
        if cache is not None:
            # [B, H_kv, S, D]: the first S slots of the cache, S = the mask's last dim (all of them when compiled);
            # no mask: a prefill into an empty cache, these T tokens in slots 0..T-1, plain causal attention
            k, v = cache.update(self.layer_idx, cache_pos, k, v, T if mask is None else mask.shape[-1])
        if cache is not None and T == 1 and mask is not None:
            y = decode_attention(q, k, v, mask)
        else:
            gqa = self.n_kv != self.n_head
            if gqa and mask is not None and q.is_cuda:  # CUDA SDPA: the kernel that takes a mask refuses grouped
                k, v = (t.repeat_interleave(self.n_head // self.n_kv, 1) for t in (k, v))  # heads (else: math)
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def decode_attention(q, k, v, mask):
    """One query per row against the cache, the query heads grouped by the key/value head they share, so each row's
    keys and values are read once, in place (no repeat of K/V, no float32 copy of them, no SDPA math fallback).
    q [B, H, 1, D]; k, v [B, H_kv, S, D]; mask [B, 1, 1, S], additive (0 / -inf) or boolean (True = may attend)."""
    B, H, _, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], D) * D ** -0.5  # [B, H_kv, G, D]: head h reads kv head h // G
    scores = q @ k.transpose(-1, -2)  # [B, H_kv, G, S]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)  # scores are [G, S] per row: float32 is cheap
    return (p @ v).reshape(B, H, 1, D)  # [B, H_kv, G, D] -> [B, H, 1, D]


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False, lora_of(cfg, "gate_proj"))
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False, lora_of(cfg, "up_proj"))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, lora_of(cfg, "down_proj"))

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, cache_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer, preallocated once: [L, B, H_kv, S, D]. Writes go in place at the slots
    `cache_pos`, so tensor shapes never change between row selections and a decode step can be captured by
    torch.compile / CUDA graphs. select_rows keeps, reorders or repeats rows in the same buffers (prefix sharing,
    finished rows leaving the batch); self.k / self.v are the current rows, the first rows of the buffers."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.buf_k = torch.zeros(shape, device=device, dtype=dtype)
        self.buf_v = torch.zeros(shape, device=device, dtype=dtype)
        self.select_rows(batch_size)

    def select_rows(self, rows, length=0):
        """rows: an int n, the first n rows of the buffers (nothing copied), or an index [n] into the current rows
        (any order, repeats allowed, n <= the allocated batch): row i becomes a copy of the first `length` slots of
        row rows[i]."""
        if torch.is_tensor(rows):
            for buf in (self.buf_k, self.buf_v):
                for layer in buf:  # one layer's rows at a time: the temporary is 1/L of the cache
                    layer[:len(rows), :, :length] = layer[rows, :, :length]
        n = len(rows) if torch.is_tensor(rows) else rows
        self.k, self.v = self.buf_k[:, :n], self.buf_v[:, :n]
        if self.k.is_cuda:  # tell CUDA graphs these buffers keep their address across calls
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def update(self, layer, cache_pos, k, v, length):
        """Write k, v [B, H_kv, T, D] at the slots cache_pos: [T], the same slots in every row (a prefill), or [B, 1],
        one slot per row (a decode step: rows paused for a tool fall behind the others); return the first `length`
        slots of the layer."""
        if cache_pos.dim() == 1:
            self.k[layer].index_copy_(2, cache_pos, k)
            self.v[layer].index_copy_(2, cache_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, cache_pos[:, 0]] = k[:, :, 0]  # [B, H_kv, D] into row b's slot cache_pos[b]
            self.v[layer][rows, :, cache_pos[:, 0]] = v[:, :, 0]
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]


class PromptKV:
    """The keys and values of a training batch's distinct prompts, with their gradients, passed to hidden() as its
    cache: first for the prompts [U, P] (each layer's keys and values are kept, attention is plain causal), then,
    as for_rows(rows), for completions [B, T], completion i attending to prompt rows[i]'s keys and values ahead of
    its own. So each prompt is forwarded once for all of its samples, with exact gradients (the concatenation
    routes each completion's attention gradient back into its prompt)."""

    def __init__(self, kv=None, rows=None):
        self.kv, self.rows = ({} if kv is None else kv), rows

    def for_rows(self, rows):
        return PromptKV(self.kv, rows)

    def update(self, layer, cache_pos, k, v, length):
        if self.rows is None:  # the prompts' pass (again, when grad checkpointing recomputes a block)
            self.kv[layer] = (k, v)
            return k, v
        pk, pv = self.kv[layer]  # [U, H_kv, P, D] -> each completion's prompt, ahead of its own [B, H_kv, P + T, D]
        return torch.cat((pk[self.rows], k), 2), torch.cat((pv[self.rows], v), 2)


def padding_inputs(attention_mask):
    """[B, T] 1 = token, 0 = padding -> rope positions [B, T] and a boolean attention mask [B, 1, T, T].
    Positions count real tokens only, so left padding does not shift them. Each query also sees itself,
    so a padding row never has all keys masked (which would give NaN)."""
    valid = attention_mask.bool()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, None, :]
    return positions, mask | torch.eye(T, dtype=torch.bool, device=valid.device)


# ----------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.generation_config = {}  # generation_config.json of the checkpoint (eos ids: where rollouts stop)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, attention_mask=None, positions=None, cache=None, cache_pos=None, logits_from=0,
                targets=None, prompts=None, head_loss=None):
        """idx [B, T] -> logits [B, T - logits_from, V] of positions logits_from.. (training skips the prompt,
        whose logits carry no loss: the lm_head is a fifth of a small model's compute); the rest as hidden().
        With targets [B, T - logits_from]: (log-probs of the targets, entropy), each [B, T - logits_from] float32,
        the logits never held whole (logprobs_from_hidden). With head_loss(logits [n, V], rows) -> scalar: its sum
        over chunks of rows (loss_from_hidden: logit distillation). With prompts (see completion_logprobs): idx are
        completions of those prompts, scored with each prompt forwarded once. Modes of forward() so that DDP, FSDP
        and torch.compile wrappers see the call."""
        if prompts is not None:
            return self.completion_logprobs(idx, *prompts)
        h = self.hidden(idx, attention_mask, positions, cache, cache_pos)
        # logits_from: a position, or one per row [B] (a right-padded prefill's last tokens: h [B, 1, C])
        h = h[:, logits_from:] if isinstance(logits_from, int) else h[torch.arange(len(h)), logits_from][:, None]
        if targets is not None:
            return logprobs_from_hidden(h, self.lm_head.weight, targets)
        if head_loss is not None:
            return loss_from_hidden(h, self.lm_head.weight, head_loss)
        return self.lm_head(h)

    def completion_logprobs(self, completions, prompt_ids, prompt_lens, rows):
        """(log pi(o_t | q, o_<t), entropy), each [B, T] float32, of completions [B, T] (right-padded), completion
        i sampled from prompt rows[i] of prompt_ids [U, P] (right-padded, true lengths prompt_lens [U]). Each prompt
        is forwarded once (PromptKV), not once per sample: the same values and gradients as scoring every
        prompt + completion on its own, for (B - U) x P fewer tokens."""
        B, T, P = completions.shape[0], completions.shape[1], prompt_ids.shape[1]
        kv = PromptKV()
        h_prompt = self.hidden(prompt_ids, cache=kv)  # [U, P, C], plain causal: right padding comes after the tokens
        h_last = h_prompt[torch.arange(len(prompt_ids)), prompt_lens - 1][rows]  # [B, C]: predicts o_0
        x = completions[:, :-1]  # [B, T - 1]: the last token predicts nothing
        dev = completions.device
        positions = prompt_lens[rows, None] + torch.arange(T - 1, device=dev)  # each row continues its prompt
        seen = torch.arange(P, device=dev) < prompt_lens[rows, None]  # [B, P]: the prompt's tokens, not its padding
        causal = torch.ones(T - 1, T - 1, dtype=torch.bool, device=dev).tril()
        mask = torch.cat((seen[:, None].expand(-1, T - 1, -1), causal.expand(B, -1, -1)), -1)[:, None]
        # mask [B, 1, T - 1, P + T - 1]: a completion token sees its prompt's tokens, then its own completion causally
        h = torch.cat((h_last[:, None], self.hidden(x, mask, positions, kv.for_rows(rows))), 1)  # [B, T, C]
        return logprobs_from_hidden(h, self.lm_head.weight, completions)

    def hidden(self, idx, attention_mask=None, positions=None, cache=None, cache_pos=None):
        """idx [B, T] -> final hidden states [B, T, C] (after the last norm; reward and value heads read these).
        attention_mask: None (plain causal), [B, T] with 0 for padding, or a ready [B, 1, T, S], boolean
        (True = may attend) or additive (0 / -inf; S = cache length when decoding). positions: rope positions
        [B, T] (default 0..T-1, or derived from a [B, T] mask). cache / cache_pos: a KVCache and the slots that
        these tokens are written to ([T], or [B, 1]: one per row); with a cache the mask must be the [B, 1, T, S] one, and attention
        reads the first S slots (one query per row: decode_attention), or None for a prefill into an empty cache
        (slots 0..T-1, plain causal). Or cache = a PromptKV (training on completions of shared prompts:
        completion_logprobs)."""
        if isinstance(cache, KVCache) and attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError("hidden(): decoding with a KVCache needs an attention_mask [B, 1, T, S]")
        if attention_mask is not None and attention_mask.dim() == 2:
            derived_positions, attention_mask = padding_inputs(attention_mask)
            positions = derived_positions if positions is None else positions
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        x = self.embed_tokens(idx)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attention_mask, cache, cache_pos,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, attention_mask, cache, cache_pos)
        return self.norm(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ checkpoints (Hugging Face format)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, lora=None):
        """Load a Hugging Face folder: config.json + model.safetensors (or sharded, with
        model.safetensors.index.json). dtype None keeps the checkpoint's stored dtype. lora (a LoraConfig): the
        loaded weights become the frozen base of fresh float32 adapters (add_adapters)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} not found (a Hugging Face model folder needs config.json)")
        cfg = ModelConfig.from_hf(read_json(config_file), source=str(config_file))
        tensors = read_safetensors(path, dtype=parse_dtype(dtype), device=device)
        with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
            model = cls(cfg)
        model.load_hf_state_dict(tensors, source=str(path), assign=True)
        model.inv_freq = rope_inv_freq(cfg, device=device)
        if (path / "generation_config.json").exists():
            model.generation_config = read_json(path / "generation_config.json")
        return model.add_adapters(lora) if lora is not None else model

    # ------------------------------------------------------------------ LoRA

    def add_adapters(self, lora):
        """The model with fresh LoRA adapters (float32, B = 0) on lora.targets, and every other weight frozen: the
        config records them, so anything that rebuilds this model from its config has them too."""
        self.config.lora = lora
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Linear) and name in lora.targets and child.lora is None:
                    w = child.weight
                    adapted = Linear(child.in_features, child.out_features, child.bias is not None, lora).to(w.device)
                    adapted.weight, adapted.bias = child.weight, child.bias
                    setattr(module, name, adapted)
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter(name))
        return self

    def adapter_names(self):
        """{key in PEFT's adapter_model.safetensors: our parameter name} of what a LoRA run trains."""
        return {peft_name(n): n for n, _ in self.named_parameters() if is_adapter(n)}

    @contextmanager
    def adapters_off(self):
        """Inside the block the model is its base: the KL reference of a LoRA run, at no memory."""
        layers = [m for m in self.modules() if isinstance(m, Linear) and m.lora is not None]
        for m in layers:
            m.lora_on = False
        try:
            yield self
        finally:
            for m in layers:
                m.lora_on = True

    def merged_weights(self):
        """{parameter name: tensor} of the equivalent model without adapters: W + (alpha / r) B A for each adapted
        projection (what a merged checkpoint and the rollouts' weight copy hold)."""
        merged = {n: p for n, p in self.named_parameters() if not is_adapter(n)}
        for name, m in self.named_modules():
            if isinstance(m, Linear) and m.lora is not None:
                merged[f"{name}.weight"] = m.merged_weight()
        return merged

    def load_hf_state_dict(self, tensors, source="checkpoint", assign=False):
        """Take weights named as in Hugging Face (model.layers.0...). Missing, unexpected or mis-shaped tensors
        are errors naming the tensor, never a silent partial load. Values are copied into the existing parameters
        (an optimizer holding them stays valid) unless assign, which adopts the given tensors (meta-device init)."""
        expected = {hf_name(n): p for n, p in self.named_parameters() if not is_adapter(n)}  # tied lm_head: once
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
        if missing or unexpected:
            raise ValueError(f"{source}: tensors do not match the config: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        for name, p in expected.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                 f"config.json implies {tuple(p.shape)}")
            if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{source}: tensor {name} holds NaN or inf values (saved from a diverged run?)")
        state = {n: tensors[hf_name(n)] for n, _ in self.named_parameters() if not is_adapter(n)}
        self.load_state_dict(state, strict=False, assign=assign)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def save_pretrained(self, path, tokenizer=None, base=None, adapter_only=False):
        """A Hugging Face folder (see save_folder) with generation_config.json: the loaded checkpoint's, so that
        its stop tokens and sampling defaults survive training, with bos/eos from the config where it had none.
        With adapters: the merged weights (a plain checkpoint transformers and vLLM load) and, in its subfolder
        adapter/, the adapters in PEFT's layout (base: the folder they adapt); adapter_only: those alone (step
        checkpoints)."""
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id,
               **self.generation_config}
        extra = {"generation_config.json": gen}
        adapter = {}
        if self.config.lora is not None:  # in a subfolder: transformers would apply an adapter it finds beside
            extra["adapter/adapter_config.json"] = peft_config(self.config.lora, base)  # the merged weights again
            params = dict(self.named_parameters())
            adapter = {"adapter/adapter_model.safetensors": {k: params[n] for k, n in self.adapter_names().items()}}
        tensors = {} if adapter_only else {hf_name(n): p for n, p in self.merged_weights().items()}
        save_folder(path, self.config.to_hf(self.embed_tokens.weight.dtype), tensors, tokenizer, extra, adapter)


def load_adapter(model, folder):
    """The adapters of a folder in PEFT's layout (adapter_model.safetensors; or a LoRA run's checkpoint, which holds
    one in adapter/) into a model's (a Transformer, or a RewardModel: its adapters and head), every one of them,
    shapes checked (ValueError naming the tensor)."""
    folder = Path(folder)
    file = folder / "adapter_model.safetensors"
    file = file if file.exists() else folder / "adapter" / "adapter_model.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (a LoRA adapter folder in PEFT's layout)")
    tensors = read_safetensors_file(file)
    params = dict(model.named_parameters())
    mine = {k: params[n] for k, n in model.adapter_names().items()}
    missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
    if missing or unexpected:
        raise ValueError(f"{file}: adapters do not match this model's (rank, targets): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in mine.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(tensors[name].shape)}, this model's "
                                 f"{tuple(p.shape)} (another --lora_rank?)")
            p.copy_(tensors[name])


def read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def save_folder(path, hf_config, tensors, tokenizer=None, extra_json=None, extra_tensors=None):
    """Write a Hugging Face folder: config.json, model.safetensors (shards over 4 GB, with an index; none for no
    tensors), the tokenizer files, extra_json ({file name: object}) and extra_tensors ({file name: {name: tensor}}),
    atomically: into a temporary folder first, then renamed into place, so a crash never leaves a half-written
    checkpoint at `path`. Files 0644, folder 0755, like any download."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, obj in {"config.json": hf_config, **(extra_json or {})}.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if tensors:
            write_safetensors({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, tmp)
        for name, group in (extra_tensors or {}).items():
            (tmp / name).parent.mkdir(exist_ok=True)
            save_file({n: t.detach().contiguous().cpu() for n, t in group.items()}, tmp / name,
                      metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp made the folder private; a checkpoint is meant to be shared
            f.chmod(0o755 if f.is_dir() else 0o644)
    except (OSError, SafetensorError) as e:  # a full disk: no half-written folder left behind, `path` untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write {path}: {e}") from None
    replace_dir(tmp, path)


def hf_name(name):
    return name if name.startswith("lm_head.") else "model." + name


def is_adapter(name):
    return name.endswith((".lora_A", ".lora_B"))


def peft_name(name):
    """Our adapter parameter name -> PEFT's key in adapter_model.safetensors (a causal LM wrapped by PeftModel):
    layers.0.self_attn.q_proj.lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{hf_name(name)}.weight"


def peft_config(lora, base, task_type="CAUSAL_LM", modules_to_save=None):
    """adapter_config.json for PEFT's PeftModel.from_pretrained(base model, folder)."""
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": str(base) if base else None,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": modules_to_save, "use_rslora": False, "use_dora": False}


def read_safetensors(path, dtype=None, device=None):
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name. Pickle files are never read."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = ", ".join(p.name for p in path.iterdir()) or "nothing"
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (found: {found}); "
                                "only safetensors checkpoints are loaded, never pickle (.bin/.pt)")
    tensors = {}
    for f in files:
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f} is listed in {index.name} but missing")
        tensors.update(read_safetensors_file(path / f, dtype, device))
    return tensors


def read_safetensors_file(file, dtype=None, device=None):
    """Every tensor of one safetensors file, by name (ValueError naming the file if it is not one)."""
    try:
        with safe_open(file, framework="pt", device=str(device or "cpu")) as st:
            return {name: st.get_tensor(name).to(dtype) if dtype else st.get_tensor(name) for name in st.keys()}
    except SafetensorError as e:  # truncated download, disk full during a save, not a safetensors file
        raise ValueError(f"{file}: not a readable safetensors file ({e}); re-download or re-save it") from None


def write_safetensors(state, folder, max_shard_bytes=4 * 2**30):
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def replace_dir(src, dst):
    """Move folder src to dst; an existing dst is swapped out by rename and only then deleted."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ----------------------------------------------------------------------------------------------------
# Log-probabilities of chosen tokens (shared by every training script)


def logprob_chunk_rows(vocab_size, elements=2**25):
    """Rows per chunk of logprobs_from_hidden: about 2^25 float32 logits (128 MiB) live at a time."""
    return max(1, elements // vocab_size)


class _LogprobsFromHidden(torch.autograd.Function):
    """Log-probs of the chosen tokens and the entropy from final hidden states, the lm_head applied a chunk of rows
    at a time. Backward recomputes each chunk's logits, so only h, W and two floats per row are saved: never the
    [N, V] logits, in any dtype. With p = softmax(z), the gradients per row are
        d logp_y / dz = onehot(y) - p        dH / dz = -p (log p + H)"""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, compute_dtype):
        # h [N, C], weight [V, C], targets [N] -> logp [N], entropy [N] (float32)
        w = weight.to(compute_dtype)  # the matmul dtype (bf16 under autocast): one copy of W, not saved
        logp, entropy, lse = (torch.empty(h.shape[0], device=h.device) for _ in range(3))
        for i in range(0, h.shape[0], chunk_rows):
            z = F.linear(h[i:i + chunk_rows].to(compute_dtype), w).float()  # [n, V]
            rows = slice(i, i + z.shape[0])
            lse[rows] = torch.logsumexp(z, -1)
            logp[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            entropy[rows] = lse[rows] - (torch.softmax(z, -1) * z).sum(-1)  # H = lse - sum_v p_v z_v
        ctx.save_for_backward(h, weight, targets, lse, entropy)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        ctx.set_materialize_grads(False)  # an unused entropy gets no gradient work
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, targets, lse, entropy = ctx.saved_tensors
        w = weight.to(ctx.compute_dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        for i in range(0, h.shape[0], ctx.chunk_rows):
            rows = slice(i, i + ctx.chunk_rows)
            hc = h[rows].to(ctx.compute_dtype)
            logp_all = F.linear(hc, w).float() - lse[rows, None]  # log p [n, V], recomputed
            p = logp_all.exp()
            g = torch.zeros_like(p)  # dL/dz [n, V]
            if grad_logp is not None:
                g.scatter_(-1, targets[rows, None], grad_logp[rows, None])
                g -= grad_logp[rows, None] * p
            if grad_entropy is not None:
                g -= grad_entropy[rows, None] * p * (logp_all + entropy[rows, None])
            g = g.to(ctx.compute_dtype)
            if grad_h is not None:
                grad_h[rows] = g @ w  # [n, C]
            if ctx.needs_input_grad[1]:
                gw = g.T @ hc  # [V, C]
                grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def logprobs_from_hidden(h, weight, targets, chunk_rows=None):
    """(log pi(y_t | y_<t), entropy H(pi(. | y_<t))), each [B, T] float32, from final hidden states h [B, T, C] and
    the lm_head weight [V, C], the logits made and dropped a chunk at a time (also in backward): the memory-lean
    same values as log_softmax(lm_head(h)) gathered at the targets and its entropy. Matmuls run in the autocast dtype when
    autocast is on (as the lm_head would), else in h's dtype."""
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    chunk_rows = chunk_rows or logprob_chunk_rows(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        logp, entropy = _LogprobsFromHidden.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                                  chunk_rows, dtype)
    return logp.view(targets.shape), entropy.view(targets.shape)


class _LossFromHidden(torch.autograd.Function):
    """sum over chunks of rows of loss_fn(z, rows), z = h W^T the chunk's logits [n, V] (float32): each chunk's
    gradient w.r.t. z is taken in forward (autograd through loss_fn) and turned at once into the gradients w.r.t. h and
    W, so only those ([N, C] and [V, C]) are kept for backward: never [N, V], in any dtype. For losses that need the
    whole distribution (logit distillation), as logprobs_from_hidden is for the chosen tokens' log-probs."""

    @staticmethod
    def forward(ctx, h, weight, loss_fn, chunk_rows, compute_dtype):
        w = weight.to(compute_dtype)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk_rows):
            rows = slice(i, min(i + chunk_rows, h.shape[0]))
            hc = h[rows].to(compute_dtype)
            with torch.enable_grad():
                z = F.linear(hc, w).float().requires_grad_(grad_h is not None or grad_w is not None)
                loss = loss_fn(z, rows)
            if z.requires_grad:
                g = torch.autograd.grad(loss, z)[0].to(compute_dtype)  # dL/dz [n, V]
                if grad_h is not None:
                    grad_h[rows] = g @ w
                if grad_w is not None:
                    grad_w += (g.T @ hc).float()
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total,
                None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype), None, None, None)


def loss_from_hidden(h, weight, loss_fn, chunk_rows=None):
    """sum over chunks of loss_fn(logits [n, V] float32, rows: a slice of h's flattened rows) -> scalar, with its
    gradients w.r.t. h [B, T, C] and the lm_head weight [V, C], the logits made and dropped a chunk at a time."""
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    chunk_rows = chunk_rows or logprob_chunk_rows(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        return _LossFromHidden.apply(h.reshape(-1, h.shape[-1]), weight, loss_fn, chunk_rows, dtype)


# ----------------------------------------------------------------------------------------------------
# Tokenizer: Hugging Face byte-level BPE checkpoints (GPT-2, SmolLM2, Qwen2/2.5/3, Llama 3, DeepSeek-V3/R1 and the
# R1-Distill models) run by tiktoken, their jinja chat templates rendered the way transformers renders them, plus a
# from-scratch 256-byte tokenizer for tiny models. No transformers/tokenizers at run time.

def _bytes_to_unicode():
    """GPT-2's reversible map byte -> printable char: HF byte-level vocabs spell their tokens in this alphabet."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))  # bytes that are not printable are moved past 255, in byte order
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
# GPT-2's pre-tokenizer regex, i.e. HF's ByteLevel(use_regex=True)
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Unicode White_Space: what \s means to HF's (Oniguruma) and tiktoken's (Rust) regexes. Python's \s also matches
# \x1c-\x1f, so the Python fallback (_python_regex) spells it out.
_WHITE_SPACE = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# the template of Tokenizer.byte_level() (ChatML, as SmolLM2 and Qwen write it)
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES)
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _is_nfc(normalizer, where):
    """tokenizer.json's normalizer: none, NFC, or a Sequence of those (DeepSeek-V3/R1 ship an empty Sequence)."""
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = {s.get("type") for s in steps if s}
    if not kinds <= {"NFC"}:
        raise ValueError(f"{where}: unsupported normalizer {json.dumps(normalizer)[:300]} (supported: none, NFC)")
    return bool(kinds)


def _pre_tokenizer_patterns(pre, where):
    """tokenizer.json's pre_tokenizer as regexes applied in turn: each cuts every piece the one before made into its
    matches and the gaps between them (HF's Split(behavior="Isolated")). BPE then merges within a piece."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    *splits, level = steps or [{}]
    unsupported = (f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:300]} (supported: ByteLevel after any "
                   "number of Split(Regex, Isolated) or Digits)")
    if level.get("type") != "ByteLevel":
        raise ValueError(unsupported)
    patterns = []
    for s in splits:
        if s.get("type") == "Digits":  # SmolLM2
            patterns.append(r"\p{N}" if s.get("individual_digits") else r"\p{N}+")
        elif (s.get("type") == "Split" and "Regex" in s.get("pattern", {}) and s.get("behavior") == "Isolated"
              and not s.get("invert")):  # Qwen2/2.5/3, Llama 3: one; DeepSeek-V3/R1: three
            patterns.append(s["pattern"]["Regex"])
        else:
            raise ValueError(unsupported)
    if level.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
    if level.get("use_regex", True):
        patterns.append(_GPT2_PATTERN)
    if len(patterns) == 2 and patterns[0] in (r"\p{N}", r"\p{N}+") and patterns[1] == _GPT2_PATTERN:
        # SmolLM2: digits, then GPT-2's regex, fuse into one regex (all of it then runs in tiktoken). Digits are
        # pieces of their own, and a whitespace run before a digit ends there (the piece ended): "(?!\S)" must
        # treat a following digit as a boundary
        d = patterns[0]
        patterns = [rf"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+|{d}| ?[^\s\p{{L}}\p{{N}}]+|\s+(?![^\s\p{{N}}])|\s+"""]
    return patterns or [r"(?s:.)+"]  # no regex (our byte tokenizer): a whole segment is one piece


def _split_isolated(regex, text):
    """HF's Split(behavior="Isolated"): the matches of `regex` in `text` and the gaps between them, in order."""
    cuts = sorted({0, len(text), *(i for m in regex.finditer(text) for i in m.span())})
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


@functools.lru_cache(maxsize=None)
def _python_regex(pattern):
    """Compile a tiktoken/HF pattern with Python's re, which lacks \\p{..} and reads \\s differently."""
    @functools.lru_cache(maxsize=None)
    def category(name):  # char class body of \p{name}: ranges of code points whose category starts with name
        cps = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)).startswith(name)]
        if not cps:
            raise ValueError(f"unsupported regex property \\p{{{name}}} in {pattern}")
        starts = [c for i, c in enumerate(cps) if i == 0 or cps[i - 1] != c - 1]
        ends = [c for i, c in enumerate(cps) if i == len(cps) - 1 or cps[i + 1] != c + 1]
        return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in zip(starts, ends))
    out, in_class = [], False
    for tok in re.findall(r"\\p\{\w+\}|\\.|.", pattern, flags=re.S):
        if tok.startswith("\\p{") or tok == "\\s":
            body = _WHITE_SPACE if tok == "\\s" else category(tok[3:-1])
            tok = body if in_class else f"[{body}]"
        elif tok == "\\S" and not in_class:
            tok = f"[^{_WHITE_SPACE}]"
        elif tok in ("\\S", "\\P"):
            raise ValueError(f"unsupported regex escape {tok} in {pattern}")
        elif tok in ("[", "]"):
            in_class = tok == "["
        out.append(tok)
    return re.compile("".join(out))


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} (SmolLM3 marks assistant text with it): renders its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=None)
def _compile_chat_template(source):
    """A chat template compiled as transformers compiles it (utils/chat_template_utils.py), so that it renders the
    same text: sandboxed and immutable, trim_blocks + lstrip_blocks, {% break %}/{% continue %}, {% generation %},
    the globals raise_exception and strftime_now, and a tojson that keeps non-ASCII and HTML characters as is."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class Tokenizer:
    """Byte-level BPE tokenizer giving the same ids as the checkpoint's Hugging Face tokenizer (encoding runs in
    tiktoken), and its chat template giving the same text as in transformers (rendered by jinja2)."""

    def __init__(self, tokenizer_json, config, name_or_path="", chat_template_kwargs=None):
        where = os.path.join(name_or_path, "tokenizer.json")
        self._tokenizer_json, self._config, self.name_or_path = tokenizer_json, config, name_or_path
        model = tokenizer_json.get("model") or {}
        decoder = (tokenizer_json.get("decoder") or {}).get("type")
        if (model.get("type") != "BPE" or decoder != "ByteLevel" or model.get("byte_fallback") or model.get("dropout")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
            raise ValueError(f"{where}: only byte-level BPE tokenizers are supported (GPT-2 / Llama 3 / Qwen style); "
                             f"this one has model {model.get('type')} with decoder {decoder}")
        self._nfc = _is_nfc(tokenizer_json.get("normalizer") or {}, where)
        *splits, final = _pre_tokenizer_patterns(tokenizer_json.get("pre_tokenizer") or {}, where)
        self._splits = [_python_regex(p) for p in splits]  # all but the last regex cut here, the last in tiktoken,
        self._pattern = rf"{final}|(?:(?!{final})(?s:.))+"  # which drops what it doesn't match: HF keeps those gaps

        # Added tokens (special or not) are cut out of the text before anything else and decode to their own text,
        # as in HF; `special` only matters to skip_special_tokens, which has no counterpart here.
        added = tokenizer_json.get("added_tokens", [])
        for t in added:
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise ValueError(f"{where}: added token {t['content']!r} uses lstrip/rstrip/single_word: not supported")
        self.special_tokens = {t["content"]: t["id"] for t in added}
        vocab = model["vocab"]
        self.vocab_size = max([*vocab.values(), *self.special_tokens.values()]) + 1
        # tiktoken's BPE merges the adjacent pair whose merged token has the lowest id, HF's the pair listed first
        # in "merges": the same thing only if merge order is id order. Check it rather than encode wrongly.
        last = -1
        for n, merge in enumerate(model.get("merges", [])):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merged = vocab.get(a + b)
            if a not in vocab or b not in vocab or merged is None or merged < last:
                raise ValueError(f"{where}: merge #{n} ({a!r}, {b!r}) breaks 'merge order == token id order', which "
                                 "this tokenizer needs (tiktoken uses the id as merge priority)")
            last = merged
        added_ids = set(self.special_tokens.values())
        try:
            self._ranks = {bytes(_BYTE_OF_CHAR[c] for c in s): i for s, i in vocab.items() if i not in added_ids}
        except KeyError as e:
            raise ValueError(f"{where}: vocab has a token with char {e} outside the byte-level alphabet") from None
        # Some vocabs lack a few single bytes (SmolLM2: 21) and HF silently drops those. tiktoken needs every byte
        # ranked, so they get placeholder ids >= vocab_size, and texts containing them take an exact slow path.
        self._missing_bytes = set(range(256)) - {b[0] for b in self._ranks if len(b) == 1}
        ranks = {**self._ranks, **{bytes([b]): self.vocab_size + k for k, b in enumerate(sorted(self._missing_bytes))}}
        self._enc = tiktoken.Encoding(os.path.basename(name_or_path.rstrip("/")) or "hf", pat_str=self._pattern,
                                      mergeable_ranks=ranks, special_tokens=self.special_tokens)
        # longest first: at a given position the longest added token wins (HF matches leftmost-longest)
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

        # special tokens by name, as strings: what every chat template sees (older configs spell a token as an
        # AddedToken dict {"__type": "AddedToken", "content": ...}; extra_special_tokens is a dict or a list)
        token = lambda t: t.get("content") if isinstance(t, dict) else t
        extra, named = config.get("extra_special_tokens") or {}, {k: config.get(k) for k in _TEMPLATE_TOKENS}
        named.update(extra if isinstance(extra, dict) else {"additional_special_tokens": extra})
        named["additional_special_tokens"] = (config.get("additional_special_tokens")
                                              or named.get("additional_special_tokens"))
        self._template_tokens = {k: [token(t) for t in v] if isinstance(v, list) else token(v)
                                 for k, v in named.items() if v}
        self.bos_token_id = self.token_to_id(self._template_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self._template_tokens.get("eos_token"))
        pad = self.token_to_id(self._template_tokens.get("pad_token"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        self.chat_template_kwargs = dict(chat_template_kwargs or {})  # template variables of every rendering
        self.system = None  # a system message for chats without one (sample.render puts it first)

    def set_prompt_options(self, chat_template=None, chat_template_kwargs=None, system=None):
        """The scripts' --chat_template (a template string replacing the checkpoint's, saved with the tokenizer),
        --chat_template_kwargs (variables of every rendering) and --system. Returns the tokenizer."""
        if chat_template:
            self.chat_template = self._config["chat_template"] = chat_template
        self.chat_template_kwargs.update(chat_template_kwargs or {})
        self.system = system
        return self

    @classmethod
    def from_pretrained(cls, path, chat_template=None, chat_template_kwargs=None):
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja (if present) from a checkpoint folder.
        chat_template: a template string replacing the checkpoint's (it is also what save_pretrained writes);
        chat_template_kwargs: template variables for every apply_chat_template, e.g. {"enable_thinking": False}."""
        path = os.path.expanduser(str(path))
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer.json in {path!r} (missing folder or not a HF checkpoint)")

        def read(name, default=None):
            file = Path(path, name)
            return file.read_text(encoding="utf-8") if file.is_file() else default
        config = json.loads(read("tokenizer_config.json", "{}"))
        # chat_template.jinja (where newer transformers save it) wins over tokenizer_config.json, as in transformers
        if chat_template or read("chat_template.jinja"):
            config["chat_template"] = chat_template or read("chat_template.jinja")
        return cls(json.loads(read("tokenizer.json")), config, path, chat_template_kwargs)

    @classmethod
    def byte_level(cls, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), chat_template=CHATML_TEMPLATE):
        """A tokenizer for models trained here: ids 0-255 are the bytes, then the special tokens; eos <|im_end|>."""
        char = _bytes_to_unicode()
        level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        tokenizer_json = {
            "version": "1.0", "pre_tokenizer": level, "decoder": level,  # no regex: without merges a byte is a token
            "added_tokens": [{"id": 256 + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, s in enumerate(special_tokens)],
            "model": {"type": "BPE", "vocab": {char[b]: b for b in range(256)}, "merges": []}}
        eos = "<|im_end|>" if "<|im_end|>" in special_tokens else (special_tokens[-1] if special_tokens else None)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": eos, "pad_token": eos,
                  "clean_up_tokenization_spaces": False, "chat_template": chat_template}
        return cls(tokenizer_json, config, "byte_level")

    def save_pretrained(self, path):
        """Write tokenizer.json and tokenizer_config.json; the folder loads here and in transformers' AutoTokenizer."""
        os.makedirs(path, exist_ok=True)
        for name, obj in (("tokenizer.json", self._tokenizer_json), ("tokenizer_config.json", self._config)):
            Path(path, name).write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")

    def token_to_id(self, text):
        """Id of the single token whose text is exactly `text` (e.g. "<|im_end|>", " the"), or None."""
        try:
            i = self._enc.encode_single_token(text) if text else None
        except KeyError:
            return None
        return i if i is not None and i < self.vocab_size else None

    def encode(self, text):
        """Text -> ids, like HF tokenizer(text, add_special_tokens=False): added tokens in the text are recognised."""
        ids, start = [], 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text):
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = [text]
        for regex in self._splits:
            pieces = [q for p in pieces for q in _split_isolated(regex, p)]
        if self._missing_bytes and not self._missing_bytes.isdisjoint(text.encode("utf-8", "surrogatepass")):
            return [i for p in pieces for i in self._encode_dropping_missing_bytes(p)]
        return [i for p in pieces for i in self._enc.encode_ordinary(p)]

    def _encode_dropping_missing_bytes(self, text):
        # HF cuts the text into pieces first and drops the bytes without a token inside each piece, so the rest of
        # the piece still merges across the gap ("!!\x04!!" -> "!!!!"). tiktoken can't drop bytes, so cut with
        # Python's re here (slow, but such bytes are rare) and run the BPE ourselves.
        ids, inf = [], float("inf")
        for m in _python_regex(self._pattern).finditer(text):
            parts = [bytes([b]) for b in m.group().encode("utf-8") if b not in self._missing_bytes]
            while len(parts) > 1:  # BPE: merge the adjacent pair with the lowest rank (= id) until none is left
                rank, i = min((self._ranks.get(parts[i] + parts[i + 1], inf), i) for i in range(len(parts) - 1))
                if rank == inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [self._ranks[p] for p in parts]
        return ids

    def encode_ordinary(self, text):
        """Text -> ids with special tokens read as plain text (a tool's output must not end a turn)."""
        return self._encode_ordinary(text)

    def token_bytes(self, i):
        """The bytes of token i (a multi-byte character may span tokens: its bytes are split between them)."""
        return self._enc.decode_single_token_bytes(int(i))

    def decode(self, ids):
        """Ids -> text (special tokens kept); bytes that are not valid UTF-8 become U+FFFD."""
        return self._enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, **template_kwargs):
        """[{"role": ..., "content": ...}, ...] -> the text transformers' apply_chat_template(messages,
        tokenize=False, add_generation_prompt=...) gives: the checkpoint's jinja template, given the messages, the
        special tokens by name (bos_token, eos_token, ...), chat_template_kwargs and template_kwargs (e.g.
        enable_thinking=False for Qwen3). A template that raises (e.g. a role-alternation check) raises ValueError
        with its message."""
        if not self.chat_template:
            where = os.path.join(self.name_or_path, "tokenizer_config.json")
            raise ValueError(f"{where} has no chat_template; pass plain text instead (disable the chat template)")
        chat = []  # as transformers: a field set to None is left out, and reasoning goes by all of its names
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        variables = {**self._template_tokens, **self.chat_template_kwargs, **template_kwargs}
        try:
            return _compile_chat_template(self.chat_template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {self.name_or_path or 'this tokenizer'} failed: {e}") from e


_PROBE = "The quick brown fox: 7+5-3=9 \\boxed{17} <think>\n</think> naïve café 数学 🙂 \t  x = [1, 2]; "


def tokenizer_mismatch(a, b):
    """Why tokenizers a and b do not give the same ids to the same text and the same text to every id (a short
    reason), or None if they do: models that read each other's token ids (a KL reference, a critic, a teacher whose
    logits a student matches) need that. Compares sizes, special tokens, eos/pad ids, the text of every id, and how
    a probe text is split (the merges)."""
    if a.vocab_size != b.vocab_size:
        return f"vocabulary sizes {a.vocab_size} vs {b.vocab_size}"
    if a.special_tokens != b.special_tokens:
        return "different special tokens"
    if (a.eos_token_id, a.pad_token_id) != (b.eos_token_id, b.pad_token_id):
        return f"eos/pad ids {(a.eos_token_id, a.pad_token_id)} vs {(b.eos_token_id, b.pad_token_id)}"

    def text(tok, i):
        try:
            return tok.decode([i])
        except KeyError:  # an id with no token (a gap in the vocabulary)
            return None
    diff = next((i for i in range(a.vocab_size) if text(a, i) != text(b, i)), None)
    if diff is not None:
        return f"token {diff} is {text(a, diff)!r} in one and {text(b, diff)!r} in the other"
    if a.encode(_PROBE) != b.encode(_PROBE):
        return "they split the same text into different tokens"
    return None
