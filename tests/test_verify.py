"""Tests for verify.py: the equivalence table (+ reflexivity / symmetry), timeouts, extraction,
format / length / language rewards, the code sandbox, eval helpers and data loaders.
Run: python -m pytest tests/test_verify.py -q"""

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import warnings

import pytest

import verify
from verify import (code_reward, cosine_length_reward, extract_answer, extract_code, extract_gsm8k_answer,
                    format_reward, is_equiv, kimi_length_reward, language_consistency_reward, lcpo_max_reward,
                    lcpo_reward, load_problems, maj_at_k, majority_vote, math_reward, overlong_penalty, pass_at_k,
                    read_jsonl, safe_reward, strict_format_reward)

# -----------------------------------------------------------------------------
# the equivalence table: (a, b, expected). Grouped by category; traps are marked.

TABLE = [
    # integers, decimals, signs
    ("42", "42", True), ("41", "42", False), ("0", "0.0", True), ("-0", "0", True), ("10", "10.0", True),
    ("0.1", ".1", True), ("-5", "-5", True), ("-5", "5", False), ("3", "3.0001", False),  # trap: not within 1e-6
    ("3.0", "3.00", True), ("1234567", "1234568", False), ("16386.16", "16386.17", False),
    ("1e-7", "0", False),  # documented: only exact zero equals 0
    ("0.0833333333333333", "\\frac{1}{12}", True), ("0.333333", "\\frac13", True), ("0.3333", "\\frac13", False),
    ("2.5", "5/2", True), ("007", "7", True), ("+3", "3", True),
    # thousands separators, currency, units
    ("1,000", "1000", True), ("1,2", "12", False),  # trap: 1,2 is a list
    ("\\sqrt{67},-\\sqrt{85}", "\\sqrt{67}", False), ("918\\frac{1}{2}", "918.5", True), ("4 2", "42", True),
    ("1,000,000", "1000000", True), ("12,345", "12345", True), ("1{,}000", "1000", True),
    ("11,\\!111,\\!111,\\!100", "11111111100", True), ("1 000", "1000", True), ("32, 349", "32349", False),
    ("\\$1,000.99", "1000.99", True), ("$10", "10", True), ("10", "\\$10", True), ("5 dollars", "5", True),
    ("10 cm", "10", True), ("10\\text{ cm}", "10", True), ("15\\mbox{ cm}^2", "15", True),
    ("125\\textnormal{ miles}", "125", True), ("10\\text{ units}", "100", False), ("0.06 \\text{ yuan}", "0.06", True),
    ("4 sq units", "4", True), ("2x", "2", False), ("5 m", "5", True), ("5 apples", "6", False), ("20 x y", "20", False),
    ("70 miles per hour", "70", True),
    # percent (documented: p% equals p and p/100)
    ("10", "10\\%", True), ("0.1", "10\\%", True), ("10", "0.1", False), ("50\\%", "\\frac{1}{2}", True),
    ("25\\%", "50\\%", False), ("28 percent", "28\\%", True), ("28 pct", "28", True), ("12.5\\%", "0.125", True),
    ("20\\%", "0.3", False),
    # fractions, mixed numbers
    ("0.5", "1/2", True), ("1/2", "2", False), ("\\frac12", "0.5", True), ("\\frac{1}2", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True), ("\\tfrac83", "\\frac{8}{3}", True), ("\\cfrac{1}{3}", "1/3", True),
    ("\\frac{2}{4}", "\\frac12", True), ("-\\frac{10}{9}", "-10/9", True), ("\\frac{10}{9}", "-10/9", False),
    ("2\\frac{1}{2}", "5/2", True), ("-2\\frac{1}{2}", "-2.5", True), ("2 1/2", "2.5", True),
    ("7/2", "3\\frac12", True), ("2\\frac{1}{2}", "1", False), ("\\frac{1}{0}", "1", False),
    ("\\frac34i", "\\frac{3}{4}i", True), ("\\tfrac{1}{2} + \\frac1{72}", "\\frac{1}{2} + 2/3", False),
    # roots, pi, exponents, scientific notation
    ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt{8}", "3\\sqrt{2}", False), ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("\\sqrt2+\\sqrt5", "\\sqrt{2}+\\sqrt{5}", True), ("\\sqrt[3]{27}", "3", True), ("\\sqrt[3]{x}", "x^{1/3}", True),
    ("27^{1/3}", "3", True), ("\\frac{\\sqrt3}{2}", "\\sqrt{3}/2", True), ("\\frac{1+\\sqrt5}{2}", "2", False),
    ("\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{2\\sqrt{33}+15}", "\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{15+2\\sqrt{33}}", True),
    ("4", "\\frac{34}{16}+\\frac{\\sqrt{1358}}{16}", False), ("4", "4\\sqrt{2}", False), ("1", "1\\sqrt{19}", False),
    ("\\pi", "3.14159265358979", True), ("\\pi", "3.14", False), ("\\frac{9}{4}\\pi", "\\frac94\\pi", True),
    ("2\\pi", "\\pi \\cdot 2", True), ("2^{10}", "1024", True), ("2^10", "1024", True), ("8^{-1}", "0.125", True),
    ("x^{2}", "x^2", True), ("x**2", "x^2", True), ("1e5", "100000", True), ("1E-3", "0.001", True),
    ("1\\times10^5", "100000", True), ("1.5e3", "1500", True), ("6.02 \\times 10^{23}", "6.02e23", True),
    ("2.5\\cdot 10^{-2}", "0.025", True), ("1\\times10^5", "1\\times10^6", False), ("10^{-3}", "0.001", True),
    # other functions and constants
    ("\\binom{5}{2}", "10", True), ("5!", "120", True), ("e^{i\\pi}", "-1", True), ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True), ("\\sin(\\pi/6)", "\\frac12", True), ("|-3|", "3", True),
    ("\\lfloor 3.7 \\rfloor", "3", True), ("3+4i", "4i+3", True), ("3+4i", "3-4i", False),
    ("\\tan^2(y)+1", "\\sec^2(y)", True), ("2 \\sin b \\cos a", "2\\cos(a)\\sin(b)", True),
    ("\\sin^{-1}(1)", "\\frac{\\pi}{2}", True), ("\\ln 2", "\\log 2", True),
    # LaTeX wrappers and spacing
    ("\\left( \\frac{1}{3} \\right)", "1/3", True), ("\\frac{1}{3} \\text{meters}", "1/3", True),
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", True), ("\\displaystyle\\frac{1}{2}", "0.5", True),
    ("1\\,000", "1000", True), ("\\!\\!5", "5", True), ("x\\quad", "x", True), ("\\mathrm{e}", "e", True),
    ("\\textbf{7}", "7", True), ("\\mbox{12}", "12", True), ("\\text{(A)}", "A", True), ("\\boxed{5}", "5", True),
    ("\\boxed{\\frac{1}{3}}", "1/3", True), ("5.", "5", True), ("\\[ 9 \\]", "9", True),
    # degrees
    ("90^\\circ", "90", True), ("90^{\\circ}", "90", True), ("90°", "90", True), ("45^\\circ", "90", False),
    ("\\frac{\\pi}{3}", "60^\\circ", False),
    # symbolic expressions
    ("x^2+2x+1", "(x+1)^2", True), ("x^2+2x+1", "(x+2)^2", False), ("2x", "x2", True), ("2x", "2y", False),
    ("\\frac{x+2}{7}", "\\frac{x}{7}+\\frac{2}{7}", True), ("\\frac{\\pi r}{h+r}", "\\frac{r\\pi}{r+h}", True),
    ("2-2p", "-2p+2", True), ("x+2n+1", "x+1", False), ("(a+5)(b+2)", "(+5)(b+2)", False),
    ("\\sqrt{x^2}", "|x|", True), ("\\sqrt{x^2}", "x", False), ("2xy", "2yx", True), ("ab", "a\\cdot b", True),
    ("\\alpha+\\beta", "\\beta+\\alpha", True), ("a_1+a_2", "a_2+a_1", True), ("a_1", "a_2", False),
    ("\\frac{1}{x-1}-\\frac{1}{x+1}", "\\frac{2}{x^2-1}", True), ("x^3-1", "(x-1)(x^2+x+1)", True),
    ("0.5x", "\\frac{x}{2}", True), ("x", "y", False), ("e", "E", False), ("n(n+1)/2", "\\frac{n^2+n}{2}", True),
    ("(r+5)(r+5)", "(r+5)^2", True), ("x^2+2x+1", "x^3+2x+1", False), ("E", "\\mathrm{E}*2", False),
    ("\\cos^2 x + \\sin^2 x", "1", True), ("\\frac{\\sqrt{3}}{3} \\approx 0.577", "\\frac{\\sqrt{3}}{3}", True),
    # equations
    ("x=3", "3", True), ("x = 3", "4", False), ("y = 2x+1", "2x+1", True), ("k=1", "1", True), ("1", "k=1", True),
    ("f(x) = x^2", "x^2", True), ("a+b=5", "5", True), ("2x+z=1", "1", False), ("7 = 11a+c", "11a+c", False),
    ("a^2 + b = 0", "0", False), ("x = 5+5+1 = 7 = 11", "11", True), ("x = 2", "y = 2", False), ("x=2", "2x=4", True),
    ("2x+4y-3=0", "y=-\\frac{1}{2}x+\\frac{3}{4}", True), ("34x+45y-20z+100=0", "-34x-45y+20z-100=0", True),
    ("x^2/4 + y^2/3 = 1", "x^2/16 + y^2/12 = 1/4", True), ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", False),
    ("(p,q)=(3,2)", "(3,2)", True), ("x \\approx 11", "11", True), ("|AB|=1", "1", True),
    ("\\log_{36}(36)=1", "\\log_{36}(36^{2})=2", False),  # true statements about different numbers
    ("\\cos(0)=1, \\sin(0)=0", "\\cos(\\pi)=-1, \\sin(\\pi)=0", False), ("\\sin(30) \\approx 0.5", "\\sin(31) \\approx 0.5", False),
    ("\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}", "\\frac{1}{\\sqrt{6}}", True),
    # intervals and inequalities
    ("[1,2)", "[1,2]", False),  # trap: bracket matters
    ("[1,2)", "[1, 2)", True), ("(0,9)", "[0,9)", False), ("x>3", "(3,\\infty)", True), ("x>3", "[3,\\infty)", False),
    ("x \\ge 2", "[2, \\infty)", True), ("-2 \\le x \\le 7", "[-2,7]", True), ("x \\in [-2,7]", "[-2,7]", True),
    ("x<1", "-x>-1", True), ("x<1", "x>-1", False), ("x \\leq 5", "5 \\geq x", True), ("x \\geq 5", "x \\leq 5", False),
    ("x+y>1", "2x+2y>2", True), ("x+y>1", "x+y<1", False), ("0<f(x)<1", "(0,1)", True),
    ("(-\\infty, 0) \\cup (0, \\infty)", "x \\neq 0", True), ("[0,1] \\cup [1,2]", "[0,2]", True),
    ("(2,12) \\cup (12,102)", "x \\in (2, 12) \\cup (12, 102)", True), ("(2,12) \\cup (12,102)", "(2,102)", False),
    ("1\\leq|z|\\leq \\frac{3}{2}", "\\left[-\\frac{3}{2}, -1\\right] \\cup \\left[1, \\frac{3}{2}\\right]", True),
    ("(\\frac{3}{5},\\frac{8}{3}]", "(0.6, \\frac83]", True), ("\\mathbb{R}", "(-\\infty,\\infty)", True),
    # infinity
    ("\\infty", "\\infty", True), ("\\infty", "+\\infty", True), ("-\\infty", "\\infty", False), ("\\infty", "oo", True),
    ("(1, +\\infty)", "(1,\\infty)", True), ("\\infty", "10^{100}", False),
    # tuples (ordered), sets and solution lists (unordered)
    ("(1,2)", "(2,1)", False),  # trap: tuples are ordered
    ("(1,2)", "(1, 2)", True), ("(1,4.5)", "(1,\\frac{9}{2})", True), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(1,2,3)", "(1,2)", False), ("\\langle 1, 2\\rangle", "(1,2)", True),
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("\\{1,2\\}", "1, 2", True),
    ("1,2", "2,1", True), ("x=1, x=2", "1,2", True), ("x=1, x=2", "1,3", False), ("-2,1", "1,-2", True),
    ("1 and 2", "1,2", True), ("6 \\text{ and } 8", "6,8", True), ("1, 2, 3", "1,2", False),
    ("1,1,2,3", "1,2,3", False),  # lists are multisets
    ("(1,2),(1,2),(3,4)", "(3,4),(1,2)", True),  # ...but a list of tuples is a solution set
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True), ("\\pm 2021", "2021", False), ("\\pm 2021", "-2021, 2021", True),
    ("(1,3)", "{1,3}", True), ("(3,1)", "{1,3}", False), ("(5, 8), (8, 5)", "(8,5),(5,8)", True),
    ("(x, y) = (5, 8) \\text{ and } (8, 5)", "(5, 8), (8, 5)", True), ("a_3 = 2, a_{37} = 19", "a_{37} = 19, a_3 = 2", True),
    ("\\{1\\} \\cup [0,7)", "[0,7)\\cup\\{1\\}", True), ("\\emptyset", "\\varnothing", True), ("\\emptyset", "\\{0\\}", False),
    ("7:32", "7:32", True), ("12:00", "1:00", False),
    # matrices and vectors
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", False),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", False),
    ("\\begin{pmatrix}\\frac12 & 0.75\\end{pmatrix}", "\\begin{pmatrix}0.5 & \\frac34\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)", True), ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "(1,2,3,4)", False),
    ("\\left[\\begin{array}{cc}1 & 2 \\\\3 & 4\\end{array}\\right]", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", True),
    ("\\begin{pmatrix}\\frac{1}{3x^{2/3}}&0\\\\-\\sin(x)&0\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{3\\sqrt[3]{x}^2}&0\\\\-\\sin(x)&0\\end{pmatrix}", True),
    # multiple choice
    ("A", "(A)", True), ("B", "A", False), ("\\text{(C)}", "C", True), ("\\textbf{(C)}", "(C)", True),
    ("(C) 12", "C", True), ("C", "c", False), ("E", "\\text{E}", True), ("D", "\\text{E}", False),
    # text answers (case-insensitive), bases
    ("Yes", "yes", True), ("\\text{No}", "yes", False), ("\\text{Evelyn}", "evelyn", True), ("\\text{east}", "West", False),
    ("\\text{odd}", "odd", True), ("Even", "even", True), ("odd", "even", False), ("xy", "yx", False),
    ("odd", "\\text{oddd}", False), ("17\\text{ any text}", "17", True), ("185\\", "185", True),
    ("The midpoints form a regular hexagon", "the midpoints form a regular hexagon", True),
    ("204_5", "204_5", True), ("204_5", "54", False), ("1112112_3", "1112112_3", True),
]

