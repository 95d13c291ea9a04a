"""Tests for the Knights and Knaves task in verify.py (Logic-RL's puzzles): the generator (a unique solution each,
checked here by an independent enumeration; disjoint, deterministic splits; every construct of the grammar), the
English rendering read back to the same logic, worked solutions, the answer grader (a table of hand-written
answers) and JSONL records through load_problems. No torch; runs in seconds.
Run: python -m pytest tests/test_knights.py -q"""

import itertools
import json
import random
import re
import time

import pytest

import tools
import verify
from tools import task_problems, task_solution
from verify import (accuracy_reward, knights_problem, knights_problems, knights_reward, knights_worked_solution,
                    load_problems, strict_format_reward)

# -----------------------------------------------------------------------------
# an independent model of the puzzles: the claim grammar's truth, written out case by case


def truth(claim, kinds):
    """Whether a claim holds when kinds maps each name to "knight" / "knave"."""
    op, args = claim[0], claim[1:]
    if op == "is":
        return kinds[args[0]] == args[1]
    if op == "and":
        return truth(args[0], kinds) and truth(args[1], kinds)
    if op == "or":
        return truth(args[0], kinds) or truth(args[1], kinds)
    if op == "if":
        return not truth(args[0], kinds) or truth(args[1], kinds)
    if op == "exactly_one":
        return [kinds[x] for x in args[1]].count(args[0]) == 1
    if op == "same":
        return kinds[args[0]] == kinds[args[1]]
    if op == "different":
        return kinds[args[0]] != kinds[args[1]]
    raise AssertionError(f"unknown claim {claim}")


def all_solutions(names, statements):
    """Every assignment under which each knight's claim is true and each knave's false."""
    out = []
    for combo in itertools.product(("knight", "knave"), repeat=len(names)):
        kinds = dict(zip(names, combo))
        if all(truth(s["claim"], kinds) == (kinds[s["speaker"]] == "knight") for s in statements):
            out.append(kinds)
    return out


def truth_table(claim, names):
    return [truth(claim, dict(zip(names, c))) for c in itertools.product(("knight", "knave"), repeat=len(names))]


def said(prompt):
    """[(speaker, sentence)] as the prompt quotes them."""
    return re.findall(r'(\w+) says: "([^"]*)"', prompt)


# -----------------------------------------------------------------------------
# the generator

MIXED = knights_problems("train", 300) + knights_problems("heldout", 60)  # the default mix: 2 to 4 inhabitants


def test_each_puzzle_has_exactly_its_solution():
    for p in MIXED:
        assert set(p) == {"prompt", "answer", "names", "statements", "solution"}
        assert 2 <= len(p["names"]) <= 4 and len(set(p["names"])) == len(p["names"])
        assert all_solutions(p["names"], p["statements"]) == [p["solution"]], p
        assert p["answer"] == ", ".join(f"{x}: {p['solution'][x]}" for x in p["names"])
        assert [s["speaker"] for s in p["statements"]] == p["names"]  # one statement each, in order
        assert json.loads(json.dumps(p)) == p  # JSON-able as it is


def test_default_mix_and_n_people():
    counts = {n: sum(len(p["names"]) == n for p in MIXED[:300]) for n in (2, 3, 4)}
    assert all(counts[n] > 60 for n in counts), counts  # roughly uniform over 2..4
    assert {len(p["names"]) for p in knights_problems("train", 20, n_people=5)} == {5}
    assert {len(p["names"]) for p in knights_problems("train", 40, min_people=3, max_people=6)} == {3, 4, 5, 6}
    for bad in (1, 7):
        with pytest.raises(ValueError):
            knights_problem(random.Random(0), bad)
    with pytest.raises(ValueError):
        knights_problems("test", 1)


