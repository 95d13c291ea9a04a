"""Tests for verify.py's verifiable tasks beyond math: Countdown (generator, worked solutions, the
expression checker), code tasks loaded from JSONL, and the accuracy_reward dispatcher.
Run: python -m pytest tests/test_tasks.py -q"""

import json
import os
import time

import pytest

import verify
from verify import (accuracy_reward, countdown_problem, countdown_problems, countdown_reward,
                    countdown_worked_solution, load_problems)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# -----------------------------------------------------------------------------
# countdown_reward on hand-written cases: (completion, numbers, target, expected)

COUNTDOWN = [
    # right value, each number once, in every accepted spelling
    ("\\boxed{(3+5)*2}", [3, 5, 2], 16, 1.0),
    ("<think>3+5=8, 8*2=16</think>\n\\boxed{(3 + 5) \\times 2}", [3, 5, 2], 16, 1.0),
    ("\\boxed{ ( 3+5 )\\cdot2 }", [3, 5, 2], 16, 1.0),
    ("\\boxed{(3+5) × 2}", [3, 5, 2], 16, 1.0),
    ("\\boxed{\\left(3+5\\right)*2}", [3, 5, 2], 16, 1.0),
    ("\\boxed{8 \\div 2 + 12}", [8, 2, 12], 16, 1.0),
    ("\\boxed{$12 + 8 ÷ 2$}", [8, 2, 12], 16, 1.0),
    ("<answer> (3 + 5) * 2 </answer>", [3, 5, 2], 16, 1.0),  # TinyZero's tag form
    ("<answer>1</answer> then <answer>(3+5)*2</answer>", [3, 5, 2], 16, 1.0),  # the last one counts
    ("<answer>(3+5)*2</answer> \\boxed{3+5}", [3, 5, 2], 16, 0.0),  # a box wins over tags
    ("\\boxed{(3+5)*2 = 16}", [3, 5, 2], 16, 1.0),  # "expr = target" form
    ("\\boxed{16 = 2*(5+3)}", [3, 5, 2], 16, 1.0),
    ("\\boxed{(3+5)*2 = 17}", [3, 5, 2], 16, 0.0),  # the stated result must be the target
    ("\\boxed{3+5 = 2*4}", [3, 5, 2, 4], 8, 0.0),  # two expressions: which one is the answer?
    ("\\boxed{16 = 16}", [3, 5, 2], 16, 0.0),  # the bare target is not a given number
    ("\\boxed{16}", [16, 5, 2], 16, 1.0),  # ... but may be when it is one
    ("\\boxed{(3+5)*2 = 16 = 16}", [3, 5, 2], 16, 0.0),
    ("\\boxed{5+3}", [3, 5, 2], 8, 1.0),  # not every number needs to be used
    # numbers: a multiset, each at most once
    ("\\boxed{3*3+7}", [3, 5, 7], 16, 0.0),  # 3 used twice, given once
    ("\\boxed{3*3+7}", [3, 3, 7], 16, 1.0),  # given twice: may be used twice
    ("\\boxed{4*4}", [3, 5, 2], 16, 0.0),  # 4 is not given
    ("\\boxed{(3+5)*02}", [3, 5, 2], 16, 0.0),  # leading zeros are not the given number
    ("\\boxed{35-19}", [3, 5, 2, 19], 16, 0.0),  # no digit concatenation: 35 is not given
    # arithmetic rules
    ("\\boxed{5/(3-3)+16}", [5, 3, 3, 16], 16, 0.0),  # division by zero
    ("\\boxed{6/(1-3/4)}", [6, 1, 3, 4], 24, 1.0),  # non-integer intermediate results are allowed (exact)
    ("\\boxed{(1/3)*3}", [1, 3, 3], 1, 1.0),
    ("\\boxed{7/2}", [7, 2], 3, 0.0),  # exact: 7/2 is not 3
    ("\\boxed{2-5+19}", [2, 5, 19], 16, 1.0),  # negative intermediates are fine
    ("\\boxed{-2+18}", [2, 18], 16, 0.0),  # no unary minus
    ("\\boxed{2(3+5)}", [3, 5, 2], 16, 0.0),  # no implicit multiplication
    ("\\boxed{2^4}", [2, 4], 16, 0.0),  # no powers
    ("\\boxed{4**2}", [2, 4], 16, 0.0),
    ("\\boxed{32/2.0}", [32, 2], 16, 0.0),  # no decimals
    ("\\boxed{((3+5)*2}", [3, 5, 2], 16, 0.0),  # unbalanced
    ("\\boxed{(3+5)*2)}", [3, 5, 2], 16, 0.0),
    ("\\boxed{3+5*}", [3, 5, 2], 16, 0.0),
    ("\\boxed{}", [3, 5, 2], 16, 0.0),
    ("(3+5)*2", [3, 5, 2], 16, 0.0),  # no final answer marked
    ("", [3, 5, 2], 16, 0.0),
    (None, [3, 5, 2], 16, 0.0),
    ("\\boxed{(3+5)*2}", ["3", "5", "2"], "16", 1.0),  # numbers / target read from JSON as strings
    # code is never run
    ("\\boxed{__import__('os').system('touch /tmp/countdown-pwned')}", [3, 5, 2], 16, 0.0),
    ("<answer>eval('16')</answer>", [3, 5, 2], 16, 0.0),
    ("<answer>int('16')</answer>", [16], 16, 0.0),
    # pathological input
    ("\\boxed{" + "(" * 5000 + "16" + ")" * 5000 + "}", [16], 16, 0.0),  # too long
    ("\\boxed{" + "(" * 60 + "16" + ")" * 60 + "}", [16], 16, 0.0),  # nested too deeply
    ("\\boxed{" + "(" * 40 + "16" + ")" * 40 + "}", [16], 16, 1.0),
    ("\\boxed{" + "+".join(["1"] * 150) + "}", [1] * 10, 150, 0.0),
]