EQUIV_IDS = [f"{a!r}~{b!r}" for a, b, _ in TABLE]

def test_table_is_broad():
    assert len(TABLE) >= 200
    assert sum(e for *_, e in TABLE) >= 100 and sum(not e for *_, e in TABLE) >= 60

@pytest.mark.parametrize("a,b,expected", TABLE, ids=EQUIV_IDS)
def test_is_equiv_table(a, b, expected):
    assert is_equiv(a, b) is expected

@pytest.mark.parametrize("a,b,expected", TABLE, ids=EQUIV_IDS)
def test_is_equiv_symmetric(a, b, expected):
    assert is_equiv(a, b) == is_equiv(b, a)

@pytest.mark.parametrize("a", sorted({x for a, b, _ in TABLE for x in (a, b)}))
def test_is_equiv_reflexive(a):
    assert is_equiv(a, a)

@pytest.mark.parametrize("bad", [None, "", "   ", "$$", "\\boxed{}"])
def test_is_equiv_empty_or_none_is_false(bad):
    assert is_equiv(bad, "1") is False and is_equiv("1", bad) is False

@pytest.mark.parametrize("weird", [object(), 3, 2.5, ["1"], "\\frac{", "}}}{{{", "\\left(", "((((", "^^^", "\x00\xff", "1/0"])
def test_is_equiv_never_raises(weird):
    assert is_equiv(weird, "1") in (True, False)
    assert is_equiv("x+", weird) in (True, False)

def test_is_equiv_accepts_numbers():
    assert is_equiv(3, "3") and is_equiv(2.5, "5/2") and not is_equiv(3, 4)

def test_plain_numbers_take_the_fast_path(monkeypatch):
    # plain numbers never reach the sympy worker (RL calls them millions of times)
    monkeypatch.setattr(verify, "_sympy_equiv", lambda *a: pytest.fail("sympy worker used"))
    for a, b, e in [("42", "42.0", True), ("1,000", "1000", True), ("\\frac{1}{2}", "0.5", True), ("3", "3.0001", False),
                    ("10\\%", "0.1", True), ("(1,2)", "(1, 2.0)", True), ("x=1, x=2", "2,1", True), ("yes", "no", False)]:
        assert is_equiv(a, b) is e
    t = time.perf_counter()
    for _ in range(1000):
        is_equiv("1234", "1235")
    assert (time.perf_counter() - t) / 1000 < 1e-3  # well under a millisecond each

