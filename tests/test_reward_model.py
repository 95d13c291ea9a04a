"""reward_model.py: the Bradley-Terry loss and metrics by hand, the saved folder against transformers'
AutoModelForSequenceClassification, save -> load, the tokenizer check, the data, and short end-to-end runs."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import reward_model
from model import ModelConfig, Tokenizer, Transformer
from reward_model import (RewardModel, bt_loss, builtin_pairs, last_token_values, load_pairs, load_reward_model,
                          pad_pairs, pair_ids, pair_stats)
from verify import builtin_problems, format_reward, math_reward

PROMPTS = ["Compute 1+2.", "Compute 7+5-3+8.", "Compute 9-4."]
RESPONSES = ["<think>\n1+2=3\n</think>\n\\boxed{3}", "<think>\n7+5-3+8=17\n</think>\n\\boxed{17}", "5"]


def tiny_config(tok, arch="LlamaForCausalLM", tie=True):
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=tie, architecture=arch, qkv_bias=arch == "Qwen2ForCausalLM",
                       qk_norm=arch == "Qwen3ForCausalLM")


def random_reward_model(tok, **kw):
    torch.manual_seed(0)
    rm = RewardModel(tiny_config(tok, **kw))
    torch.nn.init.normal_(rm.head.weight)  # a fresh head is all zeros: every score would be 0
    return rm


# ------------------------------------------------------------------ the loss and metrics by hand


def test_bt_loss_by_hand_with_and_without_margin():
    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    sig = lambda z: 1 / (1 + math.exp(-z))
    want = [-math.log(sig(1.0)), -math.log(sig(-1.0)), math.log(2.0)]
    assert bt_loss(rc, rr).tolist() == pytest.approx(want, abs=1e-6)
    # margin m: -log sigmoid(r_c - r_r - m), per pair
    want = [-math.log(sig(0.5)), -math.log(sig(-1.5)), -math.log(sig(-2.0))]
    assert bt_loss(rc, rr, torch.tensor([0.5, 0.5, 2.0])).tolist() == pytest.approx(want, abs=1e-6)
    assert bt_loss(rc, rr, 0.5)[:2].tolist() == pytest.approx(want[:2], abs=1e-6)


def test_pair_accuracy_and_gap_by_hand():
    stats = pair_stats(torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, -1.0]))
    assert stats["correct"] == 2.0  # the tie (1.0 vs 1.0) is not a win
    assert stats["gap"] == pytest.approx(1.0 - 1.0 + 0.0 + 6.0)


def test_score_is_read_at_the_last_token_with_any_padding():
    values = torch.arange(12.0).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert last_token_values(values, right).tolist() == [2.0, 11.0]
    assert last_token_values(values, left).tolist() == [5.0, 10.0]


# ------------------------------------------------------------------ the saved folder


@pytest.mark.parametrize("arch,tie", [("LlamaForCausalLM", True), ("Qwen2ForCausalLM", False),
                                      ("Qwen3ForCausalLM", True)])
def test_transformers_sequence_classification_gives_the_same_scores(tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.byte_level()
    rm = random_reward_model(tok, arch=arch, tie=tie)
    rm.save_pretrained(tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [arch.replace("ForCausalLM", "ForSequenceClassification")]
    assert config["num_labels"] == 1 and config["pad_token_id"] == tok.pad_token_id
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == config["architectures"][0]
    ids, mask = pad_pairs([pair_ids(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)], tok.pad_token_id)
    assert mask[:, -1].tolist().count(0) == 2  # right padding, with the pad token, on two rows
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask).logits.squeeze(-1)
    ours = load_reward_model(tmp_path).score(PROMPTS, RESPONSES)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert ours.std() > 0


def test_save_load_gives_the_same_scores(tmp_path):
    tok = Tokenizer.byte_level()
    rm = random_reward_model(tok, tie=False)
    rm.tokenizer = tok
    before = rm.score(PROMPTS, RESPONSES)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    loaded = load_reward_model(tmp_path / "rm", tokenizer_of_policy=tok)
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), before)
    assert not any(p.requires_grad for p in loaded.parameters())
    # the same scores one at a time: padding does not change a score
    assert torch.allclose(torch.cat([loaded.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)]), before, atol=1e-5)


def test_init_from_a_causal_lm_keeps_the_backbone_and_zeroes_the_head(tmp_path):
    tok = Tokenizer.byte_level()
    torch.manual_seed(1)
    lm = Transformer(tiny_config(tok, tie=False))
    lm.save_pretrained(tmp_path, tokenizer=tok)
    rm = RewardModel.from_pretrained(tmp_path)
    x = torch.randint(0, tok.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(rm.backbone.hidden(x), lm.hidden(x))
        assert (rm(x) == 0).all()
    assert not any(n.startswith("lm_head") or p is lm.lm_head.weight for n, p in rm.named_parameters())


def test_mismatched_tokenizer_is_refused_naming_both_folders(tmp_path):
    tok = Tokenizer.byte_level()
    random_reward_model(tok).save_pretrained(tmp_path / "rm", tokenizer=tok)
    Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>")).save_pretrained(
        tmp_path / "policy")
    other = Tokenizer.from_pretrained(tmp_path / "policy")
    with pytest.raises(ValueError) as e:
        load_reward_model(tmp_path / "rm", tokenizer_of_policy=other)
    assert str(tmp_path / "rm") in str(e.value) and str(tmp_path / "policy") in str(e.value)
    assert "tokenizer" in str(e.value)
    load_reward_model(tmp_path / "rm", tokenizer_of_policy=Tokenizer.from_pretrained(tmp_path / "rm"))  # same: fine


# ------------------------------------------------------------------ data


def test_builtin_pairs_chosen_is_right_and_rejected_is_wrong():
    pairs = builtin_pairs("train", 600, kinds=",".join(reward_model.KINDS))
    assert len(pairs) == 600 and {p["kind"] for p in pairs} == set(reward_model.KINDS)
    answers = {p["prompt"]: p["answer"] for p in builtin_problems("train", 1200)}
    for p in pairs:
        gold = answers[p["prompt"]]
        assert math_reward(p["chosen"], gold) == 1.0 and format_reward(p["chosen"]) == 1.0
        assert p["rejected"] != p["chosen"]
        if p["kind"] == "malformed":
            assert format_reward(p["rejected"]) == 0.0
        else:  # well formed, wrong answer
            assert format_reward(p["rejected"]) == 1.0 and math_reward(p["rejected"], gold) == 0.0
        if p["kind"] == "lazy":  # the chosen side shows two or more steps, the rejected one a single equation
            assert p["chosen"].count("=") >= 2 and p["rejected"].count("=") == 1


def test_builtin_default_kinds_and_unknown_kind():
    assert {p["kind"] for p in builtin_pairs("train", 200)} == set(reward_model.DEFAULT_KINDS.split(","))
    with pytest.raises(ValueError, match="unknown preference kinds"):
        builtin_pairs("train", 10, kinds="lazy,sloppy")


def test_builtin_pairs_splits_are_disjoint_and_seeded():
    train, heldout = builtin_pairs("train", 2000), builtin_pairs("heldout", 300)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert builtin_pairs("heldout", 300) == heldout


def test_load_pairs_strings_and_messages_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": 1}) + "\n\n" +
                 json.dumps({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                             "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}) + "\n")
    pairs = load_pairs(f)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Hi"}] and pairs[0]["margin"] == 1
    assert pairs[1]["chosen"] == [{"role": "assistant", "content": "x"}] and pairs[1]["margin"] is None
    tok = Tokenizer.byte_level()
    (c, r, m, _), = reward_model.tokenize_pairs(tok, pairs[1:], 1024, margin=0.25)[0]
    assert m == 0.25 and tok.decode(c).startswith("<|im_start|>system\nS<|im_end|>") and tok.decode(c).endswith("x<|im_end|>\n")
    f.write_text(json.dumps({"prompt": "Hi", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: needs 'chosen' and 'rejected'"):
        load_pairs(f)
    f.write_text("\n" + json.dumps({"prompt": "Hi", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a string or a list"):
        load_pairs(f)


def test_export_builtin_round_trips(tmp_path):
    subprocess.run([sys.executable, "reward_model.py", "--export_builtin", str(tmp_path), "--builtin_size", "50",
                    "--heldout_pairs", "10"], check=True, capture_output=True)
    pairs = load_pairs(tmp_path / "builtin_pref_train.jsonl")
    assert len(pairs) == 50 and len(load_pairs(tmp_path / "builtin_pref_heldout.jsonl")) == 10
    assert pairs[0]["chosen"][0]["content"] == builtin_pairs("train", 1)[0]["chosen"]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "reward_model.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for action in reward_model.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[-1] in out


# ------------------------------------------------------------------ end to end (short runs in a subprocess)


def two_process_run(tmp_path, *flags):
    """reward_model.py for 2 steps on 2 gloo processes from a tiny random 1-layer policy; returns (tokenizer, the
    command's arguments after the script name)."""
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    cfg.num_hidden_layers = 1
    Transformer(cfg).save_pretrained(tmp_path / "policy", tokenizer=tok)
    args = ["--device", "cpu", "--max_steps", "2", "--model", str(tmp_path / "policy"), "--out", str(tmp_path / "out"),
            "--builtin_size", "16", "--heldout_pairs", "8", "--batch_size", "4", "--warmup_steps", "1", *flags]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "reward_model.py", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tok, args


@pytest.mark.slow
def test_fsdp_two_processes_with_different_micro_batch_counts(tmp_path):
    """--fsdp with 400-token micro-batches: the ranks' pairs differ in length, so at some step one rank has more
    micro-batches than the other (checked by hand), which hangs without Run.lockstep's idle passes."""
    tok, _ = two_process_run(tmp_path, "--fsdp", "--micro_batch_tokens", "400")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and math.isfinite(summary["heldout_loss"])
    load_reward_model(tmp_path / "out" / "final", tokenizer_of_policy=tok)


@pytest.mark.slow
def test_ddp_two_processes_train_save_and_load(tmp_path):
    tok, args = two_process_run(tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["heldout_pairs"] == 8
    assert 0.0 <= summary["heldout_pair_acc"] <= 1.0 and math.isfinite(summary["heldout_loss"])
    rm = load_reward_model(tmp_path / "out" / "final", tokenizer_of_policy=tok)
    assert rm.score(PROMPTS, RESPONSES).abs().sum() > 0  # the head moved off zero
    # continue the same run for one more step on one process, from the checkpoint the DDP run left
    cmd = [sys.executable, "reward_model.py", *args, "--resume", "auto"]
    cmd[cmd.index("--max_steps") + 1] = "3"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_no_argument_run_reaches_90_percent_heldout_pair_accuracy(tmp_path):
    """`python reward_model.py` exactly as a user runs it (only --out moved), on the built-in preference set."""
    subprocess.run([sys.executable, "reward_model.py", "--out", str(tmp_path)], check=True, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout_pair_acc"] >= 0.90, summary
    assert (tmp_path / "curve.png").exists()
    rm = load_reward_model(tmp_path / "final")
    chosen, rejected = rm.score(["Compute 2+3."] * 2, ["<think>\n2+3=5\n</think>\n\\boxed{5}", "\\boxed{6}"]).tolist()
    assert chosen > rejected


def test_reward_model_and_critic_folders_have_the_modes_of_a_policy_folder(tmp_path):
    """Folders 0755, files 0644 (model.save_folder for both), whatever the umask made of the temporary folder."""
    tok = Tokenizer.byte_level()
    random_reward_model(tok).save_pretrained(tmp_path / "rm", tokenizer=tok)
    Transformer(tiny_config(tok)).save_pretrained(tmp_path / "policy", tokenizer=tok)

    def modes(folder):
        return {p.name: p.stat().st_mode & 0o777 for p in [folder, *folder.iterdir()]}
    rm, policy = modes(tmp_path / "rm"), modes(tmp_path / "policy")
    assert rm["rm"] == policy["policy"] == 0o755
    assert set(rm.values()) == set(policy.values()) == {0o755, 0o644}