@pytest.mark.parametrize("completion, numbers, target, expected", COUNTDOWN)
def test_countdown_reward(completion, numbers, target, expected):
    assert countdown_reward(completion, numbers, target) == expected
    if completion is not None:  # the dispatcher picks countdown from the record's fields
        assert accuracy_reward({"prompt": "p", "numbers": numbers, "target": target}, completion) == expected


def test_countdown_reward_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    for expr in (f"__import__('os').mkdir({str(marker)!r})", f"open({str(marker)!r}, 'w')"):
        assert countdown_reward(f"\\boxed{{{expr}}}", [1, 2], 3) == 0.0
        assert countdown_reward(f"<answer>{expr}</answer>", [1, 2], 3) == 0.0
    assert not marker.exists()


def test_countdown_reward_pathological_input_is_fast():
    t = time.monotonic()
    for s in ("(" * 10**5, "1+" * 10**5 + "1", "\\boxed{" * 10**4, "<answer>" + "(" * 10**5 + "</answer>"):
        assert countdown_reward(s, [1], 1) == 0.0
    assert time.monotonic() - t < 2


# -----------------------------------------------------------------------------
# the generator


def test_countdown_splits_are_disjoint_and_deterministic():
    key = lambda p: (tuple(sorted(p["numbers"])), p["target"])
    train = countdown_problems("train", 3000)
    heldout = countdown_problems("heldout", 400)
    assert len(train) == 3000 and len(heldout) == 400
    assert not {key(p) for p in train} & {key(p) for p in heldout}
    assert countdown_problems("train", 50) == train[:50]  # same seed, same problems
    assert countdown_problems("train", 50, seed=1) != train[:50]
    with pytest.raises(ValueError):
        countdown_problems("test", 1)


def test_countdown_problems_are_solvable_by_their_worked_solution():
    problems = countdown_problems("train", 1000) + countdown_problems("heldout", 200)
    for p in problems:
        assert set(p) >= {"prompt", "answer", "numbers", "target", "steps"}
        assert 3 <= len(p["numbers"]) <= 4 and all(1 <= n <= 25 for n in p["numbers"]) and 1 <= p["target"] <= 100
        assert str(p["target"]) in p["prompt"] and all(str(n) in p["prompt"] for n in p["numbers"])
        for show_steps in (True, False):
            solution = countdown_worked_solution(p, show_steps)
            assert solution.startswith("<think>\n") and f"</think>\n\\boxed{{{p['answer']}}}" in solution
            assert countdown_reward(solution, p["numbers"], p["target"]) == 1.0, (p, solution)
            assert accuracy_reward(p, solution) == 1.0
            assert verify.strict_format_reward(solution) == 1.0
        assert countdown_reward(f"\\boxed{{{p['answer']}+1}}", p["numbers"], p["target"]) == 0.0