# -----------------------------------------------------------------------------
# timeouts: adversarial input, any thread or process, worker recovery

ADVERSARIAL = ["9^9^9^9^9", "1000000!", "10^{10^{10}}", "{" * 5000 + "1" + "}" * 5000, "\\frac{" * 300 + "1" + "}{2}" * 300,
               "(x+1)^{10^{9}}", "2^{2^{2^{2^{2^{2}}}}}", "1e999999999", "9" * 5000, "\\sqrt{" * 400 + "2" + "}" * 400,
               "\\binom{10^{9999}}{10^{9998}}"]  # the last one hangs sympy itself: only the timeout stops it

@pytest.mark.parametrize("adv", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_input_returns_false_in_time(adv):
    is_equiv("x", "x+0")  # worker warm, so the timing measures only the comparison
    t = time.monotonic()
    assert is_equiv(adv, "5", timeout=1.0) is False
    assert time.monotonic() - t < 2.0

def test_worker_recovers_after_timeout():
    assert is_equiv("\\binom{10^{9999}}{10^{9998}}", "5", timeout=1.0) is False  # kills the worker
    t = time.monotonic()
    assert is_equiv("x^2-1", "(x-1)(x+1)") is True  # a fresh worker takes over
    assert time.monotonic() - t < 5.0
    t = time.monotonic()
    assert is_equiv("\\sqrt{12}", "2\\sqrt{3}") is True
    assert time.monotonic() - t < 0.5  # and is warm again

def test_is_equiv_from_threads():
    results, errors = {}, []
    def work(i):
        try:
            results[i] = (is_equiv(f"(x+{i})^2", f"x^2+{2 * i}x+{i * i}"), is_equiv("\\binom{10^{9999}}{10^{9998}}", "1", timeout=0.5))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors and results == {i: (True, False) for i in range(3)}
    assert time.monotonic() - t < 10

def _child_check(q):
    q.put((is_equiv("x^2-1", "(x-1)(x+1)"), is_equiv("\\binom{10^{9999}}{10^{9998}}", "1", timeout=0.5), is_equiv("1/2", "0.5")))

@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_is_equiv_from_multiprocessing_child(method):
    is_equiv("x+1", "1+x")  # the parent holds a warm worker, which a forked child must not share
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_check, args=(q,))
    p.start()
    assert q.get(timeout=60) == (True, False, True)
    p.join(10)
    assert p.exitcode == 0
    assert is_equiv("x+2", "2+x")  # and the parent's worker still works

# -----------------------------------------------------------------------------
# extraction

@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\{1, \\{2\\}\\} + {a{b}}}", "\\{1, \\{2\\}\\} + {a{b}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5$", "5"),
    ("\\boxed{unbalanced then \\boxed{3}", "3"),
    ("<answer> 42 </answer>", "42"),
    ("<answer>1</answer> <answer>2</answer>", "2"),
    ("<answer>x</answer> but \\boxed{y}", "y"),
    ("no answer here", None),
    ("\\boxed{", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected

def test_extract_answer_none_and_deep_nesting():
    assert extract_answer(None) is None
    deep = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    assert extract_answer(deep) == "{" * 5000 + "1" + "}" * 5000

def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert extract_gsm8k_answer("#### -5") == "-5"
    assert extract_gsm8k_answer("no marker") is None

def test_math_reward():
    assert math_reward("<think>2+2</think> The answer is \\boxed{4}.", "4") == 1.0
    assert math_reward("\\boxed{\\frac12}", "Half of it: \\boxed{0.5}") == 1.0  # gold as a MATH solution
    assert math_reward("\\boxed{1,234}", "So 1000+234 = 1234.\n#### 1,234") == 1.0  # gold as a GSM8K solution
    assert math_reward("\\boxed{5}", "4") == 0.0
    assert math_reward("the answer is 4", "4") == 0.0  # no final answer marker

# -----------------------------------------------------------------------------
# format rewards

FORMAT_CASES = [  # (response, format_reward default, strict_format_reward default)
    ("<think>2+2=4</think> The answer is \\boxed{4}.", 1.0, 1.0),
    ("<think>reason</think><answer>4</answer>", 1.0, 1.0),
    ("<think>reason</think><answer>\\boxed{4}</answer><|im_end|>", 1.0, 1.0),
    ("  <think>\nreason\n</think>\n\nSo $\\boxed{x+1}$.\n</s>", 1.0, 1.0),
    ("reason</think> \\boxed{4}", 1.0, 0.0),  # no opening tag: ok for the lenient one (prompt ended with <think>)
    ("<think>reason</think> 4", 0.0, 0.0),  # no answer
    ("<think>   </think> \\boxed{4}", 0.0, 0.0),  # empty thinking
    ("<think>a</think><think>b</think> \\boxed{4}", 1.0, 0.0),  # repeated think blocks
    ("<think><think>a</think></think> \\boxed{4}", 1.0, 0.0),  # nested tags
    ("<think>a \\boxed{4}</think> \\boxed{4}", 1.0, 0.0),  # answer inside the thinking
    ("<think>a <answer>4</answer></think> <answer>4</answer>", 1.0, 0.0),
    ("<think>a</think> \\boxed{4} \\boxed{5}", 1.0, 0.0),  # two answers
    ("<think>a</think> \\boxed{4} and then some more text", 1.0, 0.0),  # text after the answer
    ("<think>a</think> <answer>4</answer> trailing words", 1.0, 0.0),
    ("<think>a</think> <answer>4</answer><answer>5</answer>", 1.0, 0.0),
    ("<think>a</think> </answer>4<answer>", 0.0, 0.0),  # unbalanced / reversed
    ("<think>a</think> \\boxed{}", 0.0, 0.0),  # empty answer
    ("<think>a</think> \\boxed{4", 0.0, 0.0),  # unbalanced box
    ("</think><think>a</think> \\boxed{4}", 0.0, 0.0),
    ("\\boxed{4}", 0.0, 0.0),  # no thinking at all
]

@pytest.mark.parametrize("response,lenient,strict", FORMAT_CASES, ids=range(len(FORMAT_CASES)))
def test_format_rewards(response, lenient, strict):
    assert format_reward(response) == lenient
    assert strict_format_reward(response) == strict

def test_format_open_tag_flags():
    assert format_reward("reason</think> \\boxed{4}", require_open_tag=True) == 0.0
    assert strict_format_reward("reason</think> \\boxed{4}", require_open_tag=False) == 1.0
    assert strict_format_reward("reason</think> \\boxed{4}", require_open_tag=True) == 0.0
    assert strict_format_reward("x<think>reason</think> \\boxed{4}", require_open_tag=False) == 0.0

# -----------------------------------------------------------------------------
# length rewards, hand-computed

def test_cosine_length_reward():
    # correct, t=0: 1 + 0.5*(2-1)*(1+cos 0) = 2; t=T/2: 1 + 0.5*1*(1+0) = 1.5; t=T/4: 1 + 0.5*(1+0.70711) = 1.853553
    assert cosine_length_reward(True, 0, 100) == pytest.approx(2.0)
    assert cosine_length_reward(True, 50, 100) == pytest.approx(1.5)
    assert cosine_length_reward(True, 25, 100) == pytest.approx(1.8535534)
    # wrong, t=0: 0 + 0.5*(-10-0)*2 = -10; t=T/2: -5; t=3T/4: 0.5*(-10)*(1-0.70711) = -1.464466
    assert cosine_length_reward(False, 0, 100) == pytest.approx(-10.0)
    assert cosine_length_reward(False, 50, 100) == pytest.approx(-5.0)
    assert cosine_length_reward(False, 75, 100) == pytest.approx(-1.4644661)
    # at / past the limit: r_exceed, whatever the correctness
    assert cosine_length_reward(True, 100, 100) == -10.0 and cosine_length_reward(False, 150, 100) == -10.0
    # shorter correct answers earn more; longer wrong answers are punished less
    assert cosine_length_reward(True, 10, 100) > cosine_length_reward(True, 90, 100)
    assert cosine_length_reward(False, 90, 100) > cosine_length_reward(False, 10, 100)
    assert cosine_length_reward(True, 50, 100, r_correct=(1.0, 0.0), r_exceed=-1.0) == pytest.approx(0.5)

def test_overlong_penalty():
    # L_max = 100, L_cache = 20: free up to 80, then linear to -1 at 100, -1 beyond
    assert overlong_penalty(50, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)  # (80 - 90) / 20
    assert overlong_penalty(95, 100, 20) == pytest.approx(-0.75)  # (80 - 95) / 20
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(101, 100, 20) == -1.0

def test_lcpo_rewards():
    assert lcpo_reward(True, 1000, 1000) == 1.0
    assert lcpo_reward(True, 1500, 1000) == pytest.approx(0.85)  # 1 - 0.0003 * 500
    assert lcpo_reward(True, 500, 1000) == pytest.approx(0.85)  # exact: shorter is penalised too
    assert lcpo_reward(False, 2000, 1000) == pytest.approx(-0.3)  # 0 - 0.0003 * 1000
    assert lcpo_max_reward(True, 1000, 1000) == pytest.approx(0.5)  # clip(0 + 0.5)
    assert lcpo_max_reward(True, 0, 1000) == pytest.approx(0.8)  # clip(0.3 + 0.5)
    assert lcpo_max_reward(True, 0, 5000) == 1.0  # clip(1.5 + 0.5) = 1
    assert lcpo_max_reward(True, 3000, 1000) == 0.0  # clip(-0.6 + 0.5) = 0
    assert lcpo_max_reward(True, 2000, 1000) == pytest.approx(0.2)  # clip(-0.3 + 0.5)
    assert lcpo_max_reward(False, 100, 1000) == 0.0

def test_kimi_length_reward():
    # lengths 100, 200, 300: lambda = 0.5, 0, -0.5
    assert kimi_length_reward([100, 200, 300], [True, True, True]) == pytest.approx([0.5, 0.0, -0.5])
    assert kimi_length_reward([100, 200, 300], [False, False, False]) == pytest.approx([0.0, 0.0, -0.5])
    assert kimi_length_reward([100, 150, 300], [True, False, True]) == pytest.approx([0.5, 0.0, -0.5])  # 0.5-50/200=0.25 -> min(0, .25)
    assert kimi_length_reward([7, 7], [True, False]) == [0.0, 0.0]

# -----------------------------------------------------------------------------
# language consistency

def test_language_consistency():
    assert language_consistency_reward("<think>Let me compute the sum of the roots.</think> \\boxed{3}") == 1.0
    assert language_consistency_reward("<think>我们来计算根的和。</think> \\boxed{3}", "zh") == 1.0
    assert language_consistency_reward("<think>我们来计算根的和。</think>", "en") == 0.0
    # "我们" (2 chars) + "use the formula" (3 words): 3/5 English, 2/5 Chinese
    mixed = "<think>我们 use the formula</think>"
    assert language_consistency_reward(mixed, "en") == pytest.approx(0.6)
    assert language_consistency_reward(mixed, "zh") == pytest.approx(0.4)
    # math, LaTeX commands, numbers and single-letter variables are ignored
    assert language_consistency_reward("设 $x^2 + \\frac{1}{2}$ 和 x = 3 \\alpha", "zh") == 1.0
    assert language_consistency_reward("only the think block counts<think>abc def</think> 中文中文", "en") == 1.0
    assert language_consistency_reward("12345 + 678 = ?", "en") == 0.0  # no words at all
    assert language_consistency_reward("Привет мир hello", "ru") == pytest.approx(2 / 3)

# -----------------------------------------------------------------------------
# code sandbox

ADD = "def add(a, b):\n    return a + b\n"

def _sandbox_procs():
    """{pid: tag} of live processes of this test process's sandboxes (harness, program, and whatever the
    program forked: their command lines carry the run's tag, verify-sandbox-<our pid>-<n>)."""
    found, mine = {}, f"verify-sandbox-{os.getpid()}-".encode()
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mine in cmd and state != "Z":
            found[int(p)] = next(a for a in cmd.split(b"\0") if a.startswith(mine))
    return found

def _wait_no_sandbox_procs(seconds=5):
    deadline = time.monotonic() + seconds
    while _sandbox_procs() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _sandbox_procs()

def test_code_reward_correct_partial_and_syntax_error():
    assert code_reward(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]) == 1.0
    assert code_reward(ADD, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"]) == 0.5
    assert code_reward("def add(a, b:\n  return", ["assert add(1, 2) == 3"]) == 0.0
    assert code_reward(ADD, "assert add(1, 2) == 3\nassert add(2, 2) == 4") == 1.0  # a single str is one test
    assert code_reward(ADD, []) == 0.0

def test_code_reward_from_fenced_response():
    response = "Sure!\n```python\ndef sq(x):\n    return x * x\n```\nThis squares."
    assert extract_code(response) == "def sq(x):\n    return x * x\n"
    assert code_reward(response, ["assert sq(3) == 9"]) == 1.0

def test_code_reward_stdin_stdout():
    prog = "a, b = map(int, input().split())\nprint(a + b)"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "1 1", "output": "3"}]
    assert code_reward(prog, cases) == pytest.approx(2 / 3)
    assert code_reward(prog, {"inputs": ["2 2"], "outputs": ["4"]}) == 1.0

