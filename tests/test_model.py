"""model.py and sample.generate against transformers (the reference), on tiny random checkpoints of every
supported family, plus the real SmolLM2-135M-Instruct when it has been built (see tests/conftest.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

import model  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
import sample  # noqa: E402
from sample import sample_next  # noqa: E402


def generate(*args, **kwargs):
    """sample.generate's completions as token ids, one list per prompt (what these tests compare)."""
    return [r.ids for r in sample.generate(*args, **kwargs)]


COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "qwen2-bias-untied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3-qknorm-headdim": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
    # weights of 2^18+ elements: decoding on CPU takes model.Linear's batched row-block path
    "qwen2-wide": lambda: Qwen2Config(**{**COMMON, "hidden_size": 512, "intermediate_size": 1024,
                                         "num_attention_heads": 8}, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its safetensors folder, folder)."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(FAMILIES[request.param](), dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, Transformer.from_pretrained(folder, dtype=torch.float32), folder


def test_logits_match_transformers(pair):
    ref, ours, _ = pair
    x = torch.randint(0, 300, (3, 37))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_padded_logits_match_transformers(pair):
    ref, ours, _ = pair
    x = torch.randint(0, 300, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    with torch.no_grad():
        a, b = ref(x, attention_mask=mask).logits, ours(x, mask)
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4
    assert torch.isfinite(b).all()  # padding rows must not produce NaN


def test_greedy_generation_matches_transformers(pair):
    ref, ours, _ = pair
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (4, 9, 1)]
    for p, got in zip(prompts, generate(ours, prompts, 24, temperature=0)):
        want = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist()
        assert got == want


def test_cached_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    prompt = torch.randint(3, 300, (1, 7))
    new = generate(ours, prompt.tolist(), 12, temperature=0)[0]
    full = torch.cat([prompt, torch.tensor([new])], dim=1)
    with torch.no_grad():
        logits = ours(full)
    assert logits[0, 6:-1].argmax(-1).tolist() == new  # each cached step chose the full forward's argmax


def test_mixed_length_batch_equals_each_alone(pair):
    _, ours, _ = pair
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (2, 13, 6, 6)]
    batched = generate(ours, prompts, 16, temperature=0)
    assert batched == [generate(ours, [p], 16, temperature=0)[0] for p in prompts]


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max().item() <= 1e-4
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]


def test_sharded_checkpoint_loads(pair, tmp_path):
    ref, ours, folder = pair
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((folder / "config.json").read_text())
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, shard_dir / fname)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = Transformer.from_pretrained(shard_dir, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), ours.state_dict().values()))
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():  # MKL's rounding can depend on how the tensors are aligned in memory: not bit-equal
        assert (sharded(x) - ours(x)).abs().max().item() <= 1e-5


def test_save_pretrained_shards_large_models(tmp_path):
    import model as model_module
    m = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    state = {model_module.hf_name(n): p.detach() for n, p in m.named_parameters()}
    model_module.write_safetensors(state, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = model_module.read_safetensors(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes_load_and_run(pair, dtype):
    _, _, folder = pair
    m = Transformer.from_pretrained(folder, dtype=dtype)
    assert m.embed_tokens.weight.dtype == dtype and m.lm_head.weight.dtype == dtype
    out = generate(m, [[5, 6, 7]], 5, temperature=0)
    assert len(out[0]) == 5


def test_fresh_model_roundtrip_keeps_tied_embeddings(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    m = Transformer(cfg)
    assert m.lm_head.weight is m.embed_tokens.weight
    m.save_pretrained(tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    back = Transformer.from_pretrained(tmp_path / "m")
    assert back.lm_head.weight is back.embed_tokens.weight
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


# ------------------------------------------------------------------ bad input


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_missing_weights_file_names_the_folder(pair, tmp_path):
    _, _, folder = pair
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle!")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(pair, tmp_path, damage):
    _, _, folder = pair
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 64)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'model.safetensors'}: not a readable safetensors file"):
        Transformer.from_pretrained(tmp_path)


def test_a_truncated_checkpoint_is_one_line_from_a_script(tmp_path):
    """What a user sees: `error: <file>: ...` and a non-zero exit, not a traceback."""
    import subprocess
    import sys
    from model import ModelConfig, Tokenizer
    tok = Tokenizer.byte_level()
    Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path, tokenizer=tok)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "sample.py", "--model", str(tmp_path), "--max_new_tokens", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'model.safetensors'}: not a readable")


def test_unsupported_architecture_lists_supported(pair, tmp_path):
    _, _, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        Transformer.from_pretrained(tmp_path)


