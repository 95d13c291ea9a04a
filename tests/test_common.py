"""common.py: the shared plumbing. The run object, schedule, NaN-skipping optimizer step, token-budgeted micro-batches
(sequences, pairs, row chunks), the step's data order, FSDP lockstep, atomic checkpoints and one-line user errors."""
import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

import common
from model import ModelConfig, Tokenizer, Transformer


def training_args(argv=()):
    """The flags every training script has, parsed as a script would (CPU)."""
    return common.add_training_args(argparse.ArgumentParser(), "test", lr=1e-3, max_steps=10, batch_size=8).parse_args(
        ["--device", "cpu", *argv])


def test_run_construction_has_no_side_effects(tmp_path):
    run = common.Run(training_args(["--out", str(tmp_path / "never")]), "test", world=4, rank=3)
    assert (run.world, run.rank, run.is_main, run.device.type) == (4, 3, False, "cpu")
    assert not (tmp_path / "never").exists()  # Run.start makes the folder; constructing a Run does nothing


def test_run_start_refuses_an_earlier_run_unless_asked(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="already holds a run"):
        common.Run.start(training_args(["--out", str(tmp_path)]), "test")
    run = common.Run.start(training_args(["--out", str(tmp_path), "--overwrite"]), "test")
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"  # nothing is deleted before the new run writes
    run.log(0, {"loss": 1.0})  # its first write moves the earlier run aside
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss": 1.0}
    assert (tmp_path / ".replaced" / "metrics.jsonl").read_text() == "{}\n"


def test_overwrite_keeps_the_earlier_run_until_the_new_run_has_a_checkpoint(tmp_path):
    """--overwrite: the earlier run survives a replacement that dies before its first checkpoint (and a second
    attempt), and is deleted only once a replacement has saved one."""
    tok = Tokenizer.byte_level()
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    first = common.Run.start(training_args(["--out", str(tmp_path)]), "test")
    first.log(1, {"loss": 3.0})
    common.save_checkpoint(first, 1, {"": model}, {}, tok)
    for attempt in range(2):  # two replacements that write metrics, then die before a checkpoint
        run = common.Run.start(training_args(["--out", str(tmp_path), "--overwrite"]), "test")
        run.log(0, {"loss": 9.0})
        assert sorted(p.name for p in (tmp_path / ".replaced").iterdir()) == ["ckpt-000001", "metrics.jsonl"]
        assert common.read_metrics(tmp_path / ".replaced" / "metrics.jsonl") == [{"step": 1, "loss": 3.0}]
    with pytest.raises(SystemExit, match="moved aside"):  # neither resumed nor replaced by accident
        common.Run.start(training_args(["--out", str(tmp_path)]), "test")
    with pytest.raises(SystemExit, match="moved aside"):
        common.Run.start(training_args(["--out", str(tmp_path), "--resume", "auto"]), "test")
    run = common.Run.start(training_args(["--out", str(tmp_path), "--overwrite"]), "test")
    run.log(0, {"loss": 5.0})
    common.save_checkpoint(run, 2, {"": model}, {}, tok)
    assert not (tmp_path / ".replaced").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002", "metrics.jsonl"]


def test_out_that_cannot_take_checkpoints_is_refused_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):  # an existing file; a folder under a file
        with pytest.raises(SystemExit, match=f"^error: cannot write checkpoints to {out}: "):
            common.Run.start(training_args(["--out", str(out)]), "test")
    full = small_tmpfs(tmp_path / "full", "16k")
    fill(full)
    with pytest.raises(SystemExit, match="No space left on device"):
        common.Run.start(training_args(["--out", str(full / "run")]), "test")