def test_code_reward_infinite_loop_times_out():
    t = time.monotonic()
    assert code_reward("while True:\n    pass", ["assert True"], timeout=1.0) == 0.0
    assert code_reward("import time\ntime.sleep(60)", ["assert True"], timeout=1.0) == 0.0
    assert time.monotonic() - t < 6

def test_code_reward_memory_bomb():
    assert code_reward("x = bytearray(10**10)", ["assert True"]) == 0.0
    assert code_reward("x = [0] * 10**9", ["assert True"], memory_mb=256) == 0.0

def test_code_reward_fork_bomb_is_contained():
    if os.geteuid() == 0 and not verify._sandbox_config()[1]:
        pytest.skip("root, but the sandbox cannot drop to nobody here: RLIMIT_NPROC cannot hold (documented)")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t = time.monotonic()
    assert code_reward(bomb, ["assert True"], timeout=1.0) == 0.0
    assert time.monotonic() - t < 10
    assert _wait_no_sandbox_procs() == {}  # nothing left running
    assert code_reward(ADD, ["assert add(1, 2) == 3"]) == 1.0  # and the caller is fine

def test_code_reward_background_child_is_killed():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    assert code_reward(prog, ["assert True"]) == 1.0
    assert _wait_no_sandbox_procs() == {}  # killed with the harness (pid namespace, or its subreaper sweep)

def test_code_reward_leftover_threads_do_not_hang():
    prog = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\ndef f():\n    return 1"
    t = time.monotonic()
    assert code_reward(prog, ["assert f() == 1"], timeout=3.0) == 1.0
    assert time.monotonic() - t < 3.0

def test_code_reward_crashes_and_early_exit_score_zero():
    assert code_reward("import ctypes\nctypes.string_at(0)", ["assert True"]) == 0.0  # segfault
    assert code_reward("import os\nos._exit(0)", ["assert False"]) == 0.0  # exit before the asserts run
    assert code_reward("import sys\nsys.exit(0)", ["assert False"]) == 0.0
    assert code_reward("print('looks fine')", ["assert 1 == 2"]) == 0.0

def test_code_reward_hides_environment_secrets(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    check = "assert 'SECRET_TOKEN' not in os.environ\nassert not any('hunter2' in v for v in os.environ.values())"
    assert code_reward("import os", [check]) == 1.0
    assert code_reward("import os", ["assert os.environ['SECRET_TOKEN'] == 'hunter2'"]) == 0.0

def test_code_reward_files_stay_in_a_temp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prog = "import os\nopen('scratch.txt', 'w').write('x')\ncwd = os.getcwd()"
    assert code_reward(prog, ["assert os.path.exists('scratch.txt')"]) == 1.0
    assert not (tmp_path / "scratch.txt").exists()  # relative writes never touch the caller's cwd
    assert code_reward(prog, [f"assert cwd != {str(tmp_path)!r}"]) == 1.0
    if verify._sandbox_config()[1]:  # as root the program runs as nobody: the caller's dirs are read-only to it
        target = tmp_path / "pwned.txt"
        assert code_reward(f"open({str(target)!r}, 'w').write('x')", ["assert True"]) == 0.0
        assert not target.exists()

def test_code_reward_has_no_network():
    if not verify._sandbox_config()[0]:
        pytest.skip("unshare unavailable: network isolation is best-effort (documented)")
    prog = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    ok = False\nexcept OSError:\n    ok = True"
    assert code_reward(prog, ["assert ok", "assert open('/proc/net/dev').read().count(':') == 1"]) == 1.0  # only lo

# -----------------------------------------------------------------------------
# eval helpers

def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)