def test_countdown_problem_difficulty_knobs():
    import random
    rng = random.Random(0)
    for _ in range(200):
        p = countdown_problem(rng, min_numbers=4, max_numbers=4, max_number=9, max_target=30)
        assert len(p["numbers"]) == 4 and max(p["numbers"]) <= 9 and 1 <= p["target"] <= 30
        assert len(p["steps"]) == 3  # every number is used: three combinations


# -----------------------------------------------------------------------------
# code tasks from JSONL, graded through accuracy_reward

SOLUTIONS = [  # a correct program for each task in fixtures/code_tasks.jsonl, as a model would answer
    "```python\ndef add(a, b):\n    return a + b\n```",
    "Here you go:\n```python\ndef reverse_string(s):\n    return s[::-1]\n```",
    "```python\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n```",
    "```python\nprint(max(map(int, input().split())))\n```",
]


def test_code_tasks_fixture_loads_and_grades():
    problems = load_problems(os.path.join(FIXTURES, "code_tasks.jsonl"))
    assert [sorted(p) for p in problems] == [["prompt", "tests"]] * 3 + [["inputs", "outputs", "prompt"]]
    assert problems[2]["prompt"].startswith("Write a function is_prime")  # "question" is read as the prompt
    for p, solution in zip(problems, SOLUTIONS):
        assert accuracy_reward(p, solution) == 1.0
        assert accuracy_reward(p, "```python\nimport sys\nsys.exit(1)\n```") == 0.0
    # the fraction of passing tests: abs() breaks the two tests with negative numbers
    assert accuracy_reward(problems[0], "def add(a, b):\n    return abs(a) + abs(b)") == 0.5
    assert accuracy_reward(problems[3], "print(sorted(map(int, input().split()))[-1])") == 1.0  # any right stdout passes
    assert accuracy_reward(problems[3], "print(abs(max(map(int, input().split()))))") == pytest.approx(2 / 3)


def test_load_problems_code_and_countdown_records(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "f?", "tests": ["assert f() == 1"]},
        {"problem": "echo", "inputs": ["a\n"], "outputs": ["a\n"]},
        {"prompt": "Reach 16 with 3, 5, 2.", "numbers": [3, 5, 2], "target": 16},
        {"nums": [44, 19, 35], "target": 98},  # TinyZero's field names, no prompt
        {"prompt": "math", "answer": "2"},
    ]) + "\n")
    problems = load_problems(path)
    assert problems[:3] == [{"prompt": "f?", "tests": ["assert f() == 1"]},
                            {"prompt": "echo", "inputs": ["a\n"], "outputs": ["a\n"]},
                            {"prompt": "Reach 16 with 3, 5, 2.", "numbers": [3, 5, 2], "target": 16}]
    assert problems[3]["numbers"] == [44, 19, 35] and "44, 19, 35" in problems[3]["prompt"] and "98" in problems[3]["prompt"]
    assert problems[4] == {"prompt": "math", "answer": "2"}
    assert accuracy_reward(problems[0], "def f():\n    return 1") == 1.0
    assert accuracy_reward(problems[1], "print(input())") == 1.0
    assert accuracy_reward(problems[2], "\\boxed{(3+5)*2}") == 1.0
    assert accuracy_reward(problems[3], "<answer>44 + 19 + 35</answer>") == 1.0
    assert accuracy_reward(problems[4], "\\boxed{2}") == 1.0 and accuracy_reward(problems[4], "\\boxed{3}") == 0.0


