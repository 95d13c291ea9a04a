"""The training and rollout engine: memory-lean log-probs (logits never held for backward), and generate's
prefill, prefix sharing, grouped-head decode attention and finished-row compaction, checked by counting."""
import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import ModelConfig, Transformer, logprobs_from_hidden, token_entropy, token_logprobs


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
    want_logp, want_ent = token_logprobs(logits, y), token_entropy(logits)
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
        plain[V], _ = saved_bytes(lambda: (token_logprobs(h @ w.T, y), token_entropy(h @ w.T)))
    weight_growth = 4096 * C * 4
    assert lean[8192] - lean[4096] <= weight_growth  # the weight itself: nothing per (row, vocab entry)
    assert lean[4096] <= B * T * C * 4 + 4096 * C * 4 + 32 * 4096 * 4 + 16 * B * T  # h, W, one chunk, O(B T)
    assert plain[8192] - plain[4096] >= B * T * 4096 * 4


def test_model_log_prob_path_saves_no_logits():
    """Through the whole model: doubling the vocabulary adds about the weights (embedding + lm_head), not logits."""
    B, T = 2, 48
    x = torch.randint(0, 100, (B, T))
    got = {}
    for V in (8192, 16384):
        m = tiny(vocab_size=V, tie_word_embeddings=False).train()
        got[V], _ = saved_bytes(lambda: m(x, targets=x[:, 1:], logits_from=1))
    assert got[16384] - got[8192] <= 2 * 8192 * 64 * 4 + 8192 * 8  # two weights' growth (+ the embedding lookup)
    assert got[16384] - got[8192] < B * (T - 1) * 8192 * 4
