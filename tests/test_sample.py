"""sample.py's command line: evaluation (pass@k, maj@k), checkpoint comparison, streaming chat."""
import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

import sample
from common import Run
from model import ModelConfig, Tokenizer, Transformer
from verify import builtin_problems


def cpu_run(tmp_path):
    return Run(argparse.Namespace(device="cpu", dtype=None, out=str(tmp_path), compile_decode="off"), "test")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    eos_token_id=tok.eos_token_id))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, tokenizer=tok)
    return folder


def fake_generate(texts):
    """A stand-in for Engine.generate that returns the given completions in order (and stops each with eos)."""
    tok = Tokenizer.byte_level()
    queue = list(texts)

    def gen(engine, prompts, max_new_tokens, *args, **kw):
        ids = [tok.encode(queue.pop(0)) + [tok.eos_token_id] for _ in prompts]
        return [sample.Rollout(p, i, [1] * len(i), [0.0] * len(i), "eos") for p, i in zip(prompts, ids)]
    return gen


def test_evaluate_pass_and_majority_by_hand(monkeypatch, tmp_path):
    problems = [{"prompt": "a", "answer": "5"}, {"prompt": "b", "answer": "1/2"}]
    completions = ["\\boxed{5}", "\\boxed{4}", "\\boxed{4}", "\\boxed{5}",  # problem 0: 2 of 4 correct, vote tie 5/4
                   "\\boxed{2}", "<think>x</think>\\boxed{0.5}", "\\boxed{0.5}", "no answer"]  # problem 1: 2 of 4
    monkeypatch.setattr(sample.Engine, "generate", fake_generate(completions))
    model = Transformer(ModelConfig(vocab_size=262, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                    num_attention_heads=1, num_key_value_heads=1))
    s = sample.evaluate(cpu_run(tmp_path), sample.Engine(model), Tokenizer.byte_level(), problems, n=4, batch_size=3,
                        samples_file=tmp_path / "s.jsonl")
    assert s["pass@1"] == 0.5
    assert s["pass@2"] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))  # 5/6 for both problems
    assert s["pass@4"] == 1.0
    assert s["maj@1"] == 0.5  # first samples: 5 (right), 2 (wrong)
    assert s["maj@2"] == 0.5  # ties go to the first answer seen: 5 (right), 2 (wrong)
    assert s["maj@4"] == 1.0  # problem 0: 5 vs 4 tie, 5 seen first; problem 1: 0.5 (= 1/2) twice
    assert s["well_formed"] == 1 / 8
    rows = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1, 0, 0, 1, 0, 1, 1, 0] and rows[7]["answer"] is None


def test_eval_cli_compares_checkpoints_on_the_same_problems(tiny_dir, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "q1", "answer": "x #### 3"}) + "\n" + json.dumps({"problem": "q2", "solution": "\\boxed{4}"}) + "\n")
    import shutil
    a, b = tmp_path / "a" / "final", tmp_path / "b" / "final"  # same folder name, different runs
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    results = sample.main(["--eval", str(data), "--compare", str(a), str(b), "--n", "2",
                           "--max_new_tokens", "4", "--out", str(tmp_path / "ev")])
    table = capsys.readouterr().out
    assert "| pass@2 |" in table and "| maj@2 |" in table and str(a) in table and str(b) in table
    assert list(results) == [str(a), str(b)] and results[str(a)] == results[str(b)]  # same weights, same seeds
    assert len(list((tmp_path / "ev").glob("*/summary.json"))) == 2


def test_eval_builtin_uses_the_heldout_split():
    problems = sample.load_eval_problems("builtin", sample.PROMPT_TEMPLATE)
    assert len(problems) == 500 and problems[0]["prompt"].startswith("Compute ")