def test_a_failed_save_leaves_no_temporary_folder_and_the_previous_checkpoint_intact(tmp_path):
    tok = Tokenizer.byte_level()
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    out = small_tmpfs(tmp_path / "disk", "600k")  # room for one checkpoint (~0.4 MB), not two
    run = common.Run.start(training_args(["--out", str(out), "--keep_checkpoints", "5"]), "test")
    common.save_checkpoint(run, 1, {"": model}, {}, tok)
    with pytest.raises(SystemExit, match=f"^error: could not save {out / 'ckpt-000002'}: .*No space left on device"):
        common.save_checkpoint(run, 2, {"": model}, {}, tok)
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-000001"]  # no .ckpt-*.tmp-*, no half-written folder
    assert torch.equal(Transformer.from_pretrained(out / "ckpt-000001").embed_tokens.weight, model.embed_tokens.weight)


def small_tmpfs(path, size):
    """A tmpfs of `size` mounted at path for this test (unmounted at exit); skips where mounting is not allowed."""
    import atexit
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not checked")
    atexit.register(subprocess.run, ["umount", "-l", str(path)])
    return path


def fill(folder):
    """Write until the disk is full."""
    try:
        with open(folder / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"x" * 4096)
    except OSError:
        pass


def test_curve_has_a_panel_per_logged_metric_and_says_how_to_get_it_without_matplotlib(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "heldout_acc": 0.3}\n{"step": 1, "loss": 2.0}\n'
                                            '{"step": 2, "loss": 1.5, "heldout_acc": 0.5}\n{"step": 3, "lo')  # torn
    common.plot_curve(tmp_path, ("loss", "heldout_acc", "never_logged"))
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(tmp_path / "curve.png").shape
    assert height > width * 0.4  # two panels stacked (one would be about 7 x 2.8 inches)
    (tmp_path / "curve.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    common.plot_curve(tmp_path, ("loss",))
    assert not (tmp_path / "curve.png").exists()
    assert capsys.readouterr().out == f"{tmp_path / 'curve.png'} not drawn: matplotlib is not installed (pip install matplotlib)\n"


def test_unwrap_sees_through_compile():
    model = torch.nn.Linear(2, 2)
    assert common.unwrap(torch.compile(model)) is model and common.unwrap(model) is model


def test_user_input_errors_are_one_line_and_programming_errors_keep_their_traceback():
    with pytest.raises(SystemExit) as e:
        with common.user_input():
            raise ValueError("data.jsonl:3: not valid JSON")
    assert str(e.value) == "error: data.jsonl:3: not valid JSON"
    with pytest.raises(TypeError):
        with common.user_input():
            raise TypeError("a bug")


def test_length_buckets_keep_the_token_budget_and_cover_every_item_once():
    lengths = [5, 9, 3, 12, 7, 4, 30, 1]
    for rows_per_item in (1, 2):
        buckets = common.length_buckets(lengths, 24, rows_per_item)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in buckets for i in b]
        assert flat == sorted(lengths)  # sorted by length, so padding stays small
        for b in buckets:  # within budget, or a single item that alone exceeds it
            assert rows_per_item * len(b) * max(lengths[i] for i in b) <= 24 or len(b) == 1
    assert common.length_buckets([4, 4, 4], 8, rows_per_item=2) == [[0], [1], [2]]  # 2 x 1 x 4 fits, 2 x 2 x 4 not
    assert common.length_buckets([4, 4, 4], 12) == [[0, 1, 2]]


def test_step_indices_are_epoch_permutations_and_a_function_of_the_step():
    n, batch = 10, 4  # 2 full batches per epoch; the 2 left over are dropped
    steps = [common.step_indices(n, batch, s, seed=0) for s in range(4)]
    assert all(len(b) == batch for b in steps)
    assert len(set(steps[0] + steps[1])) == 8 and len(set(steps[2] + steps[3])) == 8  # no repeats within an epoch
    assert steps[0] != steps[2]  # a new permutation each epoch
    assert common.step_indices(n, batch, 3, seed=0) == steps[3] and common.step_indices(n, batch, 3, seed=1) != steps[3]