def test_splits_are_disjoint_even_renamed_and_deterministic():
    def shape(p):  # the puzzle with names replaced by their positions: a renamed copy has the same shape
        index = {x: i for i, x in enumerate(p["names"])}
        anon = lambda c: [anon(d) for d in c] if isinstance(c, list) else index.get(c, c)
        return json.dumps([[index[s["speaker"]], anon(s["claim"])] for s in p["statements"]])
    train, heldout = knights_problems("train", 2000), knights_problems("heldout", 300)
    assert not {shape(p) for p in train} & {shape(p) for p in heldout}
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    bigger = [shape(p) for p in heldout if len(p["names"]) > 2]  # (two inhabitants allow only a few hundred puzzles)
    assert len(set(bigger)) > 0.8 * len(bigger)  # many distinct puzzles, not a few repeated
    assert knights_problems("train", 50) == train[:50]  # same seed, same puzzles
    assert knights_problems("train", 50, seed=1) != train[:50]
    assert knights_problem(random.Random(7), 4) == knights_problem(random.Random(7), 4)


def test_every_construct_appears_including_self_reference():
    claims = [(s["speaker"], s["claim"]) for p in MIXED for s in p["statements"]]
    assert {c[0] for _, c in claims} == {"is", "and", "or", "if", "exactly_one", "same", "different"}
    assert any(len(c[2]) == 3 for _, c in claims if c[0] == "exactly_one")
    assert any(c[1] == "knave" for _, c in claims if c[0] == "exactly_one")
    sentences = [sentence for p in MIXED for _, sentence in said(p["prompt"])]
    assert any(re.search(r"\bI am a (knight|knave)\b", s) for s in sentences)  # "I" inside a compound claim
    assert any(re.search(r"\band I are\b", s) for s in sentences)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_every_size_generates_fast_with_a_unique_solution(n):
    t = time.monotonic()
    problems = knights_problems("train", 30, seed=n, n_people=n)
    assert time.monotonic() - t < 3
    for p in problems:
        assert len(p["names"]) == n and all_solutions(p["names"], p["statements"]) == [p["solution"]]
        assert knights_reward(knights_worked_solution(p), p["names"], p["solution"]) == 1.0


def test_prompt_names_everyone_and_asks_the_question():
    p = MIXED[0]
    assert f"You meet {len(p['names'])} inhabitants" in p["prompt"]
    assert all(x in p["prompt"] for x in p["names"])
    assert p["prompt"].endswith("Who is a knight and who is a knave?")
    assert [x for x, _ in said(p["prompt"])] == p["names"]


# -----------------------------------------------------------------------------
# rendering: the English of each construct, and read back to the same logic

NAMES = ["Alice", "Bob", "Carol"]
RENDERED = [  # (claim, speaker, the sentence the prompt quotes)
    (["is", "Bob", "knave"], "Alice", "Bob is a knave."),
    (["and", ["is", "Bob", "knave"], ["is", "Carol", "knight"]], "Alice", "Bob is a knave and Carol is a knight."),
    (["or", ["is", "Alice", "knight"], ["is", "Carol", "knave"]], "Alice", "I am a knight or Carol is a knave."),
    (["if", ["is", "Bob", "knight"], ["is", "Carol", "knave"]], "Alice", "If Bob is a knight, then Carol is a knave."),
    (["exactly_one", "knight", ["Bob", "Carol"]], "Alice", "Exactly one of Bob and Carol is a knight."),
    (["exactly_one", "knave", ["Alice", "Bob", "Carol"]], "Alice", "Exactly one of Bob, Carol and I is a knave."),
    (["same", "Alice", "Carol"], "Alice", "Carol and I are the same kind."),
    (["different", "Bob", "Carol"], "Alice", "Bob and Carol are different kinds."),
]


@pytest.mark.parametrize("claim, speaker, sentence", RENDERED)
def test_each_construct_renders_and_parses_back(claim, speaker, sentence):
    p = verify._knights_prompt(NAMES, [{"speaker": speaker, "claim": claim}])
    assert said(p) == [(speaker, sentence)]
    back = verify._parse_claim(sentence, speaker, NAMES)
    assert truth_table(back, NAMES) == truth_table(claim, NAMES)
    assert verify._parse_claim(sentence.upper(), speaker, NAMES)[0] == claim[0]  # case-insensitive


def test_generated_statements_read_back_to_the_same_logic():
    for p in MIXED:
        quoted = said(p["prompt"])
        assert len(quoted) == len(p["statements"])
        for (speaker, sentence), s in zip(quoted, p["statements"]):
            back = verify._parse_claim(sentence, speaker, p["names"])
            assert speaker == s["speaker"] and truth_table(back, p["names"]) == truth_table(s["claim"], p["names"])