def test_file_questions_get_the_prompt_template(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    (p,) = sample.load_eval_problems(str(data), "Q: {question} Box it.")
    assert p["prompt"] == "Q: What is 2+2? Box it."


def test_chat_cli_streams_a_completion(tiny_dir, capsys):
    sample.main(["--model", str(tiny_dir), "--prompt", "Compute 1+2.", "--max_new_tokens", "5"])
    captured = capsys.readouterr()
    assert "tok/s" in captured.err


@pytest.fixture(scope="module")
def two_eos_dir(tmp_path_factory):
    """A checkpoint whose generation_config.json lists two eos ids, the tokenizer's and token 0 (as Llama 3.1 lists
    end_of_text, eom and eot), and that emits token 0 with probability ~1 at any temperature: every embedding is the
    same vector and the blocks add nothing, so the final hidden state is that vector everywhere, and only lm_head row
    0 points along it (logit 50, all others 0). A rollout that honours generation_config stops after one token; one
    that stops only at the tokenizer's eos runs to max_new_tokens."""
    tok = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    eos_token_id=tok.eos_token_id, max_position_embeddings=512,
                                    tie_word_embeddings=False))
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1.0)
        for block in model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[0] = 50.0 / 32  # hidden = ones(32) after the norm: logit 50 for token 0
    model.generation_config = {"eos_token_id": [tok.eos_token_id, 0]}
    folder = tmp_path_factory.mktemp("two_eos")
    model.save_pretrained(folder, tokenizer=tok)
    return folder


def test_rollout_stops_at_every_generation_config_eos(two_eos_dir, tmp_path):
    tok, model = Tokenizer.from_pretrained(two_eos_dir), Transformer.from_pretrained(two_eos_dir)
    assert json.loads((two_eos_dir / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id, 0]
    assert sample.stop_token_ids(model, tok) == sorted({0, tok.eos_token_id})
    prompts = [sample.prompt_ids(tok, "Compute 1+2."), sample.prompt_ids(tok, "Compute 10+20-3.")]
    records = sample.rollout(cpu_run(tmp_path), sample.Engine(model), tok, prompts, 8)
    assert [(r.ids, r.text, r.stop) for r in records] == [([0], "", "eos")] * 2
    model.generation_config = {}  # only the tokenizer's eos: the same rows now run to the limit
    records = sample.rollout(cpu_run(tmp_path), sample.Engine(model), tok, prompts, 8)
    assert [(r.ids, r.stop, r.truncated) for r in records] == [([0] * 8, "length", True)] * 2


def test_every_script_stops_its_rollouts_at_generation_config_eos(two_eos_dir, tmp_path):
    """The no-argument paths of evaluation, grpo.py, ppo.py and distill.py (one short step each) on the two-eos
    checkpoint: every completion is the one stop token."""
    small = ["--heldout_problems", "4", "--max_steps", "1", "--eval_every", "0", "--device", "cpu"]
    runs = {"sample": ["sample.py", "--model", str(two_eos_dir), "--eval", "builtin", "--limit", "4", "--n", "2"],
            "grpo": ["grpo.py", "--model", str(two_eos_dir), "--batch_size", "4", "--group_size", "2", *small],
            "ppo": ["ppo.py", "--model", str(two_eos_dir), "--batch_size", "4", *small],
            "distill": ["distill.py", "--teacher", str(two_eos_dir), "--traces_only", "--num_prompts", "4",
                        "--heldout_problems", "4", "--device", "cpu"]}
    for name, cmd in runs.items():
        subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / name)], check=True, capture_output=True)
    assert json.loads((tmp_path / "sample" / "summary.json").read_text())["max_length"] == 1
    for name in ("grpo", "ppo"):
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [(r["completion_len_max"], r["truncated_frac"]) for r in rows if "reward" in r] == [(1, 0.0)], name
        assert all(r["heldout_mean_length"] == 1 for r in rows if "heldout_mean_length" in r), name
    stats = json.loads((tmp_path / "distill" / "traces.stats.json").read_text())
    assert stats["mean_sample_len"] == 1 and stats["truncated_frac"] == 0


