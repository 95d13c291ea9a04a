"""The training and rollout engine: memory-lean log-probs (logits never held for backward), and generate's
prefill, prefix sharing, grouped-head decode attention and finished-row compaction, checked by counting."""
import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import ModelConfig, Transformer, logprobs_from_hidden


def tiny(vocab_size=300, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


# ------------------------------------------------------------------ log-probs from hidden states


def naive(h, w, y):
    z = h @ w.T  # [B, T, V]
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, y[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_logprobs_from_hidden_values_and_gradients_equal_the_naive_formula(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 37, (3, 5))
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    want_logp, want_ent = naive(h, w, y)
    want_grads = torch.autograd.grad((a * want_logp + b * want_ent).sum(), (h, w), retain_graph=True)
    logp, ent = logprobs_from_hidden(h, w, y, chunk_rows=chunk_rows)
    assert torch.allclose(logp.double(), want_logp, atol=1e-5) and torch.allclose(ent.double(), want_ent, atol=1e-5)
    for got, want in zip(torch.autograd.grad((a * logp + b * ent).sum(), (h, w)), want_grads):
        assert torch.allclose(got, want, atol=1e-5)
    # only the log-prob in the loss (the entropy logged): the same gradient as without the entropy term
    logp, ent = logprobs_from_hidden(h, w, y, chunk_rows=chunk_rows)
    want = torch.autograd.grad((a * want_logp).sum(), (h, w))
    for got, w_ in zip(torch.autograd.grad((a * logp).sum(), (h, w)), want):
        assert torch.allclose(got, w_, atol=1e-5)


def test_forward_with_targets_equals_the_logits_path_with_gradients():
    m = tiny()
    x = torch.randint(0, 300, (2, 12))
    y = torch.randint(0, 300, (2, 8))
    logits = m(x, logits_from=4)
    want_logp, want_ent = naive_logprobs(logits, y), naive_entropy(logits)
    want = torch.autograd.grad((want_logp + 0.1 * want_ent).sum(), list(m.parameters()))
    logp, ent = m(x, targets=y, logits_from=4)
    assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    got = torch.autograd.grad((logp + 0.1 * ent).sum(), list(m.parameters()))
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def saved_bytes(fn):
    """Bytes autograd keeps for backward while fn() builds its graph, and the outputs (kept alive)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_log_prob_path_saves_no_logits_whatever_the_vocabulary():
    """Doubling V grows what the log-prob path saves for backward by the weight only (V x C), not by B x T x V
    float32 logits; the plain logits path grows by at least that."""
    B, T, C = 4, 64, 64
    torch.manual_seed(0)
    h = torch.randn(B, T, C, requires_grad=True)
    y = torch.randint(0, 100, (B, T))
    lean, plain = {}, {}
    for V in (4096, 8192):
        w = torch.randn(V, C, requires_grad=True)
        lean[V], _ = saved_bytes(lambda: logprobs_from_hidden(h, w, y, chunk_rows=32))
        plain[V], _ = saved_bytes(lambda: (naive_logprobs(h @ w.T, y), naive_entropy(h @ w.T)))
    weight_growth = 4096 * C * 4
    assert lean[8192] - lean[4096] <= weight_growth  # the weight itself: nothing per (row, vocab entry)
    assert lean[4096] <= B * T * C * 4 + 4096 * C * 4 + 32 * 4096 * 4 + 16 * B * T  # h, W, one chunk, O(B T)
    assert plain[8192] - plain[4096] >= B * T * 4096 * 4


def test_model_log_prob_path_saves_no_logits():
    """Through the whole model: doubling the vocabulary adds about the weights (embedding + lm_head), not logits."""
    B, T = 2, 48
    x = torch.randint(0, 100, (B, T))
    got, shared = {}, {}
    for V in (8192, 16384):
        m = tiny(vocab_size=V, tie_word_embeddings=False).train()
        got[V], _ = saved_bytes(lambda: m(x, targets=x[:, 1:], logits_from=1))
        shared[V], _ = saved_bytes(lambda: m(x[:, 8:], prompts=(x[:1, :8], torch.tensor([8]), torch.tensor([0, 0]))))
    for saved in (got, shared):  # the plain targets path and the shared-prompt path
        assert saved[16384] - saved[8192] <= 2 * 8192 * 64 * 4 + 8192 * 8  # two weights' growth (+ embedding lookup)
        assert saved[16384] - saved[8192] < B * (T - 1) * 8192 * 4


def test_grpo_training_step_forwards_each_prompt_once(tmp_path):
    """grpo.policy_loss_step on 3 prompts x 4 samples: the model embeds each prompt's 6 tokens once and each
    completion's 5 tokens but the last (which predicts nothing): 3 x 6 + 12 x 4 = 66 tokens, not 12 x 10."""
    import grpo
    from common import Run
    m = tiny().train()
    args = grpo.parse_args(["--group_size", "4", "--batch_size", "12", "--max_new_tokens", "5", "--device", "cpu",
                            "--out", str(tmp_path), "--overwrite"])
    torch.manual_seed(0)
    distinct = [torch.randint(3, 300, (6,)).tolist() for _ in range(3)]
    records = [sample.Rollout(p, c, [1] * 5, [0.0] * 5, "eos")
               for p, c in zip([p for p in distinct for _ in range(4)], torch.randint(3, 300, (12, 5)).tolist())]
    rewards = [float(i % 3 == 0) for i in range(12)]
    embedded = []
    handle = m.embed_tokens.register_forward_hook(lambda mod, a, out: embedded.append(a[0].numel()))
    stats = grpo.policy_loss_step(Run(args, "test"), args, m, None, torch.optim.AdamW(m.parameters()), records, rewards,
                                  1e-3)
    handle.remove()
    assert sum(embedded) == 3 * 6 + 12 * 4 == 66
    assert stats["grad_norm"] > 0


# ------------------------------------------------------------------ generate: prefill, sharing, decode, compaction

import sample  # noqa: E402

def generate(*args, **kwargs):
    """sample.generate's completions as token ids, one list per prompt (what these tests compare)."""
    return [r.ids for r in sample.generate(*args, **kwargs)]



def naive_logprobs(logits, targets):
    """log softmax(z)_y, the textbook way (the reference for the chunked paths)."""
    return logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).to(torch.float32)


def naive_entropy(logits):
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1).to(torch.float32)


