"""LoRA (model.py: adapters driven by the config; common.py: flags, loading, the KL reference, checkpoints): the math
against its formula, what trains and what stays frozen, rollouts that sample the adapted policy, and PEFT / transformers
reading what is saved."""
import argparse
import json

import pytest
import torch

import common
import sample
from model import Linear, LoraConfig, ModelConfig, Tokenizer, Transformer, load_adapter

LORA = LoraConfig(rank=4, alpha=8.0)


def tiny(lora=None, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return Transformer(ModelConfig(**{**cfg, **kw}, lora=lora))


def with_random_adapters(model, scale=0.1):
    """Adapters with nonzero B (a fresh one is 0: the base), as after some training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, scale)
    return model


def test_a_fresh_adapter_is_the_base_and_merging_is_w_plus_scaled_ba():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=True)
    layer = Linear(16, 24, True, LoraConfig(rank=4, alpha=12.0))
    layer.weight, layer.bias = base.weight, base.bias
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.lora_B.normal_()
    want = base(x) + (12.0 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert torch.allclose(layer.merged_weight(), base.weight + 3.0 * layer.lora_B @ layer.lora_A, atol=1e-6)
    assert torch.allclose(torch.nn.functional.linear(x, layer.merged_weight(), layer.bias), want, atol=1e-5)


def test_adapter_gradients_equal_autograd_of_the_explicit_formula():
    torch.manual_seed(0)
    layer = Linear(8, 6, False, LoraConfig(rank=3, alpha=6.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(4, 8), torch.randn(4, 6)
    (layer(x) * g).sum().backward()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    ((x @ layer.weight.detach().T + 2.0 * x @ A.T @ B.T) * g).sum().backward()
    assert torch.allclose(layer.lora_A.grad, A.grad, atol=1e-6) and torch.allclose(layer.lora_B.grad, B.grad, atol=1e-6)


def test_only_adapters_train_and_the_base_stays_bit_identical(tmp_path):
    tok = Tokenizer.byte_level()
    plain = tiny(vocab_size=tok.vocab_size)
    plain.save_pretrained(tmp_path / "base", tokenizer=tok)
    model = Transformer.from_pretrained(tmp_path / "base", lora=LORA)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(trainable) == 2 * 7 * 2 and all(p.dtype == torch.float32 for n, p in model.named_parameters()
                                               if n in trainable)
    args = argparse.Namespace(weight_decay=0.1, lr=1e-2)
    opt = common.make_optimizer(args, model)
    x = torch.randint(0, 200, (2, 12))
    for _ in range(3):
        model(x[:, :-1], targets=x[:, 1:])[0].sum().neg().backward()
        opt.step()
        opt.zero_grad()
    assert {id(p) for p in opt.state} == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_the_reference_of_a_lora_run_is_the_base_and_rollouts_sample_the_adapted_policy(tmp_path):
    """WithoutAdapters(policy) gives the base model's log-probs; generation (eager, and compiled on CPU) samples the
    adapted model: its greedy tokens and the trainer's logits agree after adapters changed; a bf16 rollout copy merges
    the adapters (refreshed in place for the compiled engine)."""
    tok = Tokenizer.byte_level()
    tiny(vocab_size=tok.vocab_size).save_pretrained(tmp_path / "base", tokenizer=tok)
    base = Transformer.from_pretrained(tmp_path / "base")
    policy = with_random_adapters(Transformer.from_pretrained(tmp_path / "base", lora=LORA), 0.3)
    x = torch.randint(0, 200, (2, 10))
    ref = common.WithoutAdapters(policy)
    assert torch.allclose(ref(x[:, :-1], targets=x[:, 1:])[0], base(x[:, :-1], targets=x[:, 1:])[0], atol=1e-6)
    assert not torch.allclose(policy(x), base(x), atol=1e-3)  # the adapters do change the model
    prompts = [[5, 6, 7], [8, 9]]
    greedy = [r.ids for r in sample.generate(policy, prompts, 8, temperature=0)]
    for p, ids in zip(prompts, greedy):  # the trainer's argmax at each step is the token generated
        logits = policy(torch.tensor([p + ids]))[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == ids
    assert [r.ids for r in sample.Engine(policy, compile=True).generate(prompts, 8, temperature=0)] == greedy
    engine = sample.Engine(policy, compile=True, dtype=torch.bfloat16)
    copy = engine.weights()
    merged = {n: w.to(torch.bfloat16) for n, w in policy.merged_weights().items()}
    assert all(torch.equal(p, merged[n]) for n, p in copy.named_parameters())
    with torch.no_grad():
        policy.layers[0].self_attn.q_proj.lora_B.add_(0.5)  # an optimizer step
    again = engine.weights()
    assert again is copy and torch.equal(again.layers[0].self_attn.q_proj.weight,
                                         policy.layers[0].self_attn.q_proj.merged_weight().to(torch.bfloat16))


def test_saved_folder_loads_in_transformers_and_the_adapter_in_peft_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tok = Tokenizer.byte_level()
    tiny(vocab_size=tok.vocab_size, tie_word_embeddings=False).save_pretrained(tmp_path / "base", tokenizer=tok)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    policy = with_random_adapters(Transformer.from_pretrained(tmp_path / "base", lora=lora))
    policy.save_pretrained(tmp_path / "final", tokenizer=tok, base=tmp_path / "base")
    x = torch.randint(0, 200, (2, 9))
    ours = policy(x)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert torch.allclose(merged(x).logits, ours, atol=1e-4)
    config = json.loads((tmp_path / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["q_proj", "v_proj",
                                                                                             "down_proj"]
    on_base = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "final" / "adapter").eval()
    assert torch.allclose(on_base(x).logits, ours, atol=1e-4)
    again = Transformer.from_pretrained(tmp_path / "base", lora=lora)  # --lora_from: our own loader reads it back
    load_adapter(again, tmp_path / "final")
    assert torch.allclose(again(x), ours, atol=1e-6)
    with pytest.raises(ValueError, match="adapters do not match"):
        load_adapter(Transformer.from_pretrained(tmp_path / "base", lora=LORA), tmp_path / "final")


def test_reward_model_adapter_and_head_load_in_peft_as_a_sequence_classifier(tmp_path):
    """A LoRA reward model: adapters on the backbone, the head trained whole (PEFT's modules_to_save); the saved
    adapter loads onto the base as PEFT's SEQ_CLS model with our scores, the merged folder in transformers too."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from reward_model import RewardModel
    tok = Tokenizer.byte_level()
    base = RewardModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        base.head.weight.normal_()
    base.save_pretrained(tmp_path / "base", tokenizer=tok)
    rm = RewardModel.from_pretrained(tmp_path / "base", lora=LORA)
    assert {n for n, p in rm.named_parameters() if p.requires_grad} == {"head.weight"} | {
        n for n, _ in rm.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    with_random_adapters(rm)
    with torch.no_grad():
        rm.head.weight.add_(0.3)
    rm.save_pretrained(tmp_path / "final", tokenizer=tok, base=tmp_path / "base")
    x = torch.randint(3, 200, (2, 7))
    ours = rm(x)[:, -1]
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert torch.allclose(merged(x).logits[:, 0], ours, atol=1e-4)
    seq_cls = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    on_base = peft.PeftModel.from_pretrained(seq_cls, tmp_path / "final" / "adapter").eval()
    assert torch.allclose(on_base(x).logits[:, 0], ours, atol=1e-4)


@pytest.mark.slow
def test_lora_sft_resumes_exactly_and_ranks_match_one_process(tmp_path):
    """sft.py --lora_rank on the committed tiny model: step checkpoints hold the adapters and their optimizer state
    only; a resumed run ends with the uninterrupted run's weights; 2-process DDP and FSDP runs (gradients reduced
    for the adapters only) end with the 1-process weights; the final folder is merged."""
    import os
    import subprocess
    import sys
    from safetensors.torch import load_file
    args = ["--model", "checkpoints/tiny-sft", "--lora_rank", "8", "--lr", "1e-2", "--builtin_size", "200",
            "--batch_size", "8", "--max_steps", "4", "--heldout_problems", "8", "--eval_every", "0",
            "--warmup_steps", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py"]
    run = lambda cmd, out, *more: subprocess.run([*cmd, *args, *more, "--out", str(tmp_path / out)], check=True,
                                                 env=env, capture_output=True, timeout=600)
    run([sys.executable, "sft.py"], "one", "--save_every", "2")
    assert not (tmp_path / "one" / "ckpt-000002" / "model.safetensors").exists()
    assert (tmp_path / "one" / "ckpt-000002" / "adapter" / "adapter_model.safetensors").exists()
    run([sys.executable, "sft.py"], "resumed", "--resume", str(tmp_path / "one" / "ckpt-000002"))
    run(torchrun, "ddp")
    run(torchrun, "fsdp", "--fsdp")
    final = {d: load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "resumed", "ddp", "fsdp")}
    base = load_file("checkpoints/tiny-sft/model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final["one"][q], base[q])  # merged: the adapters moved the weights
    for name in final["one"]:
        assert torch.equal(final["resumed"][name], final["one"][name]), name
        for d in ("ddp", "fsdp"):
            assert torch.allclose(final[d][name], final["one"][name], atol=1e-5), (d, name)


@pytest.mark.slow
def test_lora_grpo_raises_smollm2s_heldout_accuracy(smollm2_dir, tmp_path):
    """The recipe on the real SmolLM2-135M-Instruct, shortened: a cold-start SFT (full fine-tune, as
    tests/recipe_smollm2.py), then GRPO with LoRA (r 16 on every projection, 10x the full fine-tune's learning rate):
    held-out greedy accuracy rises, only the adapters trained, and the merged folder scores what the run says."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TQDM_DISABLE": "1"}
    common_flags = ["--heldout_problems", "64", "--eval_every", "0", "--seed", "0", "--device", "cpu"]
    subprocess.run([sys.executable, "sft.py", "--model", str(smollm2_dir), "--data", "builtin", "--builtin_size", "160",
                    "--max_steps", "10", "--batch_size", "16", "--lr", "1e-4", "--warmup_steps", "2", *common_flags,
                    "--out", str(tmp_path / "sft")], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "grpo.py", "--model", str(tmp_path / "sft" / "final"), "--lora_rank", "16",
                    "--lr", "5e-5", "--max_steps", "6", "--batch_size", "32", "--group_size", "8", "--warmup_steps", "1",
                    "--max_new_tokens", "64", *common_flags, "--out", str(tmp_path / "grpo")],
                   check=True, env=env, capture_output=True)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    # measured: 0.234 -> 0.344 (15 -> 22 of 64 problems) in 6 steps at lr 5e-5 (10x the recipe's full fine-tune rate)
    assert summary["heldout_acc_after"] >= summary["heldout_acc_before"] + 4 / 64, summary
    assert (tmp_path / "grpo" / "final" / "adapter" / "adapter_model.safetensors").exists()
