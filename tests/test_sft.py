"""sft.py: the built-in task, chat data and loss masks, batching, schedule, checkpoints and exact resume."""
import json
import math
import subprocess
import sys

import pytest
import torch

import sft
from model import ModelConfig, Tokenizer, Transformer
from verify import math_reward

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--builtin_size", "200", "--batch_size", "8",
        "--heldout_problems", "16", "--eval_every", "0", "--warmup_steps", "2"]


# ------------------------------------------------------------------ built-in task


def test_builtin_splits_are_disjoint_and_seeded():
    train = sft.builtin_problems("train", 3000)
    heldout = sft.builtin_problems("heldout", 500)
    assert not {p["expr"] for p in train} & {p["expr"] for p in heldout}
    assert sft.builtin_problems("heldout", 500) == heldout


def test_worked_solutions_are_correct_and_well_formed():
    for p in sft.builtin_problems("train", 200):
        for steps in (True, False):
            text = sft.worked_solution(p, show_steps=steps)
            assert math_reward(text, p["answer"]) == 1.0
            assert text.startswith("<think>\n") and "</think>\n\\boxed{" in text
    p = {"expr": "7+5-3+8", "answer": "17", "steps": ["7+5=12", "12-3=9", "9+8=17"]}
    assert sft.worked_solution(p) == "<think>\n7+5=12\n12-3=9\n9+8=17\n</think>\n\\boxed{17}"


def test_arithmetic_problem_answer_is_the_expression_value():
    import random
    rng = random.Random(0)
    for _ in range(300):
        p = sft.arithmetic_problem(rng)
        assert int(p["answer"]) == eval(p["expr"])  # the test may eval its own generated arithmetic


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
        terse = [sft.worked_solution(p, show_steps=False) for p in sft.builtin_problems("train", 20)]
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
    (_, x, y, w), = sft.micro_batches(examples, 10_000, tok.pad_token_id)
    logits = torch.randn(*x.shape, tok.vocab_size, requires_grad=True)
    sft.sft_loss_sum(lambda _, logits_from=0: logits[:, logits_from:], x, y, w).backward()
    assert w.sum() == (1 + 2) + 2 * 2  # the answers "4" and "ok", each + <|im_end|> + newline
    assert (logits.grad[w == 0] == 0).all()
    assert (logits.grad[w == 1].abs().sum(-1) > 0).all()


def test_first_loss_position_is_the_first_column_any_row_trains_on():
    w = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1.]])
    assert sft.first_loss_position(w) == 2
    assert sft.first_loss_position(torch.zeros(2, 4)) == 0  # nothing to train on: keep every position