def count_calls(m):
    """Counts of what generate runs through the model: prompt positions prefilled, rows of every decode step."""
    counts = {"prefill_tokens": 0, "decode_row_steps": 0, "decode_steps": 0}

    def hook(_, args):
        idx = args[0]
        if idx.shape[1] > 1:
            counts["prefill_tokens"] += idx.numel()
        else:
            counts["decode_row_steps"] += idx.shape[0]
            counts["decode_steps"] += 1
    return counts, m.register_forward_pre_hook(hook)


def test_repeated_prompts_are_prefilled_once_and_decode_as_before():
    m = tiny()
    torch.manual_seed(1)
    distinct = [torch.randint(3, 300, (6,)).tolist() for _ in range(3)]
    prompts = [p for p in distinct for _ in range(4)]  # an RL batch: 3 prompts x 4 samples, adjacent
    counts, handle = count_calls(m)
    greedy = generate(m, prompts, 10, temperature=0)
    handle.remove()
    assert counts["prefill_tokens"] == sum(map(len, distinct)) == 18  # not 12 x 6
    assert greedy == [o for o in generate(m, distinct, 10, temperature=0) for _ in range(4)]
    a = generate(m, prompts, 10, temperature=1.0, seed=5)
    assert a == generate(m, prompts, 10, temperature=1.0, seed=5)  # a fixed seed reproduces the samples
    assert len({tuple(o) for o in a}) > 3  # and the samples of one prompt differ


