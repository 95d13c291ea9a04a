"""Every user mistake and environment fault ends with one line naming the flag, file or line, a non-zero exit and no
traceback, from every script, and leaves an earlier run in --out exactly as it was. Table-driven: each row is a bad
input fed to a script's main() in this process (fast), and a few run as real commands to check what a user sees."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Tokenizer, Transformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = "checkpoints/tiny-sft"
# small settings, so that an input wrongly accepted finishes a run in seconds (and fails the row) instead of minutes
FAST = {"grpo": ["--max_steps", "1", "--batch_size", "8", "--group_size", "4", "--heldout_problems", "4"],
        "ppo": ["--max_steps", "1", "--batch_size", "8", "--heldout_problems", "4"],
        "sft": ["--max_steps", "1", "--batch_size", "4", "--builtin_size", "16", "--heldout_problems", "4",
                "--n_layer", "1", "--n_embd", "32", "--n_head", "2"],
        "reward_model": ["--max_steps", "1", "--batch_size", "4", "--builtin_size", "16", "--heldout_pairs", "4"],
        "distill": ["--max_steps", "1", "--batch_size", "4", "--num_prompts", "4", "--heldout_problems", "4"],
        "sample": ["--max_new_tokens", "8"]}
TRAINING = ("grpo", "ppo", "sft", "reward_model", "distill")
RL = ("grpo", "ppo", "distill")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs on disk: data files, model folders and an earlier run's output folder to protect."""
    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"a_file": d / "a_file", "problems_json": d / "bad.jsonl", "problems_utf8": d / "utf8.jsonl",
         "problems_dict": d / "dict_answer.jsonl", "chat_number": d / "chat_number.jsonl",
         "chat_role": d / "chat_role.jsonl", "pairs_same": d / "pairs_same.jsonl", "nan_model": d / "nan_model",
         "other_vocab": d / "other_vocab", "not_ckpt": d / "not_a_checkpoint"}
    f["a_file"].write_text("x")
    f["problems_json"].write_text('{"prompt": "Compute 1+1.", "answer": "2"}\n{"prompt": "Compute 2+2.", "answer"\n')
    f["problems_utf8"].write_bytes(b'{"prompt": "Compute 1+1.", "answer": "2"}\n{"prompt": "\xff", "answer": "1"}\n')
    f["problems_dict"].write_text('{"prompt": "Compute 1+1.", "answer": {"value": 2}}\n')
    f["chat_number"].write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 4}]}\n')
    f["chat_role"].write_text('{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "4"}]}\n')
    f["pairs_same"].write_text('{"prompt": "Compute 1+1.", "chosen": "\\\\boxed{2}", "rejected": "\\\\boxed{3}"}\n'
                               '{"prompt": "Compute 2+2.", "chosen": "\\\\boxed{4}", "rejected": "\\\\boxed{4}"}\n')
    model = Transformer.from_pretrained(ROOT / TINY)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(f["nan_model"], tokenizer=Tokenizer.from_pretrained(ROOT / TINY))
    tok = Tokenizer.byte_level()  # 3 special tokens, where tiny-sft's tokenizer has 5
    Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1)).save_pretrained(f["other_vocab"], tokenizer=tok)
    f["not_ckpt"].mkdir()
    return f


