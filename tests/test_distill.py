"""distill.py: each divergence against a hand computation, the gradient identity of forward KL, masking, the rejection
filter, the written dataset, the vocabulary check, the command line, and short 2-process DDP runs of both modes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
import sft
import verify
from distill import divergence_head_loss, select_traces, token_divergence, write_traces
from sample import Rollout
from model import ModelConfig, Tokenizer, Transformer, loss_from_hidden, tokenizer_mismatch

ROOT = Path(__file__).resolve().parent.parent

# Teacher P = [0.5, 0.5], student Q = [0.9, 0.1] (logits = log-probabilities). By hand:
#   KL(P || Q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5 (-0.587787) + 0.5 (1.609438) = 0.510826
#   KL(Q || P) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.9 (0.587787) + 0.1 (-1.609438) = 0.368064
#   beta = 0.5: M = [0.7, 0.3]; KL(P || M) = 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3) = 0.087177,
#               KL(Q || M) = 0.9 ln(0.9/0.7) + 0.1 ln(0.1/0.3) = 0.116322;  JSD = 0.5 (0.087177 + 0.116322) = 0.101749
#   beta = 0.9: M = 0.9 P + 0.1 Q = [0.54, 0.46]; KL(P || M) = 0.5 ln(0.5/0.54) + 0.5 ln(0.5/0.46) = 0.003210,
#               KL(Q || M) = 0.9 ln(0.9/0.54) + 0.1 ln(0.1/0.46) = 0.307137;
#               JSD = 0.9 (0.003210) + 0.1 (0.307137) = 0.033603
P = torch.tensor([[0.5, 0.5]]).log()
Q = torch.tensor([[0.9, 0.1]]).log()


def D(loss, student=Q, teacher=P, **kw):
    return token_divergence(student, teacher, loss, **kw).item()


def test_forward_kl_by_hand():
    assert D("forward_kl") == pytest.approx(0.510826, abs=1e-5)


def test_reverse_kl_by_hand_and_differs_from_forward():
    assert D("reverse_kl") == pytest.approx(0.368064, abs=1e-5)
    assert abs(D("forward_kl") - D("reverse_kl")) > 0.1  # asymmetric: KL(P||Q) != KL(Q||P)
    # and swapping the roles swaps them: reverse KL of (Q, P) is forward KL of (P, Q)
    assert D("reverse_kl", student=P, teacher=Q) == pytest.approx(D("forward_kl"), abs=1e-6)


@pytest.mark.parametrize("beta, want", [(0.5, 0.101749), (0.9, 0.033603)])
def test_jsd_by_hand(beta, want):
    assert D("jsd", beta=beta) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_zero_when_student_equals_teacher(loss, temperature):
    z = torch.randn(5, 11) * 3
    assert token_divergence(z, z.clone(), loss, beta=0.3, temperature=temperature).abs().max() < 1e-6
    assert (token_divergence(torch.randn(5, 11), z, loss, beta=0.3, temperature=temperature) > 0).all()


def test_jsd_beta_limits():
    # documented: JSD_beta / beta -> KL(P || Q) as beta -> 0, JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1
    b = 1e-3
    assert D("jsd", beta=b) / b == pytest.approx(D("forward_kl"), rel=2e-3)
    assert D("jsd", beta=1 - b) / b == pytest.approx(D("reverse_kl"), rel=2e-3)
    # beta = 0.5 is the symmetric JSD, bounded by log 2 and reaching it for disjoint distributions
    assert D("jsd", beta=0.5, student=P, teacher=Q) == pytest.approx(D("jsd", beta=0.5), abs=1e-6)
    far = torch.tensor([[30.0, 0.0]]), torch.tensor([[0.0, 30.0]])
    assert token_divergence(*far, "jsd", beta=0.5).item() == pytest.approx(math.log(2), abs=1e-5)
    # the ends themselves are refused: the value would be 0
    for beta in ("0", "1"):
        with pytest.raises(SystemExit):
            distill.parse_args(["--loss", "jsd", "--beta", beta])


def test_temperature_scaling():
    # tau = 2: softmax(log P / 2) = [0.5, 0.5], softmax(log Q / 2) = [0.9^.5, 0.1^.5] / 1.264911 = [0.75, 0.25];
    # KL([0.5, 0.5] || [0.75, 0.25]) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841, times tau^2 = 4: 0.575364
    assert D("forward_kl", temperature=2.0) == pytest.approx(0.575364, abs=1e-5)
    # in general D_tau(z_s, z_t) = tau^2 D_1(z_s / tau, z_t / tau), for every divergence
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        assert torch.allclose(token_divergence(s, t, loss, temperature=3.0),
                              9 * token_divergence(s / 3, t / 3, loss), atol=1e-5)


@pytest.fixture
def hidden():
    """Student and teacher hidden states and lm_heads (the teacher's vocabulary padded wider), a completion mask."""
    torch.manual_seed(0)
    sh, sw = torch.randn(3, 5, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    th, tw = torch.randn(3, 5, 4), torch.randn(9, 4)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.float)
    return sh, sw, th, tw, mask


def kd_loss(hidden, loss, beta=0.5, temperature=1.0, chunk_rows=2):
    sh, sw, th, tw, mask = hidden
    head = divergence_head_loss(th, tw, mask, loss, beta, temperature, vocab_size=7)
    return loss_from_hidden(sh, sw, head, chunk_rows=chunk_rows)


def test_forward_kl_gradient_is_q_minus_p(hidden):
    # d/dz_s sum_t KL(P_t || Q_t) = softmax(z_s) - softmax(z_t) on every completion token, 0 elsewhere; chunk_rows=2
    # spreads the 15 rows over 8 chunks
    sh, sw, th, tw, mask = hidden
    z = (sh @ sw.T).detach().requires_grad_()
    kd_loss(hidden, "forward_kl").backward()
    want_dz = (z.softmax(-1) - (th @ tw.T)[..., :7].softmax(-1)) * mask[..., None]
    assert torch.allclose(sh.grad, want_dz @ sw.detach(), atol=1e-5)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_and_gradients_equal_plain_autograd_on_whole_logits(hidden, loss):
    sh, sw, th, tw, mask = hidden
    total = kd_loss(hidden, loss, beta=0.3, temperature=1.5)
    total.backward()
    ours = sh.grad.clone(), sw.grad.clone()
    sh.grad = sw.grad = None
    s_logits, t_logits = (sh @ sw.T).reshape(-1, 7), (th @ tw.T)[..., :7].reshape(-1, 7)
    plain = (token_divergence(s_logits, t_logits, loss, 0.3, 1.5) * mask.reshape(-1)).sum()
    plain.backward()
    assert total.item() == pytest.approx(plain.item(), abs=1e-5)
    assert torch.allclose(ours[0], sh.grad, atol=1e-5) and torch.allclose(ours[1], sw.grad, atol=1e-5)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_masked_tokens_contribute_nothing(hidden, loss):
    sh, sw, th, tw, mask = hidden
    total = kd_loss(hidden, loss)
    total.backward()
    assert (sh.grad[mask == 0] == 0).all() and (sh.grad[mask == 1].abs().sum(-1) > 0).all()
    # changing the hidden states of masked positions (either model) leaves the loss unchanged
    sh2, th2 = sh.detach().clone(), th.clone()
    sh2[mask == 0], th2[mask == 0] = torch.randn(int((mask == 0).sum()), 6) * 5, torch.randn(int((mask == 0).sum()), 4)
    assert kd_loss((sh2, sw, th2, tw, mask), loss).item() == pytest.approx(total.item(), abs=1e-5)


def kept_bytes(fn):
    """Bytes of the tensors autograd saved while fn() built its graph that are still alive once it returned: what
    is kept for backward (a chunk's logits saved and freed inside a custom forward does not count)."""
    import gc
    import weakref
    seen = []

    def pack(t):
        seen.append((weakref.ref(t), t.numel() * t.element_size(), t.untyped_storage().data_ptr()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    alive = {ptr: size for ref, size, ptr in seen if ref() is not None}
    return sum(alive.values()), out


def test_logit_distillation_keeps_no_logits_for_backward():
    """The student's forward with head_loss: what autograd keeps for backward grows with the vocabulary by
    weight-sized tensors (the lm_head, the embedding, their gradients: V x C each), never by B x T x V logits (here
    4 x 199 rows: the whole logits would add 26 MB when V grows by 8192, five weight-sized tensors 10.5 MB)."""
    from test_engine import tiny
    x = torch.randint(0, 100, (4, 200))
    got = {}
    for V in (8192, 16384):
        student = tiny(vocab_size=V, tie_word_embeddings=False).train()
        th, tw = torch.randn(4, 199, 16), torch.randn(V, 16)
        head = divergence_head_loss(th, tw, torch.ones(4, 199), "forward_kl", vocab_size=V)
        got[V], loss = kept_bytes(lambda: student(x, logits_from=1, head_loss=head))
        loss.backward()
    weight_growth, logits_growth = 8192 * 64 * 4, 4 * 199 * 8192 * 4
    assert got[16384] - got[8192] <= 5 * weight_growth < logits_growth


# ------------------------------------------------------------------ rejection sampling and the dataset

GOOD = "<think>\n7+5=12\n12-3=9\n9+8=17\n</think>\n\\boxed{17}"
TERSE = "<think>\n7+5-3+8=17\n</think>\n\\boxed{17}"
PROBLEMS = [{"prompt": "Compute 7+5-3+8.", "answer": "17"}, {"prompt": "Compute 2+2.", "answer": "4"}]
SAMPLES = [
    [(GOOD, 30, False),                                   # kept
     ("<think>\n7+5-3+8=16\n</think>\n\\boxed{16}", 20, False),  # wrong answer
     ("\\boxed{17}", 6, False),                           # right answer, no reasoning: badly formed
     (TERSE, 18, False),                                  # kept (the shortest good one)
     (GOOD, 30, True),                                    # cut at max_new_tokens
     (TERSE + " and more \\boxed{17}", 25, False),       # two answers: fails the strict format only
     (TERSE, 18, False)],                                 # kept (a duplicate, sampled later)
    [("<think>\n2+2=5\n</think>\n\\boxed{5}", 12, False),  # wrong: problem 2 has no verified trace
     ("<think>\n2+2=4\n</think>\n4", 10, False)],          # right answer but not boxed
]


def record(text, n_tokens, truncated, own_text=None):
    """A Rollout as the engine returns it, with the text it decoded (own_text: the model's tokens only)."""
    return Rollout([1], [5] * n_tokens, [1] * n_tokens, [0.0] * n_tokens, "length" if truncated else "eos",
                   text=text, own_text=text if own_text is None else own_text)


def kept_texts(samples=SAMPLES, **kw):
    return [(p["answer"], text) for p, text, _ in select_traces(PROBLEMS, [[record(*s) for s in g] for g in samples],
                                                                 **kw)]


def test_rejection_filter_grades_the_models_own_text_and_keeps_the_whole_trace():
    """A tool trace: kept with its tool calls and outputs, but only when the model's own tokens answer right (an
    answer inside a tool's output does not count)."""
    call = "<think>\n```python\nprint(7+5-3+8)\n```\n```output\n17\n```\n</think>\n"
    by_tool = call + "\\boxed{17}"
    injected = "<think>\n```python\nprint('\\\\boxed{17}')\n```\n```output\n\\boxed{17}\n```\n</think>\nno idea"
    samples = [[(by_tool, 40, False, by_tool.replace("```output\n17\n```\n", "")),
                (injected, 40, False, injected.replace("```output\n\\boxed{17}\n```\n", ""))], []]
    assert kept_texts(samples, fmt="lenient") == [("17", by_tool)]


def test_rejection_filter_keeps_exactly_the_verified_traces():
    assert kept_texts() == [("17", GOOD), ("17", TERSE), ("17", TERSE)]
    # the lenient check accepts the doubly-answered trace; no check at all also the unreasoned one
    assert kept_texts(fmt="lenient") == [("17", GOOD), ("17", TERSE), ("17", TERSE + " and more \\boxed{17}"),
                                         ("17", TERSE)]
    assert kept_texts(fmt="none") == [("17", GOOD), ("17", "\\boxed{17}"), ("17", TERSE),
                                      ("17", TERSE + " and more \\boxed{17}"), ("17", TERSE)]


def test_rejection_filter_keep_shortest_and_cap():
    assert kept_texts(keep="shortest") == [("17", TERSE)]
    assert kept_texts(keep="shortest", max_per_prompt=2) == [("17", TERSE), ("17", TERSE)]
    assert kept_texts(keep="shortest", max_per_prompt=3) == [("17", TERSE), ("17", TERSE), ("17", GOOD)]
    assert kept_texts(max_per_prompt=1) == [("17", GOOD)]
    assert kept_texts(max_per_prompt=2) == [("17", GOOD), ("17", TERSE)]


def test_written_dataset_round_trips_through_sft(tmp_path):
    kept = select_traces(PROBLEMS, [[record(*s) for s in g] for g in SAMPLES])
    path = tmp_path / "sub" / "traces.jsonl"
    write_traces(path, kept)
    chats = sft.load_chats(path)
    assert chats == [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": text}]
                     for p, text, _ in kept]
    tok = Tokenizer.byte_level()
    examples, stats = sft.tokenize_dataset(tok, chats, max_len=1024)
    assert stats == {"truncated": 0, "dropped": 0} and len(examples) == 3
    ids, mask = examples[0]
    # the loss is on the trace and its end of turn, not on the prompt
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == GOOD + "<|im_end|>\n"
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt.endswith("Compute 7+5-3+8.<|im_end|>\n<|im_start|>assistant\n")
    assert not list(path.parent.glob(".*tmp*"))  # written atomically, nothing left behind


# ------------------------------------------------------------------ vocabulary check and command line


def test_vocabulary_mismatch_is_refused_naming_both_tokenizers(tmp_path):
    teacher = tmp_path / "other_teacher"
    tok = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_end|>"))  # fewer tokens than a fresh student's
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(teacher, tokenizer=tok)
    with pytest.raises(SystemExit) as e:
        distill.main(["--mode", "logits", "--teacher", str(teacher), "--device", "cpu", "--out", str(tmp_path / "o")])
    msg = str(e.value)
    assert str(teacher) in msg and "byte_level" in msg and "vocabulary sizes 258 vs" in msg


def test_tokenizer_mismatch_detects_reordered_special_tokens():
    a = Tokenizer.byte_level()
    b = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>"))  # same size, ids swapped
    assert tokenizer_mismatch(a, Tokenizer.byte_level()) is None
    assert tokenizer_mismatch(a, b) is not None


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "distill.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    for action in distill.parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help"
            assert action.option_strings[0] in out, f"{action.option_strings[0]} missing from --help"
    assert "python distill.py" in out and "torchrun --nproc_per_node=8 distill.py" in out


# ------------------------------------------------------------------ end to end (slow): 2-process gloo DDP


EASY = [("Compute 1+1.", "2"), ("Compute 2+3.", "5"), ("Compute 3+1.", "4"), ("Compute 4+4.", "8")]


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """Four easy problems (and their worked solutions as chat data), and a tiny byte-level teacher that memorised
    them with sft.py, so that its traces are verified and kept on both ranks."""
    folder = tmp_path_factory.mktemp("easy")
    solution = lambda q, a: f"<think>\n{q[8:-1]}={a}\n</think>\n\\boxed{{{a}}}"  # <think>\n2+1=3\n</think>\n\\boxed{3}
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": solution(q, a)}] for q, a in EASY]
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    (folder / "problems.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in EASY))
    subprocess.run([sys.executable, "sft.py", "--device", "cpu", "--out", str(folder / "teacher"), "--data",
                    str(folder / "chats.jsonl"), "--max_steps", "120", "--lr", "1e-2", "--n_layer", "1", "--n_embd", "32",
                    "--batch_size", "8", "--warmup_steps", "5"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return folder


def torchrun(easy, out, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "distill.py",
           "--device", "cpu", "--out", str(out), "--teacher", str(easy / "teacher" / "final"),
           "--data", str(easy / "problems.jsonl"), "--heldout_data", str(easy / "problems.jsonl"),
           "--prompt_template", "{question}", "--max_new_tokens", "48", "--batch_size", "8", "--max_steps", "3",
           "--n_layer", "1", "--n_embd", "32", *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_ddp_traces(easy, tmp_path):
    s = torchrun(easy, tmp_path, "--num_prompts", "4", "--samples_per_prompt", "3", "--max_per_prompt", "2",
                 "--mix_data", str(easy / "chats.jsonl"), "--temperature", "0.3")  # low: every prompt gets 2 traces
    assert s["world_size"] == 2 and s["sampled"] == 12 and s["steps"] == 3  # both ranks' samples are counted
    assert s["teacher_acc"] == 1.0 and {"student_acc_before", "student_acc_after"} <= s.keys()
    rows = [json.loads(l) for l in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == s["kept"] == s["keep_rate"] * 12 and s["train_examples"] == s["kept"] + 4
    # each rank's kept traces reach the dataset (prompts 0, 2 are rank 0's; 1, 3 rank 1's), capped at 2 per prompt
    prompts = [r["messages"][0]["content"] for r in rows]
    assert {q for q, _ in EASY} == set(prompts) and max(prompts.count(q) for q, _ in EASY) == 2
    assert all(verify.math_reward(r["messages"][1]["content"], r["answer"]) == 1.0 for r in rows)
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kd_data", ["teacher", "dataset"])
def test_ddp_logits(easy, tmp_path, kd_data):
    flags = ["--loss", "jsd", "--beta", "0.9"]
    if kd_data == "dataset":  # the off-policy sequences are dataset completions, scored by the teacher
        flags = ["--loss", "reverse_kl", "--kd_data", str(easy / "chats.jsonl")]
    s = torchrun(easy, tmp_path, "--mode", "logits", "--on_policy_frac", "0.5", *flags)
    assert s["world_size"] == 2 and s["steps"] == 3
    assert {"teacher_acc", "student_acc_before", "student_acc_after"} <= s.keys()
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert all("student_sample_acc" in m and ("teacher_sample_acc" in m) == (kd_data == "teacher") for m in metrics)
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_logits(easy, tmp_path):
    """--fsdp shards the student (the teacher stays whole and frozen); sampling gathers it once per step."""
    s = torchrun(easy, tmp_path, "--mode", "logits", "--on_policy_frac", "0.5", "--fsdp", "--micro_batch_tokens", "120")
    assert s["world_size"] == 2 and s["steps"] == 3
    metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)


# ------------------------------------------------------------------ end to end (slow): the no-argument runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["traces", "logits"])
def test_no_argument_run_teaches_the_fresh_student(tmp_path, mode):
    """`python distill.py [--mode logits]` as a user runs it (only --out moved): the default teacher (out/grpo/final
    when present, else the committed checkpoint) lifts a fresh student from nothing to well above chance."""
    subprocess.run([sys.executable, "distill.py", "--mode", mode, "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["teacher_acc"] >= 0.35 and s["student_acc_before"] <= 0.02, s
    assert s["student_acc_after"] >= s["student_acc_before"] + {"traces": 0.15, "logits": 0.08}[mode], s
    assert (tmp_path / "final" / "model.safetensors").exists()