def test_prefill_runs_the_lm_head_at_the_last_prompt_position_only():
    m = tiny()
    shapes = []
    handle = m.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    generate(m, [[5, 6, 7, 8], [9, 10]], 3, temperature=0)
    handle.remove()
    assert shapes[0] == (2, 1, 64)


def test_prefill_of_mixed_length_prompts_is_plain_causal_attention(monkeypatch):
    """Right-padded prompts: the prefill calls SDPA without a mask (is_causal, which the fused GPU kernels take),
    over the prompt's slots only, and decodes as before (greedy parity with transformers: tests/test_model.py)."""
    m = tiny()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, q.shape[2], k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    got = generate(m, prompts, 6, temperature=0)
    assert calls == [(True, True, 7, 7)] * m.config.num_hidden_layers  # decode steps: decode_attention, no SDPA
    monkeypatch.undo()
    assert got == [generate(m, [p], 6, temperature=0)[0] for p in prompts]  # each prompt alone, no padding


def test_decode_step_reads_keys_and_values_once_without_repeat_or_sdpa_math():
    """Ops of one decode step (TorchDispatchMode): no repeat_interleave or copy of K/V (nothing the size of a
    layer's keys is produced but the in-place cache write), and no SDPA (whose CPU/math path repeats K/V for GQA)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from model import KVCache

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            # a fresh tensor counts; views and in-place writes (storage of an input) read in place
            fresh = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs
            self.ops.append((str(func.overloadpacket), out.numel() if fresh else 0))
            return out

    m = tiny(num_attention_heads=8, num_key_value_heads=2)  # 4 query heads per kv head
    B, S = 3, 200
    cache = KVCache(m.config, B, S, "cpu", torch.float32)
    with torch.inference_mode():
        m(torch.randint(0, 300, (B, 150)), torch.ones(B, 1, 150, 150, dtype=torch.bool).tril(),
          None, cache, torch.arange(150))
        bias = torch.zeros(B, 1, 1, 151)
        with Ops() as mode:
            sample.decode_step(m, torch.randint(0, 300, (B, 1)), torch.full((B, 1), 150), bias, cache,
                               torch.tensor([150]))
    names = [n for n, _ in mode.ops]
    layer_kv = B * m.config.num_key_value_heads * 151 * m.config.head_dim
    assert not [n for n in names if "repeat" in n or "scaled_dot_product" in n or n.endswith("expand_copy")]
    assert not [(n, k) for n, k in mode.ops if k >= layer_kv]  # no K/V-sized results: no copies of them


def long_tailed_model(lengths, stop=2):
    """A tiny model whose greedy tokens are forced: row i (prompt [3, 10 + i]) repeats token 10 + i and emits the
    stop token as its lengths[i]-th token, so rows finish at chosen steps."""
    m = tiny()

    def hook(_, args, out):
        idx, positions = args[0], args[2]
        forced = torch.full_like(out, -1e9)
        row, produced = idx[:, -1] - 10, positions[:, -1]  # the logits at position j give token number j
        target = torch.where(produced >= lengths.clamp(min=1)[row.clamp(0, len(lengths) - 1)], stop, idx[:, -1])
        return forced.scatter(-1, target[:, None, None].expand(-1, out.shape[1], 1), 0.0)
    m.register_forward_hook(hook)
    return m


def test_finished_rows_leave_the_batch():
    """A long-tailed length workload (64 rows, median ~21 tokens, max ~240): decoded row-steps stay within 1.15x of
    the tokens generated, and the tokens are the ones the full-batch loop gives."""
    lengths = torch.tensor([5 + int(2 ** (i / 8)) for i in range(64)])
    m = long_tailed_model(lengths)
    prompts = [[3, 10 + i] for i in range(64)]
    counts, handle = count_calls(m)
    outs = generate(m, prompts, 300, temperature=0, stop_token_ids=[2])
    handle.remove()
    assert [len(o) for o in outs] == lengths.tolist() and all(o[-1] == 2 for o in outs)
    generated = sum(map(len, outs))
    assert counts["decode_row_steps"] <= 1.15 * generated
    assert counts["decode_steps"] == lengths.max() - 1
    # the same rows without compaction (every row every step) give the same tokens
    full = generate(m, prompts, 300, temperature=0, stop_token_ids=[2], check_every=10**9)
    assert full == outs


def test_gpu_and_compiled_batches_are_multiples_of_8_with_at_most_7_padding_rows(monkeypatch):
    """On a GPU, eager or compiled (and compiled on a CPU), live rows are compacted to the next multiple of 8: one
    CUDA graph per multiple, as vLLM captures them. The long-tailed workload under the GPU policy, simulated on a CPU
    (finished rows checked every 8 steps): the same tokens, and at most 7 padding rows in any decode step."""
    assert [sample.batch_bucket(n, "cuda", False) for n in (1, 8, 9, 80, 81, 512)] == [8, 8, 16, 80, 88, 512]
    assert all(sample.batch_bucket(n, "cpu", True) == sample.batch_bucket(n, "cuda", True)
               == sample.batch_bucket(n, "cuda", False) for n in range(1, 600))
    lengths = torch.tensor([5 + int(2 ** (i / 8)) for i in range(64)])
    m = long_tailed_model(lengths)
    prompts = [[3, 10 + i] for i in range(64)]
    runs = {}
    for device_type in ("cpu", "cuda"):  # exact rows / multiples of 8, both checking every 8 steps
        monkeypatch.setattr(sample, "batch_bucket", lambda n, d, c, real=sample.batch_bucket, t=device_type: real(n, t, c))
        counts, handle = count_calls(m)
        runs[device_type] = (generate(m, prompts, 300, temperature=0, stop_token_ids=[2], check_every=8), counts)
        handle.remove()
        monkeypatch.undo()
    (exact, exact_counts), (padded, padded_counts) = runs["cpu"], runs["cuda"]
    assert padded == exact and [len(o) for o in padded] == lengths.tolist()
    padding = padded_counts["decode_row_steps"] - exact_counts["decode_row_steps"]
    assert 0 < padding <= 7 * padded_counts["decode_steps"]


def test_no_host_sync_between_finished_row_checks(monkeypatch):
    """The decode loop reads nothing back to the host (no item/tolist/nonzero/bool of a tensor) except at its
    finished-row checks: every 8 steps under the GPU policy, every step on a CPU."""
    from torch.overrides import TorchFunctionMode
    syncing = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    class CountSyncs(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in syncing:
                syncs[0] += 1
            return func(*args, **(kwargs or {}))
    lengths = torch.tensor([5 + int(2 ** (i / 8)) for i in range(64)])
    m = long_tailed_model(lengths)
    prompts = [[3, 10 + i] for i in range(64)]
    for every in (8, 1):
        counts, handle = count_calls(m)
        syncs = [0]
        with CountSyncs():
            generate(m, prompts, 300, temperature=0, stop_token_ids=[2], check_every=every)
        handle.remove()
        checks = counts["decode_steps"] // every + 1
        assert checks <= syncs[0] <= checks + 2  # the checks, and reading the finished tokens back once at the end


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                     (0.9, 6, 0.7)])
def test_sampled_tokens_follow_softmax_restricted_by_top_k_and_top_p(temperature, top_k, top_p):
    """Drawn frequencies equal softmax(z / T) restricted to the top-k tokens, then to the smallest set of them whose
    (renormalised) probability reaches top_p, renormalised: within 0.01 over 40,000 draws (4 standard errors at
    worst), and a token outside the set is never drawn."""
    torch.manual_seed(0)
    z = torch.randn(12) * 2
    p = torch.softmax(z.double() / temperature, -1)
    order = p.argsort(descending=True)[:top_k or 12]  # the top-k tokens, most likely first
    q = p[order] / p[order].sum()
    if top_p is not None:  # a token stays while the mass of the tokens before it is below top_p
        order = order[(q.cumsum(0) - q) < top_p]
    expected = torch.zeros(12, dtype=torch.double)
    expected[order] = p[order] / p[order].sum()
    n = 40000
    draws = sample.sample_next(z.expand(n, 12), temperature, top_k, top_p, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=12).double() / n
    assert (freq - expected).abs().max() < 0.01
    assert freq[expected == 0].sum() == 0 and (expected > 0).sum() >= 2


# ------------------------------------------------------------------ dtypes


def test_rollout_weight_copy_equals_a_bf16_checkpoint(tmp_path):
    m = tiny(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "m")
    copy = sample.cast_weights(m, torch.bfloat16)
    assert copy is not m and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert copy.lm_head.weight is copy.embed_tokens.weight and m.embed_tokens.weight.dtype == torch.float32
    stored = Transformer.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    prompts = [[5, 6, 7], [8, 9]]
    assert generate(copy, prompts, 8, temperature=0) == generate(stored, prompts, 8, temperature=0)
    assert sample.Engine(m, dtype=torch.float32).weights() is m  # nothing to cast: no copy


def test_rollout_weight_copy_is_made_once_and_refreshed_in_place():
    """A captured CUDA graph reads the weights at the addresses it was captured with: for the compiled decode step
    (keep) the bf16 rollout copy is made once, refreshed in place when the float32 weights change, and never becomes
    part of the model it copies."""
    m = tiny(tie_word_embeddings=True)
    names = set(m.state_dict())
    engine = sample.Engine(m, compile=True, dtype=torch.bfloat16)
    first = engine.weights()
    addresses = [p.data_ptr() for p in first.parameters()]
    with torch.no_grad():
        m.embed_tokens.weight.mul_(2.0)  # an optimizer step
    eager = sample.Engine(m, dtype=torch.bfloat16)
    assert eager.weights() is not first and eager.weights() is not eager.weights()  # eager: a copy per rollout
    again = engine.weights()
    assert again is first and [p.data_ptr() for p in again.parameters()] == addresses
    assert torch.equal(again.embed_tokens.weight, m.embed_tokens.weight.to(torch.bfloat16))
    assert again.lm_head.weight is again.embed_tokens.weight
    assert set(m.state_dict()) == names and all(p.dtype == torch.float32 for p in m.parameters())


def test_sample_cli_dtype_defaults_to_float32_on_cpu_bf16_on_gpu():
    assert sample.parse_args(["--device", "cpu"]).dtype == "float32"
    assert sample.parse_args(["--device", "cuda"]).dtype == "bfloat16"
    assert sample.parse_args(["--device", "cpu", "--dtype", "bf16"]).dtype == "bf16"


def test_decode_step_is_compiled_by_default_on_cuda_only():
    """--compile_decode auto: CUDA graphs for every rollout on a GPU, eager on a CPU; on and off override it."""
    assert sample.use_compiled_decode("auto", "cuda") and sample.use_compiled_decode("auto", "cuda:1")
    assert not sample.use_compiled_decode("auto", "cpu") and sample.use_compiled_decode("on", "cpu")
    assert not sample.use_compiled_decode("off", "cuda")
    import distill
    import grpo
    import ppo
    import sft
    for script in (grpo, ppo, distill, sft, sample):
        assert script.parse_args([]).compile_decode == "auto"


def test_gpu_check_runs_tiny_on_cpu():
    """tests/gpu_check.py cannot rot: its --tiny CPU run prints the whole table."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, check=True)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 16 and all(line.count("|") == 3 for line in table)
    assert any(line.startswith("| rollout 4 x 2") for line in table)
    assert "| rollout prefill + decode and shared-prompt training, math kernel disabled | yes |" in table