def cases():
    """(script, argv, what the one line must name). {name} is a path from the files fixture."""
    rows = []
    for s in TRAINING:
        rows += [(s, ["--lr", "-1"], "--lr"), (s, ["--batch_size", "0"], "--batch_size"),
                 (s, ["--max_steps", "-3"], "--max_steps"), (s, ["--micro_batch_tokens", "0"], "--micro_batch_tokens"),
                 (s, ["--keep_checkpoints", "0"], "--keep_checkpoints"),
                 (s, ["--keep_checkpoints", "-1"], "--keep_checkpoints"), (s, ["--dtype", "float99"], "--dtype"),
                 (s, ["--out", "{a_file}"], "{a_file}"), (s, ["--out", "{a_file}/run"], "{a_file}/run"),
                 (s, ["--resume", "{not_ckpt}"], "{not_ckpt}")]
        rows += [(s, [flag, "{nan_model}"], "{nan_model}") for flag in
                 {"distill": ["--teacher"], "sft": ["--model"]}.get(s, ["--model"])]
        rows.append((s, [{"distill": "--teacher"}.get(s, "--model"), "checkpoints/tiny-sfft"], "checkpoints/tiny-sfft"))
    for s in RL:
        rows += [(s, ["--temperature", "0"], "--temperature"), (s, ["--temperature", "-1"], "--temperature"),
                 (s, ["--top_p", "0"], "--top_p"), (s, ["--max_new_tokens", "0"], "--max_new_tokens"),
                 (s, ["--max_new_tokens", "-5"], "--max_new_tokens"), (s, ["--heldout_problems", "0"], "--heldout_problems"),
                 (s, ["--prompt_template", "Solve this."], "--prompt_template"),
                 (s, ["--data", "{problems_json}"], "{problems_json}:2"),
                 (s, ["--data", "{problems_utf8}"], "{problems_utf8}:2"),
                 (s, ["--data", "{problems_dict}"], "{problems_dict}:1")]
    for s in ("grpo", "ppo"):
        rows += [(s, ["--epsilon", "-0.1"], "--epsilon"), (s, ["--reward_model", TINY], "--reward_model")]
    rows += [("grpo", ["--beta", "0.1", "--ref_model", "{other_vocab}"], "reference model"),
             ("ppo", ["--ref_model", "{other_vocab}"], "reference model"),
             ("sft", ["--data", "{chat_number}"], "{chat_number}:1"), ("sft", ["--data", "{chat_role}"], "{chat_role}:1"),
             ("sft", ["--builtin_size", "0"], "--builtin_size"),
             ("sft", ["--data", "builtin:knights", "--max_positions", "256"], "--max_new_tokens"),
             ("grpo", ["--data", "builtin:knights", "--model", TINY], "--max_new_tokens"),
             ("reward_model", ["--data", "{pairs_same}"], "{pairs_same}:2"),
             ("sample", ["--eval", "builtin", "--n", "0"], "--n"), ("sample", ["--eval", "builtin", "--limit", "0"], "--limit"),
             ("sample", ["--top_p", "0"], "--top_p"), ("sample", ["--max_new_tokens", "-5"], "--max_new_tokens"),
             ("sample", ["--eval", "builtin", "--limit", "2", "--out", "{a_file}"], "{a_file}"),
             ("sample", ["--dtype", "float99"], "--dtype"), ("sample", ["--model", "{nan_model}"], "{nan_model}")]
    return rows


def run_main(script, argv, capsys):
    """script.main(argv) -> (exit status, everything it wrote to stderr plus the SystemExit message)."""
    module = importlib.import_module(script)
    try:
        module.main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err + (e.code + "\n" if isinstance(e.code, str) else "")
        return (e.code if isinstance(e.code, int) else 1), err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("script,argv,names", cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_is_one_line_naming_it_and_leaves_an_earlier_run_as_it_was(script, argv, names, files, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    earlier = {"metrics.jsonl": '{"step": 1, "loss": 1.0}\n', "ckpt-000001/training_state.json": '{"step": 1}',
               "summary.json": "{}\n"}  # an earlier run: --overwrite must not touch it when this run cannot start
    for name, text in earlier.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    fill = lambda s: s.format(**files)
    argv = [fill(a) for a in argv]
    out_flags = [] if "--out" in argv else ["--out", str(out)] + (["--overwrite"] if script != "sample" else [])
    status, err = run_main(script, FAST[script] + out_flags + argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert status != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(names) in lines[0], err
    assert "Traceback" not in err
    assert {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()} == earlier


def test_a_real_command_prints_only_that_line(files, tmp_path):
    """What a user sees at the terminal: stderr holds the one line (no warning, no traceback), exit status 1 or 2."""
    for argv, names in ((["grpo.py", "--temperature", "0"], "--temperature"),
                        (["sft.py", "--data", str(files["chat_role"]), "--out", str(tmp_path / "o")], "chat_role.jsonl:1"),
                        (["ppo.py", "--out", str(files["a_file"])], "cannot write checkpoints")):
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode in (1, 2) and proc.stderr.count("\n") == 1 and names in proc.stderr, proc.stderr


def test_sample_eval_refuses_to_overwrite_an_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["--eval", "builtin", "--limit", "2", "--max_new_tokens", "8", "--out", str(tmp_path)]
    assert run_main("sample", argv, capsys)[0] == 0
    before = (tmp_path / "samples.jsonl").read_text()
    status, err = run_main("sample", argv + ["--seed", "1"], capsys)
    assert status == 1 and "already holds an evaluation" in err and "--overwrite" in err
    assert (tmp_path / "samples.jsonl").read_text() == before
    assert run_main("sample", argv + ["--seed", "1", "--overwrite"], capsys)[0] == 0
