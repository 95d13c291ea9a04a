"""ppo.py: GAE against a reference loop and its closed forms, whitening, the value loss, where rewards land, the
KL controller, and short end-to-end runs (2-process DDP, resume)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ppo
from common import Run
from model import ModelConfig, Tokenizer, Transformer
from ppo import adaptive_kl_coef, clipped_value_loss, explained_variance, gae, token_rewards, whiten


def naive_logprobs(logits, targets):
    """log softmax(z)_y, the textbook way (the reference for the chunked paths)."""
    return logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).to(torch.float32)


def naive_entropy(logits):
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1).to(torch.float32)

# Three rows of [B, T] = [3, 8]: a prompt (mask 0) then completion tokens (mask 1) then padding (mask 0).
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0],
                     [0, 0, 0, 1, 1, 1, 1, 1],
                     [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
MASK[2] = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0])  # a one-token completion


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(3, 8, generator=g) * MASK
    values = torch.randn(3, 8, generator=g) * MASK
    return rewards, values


def reference_gae(rewards, values, mask, gamma, lam):
    """The textbook loop, one row at a time over its completion tokens only (as plain Python lists)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        ts = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r, v = [rewards[b, t].item() for t in ts], [values[b, t].item() for t in ts] + [0.0]  # V after the end = 0
        a = 0.0
        for i in reversed(range(len(ts))):
            delta = r[i] + gamma * v[i + 1] - v[i]
            a = delta + gamma * lam * a
            adv[b, ts[i]] = a
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.7, 0.0)])
def test_gae_equals_reference_loop(gamma, lam):
    rewards, values = random_case()
    adv, returns = gae(rewards, values, MASK, gamma, lam)
    assert torch.allclose(adv, reference_gae(rewards, values, MASK, gamma, lam), atol=1e-5)
    assert torch.allclose(returns, (adv + values) * MASK)
    assert (adv[MASK == 0] == 0).all() and (returns[MASK == 0] == 0).all()


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards, values = random_case(1)
    gamma = 0.9
    adv, returns = gae(rewards, values, MASK, gamma, 1.0)
    for b in range(3):
        ts = MASK[b].nonzero().flatten().tolist()
        for i, t in enumerate(ts):
            ret = sum(gamma ** (j - i) * rewards[b, ts[j]].item() for j in range(i, len(ts)))
            assert adv[b, t].item() == pytest.approx(ret - values[b, t].item(), abs=1e-5)
            assert returns[b, t].item() == pytest.approx(ret, abs=1e-5)  # lambda = 1: G_t is the Monte Carlo return


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values = random_case(2)
    gamma = 0.8
    adv, _ = gae(rewards, values, MASK, gamma, 0.0)
    for b in range(3):
        ts = MASK[b].nonzero().flatten().tolist()
        for i, t in enumerate(ts):
            next_v = values[b, ts[i + 1]].item() if i + 1 < len(ts) else 0.0
            assert adv[b, t].item() == pytest.approx(rewards[b, t].item() + gamma * next_v - values[b, t].item(), abs=1e-6)


def test_gae_ignores_whatever_sits_off_the_mask():
    rewards, values = random_case(3)
    junk = torch.randn(3, 8) * 100 * (1 - MASK)
    a, g = gae(rewards, values, MASK, 0.95, 0.9)
    b, h = gae(rewards + junk, values + junk, MASK, 0.95, 0.9)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(g, h, atol=1e-5)


def test_masked_whitening():
    x = torch.randn(3, 8) * 3 + 5
    w = whiten(x, MASK)
    on = w[MASK == 1]
    assert on.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert on.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[MASK == 0] == 0).all()
    junk = x + torch.randn(3, 8) * 100 * (1 - MASK)  # off-mask values must not enter the statistics
    assert torch.allclose(whiten(junk, MASK), w, atol=1e-5)
    # by hand: entries 1, 3 -> mean 2, std 1 -> -1, +1
    assert whiten(torch.tensor([[1.0, 9.0, 3.0]]), torch.tensor([[1.0, 0.0, 1.0]]))[0].tolist() == pytest.approx(
        [-1.0, 0.0, 1.0], abs=1e-6)


