"""Rollouts that call tools (sample.Engine with a ToolUse): a row pauses when the model closes a call, the tool runs in
the pool while the other rows decode, its output is fed to the row as context (mask 0) and the row goes on. The
model here is scripted: a forward hook forces each row's next token from a script chosen by its rope position, so
every test knows exactly what the engine must produce (a misplaced position or a token fed twice shows up)."""
import concurrent.futures
import os
import threading
import time

import pytest
import torch

import sample
import sft
import tools
from model import ModelConfig, Tokenizer, Transformer
from sample import RowTools, ToolUse

TOK = Tokenizer.byte_level()
EOS = TOK.eos_token_id
BASE, SPACING = 3, 256  # row k's prompt has BASE + SPACING * k tokens: its positions tell which script it follows
CALL = "```python\nprint(6*7)\n```"
OUTPUT = "\n```output\n42\n```\n"  # what the python tool's observation is for that call


def scripted_model(scripts):
    """A tiny model whose next token at every step is forced: row k (prompt length BASE + SPACING * k) emits
    scripts[k][j] as its completion token j, then eos. Where a script holds a tool's observation the engine must
    feed it instead of sampling; a script writes "X"s there, so an observation that is sampled, not fed, shows."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                max_position_embeddings=4096)).eval()
    ids = [TOK.encode(s) + [EOS] for s in scripts]

    def hook(module, args, kwargs, out):
        lf = kwargs.get("logits_from", 0)
        position = lf if torch.is_tensor(lf) else args[2][:, -1]  # of the token whose logits these are
        k = (position + 1 - BASE) // SPACING
        j = position + 1 - (BASE + SPACING * k)  # the completion index of the next token
        nxt = torch.tensor([ids[a][b] if b < len(ids[a]) else EOS for a, b in zip(k.tolist(), j.tolist())])
        return torch.full_like(out, -1e4).scatter(-1, nxt[:, None, None].expand(-1, out.shape[1], 1), 0.0)
    m.register_forward_hook(hook, with_kwargs=True)
    return m


def prompts(n):
    return [[5] * (BASE + SPACING * k) for k in range(n)]


class InlineRunner(tools.ToolRunner):
    """Answers each call as it is made (no thread): a row never waits a step, so counts are exact."""

    def submit(self, tool, calls):
        future, started = concurrent.futures.Future(), []
        future.set_result(self.run(tool, calls, started))
        return future, tools.ToolCall(tool.name, calls[-1]), started


def tool_use(tool_list, runner=None, **kw):
    return ToolUse(tool_list, TOK, runner or tools.ToolRunner(4, 10.0), **kw)


def fake_tool(name="python", fn=lambda text: "42\n", fmt=tools.PYTHON_FORMAT):
    return tools.Tool(name, fmt, lambda calls: (fn(calls[-1]), False))


def text(ids):
    return TOK.decode([i for i in ids if i != EOS])


# ------------------------------------------------------------------ the record


@pytest.mark.parametrize("check_every", [1, 8])
def test_a_call_pauses_the_row_and_its_output_is_fed_as_context(check_every):
    """The call's tokens are the model's (mask 1), the observation is fed (mask 0, log-prob 0) where the model would
    have written "X"s (with check_every 8 it samples up to 7 of them past the delimiter: discarded), then the model
    goes on; a row without a call is as without tools."""
    m = scripted_model([CALL + "X" * len(OUTPUT) + "\\boxed{42}", "no call \\boxed{1}"])
    r0, r1 = sample.generate(m, prompts(2), 120, temperature=0, stop_token_ids=[EOS], check_every=check_every,
                             tool_use=tool_use([tools.python_tool()]))
    assert text(r0.ids) == CALL + OUTPUT + "\\boxed{42}" and r0.stop == "eos"
    assert r0.mask == [1] * len(CALL) + [0] * len(OUTPUT) + [1] * (len("\\boxed{42}") + 1)
    assert all(lp == 0.0 for lp, mine in zip(r0.logprobs, r0.mask) if not mine)
    assert all(lp > -1e-3 for lp, mine in zip(r0.logprobs, r0.mask) if mine)  # forced tokens: probability ~1
    assert [(c.tool, c.text, c.output, c.error) for c in r0.calls] == [("python", "print(6*7)\n", "42\n", False)]
    assert text(r1.ids) == "no call \\boxed{1}" and r1.mask == [1] * len(r1.ids) and r1.calls == []


def test_without_a_call_rollouts_are_token_for_token_those_without_tools():
    """The committed tiny model never writes a call: with tools on, greedy and seeded sampled rollouts (and their
    log-probs) are exactly those of the engine without tools."""
    model = Transformer.from_pretrained("checkpoints/tiny-sft")
    tok = Tokenizer.from_pretrained("checkpoints/tiny-sft")
    ps = [sample.prompt_ids(tok, f"Compute {a}+{b}-3.") for a, b in ((4, 5), (7, 8), (2, 9))]
    ps = [p for p in ps for _ in range(4)]
    on = ToolUse([tools.python_tool(), fake_tool("search", fmt=tools.SEARCH_FORMAT)], tok, tools.ToolRunner(2))
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9, "seed": 1,
                                                                     "check_every": 8}):
        off_records = sample.generate(model, ps, 40, stop_token_ids=[tok.eos_token_id], **kw)
        on_records = sample.generate(model, ps, 40, stop_token_ids=[tok.eos_token_id], tool_use=on, **kw)
        assert [(r.ids, r.mask, r.logprobs, r.stop) for r in on_records] == \
               [(r.ids, r.mask, r.logprobs, r.stop) for r in off_records]


def test_sampler_logprobs_equal_the_trainers_float32_logprobs():
    """What the sampler records as log pi(y_t) is what the trainer's forward computes for the same tokens (CPU,
    float32, one model): the quantity the sampler/trainer mismatch metric compares."""
    model = Transformer.from_pretrained("checkpoints/tiny-sft")
    tok = Tokenizer.from_pretrained("checkpoints/tiny-sft")
    ps = [sample.prompt_ids(tok, f"Compute {a}+{b}.") for a, b in ((4, 5), (7, 8))]
    records = sample.generate(model, [p for p in ps for _ in range(3)], 30, temperature=1.0, seed=0,
                              stop_token_ids=[tok.eos_token_id])
    for r in records:
        with torch.no_grad():
            logp, _ = model(torch.tensor([r.prompt + r.ids[:-1]]), targets=torch.tensor([r.ids]),
                            logits_from=len(r.prompt) - 1)
        assert torch.allclose(torch.tensor(r.logprobs), logp[0], atol=1e-5), (r.logprobs, logp[0].tolist())


# ------------------------------------------------------------------ the engine's work stays linear


def test_no_token_is_forwarded_twice():
    """Each row's tokens (its own and the observation's) enter the model once: decode row-steps = sum over rows of
    (completion tokens - 1), the last token of each row predicting nothing; prompts are prefilled once."""
    m = scripted_model([CALL + "X" * len(OUTPUT) + "ok", "plain text", CALL + "X" * len(OUTPUT) + CALL + "X" * 18])
    seen = {"decode_row_steps": 0, "prefill_rows": 0}

    def count(module, args):
        if args[0].shape[1] == 1:
            seen["decode_row_steps"] += args[0].shape[0]
        else:
            seen["prefill_rows"] += args[0].shape[0]
    m.register_forward_pre_hook(count)
    records = sample.generate(m, prompts(3), 200, temperature=0, stop_token_ids=[EOS],
                              tool_use=tool_use([fake_tool()], InlineRunner()))
    assert [len(r.calls) for r in records] == [1, 0, 2]
    assert sum(r.mask.count(0) for r in records) == 3 * len(OUTPUT)
    assert seen["prefill_rows"] == 3 and seen["decode_row_steps"] == sum(len(r.ids) - 1 for r in records)


def test_while_a_tool_runs_the_other_rows_decode_and_a_hanging_tool_times_out():
    """Row 0 calls a tool that never answers; row 1 decodes to its end meanwhile; after --tool_timeout row 0 is
    answered with the error and goes on."""
    release = threading.Event()
    hang = fake_tool(fn=lambda t: release.wait(60) and "late")
    m = scripted_model([CALL + "X" * 40 + "done", "y" * 80])
    start = time.monotonic()
    r0, r1 = sample.generate(m, prompts(2), 150, temperature=0, stop_token_ids=[EOS],
                             tool_use=tool_use([hang], tools.ToolRunner(2, timeout=1.0)))
    release.set()
    assert time.monotonic() - start < 10
    assert text(r1.ids) == "y" * 80 and r1.stop == "eos"
    assert r0.calls[0].error and "no answer within 1 s" in r0.calls[0].output and r0.stop == "eos"
    assert text(r0.ids).startswith(CALL + "\n```output\nError: no answer within 1 s")


def test_concurrent_calls_take_about_calls_over_workers_latencies():
    """8 rows each make one call that takes 0.4 s, on 4 workers: 4 calls run at once, and the rollout takes about 2
    latencies, not 8."""
    running, peak, lock = [0], [0], threading.Lock()

    def slow(text_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.4)
        with lock:
            running[0] -= 1
        return "42\n"
    m = scripted_model([CALL + "X" * len(OUTPUT) + "ok"] * 8)
    start = time.monotonic()
    records = sample.generate(m, prompts(8), 100, temperature=0, stop_token_ids=[EOS],
                              tool_use=tool_use([fake_tool(fn=slow)], tools.ToolRunner(4, 10.0)))
    elapsed = time.monotonic() - start
    assert all(text(r.ids) == CALL + OUTPUT + "ok" for r in records)
    assert peak[0] == 4 and elapsed < 8 * 0.4 / 2, (peak, elapsed)


# ------------------------------------------------------------------ limits


def test_past_max_turns_a_call_is_not_run_and_the_row_goes_on():
    m = scripted_model([(CALL + "X" * len(OUTPUT)) * 2 + CALL + "\\boxed{42}"])
    (r,) = sample.generate(m, prompts(1), 200, temperature=0, stop_token_ids=[EOS],
                           tool_use=tool_use([fake_tool()], max_turns=2))
    assert len(r.calls) == 2 and r.turn_capped and r.stop == "eos"
    assert text(r.ids) == (CALL + OUTPUT) * 2 + CALL + "\\boxed{42}"  # the third call stays the model's text
    assert r.mask[-len(CALL) - 11:] == [1] * (len(CALL) + 11)


def test_a_long_output_is_cut_in_the_middle_and_the_budget_counts_observations():
    long = fake_tool(fn=lambda t: "".join(f"{i:04d} " for i in range(400)))
    m = scripted_model([CALL + "X" * 60 + "end"])
    (r,) = sample.generate(m, prompts(1), 200, temperature=0, stop_token_ids=[EOS],
                           tool_use=tool_use([long], max_observation_tokens=60))
    observation = text([i for i, mine in zip(r.ids, r.mask) if not mine])
    assert r.mask.count(0) == 60 and observation.startswith("\n```output\n0000 0001") and \
        observation.endswith("0399 \n```\n") and "tokens cut]" in observation
    (r,) = sample.generate(m, prompts(1), len(CALL) + 10, temperature=0, stop_token_ids=[EOS],
                           tool_use=tool_use([long], max_observation_tokens=60))
    assert r.stop == "length" and len(r.ids) == len(CALL) + 10 and r.mask.count(0) == 10  # cut to what is left


def test_a_delimiter_split_across_tokens_is_found_on_bytes():
    """Tokens whose bytes hold parts of the delimiters ("``", "`pyt" ...): the call is found, and the row is cut
    after the token that completes the closing delimiter (kept whole)."""
    class Pieces:
        def __init__(self, pieces):
            self.pieces = pieces

        def token_bytes(self, i):
            return self.pieces[i].encode()
    pieces = ["so ", "``", "`pyt", "hon\nx=1\nprint(x)\n`", "``\nand", " more"]
    row = RowTools()
    row.read(Pieces(pieces), list(range(6)), [1] * 6, 0)
    tool, call, cut = row.find_call([fake_tool()])
    assert (tool.name, call, cut) == ("python", "x=1\nprint(x)\n", 5)  # tokens 0..4 kept, " more" discarded


# ------------------------------------------------------------------ the tools themselves


def test_python_tool_keeps_state_between_calls_and_is_sandboxed(tmp_path):
    tool = tools.python_tool(timeout=5.0)
    assert tool.run(["x = 6", "print(x * 7)"]) == ("42\n", False)
    output, error = tool.run(["1/0"])
    assert error and "ZeroDivisionError" in output
    target = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)
    for attack in (f"open({str(target)!r}, 'w').write('x')",
                   "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)"):
        output, error = tool.run([attack])
        assert error, output
    assert not target.exists()
    output, error = tools.python_tool(timeout=1.0).run(["while True: pass"])
    assert error


def test_a_users_tool_runs_in_a_capped_child_process(tmp_path, monkeypatch):
    (tmp_path / "mytools.py").write_text("import time\ndef shout(text):\n    return text.upper()\n"
                                         "def sleepy(text):\n    time.sleep(30)\n"
                                         "def hungry(text):\n    return len(bytearray(10**10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    shout = tools.user_tool("mytools:shout")
    assert shout.format.call_open == "<shout>" and shout.run(["hi there"]) == ("HI THERE", False)
    start = time.monotonic()
    output, error = tools.user_tool("mytools:sleepy", timeout=1.0).run(["x"])
    assert error and "did not answer within 1 s" in output and time.monotonic() - start < 5
    output, error = tools.user_tool("mytools:hungry", memory_mb=256).run(["x"])
    assert error and "MemoryError" in output
    with pytest.raises(ValueError, match="--tools mytools:nothing: cannot import it"):
        tools.user_tool("mytools:nothing")


def test_tool_flags_name_their_mistakes():
    with pytest.raises(ValueError, match="--tools calculator: unknown tool"):
        tools.tool_formats("python,calculator")
    with pytest.raises(ValueError, match="--tool_formats names a tool not in --tools: search"):
        tools.tool_formats("python", {"search": ["<q>", "</q>", "<r>", "</r>"]})
    with pytest.raises(ValueError, match="--tool_formats python: four non-empty strings"):
        tools.tool_formats("python", {"python": ["<q>", "</q>"]})
    assert tools.tool_formats("search", {"search": ["<q>", "</q>", "<r>", "</r>"]})["search"].result_open == "<r>"


def test_sft_keeps_tool_outputs_out_of_the_loss():
    """A worked solution with a real tool call and its output (tool_arithmetic): the output is context (mask 0), the
    call and the answer are trained on, exactly."""
    problem = tools.tool_arithmetic_problems("train", 1)[0]
    solution = tools.tool_arithmetic_worked_solution(problem)
    chat = [{"role": "user", "content": problem["prompt"]}, {"role": "assistant", "content": solution}]
    ids, mask = sft.tokenize_chat(TOK, chat, tools.tool_formats("python").values())
    masked_out = TOK.decode([i for i, m in zip(ids, mask) if not m])
    assert masked_out.endswith(tools.PYTHON_FORMAT.observation(problem["answer"]))
    trained = TOK.decode([i for i, m in zip(ids, mask) if m])
    assert trained == solution.replace(tools.PYTHON_FORMAT.observation(problem["answer"]), "") + "<|im_end|>\n"
    assert TOK.decode(ids) == TOK.decode(sft.tokenize_chat(TOK, chat)[0])  # the same text, only the mask differs


def test_time_waiting_for_a_worker_does_not_count_against_the_timeout():
    """6 rows' calls of 0.4 s each on one worker, timeout 1 s: the last one starts 2 s after it was made, and still
    answers (a timeout counted from the call would fail half of them)."""
    slow = fake_tool(fn=lambda t: time.sleep(0.4) or "42\n")
    m = scripted_model([CALL + "X" * len(OUTPUT) + "ok"] * 6)
    records = sample.generate(m, prompts(6), 100, temperature=0, stop_token_ids=[EOS],
                              tool_use=tool_use([slow], tools.ToolRunner(1, timeout=1.0)))
    assert [c.error for r in records for c in r.calls] == [False] * 6
    assert all(text(r.ids) == CALL + OUTPUT + "ok" for r in records)


# ------------------------------------------------------------------ end to end (slow)

TOOL_RUN = ["--data", "builtin:tool_arithmetic", "--batch_size", "16", "--group_size", "4", "--heldout_problems", "16",
            "--eval_every", "0", "--device", "cpu"]


@pytest.mark.slow
def test_two_process_runs_with_tools_log_the_same_metrics_under_ddp_and_fsdp(tmp_path):
    """grpo.py with the python tool on 2 gloo processes: each rank runs its rows' calls in its own pool, the tool
    metrics are summed over ranks, and DDP and FSDP runs log the same rewards, tool calls and gradients."""
    import json
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py", *TOOL_RUN,
           "--max_steps", "2"]
    logs = {}
    for sharding in ("ddp", "fsdp"):
        subprocess.run(cmd + ["--out", str(tmp_path / sharding)] + (["--fsdp"] if sharding == "fsdp" else []),
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
        logs[sharding] = [json.loads(l) for l in (tmp_path / sharding / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs["ddp"] if "tool_calls_per_sample" in r]
    assert len(steps) == 2 and all(r["tool_calls_per_sample"] > 0 for r in steps)
    for a, b in zip(logs["ddp"], logs["fsdp"]):
        for k in ("reward", "tool_calls_per_sample", "observation_tokens_per_sample", "grad_norm", "heldout_acc"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_grpo_teaches_the_tiny_model_when_to_call_python(tmp_path):
    """checkpoints/tiny-tool-arithmetic calls Python in 40% of its samples but answers in its head when greedy (and
    wrongly: 6-digit results): GRPO with the python tool makes the greedy policy call the tool, and held-out accuracy
    jumps."""
    import json
    import subprocess
    import sys
    subprocess.run([sys.executable, "grpo.py", "--data", "builtin:tool_arithmetic", "--max_steps", "10",
                    "--batch_size", "128", "--heldout_problems", "64", "--eval_every", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout_acc_after"] - summary["heldout_acc_before"] >= 0.3, summary
    greedy_calls = {}  # the greedy policy before and after: in its head before, through the tool after
    for name, model in (("before", "checkpoints/tiny-tool-arithmetic"), ("after", str(tmp_path / "final"))):
        subprocess.run([sys.executable, "sample.py", "--model", model, "--eval", "builtin:tool_arithmetic", "--limit",
                        "32", "--n", "1", "--temperature", "0", "--out", str(tmp_path / f"eval-{name}")],
                       check=True, capture_output=True, timeout=300)
        summary_of_eval = json.loads((tmp_path / f"eval-{name}" / "summary.json").read_text())
        greedy_calls[name] = summary_of_eval["tool_calls_per_sample"]
    assert greedy_calls["after"] >= greedy_calls["before"] + 0.5, greedy_calls


@pytest.mark.slow
def test_grpo_with_search_improves_the_tiny_models_heldout_accuracy(tmp_path):
    """checkpoints/tiny-search answers from memory in a third of its samples and miscopies names into its queries:
    on the held-out cities (never seen in training) only a correct search answers. GRPO with the search tool
    nearly doubles its held-out accuracy in 10 steps (measured: 0.055 -> 0.100 on these 200 problems)."""
    import json
    import subprocess
    import sys
    subprocess.run([sys.executable, "grpo.py", "--data", "builtin:search", "--max_steps", "10", "--batch_size", "128",
                    "--heldout_problems", "200", "--eval_every", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout_acc_after"] - summary["heldout_acc_before"] >= 0.03, summary