def test_loss_without_prompt_logits_equals_full_loss(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    examples = [sft.tokenize_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in (("2+2?", "4"), ("a longer question", "ok"))]
    (_, x, y, w), = sft.micro_batches(examples, 10_000, tok.pad_token_id)
    assert sft.first_loss_position(w) > 0
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


def test_micro_batches_respect_the_token_budget_and_shift_targets():
    examples = [(list(range(n)), [0] * (n // 2) + [1] * (n - n // 2)) for n in (5, 9, 3, 12, 7, 4)]
    batches = sft.micro_batches(examples, max_tokens=24, pad_id=-1)
    assert sorted(r for rows, *_ in batches for r in rows) == list(range(6))
    for rows, x, y, w in batches:
        assert x.numel() <= 24 or len(rows) == 1
        for r, i in enumerate(rows):
            n = len(examples[i][0]) - 1
            assert x[r, :n].tolist() == examples[i][0][:-1] and y[r, :n].tolist() == examples[i][0][1:]
            assert w[r, :n].tolist() == examples[i][1][1:] and w[r, n:].sum() == 0


def test_lr_schedule_warmup_then_cosine_to_floor():
    args = sft.parse_args(["--lr", "1.0", "--warmup_steps", "4", "--max_steps", "104", "--min_lr_ratio", "0.1"])
    assert [sft.lr_at(s, args) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sft.lr_at(54, args) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert sft.lr_at(104, args) == pytest.approx(0.1) and sft.lr_at(500, args) == pytest.approx(0.1)


def test_optimizer_state_round_trips_through_safetensors_layout():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = sft.flatten_optimizer(opt.state_dict())
    json.dumps(meta)  # the non-tensor part is plain JSON
    back = sft.unflatten_optimizer(tensors, meta)
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(st[n], back["state"][k][n]) for n in st)


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
    assert sft.latest_checkpoint(tmp_path / "part") is not None
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
        assert torch.allclose(one[name], two[name], atol=1e-5), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


# ------------------------------------------------------------------ faults


def test_lockstep_pads_a_rank_with_idle_passes_that_change_no_gradient():
    """Run.lockstep on a rank with 1 micro-batch while the busiest has 3 (FSDP): the real one is not the sync point,
    then 2 idle forward+backward passes run through the model and leave the accumulated gradients as they were."""
    from types import SimpleNamespace
    run = object.__new__(sft.Run)  # a rank of a 2-process FSDP run, without the process group
    run.world, run.args, run.device, run.amp = 2, SimpleNamespace(fsdp=True), torch.device("cpu"), False
    run.all_max = lambda v: 3
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2))
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    x = torch.randint(0, 64, (2, 5))
    seen = []
    for chunk, sync in run.lockstep([x], model):
        seen.append((chunk is x, sync))
        model(chunk).logsumexp(-1).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
    assert seen == [(True, False)] and calls == [x.shape, (1, 1), (1, 1)]
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_nan_gradient_skips_the_step_and_too_many_stop_the_run(tmp_path):
    args = sft.parse_args(["--out", str(tmp_path), "--max_bad_steps", "3", "--device", "cpu"])
    run = sft.Run(args, "sft")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(2):
        model.weight.grad = torch.full_like(model.weight, float("nan"))
        model.bias.grad = torch.zeros_like(model.bias)
        norm, skipped = sft.optimizer_step(run, model, opt, 0.1)
        assert skipped and math.isnan(norm) and run.bad_steps == i + 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was applied
    model(torch.randn(4, 3)).sum().backward()
    assert sft.optimizer_step(run, model, opt, 0.1)[1] is False and run.bad_steps == 0  # a good step resets
    with pytest.raises(SystemExit, match="3 consecutive steps with NaN/inf gradients"):
        for _ in range(3):
            model.weight.grad = torch.full_like(model.weight, float("inf"))
            sft.optimizer_step(run, model, opt, 0.1)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_leaves_every_checkpoint_loadable(tmp_path):
    """A process saving checkpoints back to back is SIGKILLed at random moments; every ckpt-* folder that exists
    afterwards is complete and loads, and the next run clears the half-written temporary folder."""
    import os
    import random
    import signal
    import time
    script = f"""
import torch, sft
from model import ModelConfig, Tokenizer, Transformer
args = sft.parse_args(["--out", {str(tmp_path)!r}, "--keep_checkpoints", "3", "--resume", "auto"])
run = sft.Run(args, "sft")
tok = Tokenizer.byte_level()
model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4))
opt = sft.make_optimizer(model, args)
model(torch.randint(0, 200, (1, 8))).sum().backward(); opt.step()
step = (sft.latest_checkpoint(args.out) and int(sft.latest_checkpoint(args.out).name[5:])) or 0
while True:
    step += 1
    sft.save_checkpoint(run, step, {{"": model}}, {{"policy": opt}}, tok)
"""
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
        newest = sft.latest_checkpoint(tmp_path)
        while sft.latest_checkpoint(tmp_path) == newest and proc.poll() is None:
            time.sleep(0.05)  # the first save of this process has completed: now kill it at a random moment
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = sorted(tmp_path.glob("ckpt-*"))
        assert ckpts, "no checkpoint was completed"
        for c in ckpts:
            Transformer.from_pretrained(c)
            assert json.loads((c / "training_state.json").read_text())["step"] == int(c.name[5:])
    sft.Run(sft.parse_args(["--out", str(tmp_path), "--resume", "auto"]), "sft")  # clears leftovers of killed saves
    assert not list(tmp_path.glob(".ckpt-*"))


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
        assert torch.allclose(one[name], fsdp[name], atol=1e-5), name
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
        epoch, offset = divmod(step, 2)
        order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch)).tolist()[offset * 8:(offset + 1) * 8]
        counts.append([len(sft.micro_batches([examples[i] for i in order][r::2], 130, 0)) for r in (0, 1)])
    assert any(a != b for a, b in counts), counts  # the case under test does occur
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "sft.py", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                    *args, "--fsdp", "--out", str(tmp_path / "fsdp")], check=True, env=env, capture_output=True,
                   timeout=300)
    one, fsdp = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "fsdp"))
    for name in one:
        assert torch.allclose(one[name], fsdp[name], atol=1e-5), name
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
