"""grpo.py: each formula against a hand computation, and the gradient identities the algorithm rests on."""
import argparse
import math
from pathlib import Path

import pytest
import torch

import grpo
from common import Run
from grpo import PRESETS, advantages, aggregate, all_equal_groups, clipped_surrogate, kl_penalty
from model import ModelConfig, Transformer
from sample import Rollout


def naive_logprobs(logits, targets):
    """log softmax(z)_y, the textbook way (the reference for the chunked paths)."""
    return logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).to(torch.float32)


def naive_entropy(logits):
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1).to(torch.float32)

# One group of G = 2 completions: rewards [1, 0]. Sequence 0 has 2 completion tokens with ratios 1.1, 1.5;
# sequence 1 has 3 with ratios 0.9, 0.5, 1.0. eps = 0.2.
RATIOS = torch.tensor([[1.1, 1.5, 1.0], [0.9, 0.5, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OLD = torch.full((2, 3), -1.0)
LOGP = OLD + RATIOS.log()
STD_SCALED = 0.5 / (math.sqrt(0.5) + 1e-4)  # |A| with std normalisation: 0.5 / (std([1, 0]) + eps)


def knobs(preset, group_size=2):
    """The advantage and aggregation knobs of a --loss preset, as parse_args fills them in."""
    return argparse.Namespace(group_size=group_size, **PRESETS[preset])


def group_advantages(rewards, group_size, preset="grpo"):
    return advantages(rewards, knobs(preset, group_size))


def variant_loss(loss, eps_high=0.2):
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, loss)
    per_token, clipped = clipped_surrogate(LOGP, OLD, adv[:, None], 0.2, eps_high)
    return aggregate(per_token, MASK, PRESETS[loss]["aggregation"], n_seqs=2, n_tokens=MASK.sum(), max_len=3), clipped


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0, 2.0, 4.0]), 2)
    # groups [1, 0] -> +-0.5 / (0.7071 + 1e-4); [3, 3] -> 0; [2, 4] -> +-1 / (1.4142 + 1e-4)
    want = [STD_SCALED, -STD_SCALED, 0.0, 0.0, -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_dr_grpo_advantages_are_not_scaled():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 5.0, 1.0]), 2, "dr_grpo"),
                       torch.tensor([0.5, -0.5, 2.0, -2.0]))


def test_grpo_loss_by_hand():
    # per-token losses (a = |A|): seq 0: -1.1a, -1.2a (1.5 clipped to 1.2); seq 1: 0.9a, 0.8a (0.5 clipped to 0.8), 1.0a
    # per-sequence means: -1.15a and 0.9a; mean over the two sequences: -0.125a
    loss, clipped = variant_loss("grpo")
    assert loss.item() == pytest.approx(-0.125 * STD_SCALED, abs=1e-6)
    assert clipped.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_dr_grpo_loss_by_hand():
    # a = 0.5, token sum (-1.1 - 1.2 + 0.9 + 0.8 + 1.0) a = 0.4 a = 0.2, over N * L_max = 2 * 3
    loss, _ = variant_loss("dr_grpo")
    assert loss.item() == pytest.approx(0.2 / 6, abs=1e-6)


def test_dapo_loss_by_hand_with_clip_higher():
    # eps_high = 0.28: ratio 1.5 on a positive advantage is clipped to 1.28; token sum 0.32 a over 5 tokens
    loss, clipped = variant_loss("dapo", eps_high=0.28)
    assert loss.item() == pytest.approx(0.32 * STD_SCALED / 5, abs=1e-6)
    assert clipped[0].tolist() == [0.0, 1.0, 0.0]


def test_kl_estimators_by_hand():
    # d = log pi_ref - log pi = [0, 1, -1.5]
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    want = {"k1": [0.0, -1.0, 1.5],  # -d = log(pi / pi_ref)
            "k2": [0.0, 0.5, 1.125],  # d^2 / 2
            "k3": [0.0, math.exp(1) - 1 - 1, math.exp(-1.5) + 1.5 - 1]}  # e^d - d - 1
    for estimator, values in want.items():
        assert torch.allclose(kl_penalty(logp, ref, estimator), torch.tensor(values), atol=1e-6), estimator
    for estimator in ("k2", "k3"):  # never negative, unlike k1
        assert (kl_penalty(torch.randn(100), torch.randn(100), estimator) >= 0).all()