def test_parse_rejects_what_the_grammar_does_not_say():
    for sentence in ("Bob is a knight and Carol is a knave and Alice is a knight.", "Bob is not a knight.",
                     "Zed is a knight.", "Bob is a wizard.", "Bob and Carol are friends."):
        with pytest.raises(ValueError):
            verify._parse_claim(sentence, "Alice", NAMES)


# -----------------------------------------------------------------------------
# worked solutions


def test_worked_solutions_grade_one_and_argue_correctly():
    problems = MIXED + knights_problems("train", 40, seed=3, n_people=6)
    supposed = 0
    for p in problems:
        for show_steps in (True, False):
            solution = knights_worked_solution(p, show_steps)
            assert solution.startswith("<think>\n") and solution.endswith(f"</think>\n\\boxed{{{p['answer']}}}")
            assert knights_reward(solution, p["names"], p["solution"]) == 1.0
            assert accuracy_reward(p, solution) == 1.0 and task_solution("builtin:knights", p, show_steps) == solution
            assert strict_format_reward(solution) == 1.0
        lines = knights_worked_solution(p).split("\n")[1:-2]
        assert len(lines) <= 6 * len(p["names"]) + 12, lines  # a few lines per inhabitant
        for line in lines:  # the top-level suppositions are the wrong kinds, the conclusions the right ones
            if m := re.fullmatch(r"Suppose (\w+) is a (knight|knave)\.", line):
                assert p["solution"][m[1]] != m[2]
                supposed += 1
            if m := re.fullmatch(r"So (\w+) is a (knight|knave)\.", line):
                assert p["solution"][m[1]] == m[2]
            assert "contradiction" not in line or line.endswith(": contradiction.")
    assert supposed > len(problems) // 2  # the case analysis is there, not only direct deductions


def test_worked_solution_example():
    p = verify._knights_problem_dict(["Alice", "Bob"], [
        {"speaker": "Alice", "claim": ["is", "Bob", "knight"]},
        {"speaker": "Bob", "claim": ["if", ["is", "Bob", "knave"], ["is", "Alice", "knave"]]}],
        {"Alice": True, "Bob": True})
    assert 'Bob says: "If I am a knave, then Alice is a knave."' in p["prompt"]
    assert knights_worked_solution(p) == (
        "<think>\n"
        "Suppose Alice is a knave.\n"
        "Alice is a knave, so \"Bob is a knight\" is false: Bob is a knave.\n"
        "Bob is a knave, so \"If Bob is a knave, then Alice is a knave\" must be false, but it is true: contradiction.\n"
        "So Alice is a knight.\n"
        "Alice is a knight, so \"Bob is a knight\" is true: Bob is a knight.\n"
        "</think>\n\\boxed{Alice: knight, Bob: knight}")
    assert knights_worked_solution(p, show_steps=False) == (
        "<think>\nAlice is a knight: \"Bob is a knight\" is true.\n"
        "Bob is a knight: \"If Bob is a knave, then Alice is a knave\" is true.\n</think>\n"
        "\\boxed{Alice: knight, Bob: knight}")
    # deduction alone: "Alice and I are the same kind" makes Alice a knight, whoever Bob is
    p = verify._knights_problem_dict(["Alice", "Bob"], [
        {"speaker": "Alice", "claim": ["is", "Bob", "knave"]},
        {"speaker": "Bob", "claim": ["same", "Alice", "Bob"]}], {"Alice": True, "Bob": False})
    assert knights_worked_solution(p).split("\n")[1:3] == [
        "Bob can only say \"Alice and Bob are the same kind\" if Alice is a knight.",
        "Alice is a knight, so \"Bob is a knave\" is true: Bob is a knave."]


def test_worked_solution_refuses_a_puzzle_with_two_solutions():
    p = verify._knights_problem_dict(["Alice", "Bob"], [{"speaker": "Alice", "claim": ["is", "Bob", "knave"]}],
                                     {"Alice": True, "Bob": False})
    with pytest.raises(ValueError, match="Alice: knave, Bob: knight also fits"):
        knights_worked_solution(p)