def test_majority_vote():
    assert majority_vote(["0.5", "1/2", "3", "3", "\\frac{1}{2}"]) == "0.5"  # equivalent spellings vote together
    assert majority_vote([None, None, "7"]) == "7"  # None never wins
    assert majority_vote(["1", "2", "2", "1"]) == "1"  # tie: first occurrence
    assert majority_vote(["x+1", "1+x", "2"]) == "x+1"
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert maj_at_k(["3", "4", "4", "3", "3"], "3") == 1.0
    assert maj_at_k(["3", "4", "4", "3", "3"], "3", k=3) == 0.0

# -----------------------------------------------------------------------------
# data helpers

def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path

def test_read_jsonl(tmp_path):
    p = _write(tmp_path / "a.jsonl", ['{"a": 1}', "", '  ', '{"a": 2}'])
    assert read_jsonl(p) == [(1, {"a": 1}), (4, {"a": 2})]
    bad = _write(tmp_path / "bad.jsonl", ['{"a": 1}', '{"a": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        read_jsonl(bad)
    arr = _write(tmp_path / "arr.jsonl", ['{"a": 1}', '[1, 2]'])
    with pytest.raises(ValueError, match=r"arr\.jsonl:2:.*object"):
        read_jsonl(arr)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")

def test_load_problems_formats(tmp_path):
    p = _write(tmp_path / "mix.jsonl", [
        json.dumps({"prompt": "1+1?", "answer": "2"}),
        json.dumps({"question": "Sum?", "answer": "3 + 4 = 7\n#### 1,007"}),
        json.dumps({"problem": "Half?", "solution": "It is \\boxed{1} then \\boxed{\\frac{1}{2}}."}),
        json.dumps({"problem": "Pi?", "answer": "\\pi", "solution": "\\boxed{ignored}"}),
        json.dumps({"prompt": "int answer", "answer": 5}),
    ])
    assert load_problems(p) == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "Sum?", "answer": "1007"},
                                {"prompt": "Half?", "answer": "\\frac{1}{2}"}, {"prompt": "Pi?", "answer": "\\pi"},
                                {"prompt": "int answer", "answer": "5"}]

@pytest.mark.parametrize("line", [json.dumps({"prompt": "no answer"}), json.dumps({"answer": "no prompt"}),
                                  json.dumps({"problem": "p", "solution": "no box here"}), "not json"])
def test_load_problems_bad_line_names_file_and_line(tmp_path, line):
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "answer": "1"}), line])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        load_problems(p)

def test_load_problems_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_problems(p)

# -----------------------------------------------------------------------------
# safe_reward

def test_safe_reward_catches_and_warns_once():
    def broken(x):
        raise RuntimeError("verifier exploded")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert safe_reward(broken, 1) == 0.0
        assert safe_reward(broken, 2, default=-1.0) == -1.0
    assert len([w for w in caught if "verifier exploded" in str(w.message)]) == 1
    assert safe_reward(math_reward, "\\boxed{2}", "2") == 1.0
    assert safe_reward(lambda: True) == 1.0

# -----------------------------------------------------------------------------
# code sandbox: writes outside the program's own scratch dir

def _private_mounts():
    if not verify._sandbox_config()[2]:
        pytest.skip("no private mount namespace here: the program can write wherever its uid may (documented)")

def _host_dir():
    """A host dir this test may write in and any uid may reach, outside the dirs the sandbox replaces
    with its own tmpfs (so these tests hold for a checkout under /tmp or /root too)."""
    for d in (os.path.dirname(os.path.abspath(verify.__file__)), os.path.expanduser("~"), os.getcwd(), "/var/lib", "/"):
        d = os.path.realpath(d)
        parents = [d]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        if (not any(d == t or d.startswith(t + "/") for t in ("/tmp", "/var/tmp", "/dev/shm")) and os.access(d, os.W_OK)
                and all(os.stat(p).st_mode & 0o001 for p in parents)):  # others may search every dir on the way
            return d
    pytest.skip("no writable host dir outside /tmp, /var/tmp and /dev/shm")

def test_code_reward_scratch_dir_home_and_tempfile():
    prog = ("import os, tempfile\nopen('scratch.txt', 'w').write('x' * 1000)\nos.makedirs('a/b')\n"
            "f = tempfile.NamedTemporaryFile(delete=False)\nf.write(b'x')\nf.close()\n"
            "open(os.path.expanduser('~/.cache'), 'w').close()")
    checks = ["assert open('scratch.txt').read() == 'x' * 1000 and os.path.isdir('a/b')",
              "assert os.path.dirname(f.name) == os.getcwd() == os.path.expanduser('~')"]  # TMPDIR and HOME
    assert code_reward(prog, checks) == 1.0

def test_code_reward_cannot_write_on_the_host():
    _private_mounts()
    name = f"verify-pwned-{os.getpid()}-{time.monotonic_ns()}"
    project = _host_dir()
    # a dir anyone may write to, outside /tmp (which the program sees as its own tmpfs): only the
    # read-only remount of the host's mounts stops a write here, whatever the program's uid
    open_dir = tempfile.mkdtemp(prefix=".verify-test-", dir=project)
    try:
        os.chmod(open_dir, 0o1777)
        private = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"]  # these land in private tmpfs
        refused = [os.path.join(os.path.expanduser("~"), name), os.path.join(project, name), os.path.join(open_dir, name)]
        prog = ("import errno, os\nwrote, errors = [], []\n"
                f"for p in {private + refused!r}:\n"
                "    for make in (lambda p: open(p, 'w').write('x'), lambda p: os.mkdir(p + '.d')):\n"
                "        try:\n            make(p)\n            wrote.append(p)\n"
                "        except OSError as e:\n            errors.append(e.errno)\n")
        assert code_reward(prog, [f"assert not set(wrote) & set({refused!r}), wrote",
                                  "assert errors[-2:] == [errno.EROFS] * 2, errors",  # the world-writable dir
                                  f"assert open({private[0]!r}).read() == 'x'"]) == 1.0
        for p in private + refused:
            assert not os.path.exists(p) and not os.path.exists(p + ".d"), p  # the host never sees any of them
        assert os.listdir(open_dir) == []
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)

def test_code_reward_cannot_undo_the_private_mounts():
    _private_mounts()
    name = f"/tmp/verify-pwned-{os.getpid()}-{time.monotonic_ns()}"
    prog = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "results = [os.system('umount -l /tmp 2>/dev/null'), os.system('mount -o remount,rw / 2>/dev/null'),\n"
            "           libc.umount2(b'/tmp', 2), libc.mount(None, b'/', None, 32 | 4096, None),\n"
            "           libc.mount(b'none', b'/mnt', b'tmpfs', 0, None), libc.unshare(0x20000)]\n"
            "status = open('/proc/self/status').read()\n"
            "libc.unshare(0x10000000 | 0x20000)\n"  # a user namespace of its own (where allowed): root in it, but
            "results += [libc.umount2(b'/tmp', 2), libc.mount(None, b'/', None, 32 | 4096, None)]\n"  # mounts stay locked
            f"open({name!r}, 'w').write('x')\n")
    assert code_reward(prog, ["assert all(r != 0 for r in results), results",
                              "assert 'CapEff:\\t0000000000000000' in status"]) == 1.0  # the program keeps no capability
    assert not os.path.exists(name)

def test_code_reward_scratch_space_is_capped():
    _private_mounts()
    prog = ("import os\nwritten = 0\nchunk = b'x' * (1 << 20)\n"
            "try:\n    for i in range(20):\n        with open(f'f{i}', 'wb') as f:\n            for _ in range(10):\n"
            "                f.write(chunk)\n                f.flush()\n                written += len(chunk)\n"
            "except OSError:\n    pass")
    assert code_reward(prog, ["assert 32 << 20 <= written <= 64 << 20, written"]) == 1.0  # /tmp: 64 MiB of tmpfs

# -----------------------------------------------------------------------------
# code sandbox: the tests' source, their expected values and the pass signal are out of the program's
# reach. AUDIT holds the five cheats an audit found, each of which scored 1.0 against the previous
# harness (it exec'd the tests in the program's own globals, after it, and printed a marker); MORE holds
# further attempts (the previous harness's score in a comment). "assert True" is a control: it passes
# iff the program started, so a cheat that merely crashed cannot make these tests pass.