def test_kl_estimators_are_unbiased_or_not_as_documented():
    """On samples from pi, k1 and k3 average to KL(pi || pi_ref) and k2 does not (its bias is O(d^3))."""
    torch.manual_seed(0)
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    kl = (pi * (pi / ref).log()).sum()
    y = torch.multinomial(pi, 200_000, replacement=True)
    logp, ref_logp = pi.log()[y], ref.log()[y]
    assert kl_penalty(logp, ref_logp, "k1").mean() == pytest.approx(kl.item(), rel=0.02)
    assert kl_penalty(logp, ref_logp, "k3").mean() == pytest.approx(kl.item(), rel=0.02)
    assert abs(kl_penalty(logp, ref_logp, "k2").mean() - kl) > 0.05


def test_kl_estimator_flag(capsys):
    assert grpo.parse_args([]).kl_estimator == "k3"
    assert grpo.parse_args(["--kl_estimator", "k2"]).kl_estimator == "k2"
    with pytest.raises(SystemExit):
        grpo.parse_args(["--kl_estimator", "k4"])


def test_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert all_equal_groups(rewards, 4).tolist() == [False, False, True]
    assert all_equal_groups(rewards, 2).tolist() == [True, False, False, True, True, True]


# ------------------------------------------------------------------ gradient identities on a tiny model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2)
    model = Transformer(cfg)
    x = torch.randint(0, 40, (4, 9))
    y = torch.randint(0, 40, (4, 9))
    mask = torch.zeros(4, 9)
    mask[0, 3:7] = mask[1, 2:9] = mask[2, 5:6] = mask[3, 4:9] = 1
    return model, x, y, mask


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_first_iteration_ratio_is_exactly_one(tiny):
    model, x, y, mask = tiny
    with torch.no_grad():
        old = naive_logprobs(model(x), y)  # pi_old: the trainer's own forward, without gradient
    logp = naive_logprobs(model(x), y)
    assert torch.equal(torch.exp(logp - old), torch.ones_like(logp))


def test_beta0_mu1_gradient_is_reinforce_with_group_baseline(tiny):
    model, x, y, mask = tiny
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 2)
    logp = naive_logprobs(model(x), y)
    per_token, _ = clipped_surrogate(logp, logp.detach(), adv[:, None], 0.2, 0.2)
    aggregate(per_token, mask, "seq_mean", 4, mask.sum(), 9).backward()
    ours = grads(model)
    model.zero_grad()
    # REINFORCE with the group mean as baseline: grad = -1/N sum_i A_i 1/|o_i| sum_t grad log pi(o_it)
    logp = naive_logprobs(model(x), y)
    (-(adv * (logp * mask).sum(1) / mask.sum(1)).mean()).backward()
    assert torch.allclose(ours, grads(model), atol=1e-6)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_masked_tokens_get_no_gradient(tiny, loss):
    _, _, y, mask = tiny
    logits = torch.randn(4, 9, 40, requires_grad=True)
    logp = naive_logprobs(logits, y)
    per_token, _ = clipped_surrogate(logp, logp.detach() + 0.05, torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None], 0.2, 0.28)
    per_token = per_token + 0.1 * kl_penalty(logp, logp.detach() - 0.3)
    aggregate(per_token, mask, PRESETS[loss]["aggregation"], 4, mask.sum(), 9).backward()
    assert (logits.grad[mask == 0] == 0).all()
    assert (logits.grad[mask == 1].abs().sum(-1) > 0).all()


