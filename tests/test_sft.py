"""sft.py: the built-in task as chats, chat data and loss masks, the SFT loss, end-to-end runs (resume, DDP, FSDP)."""
import json
import subprocess
import sys

import pytest
import torch

import common
import sft
import verify
from model import ModelConfig, Tokenizer, Transformer

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--builtin_size", "200", "--batch_size", "8",
        "--heldout_problems", "16", "--eval_every", "0", "--warmup_steps", "2"]


# ------------------------------------------------------------------ built-in task


def test_export_builtin_round_trips(tmp_path):
    sft.export_builtin(tmp_path, n_train=30, n_heldout=10)
    chats = sft.load_chats(tmp_path / "builtin_sft_train.jsonl")
    assert len(chats) == 30 and chats[0][1]["role"] == "assistant"
    from verify import load_problems
    assert len(load_problems(tmp_path / "builtin_heldout.jsonl")) == 10


def test_export_builtin_step_fraction_sets_the_answer_style(tmp_path):
    """0: terse answers only (the R1 recipe's stand-in for non-reasoning data); 1: every step written out."""
    for fraction in (0.0, 1.0):
        sft.export_builtin(tmp_path / str(fraction), n_train=20, n_heldout=5, step_fraction=fraction)
        answers = [c[1]["content"] for c in sft.load_chats(tmp_path / str(fraction) / "builtin_sft_train.jsonl")]
        lengths = [len(a) for a in answers]
        terse = [verify.worked_solution(p, show_steps=False) for p in verify.builtin_problems("train", 20)]
        assert (answers == terse) == (fraction == 0.0), lengths


# ------------------------------------------------------------------ chat data and loss masks


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok!"}]
    ids, mask = sft.tokenize_chat(tok, msgs)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "yo<|im_end|>\nok!<|im_end|>\n"


def test_prompt_tokens_carry_no_gradient(tok):
    examples = [sft.tokenize_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in (("2+2?", "4"), ("a longer question", "ok"))]
    (_, x, y, w), = common.micro_batches(examples, 10_000, tok.pad_token_id)
    logits = torch.randn(*x.shape, tok.vocab_size, requires_grad=True)

    def model(_, targets, logits_from=0):  # the log-prob mode of Transformer.forward, on these logits
        logp = logits[:, logits_from:].log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        return logp, None
    sft.sft_loss_sum(model, x, y, w).backward()
    assert w.sum() == (1 + 2) + 2 * 2  # the answers "4" and "ok", each + <|im_end|> + newline
    assert (logits.grad[w == 0] == 0).all()
    assert (logits.grad[w == 1].abs().sum(-1) > 0).all()


def test_loss_without_prompt_logits_equals_full_loss(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    examples = [sft.tokenize_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in (("2+2?", "4"), ("a longer question", "ok"))]
    (_, x, y, w), = common.micro_batches(examples, 10_000, tok.pad_token_id)
    assert common.first_loss_position(w) > 0
    full = (torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none") * w).sum()
    assert torch.allclose(sft.sft_loss_sum(model, x, y, w), full, atol=1e-5)


def test_prompt_completion_records_are_chats(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert sft.load_chats(f) == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "q"}\n', r"d.jsonl:1: needs 'messages' or 'prompt' and 'completion'"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', r"d.jsonl:1: no assistant message"),
    ('{"prompt": "q", "completion": "a"}\n{oops\n', r"d.jsonl:2: malformed JSON"),
    ('\n', r"d.jsonl: no records"),
])
def test_bad_chat_data_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        sft.load_chats(f)


def test_truncation_and_drops_are_counted(tok):
    chats = [[{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 50}]]
    examples, stats = sft.tokenize_dataset(tok, chats, max_len=30)
    assert stats == {"truncated": 2, "dropped": 1}  # the first loses its whole answer, the second is cut
    assert len(examples) == 1 and len(examples[0][0]) == 30


# ------------------------------------------------------------------ end to end (short runs in a subprocess)