def test_worked_solution_splits_cases_when_deduction_stalls():
    # every supposition about one inhabitant leaves the others open: the refutation must split again
    problems = [p for p in knights_problems("train", 300, seed=1, n_people=5)
                if "Suppose also" in knights_worked_solution(p)]
    assert problems
    for p in problems:
        text = knights_worked_solution(p)
        assert text.count("Suppose also") == text.count("Suppose instead") == text.count("Both cases fail.")
        assert knights_reward(text, p["names"], p["solution"]) == 1.0


# -----------------------------------------------------------------------------
# the grader: hand-written answers for Alice (knight), Bob (knave), Carol (knight)

GOLD = {"Alice": "knight", "Bob": "knave", "Carol": "knight"}
ANSWERS = [
    # right, in every accepted spelling
    ("\\boxed{Alice: knight, Bob: knave, Carol: knight}", 1.0),
    ("<think>...</think>\n\\boxed{Alice is a knight, Bob is a knave, Carol is a knight}", 1.0),
    ("\\boxed{Bob: knave; Carol: knight; Alice: knight}", 1.0),  # any order
    ("\\boxed{alice: KNIGHT, bob: Knave, CAROL: Knight}", 1.0),  # any case
    ("\\boxed{Alice and Carol are knights, Bob is a knave}", 1.0),  # plural
    ("\\boxed{knights: Alice, Carol; knaves: Bob}", 1.0),
    ("\\boxed{Knights: Alice, Carol. Knave: Bob.}", 1.0),
    ("\\boxed{The knights are Alice and Carol. The knave is Bob.}", 1.0),
    ("\\boxed{Knights: Alice, Bob, Carol; Knaves: none}", 0.0),  # the header form, read right: wrong about Bob
    ('\\boxed{{"Alice": "knight", "Bob": "knave", "Carol": "knight"}}', 1.0),  # JSON object
    ('<answer>{"knights": ["Alice", "Carol"], "knaves": ["Bob"]}</answer>', 1.0),
    ('\\boxed{["Alice: knight", "Bob: knave", "Carol: knight"]}', 1.0),  # a list
    ("\\boxed{[(Alice, knight), (Bob, knave), (Carol, knight)]}", 1.0),
    ("\\boxed{1. Alice - knight\n2. Bob - knave\n3. Carol - knight}", 1.0),  # a numbered list
    ("\\boxed{\\text{Alice: knight, Bob: knave, Carol: knight}}", 1.0),
    ("So the answer is:\n**Alice**: knight\n**Bob**: knave\n**Carol**: knight\n", 1.0),  # no box: the last lines
    ("Therefore Alice is a knight, Bob is a knave and Carol is a knight.", 1.0),
    ("<think>Suppose Alice is a knave: then Bob lies.</think>\nAlice is a knight. Bob is a knave. Carol is a knight.",
     1.0),  # only the final lines that read as an answer count ...
    ("Alice: knave\nWait, let me check that again.\n\nAlice: knight, Bob: knave, Carol: knight\n", 1.0),
    ("Alice: knight, Bob: knave, Carol: knight\nWait, Alice: knave", 0.0),  # ... all of them
    ("\\boxed{Alice's a knight, Bob's a knave, Carol's a knight}", 1.0),
    # wrong
    ("\\boxed{Alice: knight, Bob: knight, Carol: knight}", 0.0),
    ("\\boxed{Alice: knave, Bob: knight, Carol: knave}", 0.0),  # every kind flipped
    ("\\boxed{knights: Bob; knaves: Alice, Carol}", 0.0),
    ("<answer>Alice: knight, Bob: knave, Carol: knight</answer> \\boxed{Alice: knave}", 0.0),  # the box wins
    # partial, extra, unreadable
    ("\\boxed{Alice: knight, Bob: knave}", 0.0),  # Carol missing
    ("\\boxed{Alice: knight, Bob: knave, Carol}", 0.0),  # Carol without a kind
    ("\\boxed{Alice: knight, Bob: knave, Carol: knight, Bob}", 0.0),  # a name left dangling
    ("\\boxed{Alice: knight, Bob: knave, Carol: knight, Dave: knave}", 0.0),  # a name not in the puzzle
    ("\\boxed{Alice: knight, Bob: knave, Carol: knight, the rest: knaves}", 0.0),
    ("\\boxed{knight, knave, knight}", 0.0),  # kinds without names
    ("\\boxed{}", 0.0),
    ("", 0.0),
    (None, 0.0),
    ("Alice: knight, Bob: knave, Carol: knight\nI hope this helps!", 0.0),  # no box, last line is not an answer
    # hedged or contradictory: no benefit of the doubt
    ("\\boxed{Alice is a knight or a knave, Bob: knave, Carol: knight}", 0.0),
    ("\\boxed{Alice: knight, Bob: knave or knight, Carol: knight}", 0.0),
    ("\\boxed{Alice: knight, Bob: maybe a knave, Carol: knight}", 0.0),
    ("\\boxed{Alice or Carol is a knight, Bob: knave}", 0.0),
    ("\\boxed{Alice: knight, Bob: knave or Carol: knight}", 0.0),
    ("\\boxed{Alice: knight, Bob: knave?, Carol: knight}", 0.0),
    ("\\boxed{Alice: knight, Bob: not a knight, Carol: knight}", 0.0),
    ("\\boxed{Alice: knight, Bob: knave, Carol: knight, Bob: knight}", 0.0),  # Bob named with both kinds
    ("\\boxed{knights: Alice, Bob, Carol; knaves: Bob}", 0.0),
    ("\\boxed{Alice: knight, Alice: knight, Bob: knave, Carol: knight}", 1.0),  # repeated, never contradicted
    ("\\boxed{Knights: Alice, Bob: knave, Carol}", 0.0),  # the two forms mixed in one sentence
    ("\\boxed{Knights: Alice, Carol is a knave, Bob}", 0.0),  # (not "knights: Alice, Carol; knave: Bob")
    ("\\boxed{Alice is a knight knave, Bob: knave, Carol: knight}", 0.0),
    # huge
    ("\\boxed{" + "Alice: knight, " * 300 + "Bob: knave, Carol: knight}", 0.0),
]