@pytest.mark.parametrize("record", [
    {"prompt": "f?", "tests": []}, {"prompt": "f?", "tests": "assert True"}, {"prompt": "f?", "tests": [1]},
    {"tests": ["assert True"]}, {"prompt": "f?", "tests": ["assert True"], "inputs": ["1"], "outputs": ["1"]},
    {"prompt": "io", "inputs": ["1"]}, {"prompt": "io", "inputs": ["1", "2"], "outputs": ["1"]},
    {"prompt": "io", "inputs": [1], "outputs": [1]},
    {"prompt": "c", "numbers": [1, 2]}, {"prompt": "c", "target": 3}, {"prompt": "c", "numbers": [], "target": 3},
    {"prompt": "c", "numbers": [1, "2"], "target": 3}, {"prompt": "c", "numbers": [1, 2], "target": 2.5},
    {"prompt": "c", "numbers": [-1, 2], "target": 1}, {"prompt": 5, "numbers": [1, 2], "target": 3},
])
def test_load_problems_bad_task_record_names_file_and_line(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        load_problems(path)


def test_accuracy_reward_dispatch_order():
    # tests win over everything else; then io cases; then numbers+target; else the math answer
    both = {"prompt": "p", "tests": ["assert x == 1"], "inputs": ["a"], "outputs": ["b"], "answer": "7"}
    assert accuracy_reward(both, "x = 1") == 1.0
    assert accuracy_reward({"prompt": "p", "inputs": ["a"], "outputs": ["b"], "answer": "7"}, "print('b')") == 1.0
    countdown = {"prompt": "p", "numbers": [3, 4], "target": 7, "answer": "3+4"}
    assert accuracy_reward(countdown, "\\boxed{4+3}") == 1.0
    assert accuracy_reward(countdown, "\\boxed{7}") == 0.0  # the target alone is not an expression of the numbers
    assert accuracy_reward({"prompt": "p", "answer": "\\frac{1}{2}"}, "so \\boxed{0.5}") == 1.0
    assert accuracy_reward({"prompt": "p", "answer": "7", "steps": []}, "\\boxed{7}") == 1.0  # built-in arithmetic


# ------------------------------------------------------------------ the tasks through the scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "code_tasks.jsonl")


def test_builtin_countdown_is_one_data_name_for_every_script(tmp_path):
    """--data builtin:countdown: the same problems for SFT chats, RL steps and held-out sets; exported like the
    arithmetic task and read back by load_problems as Countdown records."""
    import argparse

    import common
    import sample
    import sft
    sft.export_builtin(tmp_path, "builtin:countdown", n_train=20, n_heldout=5)
    chats = sft.load_chats(tmp_path / "countdown_sft_train.jsonl")
    problems = verify.load_problems(tmp_path / "countdown_rl_train.jsonl")
    assert len(chats) == len(problems) == 20 and all({"numbers", "target"} <= p.keys() for p in problems)
    assert all(accuracy_reward(p, verify.countdown_worked_solution(p, show_steps=False)) == 1.0 for p in problems)
    heldout = verify.load_problems(tmp_path / "countdown_heldout.jsonl")
    assert not {(tuple(sorted(p["numbers"])), p["target"]) for p in heldout} & {
        (tuple(sorted(p["numbers"])), p["target"]) for p in problems}
    args = argparse.Namespace(data="builtin:countdown", heldout_data=None, heldout_problems=5, max_new_tokens=8,
                              prompt_template="{question}", seed=0, device="cpu", dtype="float32", out=str(tmp_path))
    data, rl_heldout = sample.rl_problems(args, [])
    assert data is None and [p["prompt"] for p in rl_heldout] == [p["prompt"] for p in heldout]
    step = common.step_problems(common.Run(args, "test"), 3, None, step=0)
    assert all("numbers" in p for p in step) and step == common.step_problems(common.Run(args, "test"), 3, None, 0)
    assert sample.load_eval_problems("builtin:countdown", "{question}", n=5) == rl_heldout


def grpo_step(tmp_path, *flags):
    import subprocess
    import sys
    cmd = [sys.executable, "grpo.py", "--out", str(tmp_path), "--max_steps", "1", "--batch_size", "4", "--group_size",
           "2", "--max_new_tokens", "16", "--heldout_problems", "2", "--eval_every", "0", "--device", "cpu", *flags]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_grpo_step_on_builtin_countdown(tmp_path):
    rows = grpo_step(tmp_path, "--data", "builtin:countdown")
    assert [r["step"] for r in rows if "reward" in r] == [1]


def test_grpo_step_on_code_tasks_from_jsonl(tmp_path):
    """Code records get code_reward (the fraction of their tests passed) as their accuracy, chosen by their fields."""
    rows = grpo_step(tmp_path, "--data", FIXTURE, "--heldout_data", FIXTURE, "--prompt_template", "{question}")
    step = next(r for r in rows if "reward" in r)
    assert 0.0 <= step["accuracy"] <= 1.0 and "reward_format" in step