def test_dynamic_sampling_keeps_exactly_the_informative_groups(monkeypatch):
    """fill_batch drops the all-equal groups, samples a second round, and fills the batch from it."""
    rounds = [torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])]

    def fake_sample_groups(run, args, engine, tokenizer, problems, seed, reward_model=None, tool_use=None):
        r = rounds.pop(0).tolist()
        return [Rollout([1], [int(10 * x)], [1], [0.0], "eos") for x in r], r, {"accuracy": r}

    monkeypatch.setattr(grpo, "sample_groups", fake_sample_groups)
    monkeypatch.setattr(grpo, "step_problems", lambda *a: [None] * 3)
    args = grpo.parse_args(["--loss", "dapo", "--group_size", "2", "--batch_size", "6", "--device", "cpu"])
    batch = grpo.fill_batch(Run(args, "grpo"), args, None, None, None, 0, None)
    # round 1: groups [1,1] (dropped), [0,1], [0,0] (dropped); round 2: [0,1], [1,1] (dropped), [1,0]
    assert batch.rewards == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [r.ids[0] for r in batch.records] == [0, 10, 0, 10, 10, 0] and batch.parts["accuracy"] == batch.rewards
    assert batch.all_equal_frac == pytest.approx(3 / 6)


def test_dynamic_sampling_rounds_are_decided_by_all_ranks(monkeypatch):
    """A rank whose batch is full after round 1 keeps sampling while another rank still needs groups: under FSDP every
    round all-gathers the weights, so ranks that left the loop at different rounds would hang."""
    calls = []

    def fake_sample_groups(run, args, engine, tokenizer, problems, seed, reward_model=None, tool_use=None):
        calls.append(seed)
        r = [0.0, 1.0] * 3  # every group informative: this rank is full after one round
        return [Rollout([1], [1], [1], [0.0], "eos") for _ in r], r, {"accuracy": r}

    monkeypatch.setattr(grpo, "sample_groups", fake_sample_groups)
    monkeypatch.setattr(grpo, "step_problems", lambda *a: [None] * 3)
    args = grpo.parse_args(["--loss", "dapo", "--group_size", "2", "--batch_size", "12", "--device", "cpu"])
    run = Run(args, "grpo", world=2)
    others = iter([1.0, 1.0, 0.0])  # the other rank: still short after rounds 1 and 2, full after round 3
    run.all_sum = lambda v: v + next(others)
    batch = grpo.fill_batch(run, args, None, None, None, 0, None)
    assert len(calls) == 3 and len(set(calls)) == 3  # three rounds, each with its own seed
    assert len(batch.rewards) == 6  # still this rank's share: the extra rounds' groups are not used


def test_group_size_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group_size", "1", "--batch_size", "4"])
    assert "--group_size 1: GRPO compares the samples of a prompt with each other" in capsys.readouterr().err


def test_batch_not_divisible_by_group_size_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(["--batch_size", "10", "--group_size", "4"])
    assert "--batch_size 10 is not divisible by --group_size 4" in capsys.readouterr().err


def test_a_verifier_that_raises_gives_zero_reward_and_a_warning(monkeypatch):
    import verify
    real = verify.math_reward

    def flaky(response, gold, timeout=5.0):
        if "boom" in response:
            raise RuntimeError("verifier bug")
        return real(response, gold, timeout)

    monkeypatch.setattr(verify, "math_reward", flaky)
    args = grpo.parse_args([])
    problems = [{"answer": "3"}, {"answer": "3"}]
    with pytest.warns(RuntimeWarning, match="verifier bug"):
        total, parts = verify.compute_rewards(args, problems, ["<think>x</think>\\boxed{3} boom",
                                                               "<think>x</think>\\boxed{3}"], [5, 5], [False, False])
    assert parts["accuracy"] == [0.0, 1.0]
    assert total == pytest.approx([0.1, 1.1])  # format still counts; accuracy weight 1, format weight 0.1


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_no_argument_run_raises_heldout_accuracy_by_15_points(tmp_path):
    """`python grpo.py` exactly as a user runs it (only --out moved): the committed tiny checkpoint on the built-in
    task must gain at least 15 points of held-out greedy accuracy, and save a checkpoint transformers can load."""
    import json
    import subprocess
    import sys
    subprocess.run([sys.executable, "grpo.py", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout_problems"] == 500
    assert summary["heldout_acc_after"] - summary["heldout_acc_before"] >= 0.15, summary
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "accuracy", "kl", "clip_frac", "entropy", "completion_len_mean", "completion_len_max",
            "all_equal_groups_frac", "gen_s", "train_s", "tokens_per_s", "reward_format"} <= set(rows[1])
    assert "reward_accuracy" not in rows[1]  # accuracy is logged once, as "accuracy"
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")


TINY_RUN = ["--max_steps", "6", "--batch_size", "16", "--group_size", "4", "--heldout_problems", "16",
            "--eval_every", "0", "--max_new_tokens", "48"]
TIMING = {"gen_s", "train_s", "tokens_per_s"}


def grpo_metrics(folder):
    import json
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING}
            for l in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "grpo.py", *TINY_RUN, "--out", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, "grpo.py", *TINY_RUN, "--out", str(tmp_path / "part")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "part" / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)  # line 1 is the held-out accuracy before training, then one line per step
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130, proc.stderr.read()
    subprocess.run([sys.executable, "grpo.py", *TINY_RUN, "--out", str(tmp_path / "part"), "--resume", "auto"],
                   check=True, env=env, capture_output=True)
    assert grpo_metrics(tmp_path / "full") == grpo_metrics(tmp_path / "part")