def test_clipped_value_loss_by_hand():
    old, returns = torch.full((4,), 1.0), torch.full((4,), 2.0)
    values = torch.tensor([1.5, 1.1, 0.5, 3.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # 1.5: unclipped (0.5)^2 = 0.25, clipped to 1.2: (0.8)^2 = 0.64 -> the clipped (larger) one: 0.32
    # 1.1: inside the range, both 0.81 -> 0.405, not clipped
    # 0.5: moved away from the target: unclipped 2.25 > clipped (0.8 -> 1.44) -> 1.125
    # 3.0: overshoots: unclipped 1.0, clipped to 1.2: 0.64 -> 0.5
    assert loss.tolist() == pytest.approx([0.32, 0.405, 1.125, 0.5], abs=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_kl_penalty_only_on_completion_tokens_and_score_on_the_last():
    g = torch.Generator().manual_seed(4)
    logp, ref = -torch.rand(3, 8, generator=g), -torch.rand(3, 8, generator=g)
    scores = torch.tensor([1.0, -2.0, 0.5])
    rewards, kl = token_rewards(scores, logp, ref, MASK, kl_coef=0.1)
    want = -0.1 * (logp - ref) * MASK
    for b, last in enumerate([5, 7, 1]):
        want[b, last] += scores[b]
    assert torch.allclose(rewards, want, atol=1e-6)
    assert (rewards[MASK == 0] == 0).all()  # nothing on prompt or padding positions
    assert torch.allclose(kl, (logp - ref) * MASK)
    assert torch.allclose(rewards.sum(1), scores - 0.1 * kl.sum(1), atol=1e-6)


def test_adaptive_kl_controller_by_hand():
    # KL above target by 50%: the error is clipped to +0.2 -> beta (1 + 0.2 * 64 / 10000)
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 10% below target: error -0.1
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 100, 1000) == pytest.approx(0.1)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    # residuals (0.5, 0, -0.5): var 1/6 vs var(G) 2/3 -> 0.75
    assert explained_variance(torch.tensor([[0.5, 2.0, 3.5, 0.0]]), returns, mask) == pytest.approx(0.75)


def test_first_update_gradients_are_token_mean_policy_gradient_and_value_regression(monkeypatch):
    """ppo_update's first minibatch step (ratio 1, values unmoved): policy gradient = -1/N sum_t A_t grad log pi(y_t),
    critic gradient = grad of 1/N sum_t 0.5 (V_t - G_t)^2, N = completion tokens; masked positions give nothing."""
    from reward_model import RewardModel
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    policy, critic = Transformer(cfg), RewardModel(cfg)
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    x, y = torch.randint(0, 40, (3, 8)), torch.randint(0, 40, (3, 8))
    with torch.no_grad():
        data = {"x": x, "y": y, "mask": MASK, "lengths": [8, 8, 8], "logp": naive_logprobs(policy(x), y),
                "values": critic(x) * MASK, "adv": torch.randn(3, 8) * MASK, "returns": torch.randn(3, 8) * MASK}
    grads = {}

    def record(run, model, optimizer, lr):
        grads[model] = [p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad()
        return 0.0, False
    monkeypatch.setattr(ppo, "optimizer_step", record)
    args = ppo.parse_args(["--ppo_epochs", "1", "--n_minibatches", "1", "--batch_size", "4", "--device", "cpu"])
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (policy, critic)]
    ppo.ppo_update(Run(args, "ppo"), args, 0, policy, critic, *opts, data)
    n = MASK.sum()
    (-(data["adv"] * naive_logprobs(policy(x), y) * MASK).sum() / n).backward()
    (0.5 * ((critic(x) - data["returns"]) ** 2 * MASK).sum() / n).backward()
    for model in (policy, critic):
        for got, p in zip(grads[model], model.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-6)


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "ppo.py", "--help"], capture_output=True, text=True, check=True).stdout
    for action in ppo.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[-1] in out