def test_missing_tensor_is_named(pair, tmp_path):
    _, _, folder = pair
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(pair, tmp_path):
    _, _, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    stored, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"gate_proj.weight has shape \({stored}, {hidden}\), config.json implies \(96, {hidden}\)"):
        Transformer.from_pretrained(tmp_path)


def test_missing_config_field_is_named(pair, tmp_path):
    _, _, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: missing required field 'hidden_size'"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_dtype_is_a_clear_error(pair):
    _, _, folder = pair
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Transformer.from_pretrained(folder, dtype="float8")


# ------------------------------------------------------------------ sampling and log-prob helpers


def test_top_k_one_is_greedy():
    logits = torch.randn(6, 40)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.2: top_p=0.6 keeps the first two tokens only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, top_p=0.6, generator=g), minlength=3)
    assert counts[2] == 0 and abs(counts[0] / 4000 - 0.625) < 0.03


def test_same_seed_same_samples_and_stop_token_ends_each_row(pair):
    _, ours, _ = pair
    prompts = [[5, 6], [7, 8, 9, 10]]
    a = generate(ours, prompts, 20, temperature=1.0, seed=3)
    assert a == generate(ours, prompts, 20, temperature=1.0, seed=3)
    stop = a[0][3]
    b = generate(ours, prompts, 20, temperature=1.0, seed=3, stop_token_ids=[stop])
    assert b[0] == a[0][: a[0].index(stop) + 1]


def test_logits_from_skips_only_the_leading_positions(pair):
    _, ours, _ = pair
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(x, logits_from=5), ours(x)[:, 5:])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logprobs_and_gradients_match_transformers(pair, checkpointing):
    """The prompts= mode (each prompt forwarded once for all of its completions): log-probs, entropies and every
    parameter's gradient equal transformers' on each prompt + completion alone. Prompts of three lengths, completions
    of 1 to 4 tokens (a 1-token one beside longer ones), one prompt with a single sample, right padding in both."""
    ref, ours, _ = pair
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    samples = [([20, 21, 22], 0), ([23], 0), ([24, 25, 26, 27], 1), ([28, 29], 2), ([30, 31, 32], 2)]
    prompt_ids = torch.zeros(3, 5, dtype=torch.long)
    completions = torch.zeros(len(samples), 4, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, :len(p)] = torch.tensor(p)
    for i, (c, _) in enumerate(samples):
        completions[i, :len(c)] = torch.tensor(c)
    lens, rows = torch.tensor([5, 2, 3]), torch.tensor([g for _, g in samples])
    torch.manual_seed(1)
    wl, we = torch.randn(len(samples), 4), torch.randn(len(samples), 4)  # a loss that weighs every token
    ours.zero_grad()
    ref.zero_grad()
    ours.grad_checkpointing, ours.training = checkpointing, True
    try:
        logp, entropy = ours(completions, prompts=(prompt_ids, lens, rows))
    finally:
        ours.grad_checkpointing, ours.training = False, False
    loss, ref_loss = 0.0, 0.0
    for i, (c, g) in enumerate(samples):
        z = ref(torch.tensor([prompts[g] + c])).logits[0, len(prompts[g]) - 1:-1].log_softmax(-1)  # [len(c), V]
        want_logp, want_entropy = z[torch.arange(len(c)), c], -(z.exp() * z).sum(-1)
        assert (logp[i, :len(c)] - want_logp).abs().max() < 1e-4
        assert (entropy[i, :len(c)] - want_entropy).abs().max() < 1e-4
        n = len(c)
        loss = loss + (logp[i, :n] * wl[i, :n] + entropy[i, :n] * we[i, :n]).sum()
        ref_loss = ref_loss + (want_logp * wl[i, :n] + want_entropy * we[i, :n]).sum()
    loss.backward()
    ref_loss.backward()
    want = {n.removeprefix("model."): p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        assert (p.grad - want[name]).abs().max() <= 1e-4 * want[name].abs().max() + 1e-7, name
    ours.zero_grad()


@pytest.mark.parametrize("shape", [(1, 512), (16, 512), (3, 7, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_row_block_path_equals_f_linear(shape, bias, monkeypatch):
    torch.manual_seed(0)
    lin = model.Linear(512, 1024, bias=bias)
    x = torch.randn(shape)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    monkeypatch.setattr(model.F, "linear", None)  # the inference path must not fall back to F.linear
    with torch.inference_mode():
        got = lin(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got - want).abs().max().item() <= 1e-5