SCAN_FOR_TESTS = r'''
import gc, os, re, stat, sys
PAT = re.compile(rb"assert f\(0\) == (\d+)")
found, scanned = [], 0
def look(blob):
    global scanned
    scanned += 1
    m = PAT.search(blob if isinstance(blob, bytes) else str(blob).encode(errors="ignore"))
    if m:
        found.append(int(m.group(1)))
def read(path):
    try:
        if stat.S_ISREG(os.stat(path).st_mode):  # not pipes: our own request pipe would block
            with open(path, "rb") as fh:
                look(fh.read(1 << 20))
    except OSError:
        pass
for top in (os.getcwd(), "/tmp", "/var/tmp", "/dev/shm"):  # the old harness wrote test.py into the cwd
    for d, _, files in os.walk(top):
        for n in files:
            read(os.path.join(d, n))
for p in os.listdir("/proc"):
    if p.isdigit():
        for n in ("cmdline", "environ"):
            read(f"/proc/{p}/{n}")
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                read(f"/proc/{p}/fd/{fd}")
        except OSError:
            pass
look(" ".join(sys.argv))
look(str(os.environ))
def f(x):  # at call time: every string the interpreter holds, and every frame's locals
    for o in gc.get_objects():
        if isinstance(o, (dict, list, tuple)):
            for v in list(o.values() if isinstance(o, dict) else o):
                if isinstance(v, (str, bytes)):
                    look(v)
    frame = sys._getframe()
    while frame:
        look(repr(frame.f_locals))
        frame = frame.f_back
    return found[0] if found else -1
'''

AUDIT = {  # name: (program, tests, score)
    "prints the harness's marker, read through __main__": (
        "import __main__, os\nprint(getattr(__main__, 'marker', 'no marker'), flush=True)\nos._exit(0)",
        ["assert f(3) == 9"], 0.0),
    "prints the marker from sys.excepthook": (
        "import sys, os, __main__\ndef hook(*a):\n    print(getattr(__main__, 'marker', 'no marker'), flush=True)\n"
        "    os._exit(0)\nsys.excepthook = hook\ndef f(x):\n    return 0", ["assert f(3) == 9", "assert True"], 0.5),
    "returns an always-equal object": (
        "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n    __hash__ = lambda s: 0\n"
        "def f(x):\n    return A()\ndef g(x):\n    return [A()]",
        ["assert f(3) == 9", "assert g(3) == [9]", "assert not f(3) != 9", "assert True"], 0.25),
    "patches builtins before the tests run": (
        "import builtins\nbuiltins.sorted = lambda *a, **k: [1, 2, 3]\nbuiltins.abs = lambda x: 0\n"
        "builtins.len = lambda x: 3\nbuiltins.set = lambda *a: {1, 2}\ndef g(x):\n    return [9]",
        ["assert sorted(g([3, 1, 2])) == [1, 2, 3]", "assert abs(g(0)[0] - 1) < 1e-9", "assert len(g(0)) == 3",
         "assert set(g(0)) == {1, 2}", "assert g(0) == [9]"], 0.2),
    "reads the tests and answers from them": (  # the previous harness wrote test.py into the program's cwd
        SCAN_FOR_TESTS, ["assert f(0) == 1000000000007", "assert scanned >= 4, scanned"], 0.5),
}

MORE = {  # name: (program, tests, score)
    "returns an object that passes a tolerance check": (  # previously 1.0
        "class N:\n    def __sub__(s, o): return s\n    __rsub__ = __add__ = __radd__ = __sub__\n"
        "    def __abs__(s): return s\n    def __lt__(s, o): return True\n    __le__ = __gt__ = __ge__ = __lt__\n"
        "    def __float__(s): return 1.41\ndef f(x):\n    return N()",
        ["assert abs(f(2.0) - 1.41) < 1e-2", "import math\nassert math.isclose(f(2.0), 1.41)", "assert True"], 1 / 3),
    "returns subclasses of list / str / dict with their own __eq__": (  # previously 1.0
        "class L(list):\n    __eq__ = lambda s, o: True\nclass S(str):\n    __eq__ = lambda s, o: True\n    __hash__ = str.__hash__\n"
        "class D(dict):\n    __eq__ = lambda s, o: True\ndef f(x):\n    return L([0])\ndef g(x):\n    return S('no')\n"
        "def h(x):\n    return D(a=0)",  # compared as the plain list / str / dict they hold
        ["assert f(3) == [9]", "assert g(3) == 'yes'", "assert h(3) == {'a': 1}", "assert f(3) == [0] and g(3) == 'no'"], 0.25),
    "shadows builtins with its own globals": (  # previously 1.0
        "def sorted(*a, **k):\n    return [1, 2, 3]\nabs = lambda x: 0\nlen = lambda x: 3\ndef g(x):\n    return [9]",
        ["assert sorted(g([3, 1, 2])) == [1, 2, 3]", "assert abs(g(0)[0] - 1) < 1e-9", "assert len(g(0)) == 3",
         "assert g(0) == [9]"], 0.25),
    "replaces a stdlib module the test uses without importing it": (  # previously 1.0
        "import math\nclass M:\n    def isclose(self, *a, **k):\n        return True\nmath = M()\ndef f(x):\n    return 0",
        ["assert math.isclose(f(2), 1.41)", "assert f(2) == 0"], 0.5),
    "tampers with sys.modules and the runner's json": (  # previously 0.75
        "import sys, json, types\nreal = json.dumps\n"  # every reply forged into a tag that is not plain data
        "json.dumps = lambda o, **k: real({'ok': {'eq': True}, 'a': [], 'k': {}} if 'ok' in o else o, **k)\n"
        "sys.modules['json'] = types.ModuleType('json')\nsys.modules['builtins'].sorted = lambda *a, **k: [1, 2, 3]\n"
        "sys.modules['solution'] = types.SimpleNamespace(f=lambda x: 9)\ndef f(x):\n    return 0",
        ["assert f(3) == 9", "assert sorted(f(3)) == [1, 2, 3]", "from solution import f as g\nassert g(3) == 9", "assert True"], 0.25),
    "writes modules for the harness to import": (  # previously 1/3 too
        "import os\nfor d in {os.getcwd(), os.environ['HOME'], os.environ['TMPDIR']}:\n"  # the harness's cwd too
        "    for name in ('statistics', 'fractions', 'sitecustomize', 'usercustomize'):\n"
        "        open(os.path.join(d, name + '.py'), 'w').write('mean = lambda xs: 2\\nFraction = lambda *a: 2\\n')\n"
        "def f():\n    return [9]",
        ["import statistics\nassert statistics.mean(f()) == 2", "from fractions import Fraction\nassert Fraction(9) == 2",
         "assert True"], 1 / 3),
    "exits early with status 0": ("import os\nos._exit(0)", ["assert True"], 0.0),  # previously 0.0 too
    "exits with status 0 during a call that the test guards": (  # previously 1/3 too
        "import os\ndef f(x):\n    os._exit(0)", ["assert f(1) is None", "try:\n    f(1)\nexcept BaseException:\n    pass", "assert True"], 1 / 3),
}

@pytest.mark.parametrize("name", list(AUDIT) + list(MORE))
def test_code_reward_cheats_earn_nothing(name):
    program, tests, score = {**AUDIT, **MORE}[name]
    assert code_reward(program, tests) == pytest.approx(score)

def test_code_reward_oversized_results_fail_only_their_test():
    # a documented limit: a reply over 32 MiB is refused (the call fails); the harness and the next test are fine
    assert code_reward("def f(x):\n    return 'x' * (40 << 20)\ndef g():\n    return 1",
                       ["assert len(f(1)) > 0", "assert g() == 1", "assert len(f(1)) > 0 or True"]) == pytest.approx(1 / 3)

def test_code_reward_cannot_signal_or_stop_the_harness():
    prog = ("import os, signal\nfor s in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
            "    for pid in {os.getppid(), 1}:\n        try:\n            os.kill(pid, s)\n        except OSError:\n"
            "            pass\ndef f(x):\n    os.kill(os.getppid(), signal.SIGSTOP)\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 0")
    # in a pid namespace the harness is pid 1: the program's signals never reach it. Without one, a
    # killed or stopped harness reports nothing, which scores 0
    expected = 2 / 3 if verify._sandbox_config()[0] else 0.0
    assert code_reward(prog, ["assert f(3) == 9", "assert f(0) == 0", "assert True"], timeout=1.0) == pytest.approx(expected)