def test_batch_not_divisible_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        ppo.parse_args(["--batch_size", "10", "--group_size", "4"])
    assert "--batch_size 10 is not divisible by --group_size 4" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end (short runs in a subprocess)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A tiny random byte-level policy folder (what sft.py writes, untrained)."""
    folder = tmp_path_factory.mktemp("policy")
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(folder, tokenizer=tok)
    return folder


TINY = ["--device", "cpu", "--batch_size", "4", "--max_new_tokens", "8", "--heldout_problems", "4",
        "--warmup_steps", "1", "--micro_batch_tokens", "256"]


def run_ppo(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "ppo.py", *TINY, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_fsdp_two_processes_with_different_micro_batch_counts(tiny_policy, tmp_path):
    """--fsdp shards policy and critic; with 4 rollouts per rank in one minibatch and 80-token micro-batches the
    ranks cut their minibatches into different numbers of micro-batches (3 and 4 at the first step), which hangs
    without Run.lockstep's idle passes."""
    proc = run_ppo(["--model", str(tiny_policy), "--out", str(tmp_path), "--max_steps", "2", "--fsdp", "--batch_size",
                    "8", "--n_minibatches", "1", "--micro_batch_tokens", "80"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "policy_loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["value_loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    Transformer.from_pretrained(tmp_path / "final")


@pytest.mark.slow
def test_ddp_two_processes(tiny_policy, tmp_path):
    proc = run_ppo(["--model", str(tiny_policy), "--out", str(tmp_path), "--max_steps", "2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert 0 <= summary["heldout_acc_before"] <= 1 and 0 <= summary["heldout_acc_after"] <= 1
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "policy_loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["value_loss"]) and r["kl"] >= -1e-3 for r in train)
    assert (tmp_path / "final" / "model.safetensors").exists()
    ckpt = sorted(tmp_path.glob("ckpt-*"))[-1]  # policy at the top, critic in critic/, both optimizers
    assert (ckpt / "critic" / "config.json").exists() and (ckpt / "optimizer_critic.safetensors").exists()
    for folder in (ckpt, ckpt / "critic", tmp_path / "final"):  # critic folders are shared like policy folders
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {f.stat().st_mode & 0o777 for f in folder.iterdir() if f.is_file()} == {0o644}, folder
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (Transformer.from_pretrained(tmp_path / "final")(x) - ref(x).logits).abs().max() < 1e-4
    transformers.AutoModelForSequenceClassification.from_pretrained(ckpt / "critic")  # the critic is an HF folder too


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tiny_policy, tmp_path):
    common = ["--model", str(tiny_policy), "--out", str(tmp_path), "--save_every", "1", "--target_kl", "1"]
    assert run_ppo([*common, "--max_steps", "2"]).returncode == 0
    (tmp_path / "final").rename(tmp_path / "first_final")
    proc = run_ppo([*common, "--max_steps", "3", "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2, 3]
    # the adaptive KL coefficient carries over: step 3 uses the value that step 2's KL gave
    train = [r for r in rows if "policy_loss" in r]
    assert train[2]["kl_coef"] == pytest.approx(adaptive_kl_coef(train[1]["kl_coef"], train[1]["kl"], 1.0, 4, 10000),
                                                rel=1e-12)
    assert train[2]["kl_coef"] != train[0]["kl_coef"]
    before = json.loads((tmp_path / "summary.json").read_text())["heldout_acc_before"]
    assert before == rows[0]["heldout_acc"]


@pytest.mark.slow
def test_no_argument_run_raises_heldout_accuracy(tmp_path):
    """`python ppo.py` exactly as a user runs it (only --out moved): the committed tiny checkpoint with the
    verifier's reward must gain held-out greedy accuracy well beyond the noise of 500 problems (~2 points)."""
    subprocess.run([sys.executable, "ppo.py", "--out", str(tmp_path)], check=True, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout_problems"] == 500
    assert summary["heldout_acc_after"] - summary["heldout_acc_before"] >= 0.10, summary
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "policy_loss", "value_loss", "clip_frac", "value_clip_frac", "explained_variance",
            "entropy", "completion_len_mean", "gen_s", "train_s"} <= set(rows[1])
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "curve.png").exists()


@pytest.mark.slow
def test_reward_model_replaces_the_verifier(tmp_path):
    """--reward_model DIR --accuracy_weight 0 --format_weight 0: the reward is the learned score (real-valued), not the
    verifier's 0 / 0.1 / 1 / 1.1; accuracy is still logged."""
    subprocess.run([sys.executable, "reward_model.py", "--max_steps", "3", "--batch_size", "8", "--out",
                    str(tmp_path / "rm")], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = run_ppo(["--reward_model", str(tmp_path / "rm" / "final"), "--out", str(tmp_path / "ppo"), "--max_steps", "2",
                    "--eval_every", "0", "--accuracy_weight", "0", "--format_weight", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert all(r["reward"] == pytest.approx(r["reward_reward_model"]) and "accuracy" in r for r in rows if "reward" in r)
    # the verifier's mean over 4 samples is a multiple of 0.025 (each is 0, 0.1, 1 or 1.1); a learned score is not
    assert not any(abs(r * 40 - round(r * 40)) < 1e-4 for r in rewards), rewards


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.0)])
def test_gae_skips_a_tool_observation_as_if_it_were_not_there(gamma, lam):
    """A completion with an observation span (mask 0 between model tokens): the advantages and returns of the model's
    tokens are those of the same completion with the span removed; the span gets none."""
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 10), torch.randn(2, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.float)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        keep = mask[row].bool()
        want_adv, want_ret = gae(rewards[row, keep][None], values[row, keep][None], mask[row, keep][None], gamma, lam)
        assert torch.allclose(adv[row, keep], want_adv[0], atol=1e-6) and torch.allclose(ret[row, keep], want_ret[0],
                                                                                            atol=1e-6)
        assert (adv[row, ~keep] == 0).all() and (ret[row, ~keep] == 0).all()