@pytest.mark.parametrize("completion, expected", ANSWERS)
def test_knights_reward(completion, expected):
    assert knights_reward(completion, list(GOLD), GOLD) == expected
    if completion is not None:  # the dispatcher picks knights_reward from the problem's fields
        problem = {"prompt": "p", "answer": "Alice: knight, Bob: knave, Carol: knight", "names": list(GOLD),
                   "statements": [], "solution": GOLD}
        assert accuracy_reward(problem, completion) == expected


def test_names_that_are_also_words():
    names, gold = ["A", "B"], {"A": "knight", "B": "knave"}
    assert knights_reward("\\boxed{A is a knight, B is a knave}", names, gold) == 1.0
    assert knights_reward("\\boxed{A is a knave, B is a knave}", names, gold) == 0.0


def test_huge_answers_are_fast():
    t = time.monotonic()
    for text in ("\\boxed{" + "Alice: knight, " * 10**5 + "}", "Alice: knight\n" * 10**5, "x" * 10**6,
                 "\\boxed{" * 10**4, "<answer>" + "Bob " * 10**5 + "</answer>"):
        assert knights_reward(text, list(GOLD), GOLD) == 0.0
    assert time.monotonic() - t < 2


# -----------------------------------------------------------------------------
# the task by its --data name, and JSONL records


def test_builtin_knights_by_data_name():
    assert tools.is_builtin("builtin:knights") and "builtin:knights" in tools.BUILTIN_TASKS
    problems = task_problems("builtin:knights", "heldout", 5, seed=2)
    assert problems == knights_problems("heldout", 5, seed=2)
    assert all(accuracy_reward(p, task_solution("builtin:knights", p, False)) == 1.0 for p in problems)


GOOD = [
    {"names": ["Alice", "Bob"], "statements": [{"speaker": "Alice", "claim": ["is", "Bob", "knave"]},
                                               {"speaker": "Bob", "claim": ["same", "Alice", "Bob"]}],
     "solution": {"Alice": "knight", "Bob": "knave"}},
    {"prompt": "A custom question.", "names": ["Alice", "Bob"],  # English claims, and a whole statement as a string
     "statements": [{"speaker": "Alice", "claim": "Bob is a knave."}, 'Bob says: "Alice and I are the same kind."'],
     "solution": {"Alice": "knight", "Bob": "knave"}},
]