def test_code_reward_cannot_read_or_write_the_harness_through_proc():
    secret = f"s{os.getpid()}x{time.monotonic_ns()}"
    prog = ("import ctypes, os\nppid = os.getppid()\nblob, denied, opened = [], set(), []\n"
            "for name in os.listdir(f'/proc/{ppid}'):\n    try:\n"
            "        blob.append(open(f'/proc/{ppid}/{name}', 'rb').read(1 << 20).decode(errors='replace'))\n"
            "    except OSError:\n        denied.add(name)\n"
            "for fd in range(32):\n    for mode in ('rb', 'wb'):\n        try:\n"
            "            with open(f'/proc/{ppid}/fd/{fd}', mode) as fh:\n                opened.append((fd, mode))\n"
            "                if mode == 'wb':\n                    fh.write(b'{\"results\": [true], \"nonce\": \"\"}\\n')\n"
            "        except OSError:\n            pass\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nptrace = libc.ptrace(16, ppid, None, None)\n"  # PTRACE_ATTACH
            "print('{\"results\": [true, true, true]}')\n")  # a fake verdict on the program's own stdout
    assert code_reward(prog, [f"assert {secret!r} not in ''.join(blob)",
                              "assert {'environ', 'mem', 'maps', 'fd'} <= denied, denied",
                              "assert opened == [] and ptrace == -1, (opened, ptrace)"]) == 1.0

def _weak_sandbox(monkeypatch):
    """The sandbox as it runs where `unshare` is not permitted (root still drops to nobody)."""
    drop = verify._sandbox_config()[1]
    monkeypatch.setattr(verify, "_sandbox", ([], drop, False))

@pytest.mark.parametrize("name", list(AUDIT) + ["writes modules for the harness to import"])
def test_code_reward_cheats_earn_nothing_in_the_weak_mode_too(monkeypatch, name):
    _weak_sandbox(monkeypatch)
    program, tests, score = {**AUDIT, **MORE}[name]
    assert code_reward(program, tests) == pytest.approx(score)

def test_weak_mode_kills_daemons_before_the_reward_returns(monkeypatch):
    _weak_sandbox(monkeypatch)
    target = f"/tmp/verify-daemon-{os.getpid()}-{time.monotonic_ns()}"
    prog = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1.0)\n"
            f"        open({target!r}, 'w').write('x')\n    os._exit(0)\ndef f():\n    return 1")
    try:
        assert code_reward(prog, ["assert f() == 1"]) == 1.0
        assert "1" in verify.run_python(prog + "\nprint(f())").output
        assert _wait_no_sandbox_procs() == {}
        time.sleep(1.5)
        assert not os.path.exists(target)  # the detached grandchild died with the harness
    finally:
        if os.path.exists(target):
            os.unlink(target)

def test_sandbox_mode_and_require_sandbox(monkeypatch):
    prefix, drop, private = verify._sandbox_config()
    mode = verify.sandbox_mode()
    assert mode and "\n" not in mode
    if prefix and private:
        verify.require_sandbox()  # no exception
        assert mode.startswith("namespaces (pid, net, mount) + private read-only mounts")
        assert ("uid nobody" in mode) == drop
    monkeypatch.setattr(verify, "_sandbox", ([], drop, False))
    assert verify.sandbox_mode().startswith("WEAK: no namespaces (unshare not permitted)")
    with pytest.raises(RuntimeError, match="too weak") as e:
        verify.require_sandbox()
    assert "\n" not in str(e.value) and "WEAK" in str(e.value)
    monkeypatch.setattr(verify, "_sandbox", (["unshare", "--pid"], drop, False))  # namespaces, host writable
    assert "without private mounts" in verify.sandbox_mode()
    if os.geteuid() == 0:
        monkeypatch.setattr(verify, "_sandbox", (["unshare", "--pid"], False, False))  # root kept root: says so
        assert "as root with all capabilities" in verify.sandbox_mode()
    with pytest.raises(RuntimeError):
        verify.require_sandbox()

# -----------------------------------------------------------------------------
# code sandbox: what test sets do still works through the stubs

PROGRAM = '''
import math, collections
from collections import Counter, namedtuple
Pt = namedtuple("Pt", "x y")
TABLE = [1, 2, 3]
class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, n in enumerate(nums):
            if target - n in seen:
                return [seen[target - n], i]
            seen[n] = i
class Node:
    def __init__(self, val, next=None):
        self.val, self.next = val, next
def to_list(node):
    out = []
    while node:
        out.append(node.val)
        node = node.next
    return out
def add(a, b):
    return a + b
def root(x):
    return math.sqrt(x)
def nothing(x):
    return None
def uniq(xs):
    return list(set(xs))
class MyError(KeyError):
    pass
def check(x):
    if x < 0:
        raise ValueError("negative")
    if x == 0:
        raise MyError("zero")
    return x
def sort_in_place(xs):
    xs.sort()
def fill(d, s, m):
    d["k"] = 1
    s.add(5)
    m[0][0] = 9
def squares(n):
    for i in range(n):
        yield i * i
def counts(s):
    return Counter(s)
def point():
    return Pt(1, 2)
def mixed():
    return {(1, 2): frozenset({1}), b"x": 1.5 + 2j, "big": 3 ** 500, "nan": float("nan"), "neg0": -0.0}
def adder(n):
    return lambda x: x + n
'''

WORKING_TESTS = [  # (test, a change to PROGRAM that makes it fail)
    ("assert add(1, 2) == 3 and add([2], [3]) == [2, 3] and add('a', 'b') == 'ab'", ("return a + b", "return b + a")),
    ("assert abs(root(2.0) - 1.41) < 1e-2 and math.isclose(root(4), 2)", ("math.sqrt(x)", "x / 2")),
    ("assert nothing(1) is None", ("return None", "return 0")),
    ("assert set(uniq([1, 1, 2])) == {1, 2} and sorted(uniq([3, 1])) == [1, 3]", ("list(set(xs))", "xs[:1]")),
    ("try:\n    check(-1)\n    assert False\nexcept ValueError as e:\n    assert 'negative' in str(e)",
     ('ValueError("negative")', 'TypeError("negative")')),
    ("try:\n    check(0)\nexcept KeyError:\n    pass\nelse:\n    assert False",  # the program's own KeyError subclass
     ("class MyError(KeyError)", "class MyError(LookupError)")),
    ("xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]", ("xs.sort()", "xs = sorted(xs)")),
    ("d, s, m = {}, set(), [[0, 0], [0]]\ninner = m[0]\nfill(d, s, m)\nassert d == {'k': 1} and s == {5} and inner == [9, 0]",
     ("m[0][0] = 9", "m[1][0] = 9")),
    ("assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]", ("return [seen[target - n], i]", "return [i, seen[target - n]]")),
    ("head = Node(1, Node(2, Node(3)))\nassert to_list(head) == [1, 2, 3]\nhead.next.val = 5\nassert to_list(head) == [1, 5, 3]",
     ("node = node.next", "node = node.next and node.next.next")),
    ("assert list(squares(4)) == [0, 1, 4, 9] and 4 in squares(3) and next(iter(squares(2))) == 0", ("yield i * i", "yield i")),
    ("assert counts('aab') == {'a': 2, 'b': 1} and point() == (1, 2) and point()[1] == 2", ("Pt(1, 2)", "Pt(2, 1)")),
    ("m = mixed()\nassert m[(1, 2)] == frozenset({1}) and m[b'x'] == 1.5 + 2j and m['big'] == 3 ** 500\n"
     "assert type(m['big']) is int and m['nan'] != m['nan'] and math.copysign(1, m['neg0']) == -1", ('"neg0": -0.0', '"neg0": 0.0')),
    ("assert adder(2)(3) == 5 and TABLE == [1, 2, 3]", ("TABLE = [1, 2, 3]", "TABLE = (1, 2, 3)")),
    ("from solution import add as plus\nassert plus(2, 3) == 5", ("return a + b", "return a * b")),
    ("def check(candidate):\n    assert candidate(1, 1) == 2\n    assert candidate(-1, 1) == 0\ncheck(add)",  # HumanEval's shape
     ("return a + b", "return abs(a) + b")),
]

def test_code_reward_supports_what_test_sets_do():
    assert code_reward(PROGRAM, [t for t, _ in WORKING_TESTS]) == 1.0
    for t, (old, new) in WORKING_TESTS:  # and each of them can fail
        assert PROGRAM.count(old) == 1 and code_reward(PROGRAM.replace(old, new), [t]) == 0.0, t

def test_code_reward_each_test_has_its_own_deadline():
    prog = "import time\ndef f(x):\n    time.sleep(x)\n    return x"
    t = time.monotonic()  # a test that times out kills the program; the next test gets a fresh one
    assert code_reward(prog, ["assert f(10) == 10", "assert f(0) == 0", "assert f(0.2) == 0.2"], timeout=1.0) == pytest.approx(2 / 3)
    assert time.monotonic() - t < 1.0 + 3

# -----------------------------------------------------------------------------
# concurrent grading

def _peak_sandboxes(fn):
    """fn()'s result, and the most sandboxes of ours seen alive at once while it ran."""
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], len(set(_sandbox_procs().values())))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        sampler.join()