def run_sft(tmp_path, *extra, check=True):
    return subprocess.run([sys.executable, "sft.py", *TINY, "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, check=check, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})


def losses(folder):
    return [json.loads(l)["loss"] for l in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    import os
    import signal
    import time
    run_sft(tmp_path / "full", "--max_steps", "40")
    cmd = [sys.executable, "sft.py", *TINY, "--out", str(tmp_path / "part"), "--max_steps", "40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "part" / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # a pre-emption mid-run
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert common.latest_checkpoint(tmp_path / "part") is not None
    run_sft(tmp_path / "part", "--max_steps", "40", "--resume", "auto")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["steps"] == 40 and 0.0 <= summary["heldout_acc"] <= 1.0


def test_final_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_sft(tmp_path, "--max_steps", "2")
    ours = Transformer.from_pretrained(tmp_path / "final")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "final")("7+5")["input_ids"] == [55, 43, 53]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """2 gloo processes with the same global batch reach the same parameters as 1 process."""
    import os
    from safetensors.torch import load_file
    args = [*TINY, "--max_steps", "3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "sft.py", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                    *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-4), name  # AdamW: float noise on ~0 gradients -> ~lr*1e-2
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


# ------------------------------------------------------------------ faults


def test_a_second_run_in_the_same_folder_is_refused_unless_asked(tmp_path):
    run_sft(tmp_path, "--max_steps", "1")
    again = run_sft(tmp_path, "--max_steps", "1", check=False)
    assert again.returncode != 0 and "already holds a run" in again.stderr and "--resume auto" in again.stderr
    run_sft(tmp_path, "--max_steps", "2", "--overwrite")
    assert len(losses(tmp_path)) == 2  # the earlier run's metrics were replaced, not appended to


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path):
    """--fsdp (FSDP2, 2 gloo processes): same parameters as 1 process; the sharded optimizer state resumes exactly;
    the checkpoint is a plain Hugging Face folder."""
    import os
    from safetensors.torch import load_file
    args = [*TINY, "--max_steps", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py"]
    subprocess.run([sys.executable, "sft.py", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([*torchrun, *args, "--fsdp", "--save_every", "2", "--out", str(tmp_path / "fsdp")], check=True,
                   env=env, capture_output=True)
    subprocess.run([*torchrun, *args, "--fsdp", "--resume", str(tmp_path / "fsdp" / "ckpt-000002"),
                    "--out", str(tmp_path / "resumed")], check=True, env=env, capture_output=True)
    one, fsdp, resumed = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "fsdp", "resumed"))
    for name in one:
        assert torch.allclose(one[name], fsdp[name], atol=1e-4), name
        assert torch.equal(fsdp[name], resumed[name]), name
    assert sorted(p.name for p in (tmp_path / "fsdp" / "ckpt-000002").glob("optimizer_*.safetensors")) == [
        "optimizer_policy.rank0.safetensors", "optimizer_policy.rank1.safetensors"]
    Transformer.from_pretrained(tmp_path / "fsdp" / "final")


@pytest.mark.slow
def test_fsdp_ranks_with_different_micro_batch_counts_stay_in_step(tmp_path):
    """Long and short examples under a small --micro_batch_tokens: the ranks cut their halves of a step into
    different numbers of micro-batches. FSDP all-gathers in every forward, so without idle passes (Run.lockstep)
    this hangs; with them the run finishes with the 1-process parameters and losses."""
    import os
    from safetensors.torch import load_file
    rows = [{"prompt": f"q{i}", "completion": "x" * (120 if i % 2 else 5)} for i in range(16)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path / "data.jsonl"), "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
            "--batch_size", "8", "--micro_batch_tokens", "130", "--max_steps", "4", "--warmup_steps", "1",
            "--device", "cpu"]
    tok = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    examples = sft.tokenize_dataset(tok, sft.load_chats(tmp_path / "data.jsonl"), 1024)[0]
    counts = []  # micro-batches per rank at each step, chosen as sft.train chooses them
    for step in range(4):
        order = common.step_indices(16, 8, step, seed=0)
        counts.append([len(common.micro_batches([examples[i] for i in order][r::2], 130, 0)) for r in (0, 1)])
    assert any(a != b for a, b in counts), counts  # the case under test does occur
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "sft.py", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                    *args, "--fsdp", "--out", str(tmp_path / "fsdp")], check=True, env=env, capture_output=True,
                   timeout=300)
    one, fsdp = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "fsdp"))
    for name in one:
        assert torch.allclose(one[name], fsdp[name], atol=1e-4), name
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
def test_fine_tunes_a_real_checkpoint(smollm2_dir, tmp_path):
    """`sft.py --model DIR --data chat.jsonl` on SmolLM2-135M-Instruct: its own tokenizer and chat template, the loss
    falls on a small repeated set, and transformers loads the result."""
    chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>2+3=5</think> \\boxed{5}"}]
    rows = [{"messages": chat}, {"prompt": "Hi", "completion": "Hello! How can I help?"}]  # both record formats
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "sft.py", "--model", str(smollm2_dir), "--data", str(tmp_path / "chat.jsonl"),
                    "--max_steps", "4", "--batch_size", "2", "--lr", "1e-4", "--warmup_steps", "1", "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.7, losses
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert Tokenizer.from_pretrained(tmp_path / "out" / "final").encode("Hello") == \
        Tokenizer.from_pretrained(smollm2_dir).encode("Hello")


def test_sft_loss_keeps_no_logits_for_backward():
    """sft_loss_sum goes through the log-prob path (as the RL losses do, and distill.py's trace SFT, which runs it):
    what autograd saves grows with the vocabulary by weight-sized tensors, not by the B x T x V logits (4 x 199 rows
    here: 26 MB per 8192 more entries, five weight-sized tensors 10.5 MB), in any dtype."""
    from test_engine import saved_bytes, tiny
    x = torch.randint(0, 100, (4, 200))
    w = torch.ones(4, 199)
    got = {}
    for V in (8192, 16384):
        model = tiny(vocab_size=V, tie_word_embeddings=False).train()
        got[V], loss = saved_bytes(lambda: sft.sft_loss_sum(model, x[:, :-1], x[:, 1:], w))
    assert got[16384] - got[8192] <= 5 * 8192 * 64 * 4 < 4 * 199 * 8192 * 4
    naive = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)  # the same loss as the plain logits path