def test_load_problems_knights_records(tmp_path):
    path = tmp_path / "knights.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD + [{"problem": "Half?", "solution": "\\boxed{1/2}"}]))
    first, second, math = load_problems(path)
    assert first == {"prompt": verify._knights_prompt(["Alice", "Bob"], GOOD[0]["statements"]),
                     "answer": "Alice: knight, Bob: knave", "names": ["Alice", "Bob"],
                     "statements": GOOD[0]["statements"], "solution": GOOD[0]["solution"]}
    assert 'Alice says: "Bob is a knave." Bob says: "Alice and I are the same kind."' in first["prompt"]
    assert second["prompt"] == "A custom question."
    assert truth_table(second["statements"][1]["claim"], ["Alice", "Bob"]) == truth_table(
        ["same", "Alice", "Bob"], ["Alice", "Bob"]) and second["statements"][0] == GOOD[0]["statements"][0]
    assert math == {"prompt": "Half?", "answer": "1/2"}  # a MATH record's "solution" is not a knights solution
    assert accuracy_reward(first, "\\boxed{Bob: knave, Alice: knight}") == 1.0
    assert accuracy_reward(first, "\\boxed{Bob: knight, Alice: knave}") == 0.0
    assert accuracy_reward(first, knights_worked_solution(first)) == 1.0


def test_generated_problems_round_trip_through_jsonl(tmp_path):
    problems = knights_problems("train", 30, n_people=5)
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({k: p[k] for k in ("names", "statements", "solution")}) + "\n"
                            for p in problems))
    assert load_problems(path) == problems


ok = GOOD[0]
BAD = [  # (record, what the error must say)
    ({**ok, "statements": [{"speaker": "Alice", "claim": ["is", "Zed", "knave"]}]}, "unknown name 'Zed'"),
    ({**ok, "statements": [{"speaker": "Zed", "claim": ["is", "Bob", "knave"]}]}, "unknown speaker 'Zed'"),
    ({**ok, "statements": [{"speaker": "Alice", "claim": "Zed is a knave."}]}, "unknown name 'Zed'"),
    ({**ok, "statements": [{"speaker": "Alice", "claim": "Bob is probably a knave."}]}, "cannot read"),
    ({**ok, "statements": [{"speaker": "Alice", "claim": ["is", "Bob", "wizard"]}]}, "not a claim of the grammar"),
    ({**ok, "statements": [{"speaker": "Alice", "claim": [
        "and", ["or", ["is", "Bob", "knave"], ["is", "Bob", "knight"]], ["is", "Bob", "knave"]]}]}, "combine two"),
    ({**ok, "statements": [{"speaker": "Alice", "claim": ["same", "Bob", "Bob"]}]}, "each person once"),
    ({**ok, "statements": [{"speaker": "Alice"}]}, "statement 1"),
    ({**ok, "statements": "Alice says hi"}, "statements"),
    ({**ok, "solution": {"Alice": "knight"}}, "missing ['Bob']"),
    ({**ok, "solution": {"Alice": "knight", "Bob": "knave", "Carol": "knight"}}, "unknown ['Carol']"),
    ({**ok, "solution": {"Alice": "knight", "Bob": "liar"}}, "knight\" or \"knave"),
    ({**ok, "solution": {"Alice": "knave", "Bob": "knight"}}, "does not satisfy statement 2: Bob is a knight but"),
    ({**ok, "solution": {"Alice": "knave", "Bob": "knave"}}, "does not satisfy statement 1: Alice is a knave but"),
    ({**ok, "statements": ok["statements"][:1]}, "not unique: Alice: knave, Bob: knight also satisfies"),
    ({**ok, "statements": []}, "not unique"),
    ({**ok, "names": ["Alice", "alice"]}, "distinct"),
    ({**ok, "names": ["Alice", "Knight"]}, "cannot be a name"),
    ({**ok, "names": ["Alice", "Bob Jr"]}, "one-word names"),
    ({**ok, "names": []}, "one-word names"),
    ({**ok, "prompt": 5}, "prompt must be a string"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_load_problems_bad_knights_record_names_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: ") as e:
        load_problems(path)
    assert message in str(e.value)