@pytest.mark.slow
def test_compiled_decode_step_generates_what_eager_does_and_compiles_once():
    """--compile_decode: the decode step compiled with symbolic shapes samples the same tokens as the eager loop, is
    compiled once for every batch bucket and attention length (a compile per shape would hit torch's limit of 8 and
    silently run eager), and keeps its KV cache between calls, so CUDA graphs replay on the addresses they were
    captured with (a larger call grows it once; later calls reuse it)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = Transformer.from_pretrained("checkpoints/tiny-sft")
    tok = Tokenizer.from_pretrained("checkpoints/tiny-sft")
    problems = builtin_problems("heldout", 24)
    calls = [(4, 40, [tok.eos_token_id]),  # batch bucket 8, attention length 128
             (24, 150, []),  # bucket 24, lengths 128 and 256 (no stop: every row runs 150 tokens), a larger cache
             (12, 60, [tok.eos_token_id])]  # rows leave: buckets 16 -> 8
    buffers = []
    compiled = sample.Engine(model, compile=True)  # one engine: its cache is kept between calls
    for rows, new_tokens, stop in calls:
        prompts = [sample.prompt_ids(tok, p["prompt"]) for p in problems[:rows]]
        assert len({len(p) for p in prompts}) > 1  # mixed lengths: right padding is part of what is compared
        eager = [r.ids for r in sample.generate(model, prompts, new_tokens, temperature=0, stop_token_ids=stop)]
        assert [r.ids for r in compiled.generate(prompts, new_tokens, temperature=0, stop_token_ids=stop)] == eager
        assert sum(map(len, eager)) > rows * 10  # real completions, not immediate stops
        buffers.append(compiled.cache.buf_k.data_ptr())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert buffers[2] == buffers[1]  # the grown cache is kept


def test_prompt_flags_reach_the_rendered_prompt(tiny_dir, tmp_path):
    """--system, --chat_template FILE and --chat_template_kwargs JSON, as every prompt-building script parses them."""
    import common
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'think' if thinking else 'answer' }}:{% endif %}")
    args = sample.parse_args(["--system", "Be brief.", "--chat_template", str(template),
                              "--chat_template_kwargs", '{"thinking": true}'])
    tok = common.load_tokenizer(args, tiny_dir)
    assert sample.render(tok, [{"role": "user", "content": "2+2?"}], True) == "[system:Be brief.][user:2+2?]think:"
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "q"}]
    assert sample.render(tok, own, False) == "[system:Mine.][user:q]"  # a chat's own system message stays
    assert tok.decode(sample.prompt_ids(tok, "2+2?")) == "[system:Be brief.][user:2+2?]think:"
    tok.save_pretrained(tmp_path / "saved")  # the replacing template is what a checkpoint keeps
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["chat_template"] == template.read_text()


@pytest.mark.parametrize("script", ["sample", "sft", "grpo", "ppo", "reward_model", "distill"])
def test_every_prompt_building_script_takes_the_prompt_flags(script, capsys):
    import importlib
    module = importlib.import_module(script)
    argv = ["--system", "S", "--chat_template_kwargs", '{"enable_thinking": false}']
    args = (module.parse_args(argv) if hasattr(module, "parse_args") else module.build_parser().parse_args(argv))
    assert args.system == "S" and args.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(SystemExit):
        module.parse_args(["--chat_template_kwargs", "[1]"]) if hasattr(module, "parse_args") else \
            module.build_parser().parse_args(["--chat_template_kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_rollout_metrics_split_lengths_by_correctness():
    """Hand-computed: lengths 2, 4 (correct) and 6, 8, 10 (wrong, one of them half-right on a code task)."""
    import grpo
    from common import Run
    from sample import rollout_metrics
    run = Run(grpo.parse_args(["--device", "cpu"]), "grpo")
    records = [sample.Rollout([1], [0] * k, [1] * k, [0.0] * k, "eos") for k in (2, 4, 6, 8, 10)]
    acc = [1.0, 1.0, 0.0, 0.5, 0.0]
    m = rollout_metrics(run, records, [1.0, 1.0, 0.0, 0.5, 0.0], {"accuracy": acc, "format": [1.0] * 5})
    assert m["completion_len_mean"] == 6 and m["completion_len_max"] == 10
    assert m["completion_len_correct"] == 3 and m["completion_len_incorrect"] == 8
    assert m["accuracy"] == 2.5 / 5 and m["reward_format"] == 1.0 and m["truncated_frac"] == 0
    none_right = rollout_metrics(run, [sample.Rollout([1], [0, 0], [1, 1], [0.0, 0.0], "length")], [0.0],
                                 {"accuracy": [0.0]})
    assert none_right["completion_len_correct"] is None and none_right["completion_len_incorrect"] == 2
    assert none_right["truncated_frac"] == 1 and none_right["stop_eos_frac"] == 0
