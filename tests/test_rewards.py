"""The built-in arithmetic task (verify.py) and the reward builder grpo.py and ppo.py share
(verify.add_reward_args, verify.compute_rewards): each component checked against a hand-computed value."""
import argparse
import random

import pytest
import torch

import grpo
import ppo
import verify
from verify import math_reward

# ------------------------------------------------------------------ built-in task


def test_builtin_splits_are_disjoint_and_seeded():
    train = verify.builtin_problems("train", 3000)
    heldout = verify.builtin_problems("heldout", 500)
    assert not {p["expr"] for p in train} & {p["expr"] for p in heldout}
    assert verify.builtin_problems("heldout", 500) == heldout


def test_worked_solutions_are_correct_and_well_formed():
    for p in verify.builtin_problems("train", 200):
        for steps in (True, False):
            text = verify.worked_solution(p, show_steps=steps)
            assert math_reward(text, p["answer"]) == 1.0
            assert text.startswith("<think>\n") and "</think>\n\\boxed{" in text
    p = {"expr": "7+5-3+8", "answer": "17", "steps": ["7+5=12", "12-3=9", "9+8=17"]}
    assert verify.worked_solution(p) == "<think>\n7+5=12\n12-3=9\n9+8=17\n</think>\n\\boxed{17}"


def test_arithmetic_problem_answer_is_the_expression_value():
    rng = random.Random(0)
    for _ in range(300):
        p = verify.arithmetic_problem(rng)
        assert int(p["answer"]) == eval(p["expr"])  # the test may eval its own generated arithmetic


# ------------------------------------------------------------------ the reward builder

RIGHT = "<think>\n2+2=4\n</think>\n\\boxed{4}"  # correct and well formed
WRONG = "<think>\n2+2=5\n</think>\n\\boxed{5}"  # wrong, well formed
BARE = "\\boxed{4}"  # correct, no think block


def reward_args(*argv, group_size=2, max_new_tokens=100):
    args = verify.add_reward_args(argparse.ArgumentParser()).parse_args(list(argv))
    args.group_size, args.max_new_tokens = group_size, max_new_tokens
    return args


def rewards(args, texts, lengths, truncated=None, reward_model=None):
    problems = [{"prompt": "Compute 2+2.", "answer": "4"}] * len(texts)
    return verify.compute_rewards(args, problems, texts, lengths, truncated or [False] * len(texts), reward_model)


def test_default_reward_is_accuracy_plus_a_tenth_of_format():
    total, parts = rewards(reward_args(), [RIGHT, WRONG, BARE, ""], [10, 10, 1, 0])
    assert parts == {"accuracy": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert total == pytest.approx([1.1, 0.1, 1.0, 0.0])


def test_cosine_and_lcpo_take_the_accuracy_terms_place_and_are_logged_as_themselves():
    total, parts = rewards(reward_args("--length_reward", "cosine"), [RIGHT, WRONG], [50, 50])
    # Yeo et al.: r = r_L + (r_0 - r_L)(1 + cos(pi t / T)) / 2 at t/T = 1/2: correct 1.5, wrong -5
    assert parts["length"] == pytest.approx([1.5, -5.0]) and parts["accuracy"] == [1.0, 0.0]
    assert total == pytest.approx([1.5 + 0.1, -5.0 + 0.1])
    total, parts = rewards(reward_args("--length_reward", "lcpo", "--target_length", "20", "--accuracy_weight", "2"),
                           [RIGHT, WRONG], [10, 30])
    assert parts["length"] == pytest.approx([1 - 0.0003 * 10, -0.0003 * 10])  # 1[correct] - alpha |n_gold - n|
    assert total == pytest.approx([2 * 0.997 + 0.1, 2 * -0.003 + 0.1])
    total, parts = rewards(reward_args("--length_reward", "lcpo_max", "--target_length", "1000"), [RIGHT], [0])
    assert parts["length"] == pytest.approx([0.8]) and total == pytest.approx([0.9])  # clip(0.0003 * 1000 + 0.5, 0, 1)


def test_kimi_is_added_within_each_group():
    total, parts = rewards(reward_args("--length_reward", "kimi"), [RIGHT, RIGHT, WRONG, RIGHT], [10, 30, 10, 30])
    # per group of 2: lambda = 0.5 - (len - min) / (max - min): 0.5 for the short one, -0.5 for the long one;
    # a wrong answer keeps min(0, lambda)
    assert parts["length"] == [0.5, -0.5, 0.0, -0.5]
    assert total == pytest.approx([1.6, 0.6, 0.1, 0.6])


def test_overlong_language_and_reward_model_terms():
    class FakeRM:  # a reward model scores (prompt, completion) pairs
        def score(self, prompts, completions):
            assert prompts == ["Compute 2+2."] * len(completions)
            return torch.tensor([len(c) / 100 for c in completions])
    args = reward_args("--overlong_cache", "20", "--language_weight", "0.5", "--reward_model_weight", "2",
                       "--format_weight", "0")
    english = "<think>\ntwo and two make four\n</think>\n\\boxed{4}"
    total, parts = rewards(args, [english] * 3, [50, 90, 100], [False, False, True], FakeRM())
    # DAPO soft penalty: 0 up to L_max - cache = 80 tokens, -(n - 80) / 20 after, -1 past L_max (a truncated one)
    assert parts["overlong"] == pytest.approx([0.0, -0.5, -1.0])
    assert parts["language"] == [1.0, 1.0, 1.0] and parts["reward_model"] == pytest.approx([len(english) / 100] * 3)
    rm = 2 * len(english) / 100
    assert total == pytest.approx([1 + 0.5 + rm, 1 - 0.5 + 0.5 + rm, 1 - 1 + 0.5 + rm])


def test_strict_format_refuses_repeated_tags():
    hacked = "<think>\nx\n</think>\n\\boxed{4}\n</think>\\boxed{4}"  # tags repeated after the answer
    assert rewards(reward_args(), [hacked], [10])[1]["format"] == [1.0]  # the lenient check is gameable
    assert rewards(reward_args("--strict_format"), [hacked], [10])[1]["format"] == [0.0]


def test_grpo_and_ppo_take_the_same_reward_flags_and_give_the_same_components():
    flags = ["--group_size", "2", "--max_new_tokens", "100", "--length_reward", "kimi", "--strict_format",
             "--language_weight", "0.3", "--overlong_cache", "20", "--accuracy_weight", "0.7", "--format_weight", "0.2"]
    g, p = grpo.parse_args(flags), ppo.parse_args(flags)
    names = [a.dest for a in verify.add_reward_args(argparse.ArgumentParser())._actions if a.dest != "help"]
    assert {n: getattr(g, n) for n in names} == {n: getattr(p, n) for n in names}
    texts, lengths = [RIGHT, WRONG, BARE, RIGHT], [10, 95, 1, 100]
    assert rewards(g, texts, lengths, [False, False, False, True]) == rewards(p, texts, lengths, [False, False, False, True])
    assert set(rewards(g, texts, lengths)[1]) == {"accuracy", "format", "length", "overlong", "language"}