@pytest.mark.slow
def test_compiled_decode_step_trains_exactly_as_eager(tmp_path):
    """--compile_decode on (the default on CUDA) through a whole run: sampled rollouts, training and held-out
    evaluation log the same metrics as the eager decode loop, step for step."""
    import json
    import subprocess
    import sys
    for mode in ("off", "on"):
        subprocess.run([sys.executable, "grpo.py", *TINY_RUN, "--max_steps", "3", "--compile_decode", mode,
                        "--out", str(tmp_path / mode)], check=True, capture_output=True)
    on, off = grpo_metrics(tmp_path / "on"), grpo_metrics(tmp_path / "off")
    # the sampler's own log-probs (mismatch_k3 only) come from differently fused float32 kernels: equal to rounding
    assert [r.get("mismatch_k3", 0) for r in on] == pytest.approx([r.get("mismatch_k3", 0) for r in off], abs=1e-6)
    assert [{k: v for k, v in r.items() if k != "mismatch_k3"} for r in on] == \
        [{k: v for k, v in r.items() if k != "mismatch_k3"} for r in off]
    summaries = [json.loads((tmp_path / mode / "summary.json").read_text()) for mode in ("off", "on")]
    assert summaries[0]["heldout_acc_after"] == summaries[1]["heldout_acc_after"]
    assert summaries[1]["args"]["compile_decode"] == "on"