def test_grade_all_costs_about_n_over_cores_timeouts():
    T, n, workers = 1.0, 32, verify._SLOTS
    problems = [{"prompt": "p", "tests": ["assert f() == 1"]}] * n
    t = time.monotonic()
    acc, peak = _peak_sandboxes(lambda: verify.grade_all(problems, ["def f():\n    while True:\n        pass"] * n, timeout=T))
    elapsed = time.monotonic() - t
    assert acc == [0.0] * n
    assert elapsed < (n / workers + 2) * T, (elapsed, workers)  # one after another would take n * T
    assert peak <= workers and (workers == 1 or peak >= 2), peak

def test_nested_grading_never_oversubscribes():
    prog = "import time\ntime.sleep(0.3)\nprint(int(input()) + 1)"  # 4 problems x 4 cases, each case a process
    problems = [{"prompt": "p", "inputs": [str(i) for i in range(4)], "outputs": [str(i + 1) for i in range(4)]}] * 4
    acc, peak = _peak_sandboxes(lambda: verify.grade_all(problems, [prog] * 4))
    assert acc == [1.0] * 4
    assert peak <= verify._SLOTS, peak

def test_compute_rewards_grades_code_concurrently_in_order():
    from types import SimpleNamespace
    args = SimpleNamespace(strict_format=False, length_reward="none", accuracy_weight=1.0, format_weight=0.0,
                           overlong_cache=None, language_weight=0.0)
    code = {"prompt": "p", "tests": ["assert f() == 1"]}
    slow = lambda r: f"```python\nimport time\ntime.sleep(1.0)\ndef f():\n    return {r}\n```"
    problems = [code, {"prompt": "1+1?", "answer": "2"}, code, code, {"prompt": "c", "numbers": [3, 4], "target": 7}, code]
    completions = [slow(1), "\\boxed{2}", slow(0), slow(1), "\\boxed{3*4}", slow(1)]
    t = time.monotonic()
    total, parts = verify.compute_rewards(args, problems, completions, [10] * 6, [False] * 6)
    elapsed = time.monotonic() - t
    assert parts["accuracy"] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0] and total == parts["accuracy"]
    if verify._SLOTS >= 2:
        assert elapsed < (4 / verify._SLOTS + 1) * 1.0, elapsed  # one after another: over 4 s

def _grade_in_forked_child(queue):
    queue.put(code_reward(ADD, ["assert add(1, 2) == 3"]))

def test_a_forked_child_does_not_inherit_busy_slots():
    for _ in range(verify._SLOTS):  # as if other threads were grading when the process forked
        verify._slots.acquire()
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_grade_in_forked_child, args=(queue,))
        child.start()
        child.join(30)
        if child.is_alive():
            child.kill()
        assert queue.get(timeout=1) == 1.0
    finally:
        for _ in range(verify._SLOTS):
            verify._slots.release()

# -----------------------------------------------------------------------------
# run_python: tool calls' code, run in the same sandbox, output returned

def test_run_python_output_as_a_notebook_shows_it():
    r = verify.run_python(["x = 2\nprint('earlier output is not shown')", "import sys\nprint(x + 1)\n"
                           "print('to stderr', file=sys.stderr)\nx * 10"])
    assert r == verify.PythonResult("3\nto stderr\n20\n", None, False)
    assert verify.run_python(["y = 1/0", "print('still runs')"]).output == "still runs\n"  # an earlier error is skipped
    r = verify.run_python("print('before')\n1/0")
    assert r.output == "before\nZeroDivisionError: division by zero\n" and r.error == "ZeroDivisionError: division by zero"
    assert verify.run_python("def f(:\n  pass").error == "SyntaxError: invalid syntax"
    assert verify.run_python("print(undefined)").error == "NameError: name 'undefined' is not defined"
    assert verify.run_python("None").output == "" and verify.run_python([]).output == ""
    assert verify.run_python("'a'").output == "'a'\n"

def test_run_python_cuts_long_output_in_the_middle():
    r = verify.run_python("print('a' * 5000 + 'b' * 5000)", max_output_chars=100)
    assert r.output == "a" * 50 + "...[9901 characters cut]..." + "b" * 49 + "\n" and r.error is None
    r = verify.run_python("print('é' * 3000)", max_output_chars=10)  # characters, not bytes
    assert r.output == "é" * 5 + "...[2991 characters cut]..." + "é" * 4 + "\n"

@pytest.mark.parametrize("code, error", [
    ("import time\nprint('started', flush=True)\ntime.sleep(60)", "TimeoutError"),
    ("while True:\n    pass", "TimeoutError"),
    ("while True:\n    print('y' * 1000)", "TimeoutError"),  # megabytes of output: still cut to size
    ("import ctypes\nctypes.string_at(0)", "the process was killed by SIGSEGV"),
    ("x = bytearray(10 ** 10)", "MemoryError"),
    ("import os\nos._exit(3)", "the process exited with status 3"),
    ("import os\nos.kill(os.getpid(), 9)", "the process was killed by SIGKILL"),
])
def test_run_python_returns_in_time_whatever_the_code_does(code, error):
    t = time.monotonic()
    r = verify.run_python(code, timeout=1.0, max_output_chars=300)
    assert time.monotonic() - t < 1.0 + 2
    assert r.error.startswith(error) and r.output.endswith(r.error + ("\n" if error == "MemoryError" else ""))
    assert r.timed_out == (error == "TimeoutError") and len(r.output) < 300 + 100
    if code.startswith("import time"):
        assert r.output.startswith("started\n")

def test_run_python_is_contained():
    # the checks of the code_reward tests above, through run_python's path
    if verify._sandbox_config()[0]:
        net = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    print('connected')\nexcept OSError:\n    print('no network')"
        assert verify.run_python(net).output == "no network\n"
    if verify._sandbox_config()[2]:
        name = f"/tmp/verify-pwned-{os.getpid()}-{time.monotonic_ns()}"
        project = os.path.join(_host_dir(), os.path.basename(name))
        r = verify.run_python(f"import os\nopen({name!r}, 'w').write('x')\ntry:\n    open({project!r}, 'w')\n"
                              f"except OSError as e:\n    print(e.errno)\nprint(os.path.exists({name!r}))")
        assert r.output == "30\nTrue\n"  # EROFS on the project; /tmp is the sandbox's own
        assert not os.path.exists(name) and not os.path.exists(project)
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    assert verify.run_python(prog).output == "parent done\n"
    assert _wait_no_sandbox_procs() == {}
    if not (os.geteuid() == 0 and not verify._sandbox_config()[1]):
        bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        t = time.monotonic()
        assert verify.run_python(bomb, timeout=1.0).timed_out
        assert time.monotonic() - t < 10
        assert _wait_no_sandbox_procs() == {}
    assert verify.run_python("print(sum(range(10)))").output == "45\n"

# -----------------------------------------------------------------------------
# the codec between harness and program: plain data only, exactly

def _codec():
    ns = {}
    exec(verify._CODEC, ns)
    return ns

def _same(a, b):
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return repr(a) == repr(b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(k in b and _same(v, b[k]) for k, v in a.items())
    return a == b

def test_codec_round_trips_plain_data_exactly():
    c = _codec()
    no_ref = lambda x, depth: pytest.fail(f"not plain: {x!r}")
    for x in [None, True, 0, -5, 2 ** 53, -(2 ** 200), 0.5, -0.0, float("inf"), float("nan"), 1 + 2j, "é\ud800",
              b"\x00\xff", [], (), (1, [2, {3: (4,)}]), {(1, 2): frozenset({1}), "k": {1, 2}, 3: None}, [[[]]] * 3]:
        back = c["decode"](json.loads(json.dumps(c["encode"](x, no_ref))), lambda tag, v: pytest.fail(tag))
        assert _same(back, x), (x, back)
    class L(list):
        pass
    assert c["encode"](L(), lambda x, depth: "ref") == "ref"  # a subclass is not plain data

@pytest.mark.parametrize("message", [{"eq": True}, {"a": 1, "b": 2}, {"x": 5}, {"d": [[1]]}, {"s": [[1]]}, {"d": [[[1], 2]]},
                                     {"c": ["1", 2]}, {"h": [0, "A"]}, {"t": 5}])
def test_codec_rejects_anything_else(message):
    def unref(tag, v):
        raise ValueError(tag)
    with pytest.raises((ValueError, TypeError)):
        _codec()["decode"](message, unref)

def test_codec_rejects_deep_nesting():
    c = _codec()
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="deeply"):
        c["decode"](deep, None)
    with pytest.raises(ValueError, match="deeply"):
        c["encode"](deep, None)