def test_pad_right():
    assert common.pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert common.pad_right([[1.0], [0.5, 0.25]], 0.0, torch.float).dtype == torch.float


def test_first_loss_position_is_the_first_column_any_row_trains_on():
    w = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1.]])
    assert common.first_loss_position(w) == 2
    assert common.first_loss_position(torch.zeros(2, 4)) == 0  # nothing to train on: keep every position


def test_micro_batches_respect_the_token_budget_and_shift_targets():
    examples = [(list(range(n)), [0] * (n // 2) + [1] * (n - n // 2)) for n in (5, 9, 3, 12, 7, 4)]
    batches = common.micro_batches(examples, max_tokens=24, pad_id=-1)
    assert sorted(r for rows, *_ in batches for r in rows) == list(range(6))
    for rows, x, y, w in batches:
        assert x.numel() <= 24 or len(rows) == 1
        for r, i in enumerate(rows):
            n = len(examples[i][0]) - 1
            assert x[r, :n].tolist() == examples[i][0][:-1] and y[r, :n].tolist() == examples[i][0][1:]
            assert w[r, :n].tolist() == examples[i][1][1:] and w[r, n:].sum() == 0


@pytest.mark.parametrize("budget", [10**6, 60, 1])
def test_shared_prompt_micro_batches_forward_each_prompt_once_within_the_budget(budget):
    """RL batches (groups of samples of one prompt): every sample lands in exactly one micro-batch with its own
    prompt, each micro-batch holds each of its prompts once, and its padded tokens U x P + B x T stay within the
    budget (a single row may exceed it); with room for all, one micro-batch forwards each distinct prompt once."""
    import random
    rng = random.Random(0)
    distinct = [[rng.randrange(3, 99) for _ in range(n)] for n in (4, 7, 7, 2)]
    prompts = [p for p in distinct for _ in range(3)]
    completions = [[rng.randrange(3, 99) for _ in range(rng.randrange(1, 9))] for _ in prompts]
    weights = [[rng.randrange(2) for _ in c] for c in completions]
    batches = common.shared_prompt_micro_batches(prompts, completions, weights, budget)
    assert sorted(r for rows, *_ in batches for r in rows) == list(range(len(prompts)))
    for rows, prompt_ids, lens, of_row, c, w in batches:
        assert len({tuple(prompt_ids[u, :lens[u]].tolist()) for u in range(len(lens))}) == len(lens)
        assert prompt_ids.numel() + c.numel() <= budget or len(rows) == 1
        assert c.shape[1] >= 2
        for r, i in enumerate(rows):
            n, u = len(completions[i]), of_row[r]
            assert prompt_ids[u, :lens[u]].tolist() == prompts[i] and prompt_ids[u, lens[u]:].sum() == 0
            assert c[r, :n].tolist() == completions[i] and w[r, :n].tolist() == weights[i] and w[r, n:].sum() == 0
    if budget == 10**6:
        assert len(batches) == 1 and batches[0][2].tolist() == [2, 4, 7, 7]  # 4 distinct prompts, by length


def test_lr_schedule_warmup_then_cosine_to_floor():
    args = training_args(["--lr", "1.0", "--warmup_steps", "4", "--max_steps", "104", "--min_lr_ratio", "0.1"])
    assert [common.lr_at(args, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert common.lr_at(args, 54) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert common.lr_at(args, 104) == pytest.approx(0.1) and common.lr_at(args, 500) == pytest.approx(0.1)


def test_optimizer_state_round_trips_through_safetensors_layout():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = common.flatten_optimizer(opt.state_dict())
    json.dumps(meta)  # the non-tensor part is plain JSON
    back = common.unflatten_optimizer(tensors, meta)
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(st[n], back["state"][k][n]) for n in st)


def test_lockstep_pads_a_rank_with_idle_passes_that_change_no_gradient():
    """Run.lockstep on a rank with 1 micro-batch while the busiest has 3 (FSDP): the real one is not the sync point,
    then 2 idle forward+backward passes run through the model and leave the accumulated gradients as they were."""
    run = common.Run(training_args(["--fsdp"]), "test", world=2, rank=1)  # a rank of a 2-process FSDP run
    run.all_max = lambda v: 3  # without the process group: the busiest rank has 3
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
    run = common.Run(training_args(["--out", str(tmp_path), "--max_bad_steps", "3"]), "test")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(2):
        model.weight.grad = torch.full_like(model.weight, float("nan"))
        model.bias.grad = torch.zeros_like(model.bias)
        norm, skipped = common.optimizer_step(run, model, opt, 0.1)
        assert skipped and math.isnan(norm) and run.bad_steps == i + 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was applied
    model(torch.randn(4, 3)).sum().backward()
    assert common.optimizer_step(run, model, opt, 0.1)[1] is False and run.bad_steps == 0  # a good step resets
    with pytest.raises(SystemExit, match="3 consecutive steps with NaN/inf gradients"):
        for _ in range(3):
            model.weight.grad = torch.full_like(model.weight, float("inf"))
            common.optimizer_step(run, model, opt, 0.1)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_leaves_every_checkpoint_loadable(tmp_path):
    """A process saving checkpoints back to back is SIGKILLed at random moments; every ckpt-* folder that exists
    afterwards is complete and loads, and the next run clears the half-written temporary folder."""
    import os
    import random
    import signal
    import time
    script = f"""
import torch, common, sft
from model import ModelConfig, Tokenizer, Transformer
args = sft.parse_args(["--out", {str(tmp_path)!r}, "--keep_checkpoints", "3", "--resume", "auto", "--device", "cpu"])
run = common.Run.start(args, "sft")
tok = Tokenizer.byte_level()
model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4))
opt = common.make_optimizer(args, model)
model(torch.randint(0, 200, (1, 8))).sum().backward(); opt.step()
step = (common.latest_checkpoint(args.out) and int(common.latest_checkpoint(args.out).name[5:])) or 0
while True:
    step += 1
    common.save_checkpoint(run, step, {{"": model}}, {{"policy": opt}}, tok)
"""
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
        newest = common.latest_checkpoint(tmp_path)
        while common.latest_checkpoint(tmp_path) == newest and proc.poll() is None:
            time.sleep(0.05)  # the first save of this process has completed: now kill it at a random moment
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = sorted(tmp_path.glob("ckpt-*"))
        assert ckpts, "no checkpoint was completed"
        for c in ckpts:
            Transformer.from_pretrained(c)
            assert json.loads((c / "training_state.json").read_text())["step"] == int(c.name[5:])
    common.Run.start(training_args(["--out", str(tmp_path), "--resume", "auto"]), "test")  # clears killed saves' leftovers
    assert not list(tmp_path.glob(".ckpt-*"))


def tiny_model():
    tok = Tokenizer.byte_level()
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1)), tok


def saved_run(tmp_path, steps=(1, 2), argv=(), script="test"):
    """A run in tmp_path with checkpoints at `steps` (weights and AdamW state differing per step) and metrics."""
    model, tok = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = common.Run.start(training_args(["--out", str(tmp_path), "--keep_checkpoints", "5", *argv]), script)
    for step in steps:
        model(torch.randint(0, 200, (1, 8))).sum().backward()
        opt.step()
        opt.zero_grad()
        run.log(step, {"loss": float(step)})
        common.save_checkpoint(run, step, {"": model}, {"policy": opt}, tok)
    return model


def resumed(tmp_path, argv=(), script="test"):
    """(model, state, what it printed) after --resume auto into a fresh model and optimizer."""
    model, _ = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = common.Run.start(training_args(["--out", str(tmp_path), "--resume", "auto", *argv]), script)
    printed = []
    run.print = lambda *a: printed.append(" ".join(map(str, a)))
    return model, common.resume(run, {"": model}, {"policy": opt}), printed


def test_resume_refuses_a_checkpoint_of_another_run_and_names_the_differing_flags(tmp_path):
    saved_run(tmp_path, argv=["--lr", "1e-3", "--seed", "3"])
    with pytest.raises(SystemExit, match=r"^error: --resume .*ckpt-000002: another run: its flags differ \(--lr 0.001 "
                                         r"-> 0.002, --seed 3 -> 0\); pass --allow_changed lr,seed"):
        resumed(tmp_path, ["--lr", "2e-3"])
    with pytest.raises(SystemExit, match="saved by test.py, not sft.py"):  # another script's checkpoint
        resumed(tmp_path, ["--lr", "1e-3", "--seed", "3"], script="sft")
    with pytest.raises(SystemExit, match=r"another run: its flags differ \(--seed 3 -> 0\)"):  # a deliberate lr change
        resumed(tmp_path, ["--lr", "2e-3", "--allow_changed", "lr"])  # is allowed, not the seed
    _, state, _ = resumed(tmp_path, ["--lr", "2e-3", "--seed", "3", "--allow_changed", "lr", "--max_steps", "99"])
    assert state["step"] == 2  # and operational flags (max_steps here) may change freely
    with pytest.raises(SystemExit, match="another run: its flags differ"):  # an explicit path is checked at start
        common.Run.start(training_args(["--out", str(tmp_path), "--resume", str(tmp_path / "ckpt-000001")]), "test")


def test_resume_drops_a_torn_metrics_line_and_falls_back_from_a_corrupt_checkpoint(tmp_path):
    saved_run(tmp_path, steps=(1, 2, 3))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-append
    weights = tmp_path / "ckpt-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (tmp_path / "ckpt-000002" / "optimizer_policy.safetensors").unlink()  # partial
    model, state, printed = resumed(tmp_path)
    assert state["step"] == 1
    assert "ckpt-000003" in printed[0] and "not a readable safetensors file" in printed[0] and \
        printed[0].endswith("falling back to " + str(tmp_path / "ckpt-000002"))
    assert "optimizer_policy.safetensors" in printed[1] and printed[1].endswith("ckpt-000001")
    assert common.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    reference = Transformer.from_pretrained(tmp_path / "ckpt-000001")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    for c in ("ckpt-000001",):  # nothing left to fall back to: one line, naming the checkpoint
        (tmp_path / c / "training_state.json").write_text("{")
    with pytest.raises(SystemExit, match=r"^error: --resume .*ckpt-000001: .*"):
        resumed(tmp_path)


def test_resume_refuses_optimizer_state_of_another_shape(tmp_path):
    saved_run(tmp_path, steps=(1,))
    tok = Tokenizer.byte_level()
    other = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=1))
    opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    run = common.Run.start(training_args(["--out", str(tmp_path), "--resume", "auto"]), "test")
    with pytest.raises(SystemExit, match="has shape"):  # the weights are refused first, naming the tensor
        common.resume(run, {"": other}, {"policy": opt})
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in other.parameters()]
    tensors, meta = common.flatten_optimizer(torch.optim.AdamW(tiny_model()[0].parameters()).state_dict())
    with pytest.raises(ValueError, match="does not fit this model's parameter"):
        common.unflatten_optimizer({"0.exp_avg": torch.zeros(5, 5)}, meta, params)


def test_resume_auto_without_a_checkpoint_starts_fresh_without_the_earlier_attempts_metrics(tmp_path):
    run = common.Run.start(training_args(["--out", str(tmp_path)]), "test")
    run.log(0, {"heldout_acc": 0.5})
    run.log(1, {"loss": 1.0})  # then killed before any checkpoint
    _, state, printed = resumed(tmp_path)
    assert state == {} and "starting fresh" in printed[0] and not (tmp_path / "metrics.jsonl").exists()