@pytest.mark.slow
def test_two_process_runs_under_ddp_and_fsdp_log_the_same_metrics(tmp_path):
    """2 gloo processes, mu = 2 (pi_old from a no-grad pass) and micro-batches small enough that the ranks cut
    their rollouts into different numbers of them (under FSDP this needs Run.lockstep's idle passes, or the run
    hangs). FSDP calls each block twice per micro-batch (prompts, then completions): its gradients must be DDP's."""
    import json
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py", *TINY_RUN,
           "--max_steps", "2", "--device", "cpu", "--save_every", "1", "--micro_batch_tokens", "150", "--mu", "2"]
    for sharding in ("ddp", "fsdp"):
        subprocess.run(cmd + ["--out", str(tmp_path / sharding)] + (["--fsdp"] if sharding == "fsdp" else []),
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
        summary = json.loads((tmp_path / sharding / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2
        Transformer.from_pretrained(tmp_path / sharding / "final")
    ddp, fsdp = grpo_metrics(tmp_path / "ddp"), grpo_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp]
    for a, b in zip(ddp, fsdp):
        for k in ("grad_norm", "reward", "entropy", "clip_frac"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert sum("grad_norm" in r for r in ddp) == 2


def test_prompts_per_step_must_split_over_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        grpo.parse_args(["--batch_size", "16", "--group_size", "4"])
    assert "4 prompts per step cannot be split evenly over 3 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_a_few_steps_of_smollm2_on_the_builtin_task(smollm2_dir, tmp_path):
    """A real open-weights checkpoint (SmolLM2-135M-Instruct, its own tokenizer and chat template) through GRPO on
    CPU: it trains, and the final folder loads in transformers with our logits."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, "grpo.py", "--model", str(smollm2_dir), "--out", str(tmp_path), "--max_steps", "2",
           "--batch_size", "4", "--group_size", "2", "--max_new_tokens", "16", "--heldout_problems", "2",
           "--eval_every", "0", "--lr", "1e-6"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    transformers = pytest.importorskip("transformers")
    import torch
    from model import Transformer
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ours = Transformer.from_pretrained(tmp_path / "final", dtype=torch.float32)(ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)(ids).logits
    assert (ours - ref).abs().max() < 1e-3


@pytest.mark.slow
def test_one_step_on_builtin_knights_from_its_checkpoint(tmp_path):
    """`--data builtin:knights` alone picks the task's committed checkpoint and token budget; one step samples
    case analyses, grades them with knights_reward and saves a model that scores what its summary says."""
    import json
    import subprocess
    import sys
    import tools
    subprocess.run([sys.executable, "grpo.py", "--data", "builtin:knights", "--max_steps", "1", "--batch_size", "8",
                    "--group_size", "4", "--heldout_problems", "4", "--eval_every", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["heldout_problems"] == 4
    step = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"reward"' in l][0]
    task = tools.TASKS["builtin:knights"]
    assert 0 < step["completion_len_max"] <= task.max_new_tokens and 0 <= step["accuracy"] <= 1
    assert summary["args"]["model"] == task.checkpoint and summary["args"]["max_new_tokens"] == task.max_new_tokens

@pytest.mark.slow
def test_fsdp_dapo_finishes_when_one_ranks_groups_are_all_equal(tmp_path):
    """2 gloo processes under FSDP, DAPO's dynamic sampling, rank 0's groups all equal (tests/uneven_dapo.py): rank 0
    needs every sampling round while rank 1 is full sooner; the run must finish, both ranks running the same rounds."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/uneven_dapo.py",
           *TINY_RUN, "--max_steps", "2", "--loss", "dapo", "--max_sampling_rounds", "3", "--fsdp", "--device", "cpu",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                   capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    rounds = [(tmp_path / f"rounds-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert rounds[0] == rounds[1] == ["3", "3"]  # rank 0 never fills, so both ranks sample all three rounds
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward" in l]
    assert all(0.5 <= r["all_equal_groups_frac"] < 1.0 for r in rows)  # rank 0: 1.0; rank 1: its own groups


def test_tool_observations_are_context_in_the_policy_loss(tmp_path, monkeypatch):
    """Rollouts with tool observations (mask 0 inside the completion) through grpo.policy_loss_step (shared prompts,
    several micro-batches): its gradient is that of -1/N sum_i A_i / |o_i| sum_{t: the model's tokens} log pi(y_t),
    computed by scoring each prompt + completion on its own. Observations only condition the tokens after them: they
    take no loss and are not counted in |o_i|."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    prompts = [torch.randint(1, 50, (5,)).tolist(), torch.randint(1, 50, (7,)).tolist()]
    masks = [[1, 1, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0, 1, 1]]
    records = [Rollout(prompts[i // 2], torch.randint(1, 50, (len(m),)).tolist(), m, [0.0] * len(m), "eos")
               for i, m in enumerate(masks)]
    rewards = [1.0, 0.0, 0.0, 1.0]
    args = grpo.parse_args(["--group_size", "2", "--batch_size", "4", "--micro_batch_tokens", "30", "--device", "cpu",
                            "--out", str(tmp_path)])
    got = {}
    monkeypatch.setattr(grpo, "optimizer_step", lambda run, m, opt, lr: (
        got.update({n: p.grad.clone() for n, p in m.named_parameters()}), (0.0, False))[1])
    grpo.policy_loss_step(Run(args, "test"), args, model, None, None, records, rewards, 0.0)
    model.zero_grad()
    adv = group_advantages(torch.tensor(rewards), 2)
    loss = 0.0
    for r, a in zip(records, adv):
        logp, _ = model(torch.tensor([r.prompt + r.ids[:-1]]), targets=torch.tensor([r.ids]), logits_from=len(r.prompt) - 1)
        mask = torch.tensor(r.mask, dtype=torch.float)
        loss = loss - a * (logp[0] * mask).sum() / mask.sum() / len(records)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


PRESET_RUN = ["--max_steps", "3", "--batch_size", "16", "--group_size", "4", "--heldout_problems", "16",
              "--eval_every", "0", "--max_new_tokens", "48", "--beta", "0.05", "--mu", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_presets_log_what_the_code_before_the_knobs_logged(tmp_path, loss):
    """--loss grpo / dr_grpo / dapo are now presets over separate knobs: `python grpo.py` (KL on, mu = 2, so the ratio
    and the clip matter) logs exactly what the code before the knobs logged, step for step (its metrics, recorded in
    tests/fixtures/grpo_preset_metrics.json)."""
    import json
    import subprocess
    import sys
    subprocess.run([sys.executable, "grpo.py", "--loss", loss, *PRESET_RUN, "--out", str(tmp_path)], check=True,
                   capture_output=True)
    want = json.loads((Path(__file__).parent / "fixtures" / "grpo_preset_metrics.json").read_text())[loss]
    got = grpo_metrics(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for w, g in zip(want, got):
        assert {k: g.get(k) for k in w} == pytest.approx(w, rel=1e-9, abs=1e-12), w["step"]


# ------------------------------------------------------------------ the knobs, each against its formula written out


def test_advantage_knobs_by_hand():
    """Two groups of G = 3: [1, 0, 0] and [2, 2, 5]; every baseline and normalisation written out."""
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    means, stds = [1 / 3] * 3 + [3.0] * 3, [math.sqrt(1 / 3)] * 3 + [math.sqrt(3.0)] * 3
    centered = [x - m for x, m in zip(r.tolist(), means)]

    def adv(**kw):
        return advantages(r, argparse.Namespace(group_size=3, **kw)).tolist()
    assert adv(baseline="group", adv_norm="none") == pytest.approx(centered)
    assert adv(baseline="group", adv_norm="group") == pytest.approx([c / (s + 1e-4) for c, s in zip(centered, stds)])
    # RLOO: r_i minus the mean of the group's other two
    loo = [1 - 0, 0 - 0.5, 0 - 0.5, 2 - 3.5, 2 - 3.5, 5 - 2]
    assert adv(baseline="leave_one_out", adv_norm="none") == pytest.approx(loo)
    # REINFORCE++: the rewards whitened over the batch (unbiased std); -baseline: the group-centered ones whitened
    for base, raw in (("none", r.tolist()), ("group", centered)):
        m = sum(raw) / 6
        sd = math.sqrt(sum((x - m) ** 2 for x in raw) / 5)
        assert adv(baseline=base, adv_norm="batch") == pytest.approx([(x - m) / sd for x in raw], abs=1e-6)


def test_reinforce_pp_whitens_over_every_rank():
    """Batch whitening counts all ranks: two ranks' halves whitened together equal the whole batch on one."""
    r = torch.tensor([1.0, 0.0, 3.0, 2.0, 0.5, 0.0, 4.0, 1.0])
    ns = argparse.Namespace(group_size=2, baseline="none", adv_norm="batch")
    whole, mean = advantages(r, ns), r.mean().item()
    for rank in (0, 1):
        other = r[4:] if rank == 0 else r[:4]
        # what the other rank adds to each all-reduced sum, in batch_whiten's order: count, sum, squared deviations
        adds = iter([len(other), other.sum().item(), ((other - mean) ** 2).sum().item()])
        got = advantages(r[rank * 4:(rank + 1) * 4], ns, lambda x: x + next(adds))
        assert torch.allclose(got, whole[rank * 4:(rank + 1) * 4], atol=1e-6)


def test_ratio_objectives_and_aggregations_by_hand():
    """RATIOS / MASK as above (A = +-0.5, no std): GSPO's sequence ratios, CISPO's clipped weights, the plain policy
    gradient, and the three aggregations, each written out."""
    adv = torch.tensor([0.5, -0.5])[:, None]
    seq = [math.exp((math.log(1.1) + math.log(1.5)) / 2), math.exp((math.log(0.9) + math.log(0.5) + 0.0) / 3)]
    ratio = grpo.importance_ratio(LOGP, OLD, MASK, "sequence")
    assert ratio[0, :2].tolist() == pytest.approx([seq[0]] * 2) and ratio[1].tolist() == pytest.approx([seq[1]] * 3)
    per_token, clipped = clipped_surrogate(LOGP, OLD, adv, 0.2, 0.2, ratio)
    want = [-min(seq[0] * 0.5, 1.2 * 0.5), -min(seq[1] * -0.5, max(seq[1], 0.8) * -0.5)]
    assert per_token[0, 0].item() == pytest.approx(want[0]) and per_token[1, 0].item() == pytest.approx(want[1])
    cispo, clip_mask = grpo.cispo_loss(LOGP, RATIOS, adv, 1.0, 0.28)  # weights: 1.1, 1.28 (from 1.5); 0.9, 0.5, 1.0
    weights = [[1.1, 1.28, 1.0], [0.9, 0.5, 1.0]]
    for i in range(2):
        for t in range(3):
            assert cispo[i, t].item() == pytest.approx(-weights[i][t] * adv[i, 0].item() * LOGP[i, t].item())
    assert clip_mask.tolist() == [[0, 1, 0], [0, 0, 0]]
    per_token = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])  # the 9 sits off the mask
    assert aggregate(per_token, MASK, "seq_mean", 2, 5, 3).item() == pytest.approx(((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2)
    assert aggregate(per_token, MASK, "token_mean", 2, 5, 3).item() == pytest.approx(15 / 5)
    assert aggregate(per_token, MASK, "token_sum", 2, 5, 3).item() == pytest.approx(15 / (2 * 3))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per_token, MASK, "grpo", 2, 5, 3)


@pytest.mark.parametrize("objective,ratio", [("clip", "token"), ("clip", "sequence"), ("cispo", "token"),
                                             ("pg", "token"), ("pg", "sequence")])
def test_objective_gradients_equal_autograd_of_the_written_out_formula(objective, ratio):
    torch.manual_seed(0)
    logp = (torch.randn(3, 4) * 0.1 - 1).requires_grad_()
    old = (logp.detach() + torch.randn(3, 4) * 0.2)
    adv = torch.tensor([1.0, -0.5, 2.0])[:, None]
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    args = argparse.Namespace(objective=objective, ratio=ratio, epsilon=0.2, epsilon_high=0.28)
    got = torch.autograd.grad(aggregate(grpo.policy_objective(logp, old, adv, mask, args)[0], mask, "seq_mean", 3, 8, 4),
                              logp)[0]
    lp = logp.detach().clone().requires_grad_()
    total = 0.0
    for i in range(3):
        n = int(mask[i].sum())
        if ratio == "sequence":
            r = [torch.exp(sum(lp[i, t] - old[i, t] for t in range(n)) / n)] * n
        else:
            r = [torch.exp(lp[i, t] - old[i, t]) for t in range(n)]
        terms = []
        for t in range(n):
            a = adv[i, 0]
            if objective == "clip":
                terms.append(-torch.min(r[t] * a, torch.clamp(r[t], 0.8, 1.28) * a))
            elif objective == "cispo":
                terms.append(-torch.clamp(r[t], 0.8, 1.28).detach() * a * lp[i, t])
            else:
                terms.append(-r[t] * a)
        total = total + sum(terms) / n / 3
    want = torch.autograd.grad(total, lp)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_gspo_at_ratio_one_has_grpos_gradient():
    """mu = 1: pi_old = pi detached, every ratio 1. GSPO's gradient, -1/N sum_i A_i 1/|o_i| sum_t grad log pi, is
    GRPO's (sequence mean of token means), as the math says; with tokens off the mask too."""
    torch.manual_seed(1)
    logp = (torch.randn(4, 5) * 0.3 - 1).requires_grad_()
    adv = torch.randn(4)[:, None]
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    grads = {}
    for r in ("token", "sequence"):
        args = argparse.Namespace(objective="clip", ratio=r, epsilon=3e-4, epsilon_high=4e-4)
        loss = aggregate(grpo.policy_objective(logp, logp.detach(), adv, mask, args)[0], mask, "seq_mean", 4, 0, 5)
        grads[r] = torch.autograd.grad(loss, logp)[0]
    assert torch.allclose(grads["token"], grads["sequence"], atol=1e-7)


def test_rollout_correction_weights_and_masks_by_hand():
    """r = pi_old / pi_sampler per token: [2.5, 0.4, 1.0] and [1.5, 1.2, x] (x off the mask)."""
    sampler = torch.zeros(2, 3)
    old = torch.tensor([[2.5, 0.4, 1.0], [1.5, 1.2, 7.0]]).log()
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    corr = lambda mode, o=old: grpo.rollout_correction(o, sampler, mask, mode, 0.5, 2.0)
    assert torch.allclose(corr("token_tis"), torch.tensor([[2.0, 0.4, 1.0], [1.5, 1.2, 1.0]]))  # min(r, C = 2)
    assert corr("token_mask").tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]  # (off the mask: r = 1)
    assert torch.allclose(corr("seq_tis"), torch.tensor([[1.0] * 3, [1.8] * 3]))  # prod: 1.0 and 1.8 (<= C)
    assert corr("seq_mask").tolist() == [[1.0] * 3, [1.0] * 3]
    assert corr("seq_mask", old * 3).tolist() == [[1.0] * 3, [0.0] * 3]  # r cubed: 1.0 and 5.8
    assert corr("none").tolist() == [[1.0] * 3] * 2
    k3, outside = grpo.sampler_mismatch(old, sampler, mask)  # d = log r
    d = [math.log(x) for x in (2.5, 0.4, 1.0, 1.5, 1.2)]
    assert k3 == pytest.approx(sum(math.exp(x) - x - 1 for x in d)) and outside == 2


def test_top_entropy_quantile_over_two_ranks_equals_one_rank():
    """The threshold is a quantile over every rank's tokens: each rank's mask, with the other rank's entropies
    gathered in, equals the mask one process computes over all of them."""
    torch.manual_seed(2)
    ent = [torch.rand(3, 6) for _ in range(4)]  # 4 micro-batches: 2 per rank
    masks = [(torch.rand(3, 6) > 0.3).float() for _ in range(4)]
    alone = grpo.top_entropy_mask(ent, masks, 0.2)
    kept = torch.cat([m.flatten() for m in alone]).sum().item()
    assert kept == math.ceil(0.2 * sum(m.sum().item() for m in masks))  # the top fifth (no ties in random floats)
    values = lambda e, m: torch.cat([x[y > 0] for x, y in zip(e, m)])
    for rank, mine in ((0, slice(0, 2)), (1, slice(2, 4))):
        other = slice(2, 4) if rank == 0 else slice(0, 2)
        gather = lambda v: torch.cat([v, values(ent[other], masks[other])] if rank == 0 else
                                     [values(ent[other], masks[other]), v])
        assert all(torch.equal(a, b) for a, b in zip(grpo.top_entropy_mask(ent[mine], masks[mine], 0.2, gather),
                                                      alone[mine]))


def test_presets_and_knobs_parse_and_meaningless_combinations_are_refused(capsys):
    args = grpo.parse_args(["--loss", "gspo"])
    assert (args.ratio, args.epsilon, args.epsilon_high, args.aggregation) == ("sequence", 3e-4, 4e-4, "seq_mean")
    args = grpo.parse_args(["--loss", "dapo", "--aggregation", "seq_mean", "--epsilon_high", "0.3"])
    assert (args.aggregation, args.epsilon_high, args.dynamic_sampling, args.overlong_cache) == ("seq_mean", 0.3, True, 16)
    assert grpo.parse_args(["--loss", "rloo"]).baseline == "leave_one_out"
    for argv, why in ((["--loss", "gspo", "--objective", "cispo"], "CISPO weights each token"),
                      (["--baseline", "none", "--adv_norm", "group"], "has no baseline"),
                      (["--rollout_correction", "token_tis", "--old_logprobs", "sampler"], "always 1"),
                      (["--loss", "ppo"], "invalid choice")):
        with pytest.raises(SystemExit):
            grpo.parse_args(argv)
        assert why in capsys.readouterr().err
    import subprocess
    import sys
    help_text = subprocess.run([sys.executable, "grpo.py", "--help"], capture_output=True, text=True).stdout
    assert "reinforce_pp_baseline  group          batch" in help_text  # the preset table
