"""
Verifiable rewards for RL on reasoning LMs (DeepSeek-R1 recipe): answer extraction, a math
equivalence checker, format / length / language rewards, a sandbox for code rewards, the Countdown
task (TinyZero's), Knights and Knaves logic puzzles (Logic-RL's), pass@k and majority voting, and the
jsonl loaders every script uses. Only stdlib + sympy (imported lazily).

Rules that decide rewards (tests in tests/test_verify.py pin each one):
- Numbers are compared exactly as rationals (0.5 == 1/2 == \\frac{2}{4}). If either side was written
  as a decimal / scientific literal it is treated as rounded and we allow
  |a - b| <= 1e-6 * min(1, max(|a|, |b|)): relative 1e-6 for |x| <= 1, absolute 1e-6 above, so
  3 != 3.0001, 16386.16 != 16386.17, 1/3 == 0.333333, and 1e-7 != 0 (only exact zero equals 0).
- Percent: "p%" equals both p and p/100 (gold "10\\%" accepts 10, 0.1 and 10%); without a % sign
  10 != 0.1.
- Units / currency / degrees after a number are dropped ("5 dollars" == 5, "90^\\circ" == 90).
- "x = 3" equals "3" when the left side is a bare name (no digits: x, f(x), a+b, |AB|); two equations
  are equal when (lhs - rhs) of one is a nonzero constant multiple of the other's ("a \\approx 0.58"
  stands for its exact left side a).
- Comma / "and" / "or" lists of answers are unordered multisets ("x=1, x=2" == "2, 1"; a list of
  tuples is a set); \\{sets\\} are unordered; (tuples), [intervals] and matrices are ordered and their
  brackets must match ([1,2) != [1,2]); a one-variable inequality equals the set it describes
  (x > 3 == (3, \\infty)); "a \\pm b" is the list a+b, a-b.
- Symbolic equality (done by sympy in a worker process): identical after sympy's canonicalisation,
  numerically equal to 30 digits for constants, or equal at 6 random points for expressions.
- Multi-letter words are compared as case-insensitive text ("Even" == "even"); single letters as
  multiple-choice letters or variables, case-sensitive ("(A)" == "A" == "\\text{(A)}").
is_equiv never raises and returns within `timeout` seconds, even for 9^9^9^9 or 5000 nested braces
(the first symbolic comparison also spends ~1 s of that budget starting the sympy worker).

Public API, in file order: extract_answer, extract_gsm8k_answer (answer extraction); is_equiv
(equivalence); math_reward, format_reward, strict_format_reward, cosine_length_reward,
overlong_penalty, lcpo_reward, lcpo_max_reward, kimi_length_reward, language_consistency_reward,
extract_code, code_reward, sandbox_mode, require_sandbox (how strong the code sandbox is here),
run_python and its PythonResult (run a tool call's Python in the sandbox, get its output), safe_reward
(rewards); countdown_reward, knights_reward, accuracy_reward (countdown, knights and knaves, and the one
reward that grades any problem dict by its fields), grade_all (accuracy_reward over a batch, code graded
concurrently); pass_at_k, majority_vote, maj_at_k (evaluation); read_jsonl, load_problems (data files);
arithmetic_problem, builtin_problems, worked_solution (the built-in task), with countdown_problem,
countdown_problems, countdown_worked_solution (Countdown) and knights_problem, knights_problems,
knights_worked_solution (Knights and Knaves; tools.py names every built-in task for --data);
add_reward_args, compute_rewards (the reward of an RL completion, for grpo.py and ppo.py). Everything
after the "internals" line is private.
"""

import atexit
import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
import zlib
from fractions import Fraction

# -----------------------------------------------------------------------------
# answer extraction

def extract_answer(text):
    """Content of the last well-formed \\boxed{...} / \\fbox{...} (or `\\boxed 5`), else of the last
    <answer>...</answer>, else None."""
    if text is None:
        return None
    text = str(text)
    if box := _boxed(text, last_only=True):
        return box[0]
    tags = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    return tags[-1].strip() if tags else None

def extract_gsm8k_answer(text):
    """GSM8K gold solutions end with '#### 1,234': return '1234' (None if there is no ####)."""
    if text is None or "####" not in str(text):
        return None
    return str(text).split("####")[-1].strip().replace(",", "")

# -----------------------------------------------------------------------------
# equivalence

def is_equiv(pred, gold, timeout=5.0):
    """True if the two answers are mathematically equal (rules in the module docstring). Never
    raises; returns within `timeout` seconds (sympy runs in a worker that is killed past it)."""
    try:
        if pred is None or gold is None:
            return False
        a, b = _clean(str(pred)), _clean(str(gold))
        if not a or not b:
            return False
        if a == b:
            return True
        if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):  # microseconds, no parsing
            return _close(Fraction(a), Fraction(b), "." in a + b)
        if len(a) > _MAX_LEN or len(b) > _MAX_LEN:
            return False
        try:
            return bool(_equiv(a, b, False))
        except _NeedSympy:
            return timeout > 0 and _sympy_equiv(a, b, timeout)
    except Exception:
        return False

# -----------------------------------------------------------------------------
# rewards

def math_reward(response, gold, timeout=5.0):
    """1.0 if the response's final answer equals gold (a plain answer, a \\boxed solution, or a
    GSM8K '#### x' solution), else 0.0. timeout bounds the equivalence check (is_equiv)."""
    pred = extract_answer(response)
    gold = str(gold)
    gold = extract_gsm8k_answer(gold) if "####" in gold else (extract_answer(gold) or gold) if (
        "\\boxed" in gold or "\\fbox" in gold or "<answer>" in gold) else gold
    return 1.0 if pred is not None and is_equiv(pred, gold, timeout) else 0.0

def format_reward(response, require_open_tag=False):
    """R1 template, lenient: [<think>] reasoning </think> ... answer. Passes iff the text before the
    first </think> (after an optional leading <think>) has non-whitespace reasoning and the text after
    it holds a non-empty \\boxed{} or <answer></answer>. The opening tag is optional by default
    because many chat prompts already end with '<think>'; require_open_tag=True demands it."""
    response = str(response)
    m = re.match(r"\s*" + ("<think>" if require_open_tag else "(?:<think>)?") + r"(.*?)</think>(.*)\Z", response, re.S)
    return 1.0 if m and m.group(1).strip() and (extract_answer(m.group(2)) or "").strip() else 0.0

_EOS = re.compile(r"<\|[^|>]*\|>|</s>|<｜[^｜]*｜>")

def strict_format_reward(response, require_open_tag=True):
    """Un-gameable template: exactly one <think> (optional if require_open_tag=False, but then at
    most one and only at the start), exactly one </think>, non-whitespace reasoning with no \\boxed /
    \\fbox / <answer> inside it, then exactly one final answer -- one \\boxed{...} or one
    <answer>...</answer> pair (which may hold one box), non-empty -- and after that answer only
    whitespace, '.', '!', '*', '$', '\\]', '\\)' and end-of-sequence tags (<|im_end|>, </s>, ...)."""
    r = str(response)
    opens = r.count("<think>")
    if r.count("</think>") != 1 or opens > 1 or (require_open_tag and opens != 1):
        return 0.0
    if opens and not r.lstrip().startswith("<think>"):
        return 0.0
    think, tail = r.lstrip()[len("<think>") if opens else 0:].split("</think>")
    if not think.strip() or any(t in think for t in ("\\boxed", "\\fbox", "<answer>", "</answer>")):
        return 0.0
    boxes = len(re.findall(r"\\(?:boxed|fbox)(?![a-zA-Z])", tail))
    if "<answer>" in tail or "</answer>" in tail:
        if tail.count("<answer>") != 1 or tail.count("</answer>") != 1 or boxes > 1:
            return 0.0
        before, _, rest = tail.partition("<answer>")
        content, _, end = rest.partition("</answer>")
        if not content.strip() or "</answer>" in before or boxes > content.count("\\boxed") + content.count("\\fbox"):
            return 0.0
    else:
        m = re.search(r"\\(?:boxed|fbox)\s*\{", tail)
        j = _match_brace(tail, m.end() - 1) if m and boxes == 1 else -1
        if j < 0 or not tail[m.end():j].strip():
            return 0.0
        end = tail[j + 1:]
    return 1.0 if re.fullmatch(r"(?:\s|[.!*$]|\\\]|\\\))*", _EOS.sub("", end)) else 0.0

def cosine_length_reward(correct, length, max_length, r_correct=(2.0, 1.0), r_wrong=(-10.0, 0.0), r_exceed=-10.0):
    """Cosine length-scaling reward (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning
    in LLMs", Sec. 4.2; defaults from their runs: r_0^c=2, r_L^c=1, r_0^w=-10, r_L^w=0, r_e=-10).
    r_correct / r_wrong = (r_0, r_L): the reward at length 0 and at length L_max. Correct answers earn
    more when short (2 -> 1), wrong answers are punished less when long (-10 -> 0, keep thinking);
    hitting the length limit (length >= max_length, i.e. truncated) gives r_exceed."""
    if length >= max_length:
        return float(r_exceed)
    r0, rL = r_correct if correct else r_wrong
    # CosFn(t, T, eta_min, eta_max) = eta_min + 1/2 (eta_max - eta_min)(1 + cos(t pi / T)), eta_min=r_L, eta_max=r_0
    return rL + 0.5 * (r0 - rL) * (1.0 + math.cos(math.pi * length / max_length))

def overlong_penalty(length, max_length, cache_length):
    """DAPO soft overlong punishment (Yu et al. 2025, Sec. 3.4), added to the task reward:
    0 if L <= L_max - L_cache; ((L_max - L_cache) - L) / L_cache inside the cache window; -1 beyond L_max."""
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:  # R = ((L_max - L_cache) - |y|) / L_cache, from 0 down to -1
        return ((max_length - cache_length) - length) / cache_length
    return -1.0

def lcpo_reward(correct, length, target_length, alpha=0.0003):
    """L1 / LCPO-Exact (Aggarwal & Welleck 2025): r = 1[y = y_gold] - alpha * |n_gold - n_y|."""
    return float(bool(correct)) - alpha * abs(target_length - length)  # r = 1[y = y_gold] - alpha |n_gold - n_y|

def lcpo_max_reward(correct, length, target_length, alpha=0.0003, delta=0.5):
    """L1 / LCPO-Max: r = 1[y = y_gold] * clip(alpha * (n_gold - n_y) + delta, 0, 1); n_gold is a budget."""
    return float(bool(correct)) * min(1.0, max(0.0, alpha * (target_length - length) + delta))  # clip(., 0, 1)

def kimi_length_reward(lengths, correct):
    """Kimi k1.5 length penalty within one prompt's group of samples:
    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len); correct -> lambda_i, wrong ->
    min(0, lambda_i); all 0 when every length is equal."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]  # lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
    return [l if c else min(0.0, l) for l, c in zip(lam, correct)]

_LANG_SCRIPTS = {"zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"},
                 "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "he": {"HEBREW"},
                 "el": {"GREEK"}, "hi": {"DEVANAGARI"}, "th": {"THAI"}}
_UNSPACED = {"CJK", "HIRAGANA", "KATAKANA", "THAI"}  # scripts written without spaces between words

def language_consistency_reward(response, language="en"):
    """DeepSeek-R1 language-consistency reward: the fraction of words in the chain of thought (the
    <think> block if there is a </think>, else the whole response) written in the target language's
    script. Math ($...$, \\[...\\], \\(...\\)), code, LaTeX commands, digits and punctuation are
    ignored; a word is a run of letters of one script, each CJK / kana / Thai character counts as one
    word, and one-letter Latin words (math variables like x) are ignored. Languages not listed in
    _LANG_SCRIPTS are taken to be Latin-script (en, fr, de, es, ...). No words -> 0.0."""
    text = str(response)
    if "</think>" in text:
        text = text.split("</think>")[0].split("<think>")[-1]
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|\\\[.*?\\\]|\\\(.*?\\\)|```.*?```|`[^`]*`|\\[a-zA-Z]+", " ", text, flags=re.S)
    target = _LANG_SCRIPTS.get(language.split("-")[0].lower(), {"LATIN"})  # "zh-CN" -> zh
    words, prev = [], None
    for ch in text:
        script = unicodedata.name(ch, " ").split(" ")[0] if ch.isalpha() else None
        if script and script == prev and script not in _UNSPACED:
            words[-1][1] += 1
        elif script:
            words.append([script, 1])
        prev = script
    words = [s for s, n in words if not (s == "LATIN" and n == 1)]
    return sum(s in target for s in words) / len(words) if words else 0.0

def extract_code(text):
    """The last ```python (or plain ```) fenced block of a model response; the text itself if none."""
    blocks = re.findall(r"```(?:python|py|python3)[^\n]*\n(.*?)```", text, re.S) or re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    return blocks[-1] if blocks else text

def code_reward(program, tests, timeout=5.0, memory_mb=512):
    """Fraction of tests passed by `program` (a model response is reduced with extract_code). tests:
    a list of assert-style statement strings (each one test; a single str is one test), a list of
    {"input", "output"} stdin/stdout cases (outputs compared token by token), or {"inputs": [...],
    "outputs": [...]}. Everything runs in the code sandbox (see the comment above _CODEC): the assert
    tests in one sandbox, each with its own `timeout`; the cases each in a fresh process, spread over up
    to one sandbox per core. memory_mb caps each process's address space."""
    code = extract_code(str(program))
    if isinstance(tests, dict):
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests:
        return 0.0
    asserts = [t for t in tests if isinstance(t, str)]
    cases = [{"input": str(t.get("input", "")), "output": str(t.get("output", ""))} for t in tests if not isinstance(t, str)]
    return (_pass_asserts(code, asserts, timeout, memory_mb) + _pass_cases(code, cases, timeout, memory_mb)) / len(tests)

def sandbox_mode():
    """One line saying how the code sandbox confines programs on this machine (probed once; see the
    comment above _CODEC): strong with namespaces and private read-only mounts, WEAK without."""
    prefix, drop, private = _sandbox_config()
    if drop or os.geteuid() != 0:
        who = "uid nobody" if drop else f"uid {os.getuid()}"
    else:  # root could not drop to nobody here: capabilities go only with the private mounts' setup
        who = "as root, capabilities dropped" if private else "as root with all capabilities"
    if prefix and private:
        return f"namespaces (pid, net, mount) + private read-only mounts, {who}"
    if prefix:
        return (f"namespaces (pid, net, mount) without private mounts, {who}: programs can write the host's "
                f"world-writable dirs (/tmp)")
    return (f"WEAK: no namespaces (unshare not permitted), {who}: programs can write the host's /tmp and "
            f"reach localhost")

def require_sandbox():
    """Raise RuntimeError (one line) unless the strong sandbox -- pid, net and mount namespaces with the
    host mounted read-only -- works here; scripts call this for --require_sandbox."""
    prefix, _, private = _sandbox_config()
    if not (prefix and private):
        raise RuntimeError(f"the code sandbox is too weak here ({sandbox_mode()}); it needs `unshare` with pid, "
                           f"net and mount namespaces and private read-only mounts (run as root or allow "
                           f"unprivileged user namespaces)")

@dataclasses.dataclass
class PythonResult:
    """What run_python returns: the last cell's output as a notebook user would see it, the error line
    (None if it ran cleanly) and whether it ran out of time."""
    output: str
    error: str | None = None
    timed_out: bool = False

def run_python(cells, timeout=5.0, memory_mb=512, max_output_chars=2000):
    """Run model-written Python (tool use) in the code sandbox and return what it printed. cells: the
    code strings of one sample, earlier calls first (a str is one cell); the earlier cells are re-run
    with their output discarded so the last one sees their variables. The output is the last cell's
    stdout and stderr as printed, then, as a notebook shows it, the repr of a final expression's value
    and one line for an exception ("ZeroDivisionError: division by zero"), a timeout or a crash; cut in
    the middle to max_output_chars (at most 1,000,000; "...[N characters cut]..."). Never raises; returns
    within about `timeout` seconds (all cells together) whatever the code does, once a sandbox slot is free
    (one per core, shared with code_reward)."""
    try:
        cells = [cells] if isinstance(cells, str) else [str(c) for c in cells]
        if not cells:
            return PythonResult("")
        job = {"mode": "cells", "cells": cells, "timeout": float(timeout), "max_chars": min(max(int(max_output_chars), 0), 10 ** 6)}
        start = time.monotonic()
        verdict = _run_sandbox(job, _sandbox_config(), memory_mb, timeout + _GRACE)
        if verdict is None:
            late = time.monotonic() - start >= timeout
            return PythonResult("", "TimeoutError: the sandbox did not answer in time" if late else
                                "the sandbox failed to run the code", late)
        error = verdict.get("error")
        return PythonResult(str(verdict.get("output", "")), error if isinstance(error, str) else None,
                            verdict.get("timed_out") is True)
    except Exception as e:
        return PythonResult("", f"the sandbox failed: {type(e).__name__}: {e}")

_warned = set()

def safe_reward(fn, *args, default=0.0, **kwargs):
    """fn(*args, **kwargs) as a float, or `default` if it raises (warning once per distinct error),
    so one broken verifier call cannot crash an RL step."""
    try:
        return float(fn(*args, **kwargs))
    except Exception as e:
        key = (getattr(fn, "__name__", repr(fn)), type(e).__name__, str(e)[:200])
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"reward {key[0]} raised {key[1]}: {key[2]}; using {default}", RuntimeWarning, stacklevel=2)
        return default

# -----------------------------------------------------------------------------
# countdown, knights and knaves, and the accuracy of any problem (math, countdown, knights or code, chosen by
# its fields)

def countdown_reward(completion, numbers, target):
    """1.0 if the completion's final expression (the last \\boxed{}, else the last <answer></answer>)
    equals target using each given number at most once, else 0.0. Rules:
    - numbers are a multiset: a number listed twice may be used twice; not every number need be used;
    - the expression holds non-negative integer literals (no leading zeros, no decimals), + - * /
      (also \\times \\cdot \\ast × · and \\div ÷), parentheses and whitespace; anything else scores 0
      (no unary + or -, no implicit multiplication or digit concatenation, no ^);
    - it is evaluated exactly with fractions: non-integer intermediate results are allowed
      (6/(1-3/4) = 24), division by zero scores 0;
    - "expr = target" or "target = expr" is accepted (one '=' with the bare target literal on one side);
    - input longer than 300 characters or nested deeper than 50 parentheses scores 0.
    Nothing is ever executed: the text is parsed by a small recursive-descent parser."""
    try:
        expr = extract_answer(completion)
        if expr is None or len(expr) > 300:
            return 0.0
        target = Fraction(str(target).strip())
        tokens = _countdown_tokens(expr)
        if tokens.count("=") == 1:  # "expr = target": grade expr (either side may be the bare target)
            i = tokens.index("=")
            left, right = tokens[:i], tokens[i + 1:]
            tokens = left if _is_literal(right, target) else right if _is_literal(left, target) else []
        used = collections.Counter(int(t) for t in tokens if t.isdigit())
        if not tokens or used - collections.Counter(int(n) for n in numbers):
            return 0.0
        return 1.0 if _CountdownParser(tokens).parse() == target else 0.0
    except (ValueError, ZeroDivisionError):
        return 0.0

def knights_reward(completion, names, solution):
    """1.0 if the completion's answer assigns every inhabitant its kind in solution ({name: "knight"|"knave"}),
    else 0.0. The answer is the last \\boxed{} (else the last <answer></answer>; else the final lines of the text
    that read as an answer). Read leniently, the way people write it:
    - "Alice is a knight, Bob is a knave", "Alice: knight; Bob: knave", "Alice and Carol are knights", a JSON
      object {"Alice": "knight"} or list ["Alice: knight", ...], a numbered list, "knights: Alice, Carol; knaves:
      Bob" (or "none"), "The knights are Alice and Carol. The knave is Bob.", in any order, any case ("Knight",
      "KNAVES"), singular or plural, LaTeX commands (\\text{...}) and punctuation ignored;
    - sentences are split at . ; | and line ends, and each is read in one form: names then their kind, or a kind
      then its names (decided by its first name or kind word); mixing the two in one sentence is unreadable.
    Scores 0: an unreadable answer (any word besides names, kinds and a few fillers like "is", "the", "and", "so":
    "or", "not", "maybe", "either", a name not in the puzzle), a "?", a name left without a kind, someone missing
    (partial), someone named with both kinds (no benefit of the doubt), or an answer over 2000 characters."""
    if completion is None:
        return 0.0
    knight = {x: solution[x] == "knight" for x in names}
    got = _knights_parse_answer(_knights_answer_text(completion, names), names)
    return 1.0 if got == knight else 0.0

def accuracy_reward(problem, completion, timeout=5.0):
    """1.0 / 0.0 (the fraction of tests passed for code) for a completion of a problem dict, as
    load_problems, countdown_problems and the built-in tasks make them. The task kind is chosen by the
    record's fields, in this order: "tests" -> code_reward on the assert tests; "inputs" and "outputs"
    -> code_reward on the stdin/stdout cases; "numbers" and "target" -> countdown_reward; "names" and
    "solution" -> knights_reward; otherwise math_reward against problem["answer"]. timeout bounds each
    test case (code) or the equivalence check (math)."""
    if "tests" in problem:
        return code_reward(completion, problem["tests"], timeout=timeout)
    if "inputs" in problem and "outputs" in problem:
        return code_reward(completion, {"inputs": problem["inputs"], "outputs": problem["outputs"]}, timeout=timeout)
    if "numbers" in problem and "target" in problem:
        return countdown_reward(completion, problem["numbers"], problem["target"])
    if "names" in problem and "solution" in problem:
        return knights_reward(completion, problem["names"], problem["solution"])
    return math_reward(completion, problem["answer"], timeout=timeout)

def grade_all(problems, completions, timeout=5.0):
    """[accuracy_reward(problem, completion)] for two lists of equal length, in order, each through
    safe_reward (a verifier that raises gives 0.0 with a warning). Code problems are graded concurrently,
    one thread per core, and every sandbox run takes one of a process-wide set of per-core slots, so N
    programs that loop until `timeout` cost about N / cores timeouts; math and countdown are graded here,
    in the calling thread."""
    from concurrent.futures import ThreadPoolExecutor
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    grade = lambda p, c: safe_reward(accuracy_reward, p, c, timeout=timeout)
    is_code = [("tests" in p or ("inputs" in p and "outputs" in p)) for p in problems]
    with ThreadPoolExecutor(max(1, min(sum(is_code), _SLOTS))) as ex:
        futures = [ex.submit(grade, p, c) if code else None for p, c, code in zip(problems, completions, is_code)]
        out = [grade(p, c) if f is None else None for p, c, f in zip(problems, completions, futures)]
        return [f.result() if f is not None else r for f, r in zip(futures, out)]

# -----------------------------------------------------------------------------
# evaluation

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product
    1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def majority_vote(answers, timeout=5.0):
    """Most common answer, grouping equivalent spellings with is_equiv (0.5 and 1/2 vote together).
    None never wins; ties go to the answer that appeared first. Returns the group's first spelling."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        g = next((g for g in groups if is_equiv(a, g[0], timeout)), None)
        if g:
            g[1] += 1
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None

def maj_at_k(answers, gold, k=None):
    """1.0 if the majority vote over the first k answers equals gold, else 0.0."""
    winner = majority_vote(answers[:k] if k else answers)
    return 1.0 if winner is not None and is_equiv(winner, gold) else 0.0

# -----------------------------------------------------------------------------
# data files

def read_jsonl(path):
    """[(line_number, record)] for every non-blank line; ValueError names path:line on bad lines."""
    out = []
    with open(path, "rb") as f:  # FileNotFoundError names the path
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((lineno, rec))
    return out

def load_problems(path):
    """Problem dicts, one per record, of every kind accuracy_reward grades (the question may be under
    "prompt", "question" or "problem"; it is returned as "prompt"):
    - math: {"prompt", "answer"} from {"prompt","answer"}, GSM8K {"question","answer":"... #### x"}, MATH
      {"problem","answer"} or {"problem","solution"} (gold = last \\boxed{} of the solution);
    - code with asserts: {"prompt", "tests": [assert statements, one test each]};
    - code with stdin/stdout: {"prompt", "inputs": [str], "outputs": [str]} (equal lengths);
    - countdown: {"prompt", "numbers": [int], "target": int} ("nums", TinyZero's name, is read as
      numbers; without a prompt one is written from them), keeping an "answer" if there is one;
    - knights and knaves: {"prompt", "answer", "names", "statements", "solution"} from {"names": [str],
      "statements": [{"speaker": name, "claim": claim}], "solution": {name: "knight"|"knave"}} (claims in
      knights_problem's grammar, as JSON lists or English sentences; a statement may also be one string
      'Alice says: "Bob is a knave."'; without a prompt one is written from the statements). The solution must
      satisfy every statement and be the only assignment that does (all 2^n are tried; at most 12 names).
    A record with tests / inputs / outputs is code, one with numbers / target is countdown, one with names /
    statements is knights and knaves, the rest math. ValueError names path:line for a bad record."""
    problems = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = rec.get("prompt", rec.get("question", rec.get("problem")))
        if any(k in rec for k in ("tests", "inputs", "outputs")):
            problems.append(_code_record(rec, prompt, where))
            continue
        if any(k in rec for k in ("numbers", "nums", "target")):
            problems.append(_countdown_record(rec, prompt, where))
            continue
        if any(k in rec for k in ("names", "statements")):  # before math: MATH records have a "solution" too
            problems.append(_knights_record(rec, prompt, where))
            continue
        answer = rec.get("answer")
        if isinstance(answer, str) and "####" in answer:
            answer = extract_gsm8k_answer(answer)
        elif answer is None and "solution" in rec:
            answer = extract_answer(str(rec["solution"]))
        if not isinstance(prompt, str) or answer is None or str(answer).strip() == "":
            raise ValueError(f"{where}: expected prompt/question/problem and answer (or a "
                             f"solution with \\boxed{{}}), got keys {sorted(rec)}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or answer != answer:
            raise ValueError(f"{where}: the answer must be a string or a number, got {answer!r:.80} (nothing a "
                             "completion writes could match it)")
        problems.append({"prompt": prompt, "answer": str(answer).strip()})
    if not problems:
        raise ValueError(f"{path}: no problems found (empty file)")
    return problems

# -----------------------------------------------------------------------------
# built-in tasks, generated on the fly (no downloads), each with disjoint train and held-out splits and
# worked solutions in the R1 format. The default: multi-step arithmetic, graded by math_reward.
# "Compute 7+5-3+8." -> "<think>\n7+5=12\n12-3=9\n9+8=17\n</think>\n\boxed{17}". sft.py mixes step-by-step
# solutions with terse ones that write only the final equation: a small model gets many terse answers wrong,
# so RL has something real to find (show the work) and response length grows as it does. Then Countdown
# (TinyZero's task), graded by countdown_reward, and Knights and Knaves logic puzzles (Logic-RL's task), graded by
# knights_reward.

def arithmetic_problem(rng, min_terms=2, max_terms=6, max_value=9, max_total=19):
    """A random problem: {"prompt", "answer", "steps", "expr"}. Running totals stay within [0, max_total], so each
    step is one of a few hundred small facts ("12-3=9") while the whole chain is long; difficulty grows with
    max_terms, max_value and max_total."""
    total = rng.randint(1, max_value)
    expr, steps = str(total), []
    for _ in range(rng.randint(min_terms, max_terms) - 1):
        n = rng.randint(1, max_value)
        can_add, can_sub = total + n <= max_total, total - n >= 0
        op = "+" if can_add and (not can_sub or rng.random() < 0.5) else "-" if can_sub else None
        if op is None:  # neither fits: pick a smaller number that can be subtracted
            n, op = rng.randint(1, total) if total else 0, "-"
            if n == 0:
                n, op = rng.randint(1, max_value), "+"
        new = total + n if op == "+" else total - n
        steps.append(f"{total}{op}{n}={new}")
        expr, total = expr + op + str(n), new
    return {"prompt": f"Compute {expr}.", "answer": str(total), "steps": steps, "expr": expr}

def is_heldout(problem):
    return zlib.crc32(problem["expr"].encode()) % 8 == 0  # a fixed eighth of all problems never appears in training

def builtin_problems(split, n, seed=0, **difficulty):
    """n problems from the train or heldout split (disjoint by construction); same seed, same problems."""
    rng, out = random.Random(f"{split}-{seed}"), []
    while len(out) < n:
        p = arithmetic_problem(rng, **difficulty)
        if is_heldout(p) == (split == "heldout"):
            out.append(p)
    return out

def worked_solution(problem, show_steps=True):
    """The R1-format completion: reasoning in <think>, then the boxed answer."""
    work = "\n".join(problem["steps"]) if show_steps else f"{problem['expr']}={problem['answer']}"
    return f"<think>\n{work}\n</think>\n\\boxed{{{problem['answer']}}}"

def countdown_problem(rng, min_numbers=3, max_numbers=4, max_number=25, max_target=100):
    """A random Countdown problem (TinyZero's task): reach the target with + - * / and parentheses over
    the given numbers. Returns {"prompt", "answer", "numbers", "target", "steps"}. The target is built
    from a random expression over all the numbers, so every problem is solvable: "answer" is that
    expression ("(3+5)*2") and "steps" its intermediate results ("3+5=8", "8*2=16"). Intermediate
    results are positive integers (divisions are exact) and 1 <= target <= max_target."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
        items, steps = [(n, str(n), 3) for n in numbers], []  # (value, text, precedence: 1 + -, 2 * /, 3 atom)
        while len(items) > 1:
            (a, ta, pa), (b, tb, pb) = (items.pop(rng.randrange(len(items))) for _ in range(2))
            if a < b:
                (a, ta, pa), (b, tb, pb) = (b, tb, pb), (a, ta, pa)
            ops = "+*" + ("-" if a > b else "") + ("/" if b > 1 and a % b == 0 else "")
            op = rng.choice(ops)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            prec = 1 if op in "+-" else 2
            ta = f"({ta})" if pa < prec else ta
            tb = f"({tb})" if pb < prec or (pb == prec and op in "-/") else tb  # a-(b+c), a/(b*c)
            steps.append(f"{a}{op}{b}={value}")
            items.append((value, ta + op + tb, prec))
        target, answer = items[0][0], items[0][1]
        if 1 <= target <= max_target:
            return {"prompt": _countdown_prompt(numbers, target), "answer": answer, "numbers": numbers,
                    "target": target, "steps": steps}

def countdown_problems(split, n, seed=0, **difficulty):
    """n Countdown problems from the "train" or "heldout" split; same seed, same problems. The splits are
    disjoint by construction: a hash of the question (sorted numbers, target) puts a fixed eighth of
    all questions in heldout, however they were generated."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, out = random.Random(f"countdown-{split}-{seed}"), []
    while len(out) < n:
        p = countdown_problem(rng, **difficulty)
        if _countdown_heldout(p["numbers"], p["target"]) == (split == "heldout"):
            out.append(p)
    return out

def countdown_worked_solution(problem, show_steps=True):
    """The R1-format completion for a countdown_problem: the intermediate results in <think>, then
    the expression boxed (show_steps=False writes only "expr=target" as the reasoning)."""
    work = "\n".join(problem["steps"]) if show_steps else f"{problem['answer']}={problem['target']}"
    return f"<think>\n{work}\n</think>\n\\boxed{{{problem['answer']}}}"

def knights_problem(rng, n_people=3):
    """A random Knights and Knaves puzzle (Logic-RL's task, Xie et al. 2025): n_people inhabitants (2..6), each a
    knight (always tells the truth) or a knave (always lies), each making one statement. Returns {"prompt", "answer",
    "names", "statements", "solution"}: statements are [{"speaker": name, "claim": claim}] with claims from a small
    grammar of JSON lists (an "is" atom is ["is", name, "knight"|"knave"]):
      ["is", X, kind]                 "X is a knight"              (said by X: "I am a knight")
      ["and", atom, atom]             "X is a knight and Y is a knave"
      ["or", atom, atom]              "X is a knight or Y is a knave" (inclusive: at least one)
      ["if", atom, atom]              "If X is a knight, then Y is a knave" (false only when the first holds and
                                       the second does not)
      ["exactly_one", kind, [X, ...]] "Exactly one of X and Y is a knight"
      ["same", X, Y]                  "X and Y are the same kind"
      ["different", X, Y]             "X and Y are different kinds"
    A knight's claim is true, a knave's false. A hidden assignment is drawn first and each claim is drawn until it
    agrees with it (so a solution exists); the puzzle is kept only if exactly one of the 2^n assignments satisfies
    every statement (enumerated), else it is drawn again. "solution" maps each name to "knight" / "knave" and
    "answer" writes it out in the names' order ("Alice: knight, Bob: knave")."""
    if not 2 <= n_people <= 6:
        raise ValueError(f"n_people must be in 2..6, got {n_people}")
    while True:
        names = rng.sample(_KNIGHT_NAMES, n_people)
        hidden = {x: rng.random() < 0.5 for x in names}  # True = knight
        statements = []
        for speaker in names:
            claim = _knights_random_claim(rng, names, speaker)
            while _claim_value(claim, hidden) != hidden[speaker]:  # a knight's claim is true, a knave's false
                claim = _knights_random_claim(rng, names, speaker)
            statements.append({"speaker": speaker, "claim": claim})
        if len(_knights_solutions(names, statements)) == 1:
            return _knights_problem_dict(names, statements, hidden)

def knights_problems(split, n, seed=0, min_people=2, max_people=4, n_people=None):
    """n Knights and Knaves puzzles from the "train" or "heldout" split; same seed, same puzzles. The number of
    inhabitants is uniform in [min_people, max_people] (the difficulty), or n_people for all of them. The splits
    are disjoint by construction: a hash of the puzzle with its names replaced by their positions puts a fixed
    eighth of all puzzles in heldout, so a held-out puzzle never appears in training, not even renamed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n_people is not None:
        min_people = max_people = n_people
    rng, out = random.Random(f"knights-{split}-{seed}"), []
    while len(out) < n:
        p = knights_problem(rng, rng.randint(min_people, max_people))
        if _knights_heldout(p["names"], p["statements"]) == (split == "heldout"):
            out.append(p)
    return out

def knights_worked_solution(problem, show_steps=True):
    """The R1-format completion for a Knights and Knaves problem: a case analysis in <think>, then the assignment
    boxed ("\\boxed{Alice: knight, Bob: knave}"). The case analysis first writes what follows from the statements
    alone, then settles one inhabitant at a time: "Suppose X is a <the wrong kind>." and the deductions from it
    ("Y is a knave, so "..." is false: Z is a knight.") up to a contradiction, then "So X is a <kind>." and what
    follows from that. Each deduction is forced (unit propagation: one statement, its speaker and the people it
    names); when they stop short of a contradiction the supposition is split again on the next unsettled
    inhabitant ("Suppose also ... Suppose instead ... Both cases fail."). The inhabitant settled next is the one
    whose refutation is shortest, which keeps the text to a few lines per inhabitant. show_steps=False writes only
    the check of the answer: one line per statement, its speaker's kind and whether the claim is true."""
    names, statements = problem["names"], problem["statements"]
    knight = {x: problem["solution"][x] == "knight" for x in names}
    if not show_steps:
        lines = [f"{s['speaker']} is a {_kind(knight[s['speaker']])}: {_quote(s['claim'])} is "
                 f"{'true' if _claim_value(s['claim'], knight) else 'false'}." for s in statements]
    else:
        facts, lines = {}, []
        _knights_propagate(statements, facts, lines)  # what the statements force without any supposition
        while len(facts) < len(names):
            refutations = {}  # unsettled inhabitant -> the lines refuting their wrong kind
            for x in names:
                if x not in facts:
                    _knights_refute(statements, names, {**facts, x: not knight[x]}, refutations.setdefault(x, []))
            x = min(refutations, key=lambda x: len(refutations[x]))  # the shortest; ties: the first named
            lines += [f"Suppose {x} is a {_kind(not knight[x])}.", *refutations[x], f"So {x} is a {_kind(knight[x])}."]
            facts[x] = knight[x]
            _knights_propagate(statements, facts, lines)
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n\\boxed{{{problem['answer']}}}"

# -----------------------------------------------------------------------------
# the reward of an RL completion: one builder for grpo.py and ppo.py, with the same flags in both

REWARD_HELP = """Each completion's reward is a sum of components, each logged under one name with one meaning:
  accuracy      accuracy_reward: 1 if the final answer is right, else 0 (math_reward, countdown_reward for a
                Countdown problem, knights_reward for a knights-and-knaves puzzle); for a code problem the fraction
                of its tests passed; logged as "accuracy"
  format        format_reward or, with --strict_format, strict_format_reward (0 or 1)
  length        the --length_reward function's value: cosine, lcpo and lcpo_max score correctness and length
                together, so they take the accuracy term's place; kimi is added to it
  overlong      DAPO's soft overlong penalty (0 down to -1 over the last --overlong_cache tokens)
  language      language_consistency_reward of the completion (share of --language's script)
  reward_model  the --reward_model's score
total = accuracy_weight * (length if cosine/lcpo/lcpo_max else accuracy) + format_weight * format
        [+ kimi length] + overlong + language_weight * language + reward_model_weight * reward_model
(a learned reward alone: --accuracy_weight 0 --format_weight 0 --reward_model DIR)"""

def add_reward_args(parser):
    """The reward flags (grpo.py and ppo.py), in their own --help section."""
    g = parser.add_argument_group("rewards", REWARD_HELP)
    g.add_argument("--accuracy_weight", type=float, default=1.0, help="weight of the accuracy (or cosine/lcpo) term")
    g.add_argument("--format_weight", type=float, default=0.1, help="weight of the format reward")
    g.add_argument("--strict_format", action="store_true", help="strict_format_reward: exactly one think block, "
                   "nothing after the answer (repeated tags earn nothing)")
    g.add_argument("--length_reward", choices=["none", "cosine", "kimi", "lcpo", "lcpo_max"], default="none",
                   help="length shaping (see above)")
    g.add_argument("--target_length", type=int, default=0, help="lcpo / lcpo_max token budget")
    g.add_argument("--overlong_cache", type=int, default=None, help="soft overlong penalty window in tokens "
                   "(default: 0, off; grpo.py --loss dapo: max_new_tokens // 4)")
    g.add_argument("--language_weight", type=float, default=0.0, help="weight of the language-consistency reward")
    g.add_argument("--language", default="en", help="target language of the chain of thought")
    g.add_argument("--reward_model", default=None, help="a reward_model.py folder whose score is added")
    g.add_argument("--reward_model_weight", type=float, default=1.0, help="weight of the reward model's score")
    return parser

def compute_rewards(args, problems, completions, lengths, truncated, reward_model=None):
    """Totals [N] and components {name: [N]} (see REWARD_HELP) for completions (texts) of problems, their lengths in
    tokens and truncated flags (hit max_new_tokens). Groups of args.group_size samples of one prompt are adjacent
    (kimi compares within a group). A verifier that raises gives 0 for that sample with a warning (safe_reward). Code
    problems are graded concurrently, one per core (grade_all)."""
    acc = grade_all(problems, completions)  # code problems concurrently, one thread per core
    fmt = strict_format_reward if args.strict_format else format_reward
    parts = {"accuracy": acc, "format": [safe_reward(fmt, c) for c in completions]}
    if args.length_reward == "cosine":
        parts["length"] = [cosine_length_reward(a > 0, n, args.max_new_tokens) for a, n in zip(acc, lengths)]
    elif args.length_reward in ("lcpo", "lcpo_max"):
        fn = lcpo_reward if args.length_reward == "lcpo" else lcpo_max_reward
        parts["length"] = [fn(a > 0, n, args.target_length) for a, n in zip(acc, lengths)]
    elif args.length_reward == "kimi":
        G = args.group_size
        parts["length"] = [x for i in range(0, len(acc), G)
                           for x in kimi_length_reward(lengths[i:i + G], [a > 0 for a in acc[i:i + G]])]
    scored = parts["length"] if args.length_reward in ("cosine", "lcpo", "lcpo_max") else acc
    total = [args.accuracy_weight * s + args.format_weight * f for s, f in zip(scored, parts["format"])]
    if args.length_reward == "kimi":
        total = [t + x for t, x in zip(total, parts["length"])]
    if args.overlong_cache:  # a truncated completion counts as past the limit
        parts["overlong"] = [overlong_penalty(n + 1 if t else n, args.max_new_tokens, args.overlong_cache)
                             for n, t in zip(lengths, truncated)]
        total = [t + x for t, x in zip(total, parts["overlong"])]
    if args.language_weight:
        parts["language"] = [safe_reward(language_consistency_reward, c, args.language) for c in completions]
        total = [t + args.language_weight * x for t, x in zip(total, parts["language"])]
    if reward_model is not None:
        parts["reward_model"] = reward_model.score([p["prompt"] for p in problems], completions).tolist()
        total = [t + args.reward_model_weight * x for t, x in zip(total, parts["reward_model"])]
    return total, parts

# =============================================================================
# internals: everything below is private to this file

# -----------------------------------------------------------------------------
# answer extraction: brace matching and \boxed{} contents

def _match_brace(s, i):
    """Index of the '}' closing the '{' at s[i], or -1. Escaped \\{ \\} are not group braces."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
        i += 1
    return -1

def _boxed(text, last_only=False):
    """Contents of the well-formed \\boxed{...} / \\fbox{...} / `\\boxed 5` in text (at most 50,
    scanning from the end when last_only)."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text)]
    out = []
    for i in (reversed(starts[-50:]) if last_only else starts[:50]):
        rest = text[i:].lstrip(" ")
        j = _match_brace(rest, 0) if rest.startswith("{") else -1
        if j >= 0:
            out.append(rest[1:j].strip())
        elif text[i:i + 1] in tuple(" 0123456789") and (tok := re.match(r"[^\s${}]+", rest)):
            out.append(tok.group(0))
        if out and last_only:
            break
    return out

# -----------------------------------------------------------------------------
# normalisation: LaTeX answer -> canonical string (cheap, pure string work)

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|textup|mathrm|mathbf|"
                      r"mathit|mathsf|mathtt|mathcal|mathbb|mathnormal|mbox|hbox|operatorname|"
                      r"boldsymbol|bm|emph)\s*\{")
_LATEX = [  # (pattern, replacement), applied in order when s has LaTeX or unicode in it
    (r"\\(?:left|right)\s*\.", ""), (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),
    (r"\\[\[\]()]", " "), (r"\\?\$", ""),                                 # math delimiters, dollars
    (r"\{,\}", ""), (r"(?<=\d)(?:,\\!|\\[,!]|,\\,)\s*(?=\d{3}(?!\d))", ""),  # 1{,}000  1,\!000  1\,000
    (r"(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree)(?:\s*[CF](?![a-zA-Z]))?", ""),  # degrees (and °C, °F)
    (r"\\%", "%"),
    (r"\\[,;:!> ]|\\q?quad|~|\\hspace\*?\{[^}]*\}", " "),      # spacing commands
    (r"\\(?:displaystyle|textstyle|limits|nolimits|middle)(?![a-zA-Z])", ""),
    (r"\\[dtc]frac", r"\\frac"), (r"\\[dt]binom", r"\\binom"),
    (r"\\leqslant|\\leq?(?![a-zA-Z])|≤", "<="), (r"\\geqslant|\\geq?(?![a-zA-Z])|≥", ">="),
    (r"\\neq?(?![a-zA-Z])|\\not\s*=|≠", "!="), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\langle(?![a-zA-Z])", "("), (r"\\rangle(?![a-zA-Z])", ")"), (r"\\varnothing|\\\{\s*\\\}", r"\\emptyset"),
    (r"−", "-"), (r"×", r"\\times "), (r"[·⋅]", r"\\cdot "), (r"÷", r"\\div "), (r"π", r"\\pi "),
    (r"∞", r"\\infty "), (r"√", r"\\sqrt"), (r"∪", r"\\cup "), (r"∈", r"\\in "), (r"[€£¥₹]", ""),
]
_TEXT = [  # applied to every answer
    (r"\ball real numbers\b", r"(-\\infty,\\infty)"), (r"\s*\b(?:percent|percentage|pct)\b", "%"),
    (r"(?:,\s*)?\b(?:and|or)\b", ","), (r"\s*;\s*", ","), (r"\s+", " "),  # "1 and 2", "1; 2" are lists
]
_LATEX, _TEXT = ([(re.compile(p), r) for p, r in subs] for subs in (_LATEX, _TEXT))
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")  # a plain decimal: the common case in RL
_MAX_LEN = 1000  # longer answers are only compared as strings (a guard against pathological input)

def _clean(s):
    s = str(s).strip()
    return _clean_cached(s) if len(s) < 2000 else _clean_uncached(s)

@functools.lru_cache(maxsize=1 << 14)  # golds repeat across a group of samples
def _clean_cached(s):
    return _clean_uncached(s)

def _clean_uncached(s):
    if len(s) > 20 * _MAX_LEN or _NUMBER.fullmatch(s):
        return s
    if "\\boxed" in s or "\\fbox" in s:  # several boxes in one answer are a list: \boxed{1}, \boxed{2}
        boxes = list(dict.fromkeys(b for b in _boxed(s) if b))
        s = ", ".join(boxes) if boxes else s
    if not s.isascii() or any(c in s for c in "\\${}^~"):
        s = re.sub(r"(?<!\\)\\\\(?=[a-zA-Z]{2,})", r"\\", s)  # over-escaped \\frac -> \frac
        s = s.replace("\\\\", " \\cr ")  # protect matrix row breaks from the spacing rules below
        s = re.sub(r"\\mathbb\s*\{R\}", r"(-\\infty,\\infty)", s)
        while m := _WRAPPER.search(s):  # \text{abc} -> abc (unbalanced: drop the command)
            j = _match_brace(s, m.end() - 1)
            s = s[:m.start()] + (" " + s[m.end():j] + " " + s[j + 1:] if j > 0 else s[m.end():])
        for pat, rep in _LATEX:
            s = pat.sub(rep, s)
    for pat, rep in _TEXT:
        s = pat.sub(rep, s)
    return s.strip().rstrip(" .,;:\\").lstrip(" ,;:")

def _squash(s):
    return re.sub(r"\s+", "", s)

# -----------------------------------------------------------------------------
# structure: split an answer into lists / sets / tuples / intervals / matrices / relations

def _split_top(s, sep=","):
    """Split on `sep` outside of any ( [ { brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1:i + 2] not in ("{", "}") and not s.startswith(sep, i):
            i += 2  # skip escapes like \, but count \{ \} as brackets
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    return [p.strip() for p in parts + [s[start:]]]

def _wrapped(s):
    """True if the bracket opening s closes exactly at its last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False

_REL = re.compile(r"<=|>=|!=|==|=|<|>|\\approx(?![a-zA-Z])|\\in(?![a-zA-Z])")
_REL_NAME = {"==": "=", "\\approx": "~", "\\in": "in"}

def _split_rel(s):
    """'a < b <= c' -> (['a', 'b', 'c'], ['<', '<=']) using top-level relation symbols only."""
    parts, ops, depth, start, i = [], [], 0, 0, 0
    while i < len(s):
        m = _REL.match(s, i) if depth == 0 else None
        if m:
            parts.append(s[start:i].strip())
            ops.append(_REL_NAME.get(m.group(0), m.group(0)))
            start = i = m.end()
            continue
        depth += (s[i] in "([{") - (s[i] in ")]}")
        i += 2 if s[i] == "\\" and s[i + 1:i + 2] not in ("{", "}") and not s[i + 1:i + 2].isalpha() else 1
    return parts + [s[start:].strip()], ops

def _is_name(lhs):
    """Left side of an assignment: a name without digits once subscripts and arguments are dropped
    (x, y_1, f(x), a+b, |AB|, A:B) -- so 'x = 3' answers 3 but '2x + z = 1' is an equation."""
    t = re.sub(r"_\{[^{}]*\}|_\w", "", lhs).strip()
    t = re.sub(r"(?<=\w)\([^()]*\)", "", t[1:-1] if t[:1] == "(" and _wrapped(t) else t)  # (p,q); f(x) -> f
    return bool(t.strip()) and not re.search(r"\d", t)

_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array|smallmatrix)\}(?:\{[^}]*\})?(.*)\\end\{\1\}", re.S)

def _parse_answer(s):
    """Whole answer -> item; a top-level comma list becomes ('list', items). ± expands to both signs."""
    if re.fullmatch(r"[^,(\[]*?\d{1,3}(?:,\d{3})+(?:\.\d+)?[^,\d)\]]*", s):
        s = re.sub(r"(?<=\d),(?=\d{3})", "", s)  # 1,000,000 is a number; 1,2 and (1,000) are not
    elif re.fullmatch(r"-?\d+(?: \d+)+(?:\.\d+)?", s):
        s = s.replace(" ", "")  # 1 000 000 (and LaTeX renders "4 2" as 42)
    items = []
    for p in _split_top(s):
        if not p:
            continue
        variants = [p]
        if re.search(r"\\(?:pm|mp)(?![a-zA-Z])", p):  # a \pm b \mp c -> a + b - c and a - b + c
            variants = [re.sub(r"\\mp(?![a-zA-Z])", t, re.sub(r"\\pm(?![a-zA-Z])", s_, p)) for s_, t in (("+", "-"), ("-", "+"))]
        items += [_parse_item(v) for v in variants]
    return items[0] if len(items) == 1 else ("list", items)

def _parse_item(p):
    p = p.strip()
    if p.startswith("{") and _wrapped(p):  # a bare LaTeX group {1,3} is invisible
        return _parse_answer(p[1:-1].strip())
    parts, ops = _split_rel(p)
    if ops and all(parts):
        return ("rel", parts, ops)
    if p.startswith("\\{") and p.endswith("\\}") and _wrapped(p[1:]):
        return ("set", [_parse_item(q) for q in _split_top(p[2:-2]) if q])
    if m := _MATRIX.fullmatch(p):
        rows = [r for r in m.group(2).split("\\cr") if r.strip()]
        return ("matrix", [[_parse_item(c) for c in r.split("&")] for r in rows])
    if len(u := _split_top(p, "\\cup")) > 1:
        return ("union", [_parse_item(q) for q in u])
    if p[:1] in "([" and p[-1:] in ")]" and _wrapped(p):
        inner = _split_top(p[1:-1])
        if len(inner) > 1:
            return ("seq", p[0], p[-1], [_parse_item(q) for q in inner])
        if p[0] + p[-1] in ("()", "[]"):  # (x+1) or [\begin{array}...\end{array}]: plain grouping
            return _parse_item(p[1:-1])
    if len(r := _split_top(p, ":")) > 1:
        return ("ratio", [_parse_item(q) for q in r])
    return ("expr", _strip_units(p))

_UNITS = re.compile(r"(?:sq(?:uare)?\.? |cubic )?(?:units?|cm|mm|km|m|meters?|metres?|centimeters?|"
                    r"millimeters?|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mph|kg|g|"
                    r"grams?|kilograms?|lbs?|pounds?|ounces?|oz|liters?|litres?|ml|seconds?|sec|s|"
                    r"minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|dollars?|cents?|yuan|"
                    r"euros?|degrees?|deg|radians?|rad|st|nd|rd|th)\.?", re.I)
_MATH_WORDS = {"sin", "cos", "tan", "sec", "csc", "cot", "log", "ln", "exp", "sqrt", "pi", "oo", "inf",
               "infinity", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "abs"}

def _strip_units(p):
    """'10 cm^2' -> '10', '5 dollars' -> '5' (only when what remains is a number)."""
    m = len(p) < 200 and re.fullmatch(r"(.*?[\d}%)])(\s*)([a-zA-Z][a-zA-Z .]*?)\s*(?:\^\s*\{?\s*[23]\s*\}?)?", p)
    if not m:
        return p
    num, space, unit = m.groups()
    known = _UNITS.fullmatch(unit) and (space or len(unit) > 1)
    words = re.findall(r"[a-zA-Z]+", unit)  # '5 apples', '70 miles per hour'; not '20 x y'
    if known or (space and all(len(w) > 1 and w.lower() not in _MATH_WORDS for w in words)):
        try:
            if not _symbols(_Parser(num).parse()):
                return num.strip()
        except (ValueError, IndexError):
            pass
    return p

# -----------------------------------------------------------------------------
# expression parser: LaTeX / plain math -> small tuple AST, shared by the exact evaluator (parent
# process) and the sympy builder (worker). Nodes: ('n', Fraction, is_decimal) ('s', name)
# ('c', 'pi'|'E'|'I'|'oo') (op, a, b) for + - * / ^, ('neg', a), ('!', a), ('f', name, [args]).

_FUNCS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh",
          "tanh", "log", "ln", "exp", "sqrt", "abs", "lg"}
_CONSTS = {"pi": "pi", "infty": "oo", "infinity": "oo", "inf": "oo", "oo": "oo", "e": "E", "i": "I"}
_WORDS = sorted((_FUNCS | set(_CONSTS)) - {"e", "i"}, key=len, reverse=True)
_MUL = {"*", "\\cdot", "\\times", "\\ast"}
_DIV = {"/", "\\div"}
_CLOSE = {"(": ")", "[": "]", "{": "}", "\\lfloor": "\\rfloor", "\\lceil": "\\rceil"}
_SKIP_CMDS = {"\\overline", "\\vec", "\\hat", "\\bar", "\\widehat", "\\overrightarrow", "\\tilde",
              "\\underline", "\\cr", "\\!", "\\,", "\\prime"}
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(\\[a-zA-Z]+|\\.)|"
                    r"([a-zA-Z]+)|(\*\*|\S))")

def _tokenize(s):
    out, pos, end = [], 0, len(s.rstrip())
    while pos < end:
        m = _TOKEN.match(s, pos)
        num, cmd, word, op = m.groups()
        pos = m.end()
        if num:
            out.append(("num", num))
        elif cmd:
            name = cmd[1:]
            kind = "func" if name in _FUNCS and name != "sqrt" else "const" if name in _CONSTS else "cmd"
            out.append((kind, name if kind != "cmd" else cmd))
        elif word:  # split 'sinx' -> sin x, '2xy' -> x y; known words win
            i = 0
            while i < len(word):
                w = next((w for w in _WORDS if word.startswith(w, i)), word[i])
                out.append(("func" if w in _FUNCS else "const" if w in _CONSTS and len(w) > 1 else "name", w))
                i += len(w)
        else:
            out.append(("op", op))
    return out

class _Parser:
    """Recursive descent: expr = term (+|- term)*; term = unary ((*|/|implicit) unary)*;
    unary = -unary | power; power = postfix (^ unary)?; postfix = atom (! | %)*."""

    def __init__(self, s):
        if len(s) > _MAX_LEN:
            raise ValueError("too long")
        self.t, self.i, self.bars = _tokenize(s), 0, 0

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("end", "")

    def take(self, want=None):
        tok = self.peek()
        if tok[0] == "end" or (want is not None and tok[1] != want):
            raise ValueError(f"expected {want}")
        self.i += 1
        return tok

    def parse(self):
        e = self.expr()
        if self.peek()[0] != "end":
            raise ValueError("trailing input")
        return e

    def expr(self):
        e = self.term()
        while self.peek()[1] in ("+", "-"):
            e = (self.take()[1], e, self.term())
        return e

    def term(self):
        e = self.unary()
        while True:
            v = self.peek()[1]
            if v in _MUL or v in _DIV:
                self.take()
                e = ("*" if v in _MUL else "/", e, self.unary())
            elif self.starts_atom():
                e = ("*", e, self.power())
            else:
                return e

    def unary(self):
        if self.peek()[1] in ("-", "+"):
            return ("neg", self.unary()) if self.take()[1] == "-" else self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] in ("^", "**"):
            self.take()
            return ("^", base, self.group() if self.peek()[1] == "{" else self.unary())
        return base

    def postfix(self):
        e = self.atom()
        while self.peek()[1] in ("!", "%"):
            e = ("!", e) if self.take()[1] == "!" else ("/", e, ("n", Fraction(100), False))
        return e

    def starts_atom(self):
        kind, v = self.peek()
        if kind in ("num", "name", "func", "const"):
            return True
        if kind == "cmd":
            return v not in _MUL | _DIV | {"\\rfloor", "\\rceil", "\\cr"}
        return v in ("(", "[", "{") or (v == "|" and self.bars == 0)

    def group(self):
        self.take("{")
        e = self.expr()
        self.take("}")
        return e

    def arg(self):
        """Argument of \\frac / \\sqrt: a {group} or a single character (\\frac12 = 1/2)."""
        kind, v = self.peek()
        if v == "{":
            return self.group()
        if kind == "num" and len(v) > 1:
            self.t[self.i] = ("num", v[1:])
            return ("n", Fraction(int(v[0])), False)
        return self.atom()

    def subscript(self):
        self.take("_")
        if self.peek()[1] != "{":
            return self.take()[1]
        j = self.i + 1
        depth = 1
        while depth:
            depth += (self.t[j][1] == "{") - (self.t[j][1] == "}")
            j += 1
        sub = "".join(v for _, v in self.t[self.i + 1:j - 1])
        self.i = j
        return sub

    def number(self, v):
        if "e" in v.lower() and abs(int(re.split("[eE]", v)[1])) > 1000:
            raise ValueError("exponent too large")
        return ("n", Fraction(v), "." in v or "e" in v.lower())

    def atom(self):
        kind, v = self.take()
        if kind == "num":
            n = self.number(v)
            if self.peek()[1] == "_":  # 204_5: a numeral in another base, kept opaque
                return ("s", f"{v}_{self.subscript()}")
            if self.peek()[1] == "\\frac" and not n[2]:  # mixed number 2\frac{1}{2} = 5/2
                save = self.i, list(self.t)
                self.take()
                f = ("/", self.arg(), self.arg())
                if f[1][0] == f[2][0] == "n" and 0 < f[1][1] < f[2][1]:
                    return ("+", n, f)
                self.i, self.t = save
            return n
        if kind == "name" or (kind == "cmd" and v not in _CLOSE and v not in _SKIP_CMDS and v[1:].isalpha()
                              and v not in ("\\frac", "\\sqrt", "\\binom")):
            name = v.lstrip("\\")
            if self.peek()[1] == "_":
                return ("s", f"{name}_{self.subscript()}")
            return ("c", _CONSTS[name]) if name in ("e", "i") and kind == "name" else ("s", name)
        if kind == "const":
            return ("c", _CONSTS[v])
        if kind == "func":
            return self.function(v)
        if v in _CLOSE:
            self.bars, bars = 0, self.bars
            e = self.expr()
            self.take(_CLOSE[v])
            self.bars = bars
            return ("f", v[1:], [e]) if v.startswith("\\") else e
        if v == "|":
            self.bars += 1
            e = self.expr()
            self.take("|")
            self.bars -= 1
            return ("f", "abs", [e])
        if v == "\\frac":
            return ("/", self.arg(), self.arg())
        if v == "\\binom":
            return ("f", "binom", [self.arg(), self.arg()])
        if v == "\\sqrt":
            n = None
            if self.peek()[1] == "[":
                self.take()
                n = self.expr()
                self.take("]")
            return ("f", "sqrt", [self.arg()] + ([n] if n else []))
        if v in _SKIP_CMDS:  # decorations: \overline{AB} is just AB
            return self.arg() if self.peek()[1] == "{" else self.atom()
        raise ValueError(f"unexpected {v}")

    def function(self, name):
        base = power = None
        if self.peek()[1] == "_":
            self.take()
            base = self.arg()
        if self.peek()[1] in ("^", "**"):  # \sin^2 x
            self.take()
            power = self.group() if self.peek()[1] == "{" else self.unary()
        if self.peek()[1] in ("(", "{", "["):
            arg = self.atom()
        else:  # \sin 2x = sin(2x): an implicit product, stopping at the next function
            arg = self.power()
            while self.starts_atom() and self.peek()[0] != "func":
                arg = ("*", arg, self.power())
        if power == ("neg", ("n", 1, False)) and name in ("sin", "cos", "tan"):
            name, power = "a" + name, None  # \sin^{-1} x = arcsin x
        node = ("f", name, [arg] + ([base] if base is not None else []))
        return ("^", node, power) if power is not None else node

def _symbols(node):
    if node[0] == "s":
        return {node[1]}
    kids = node[2] if node[0] == "f" else node[1:] if node[0] not in ("n", "c") else ()
    return set().union(*(_symbols(k) for k in kids if isinstance(k, tuple)))

def _has_decimal(node):
    if node[0] == "n":
        return node[2]
    kids = node[2] if node[0] == "f" else node[1:] if node[0] not in ("s", "c") else ()
    return any(_has_decimal(k) for k in kids if isinstance(k, tuple))

# -----------------------------------------------------------------------------
# exact rational evaluation: decides plain numbers without sympy (microseconds)

class _NotRational(Exception):
    pass

_MAX_BITS = 100_000  # refuse powers/factorials whose result would exceed ~30k digits

def _check_pow(base_bits, exp):
    if abs(exp) > 10_000 or abs(exp) * base_bits > _MAX_BITS:
        raise ValueError("power too large")

def _rat(n):
    op = n[0]
    if op == "n":
        return n[1]
    if op == "neg":
        return -_rat(n[1])
    if op in ("+", "-", "*", "/", "^"):
        a, b = _rat(n[1]), _rat(n[2])
        if op == "+": return a + b
        if op == "-": return a - b
        if op == "*": return a * b
        if op == "/":
            if b == 0:
                raise _NotRational
            return a / b
        if b.denominator != 1 or (a == 0 and b < 0):
            raise _NotRational
        _check_pow(max(abs(a.numerator), a.denominator).bit_length() if abs(a) != 1 else 0, b)
        return a ** int(b)
    if op == "!":
        a = _rat(n[1])
        if a.denominator != 1 or a < 0:
            raise _NotRational
        if a > 5000:
            raise ValueError("factorial too large")
        return Fraction(math.factorial(int(a)))
    if op == "f" and n[1] in ("sqrt", "abs") and len(n[2]) == 1:
        a = _rat(n[2][0])
        if n[1] == "abs":
            return abs(a)
        r = (math.isqrt(a.numerator), math.isqrt(a.denominator)) if a >= 0 else (0, 0)
        if a >= 0 and r[0] ** 2 == a.numerator and r[1] ** 2 == a.denominator:
            return Fraction(*r)
    raise _NotRational

def _close(a, b, decimal):
    """Exact equality, or the documented tolerance when a decimal literal was involved."""
    return a == b or (decimal and abs(a - b) <= Fraction(1, 10**6) * min(1, max(abs(a), abs(b))))

# -----------------------------------------------------------------------------
# comparison of parsed answers. sym=False is the fast path in the caller's process: it raises
# _NeedSympy instead of guessing, and the same function then runs with sym=True in the worker.

class _NeedSympy(Exception):
    pass

def _equiv(a, b, sym):
    return _item_equal(_parse_answer(a), _parse_answer(b), sym)

def _assignment_value(x):
    """'x = 1 + 1 = 2' -> item for '2' (the last exact '=' part); '\\frac{\\sqrt3}{3} \\approx 0.577' ->
    the exact value in front; None if x is not an assignment."""
    parts, ops = x[1], x[2]
    if set(ops) == {"~"} and not _is_name(parts[0]):
        return _parse_item(parts[0])
    if not (all(o in ("=", "~", "in") for o in ops) and _is_name(parts[0])):
        return None
    exact = [p for p, o in zip(parts[1:], ops) if o in ("=", "in")]
    return _parse_item(exact[-1] if exact else parts[-1])

def _match_unordered(xs, ys, sym):
    """Same multiset of answers: pair every item with a distinct equal item on the other side.
    Lists of tuples are solution sets of a system: there a repeated tuple is ignored."""
    if all(z[0] == "seq" for z in xs + ys):
        return (all(any(_item_equal(x, y, sym) for y in ys) for x in xs)
                and all(any(_item_equal(x, y, sym) for x in xs) for y in ys))
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        j = next((j for j, y in enumerate(left) if _item_equal(x, y, sym)), None)
        if j is None:
            return False
        left.pop(j)
    return True

def _item_equal(x, y, sym):
    kx, ky = x[0], y[0]
    if kx == "rel" and ky != "rel" and (v := _assignment_value(x)) is not None:
        return _item_equal(v, y, sym)
    if ky == "rel" and kx != "rel" and (v := _assignment_value(y)) is not None:
        return _item_equal(x, v, sym)
    if kx in ("list", "set") and ky in ("list", "set"):
        return _match_unordered(x[1], y[1], sym)
    if {kx, ky} == {"list", "seq"}:  # "1, 3" is read as the tuple (1, 3), in order
        xs, s = (x[1], y) if kx == "list" else (y[1], x)
        return s[1:3] == ("(", ")") and len(xs) == len(s[3]) and all(_item_equal(a, b, sym) for a, b in zip(xs, s[3]))
    if kx == ky == "seq":
        return (x[1:3] == y[1:3] and len(x[3]) == len(y[3])
                and all(_item_equal(a, b, sym) for a, b in zip(x[3], y[3])))
    if kx == ky == "ratio":
        return len(x[1]) == len(y[1]) and all(_item_equal(a, b, sym) for a, b in zip(x[1], y[1]))
    if "matrix" in (kx, ky):
        rows = lambda z: z[1] if z[0] == "matrix" else [[c] for c in z[3]] if z[0] == "seq" and z[1] == "(" else None
        rx, ry = rows(x), rows(y)
        vector = lambda r: len(r) == 1 or all(len(row) == 1 for row in r)
        if rx is None or ry is None or ("seq" in (kx, ky) and not (vector(rx) and vector(ry))):
            return False
        fx, fy = [c for r in rx for c in r], [c for r in ry for c in r]
        shape_ok = [len(r) for r in rx] == [len(r) for r in ry] or "seq" in (kx, ky)
        return shape_ok and len(fx) == len(fy) and all(_item_equal(a, b, sym) for a, b in zip(fx, fy))
    if kx == ky == "expr":
        return _expr_equal(x[1], y[1], sym)
    if kx == ky == "rel":
        vx, vy = _assignment_value(x), _assignment_value(y)
        if vx is not None and vy is not None and _squash(x[1][0]) == _squash(y[1][0]):
            return _item_equal(vx, vy, sym)
    setlike = {"rel", "seq", "union", "set"}
    if kx in setlike and ky in setlike and (kx == "rel" or ky == "rel" or "union" in (kx, ky)):
        if kx == ky == "union" and _match_unordered(x[1], y[1], sym):
            return True
        if not sym:
            raise _NeedSympy
        return _sympy_structured_equal(x, y)
    return False

def _text(s):
    """Lower-cased text if s reads as words (not math), else None."""
    if re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", s) and any(
            len(w) > 1 and w.lower() not in _MATH_WORDS for w in re.split(r"[ '\-]", s)):
        return " ".join(s.lower().split())
    return None

_MC = re.compile(r"\(([A-E])\)(?:\s.*)?|([A-E])[.:)](?:\s.*)?|([A-E])")

def _expr_equal(a, b, sym):
    if _squash(a) == _squash(b):
        return True
    ta, tb = _text(a), _text(b)
    if ta is not None and tb is not None:
        return ta == tb
    ma, mb = _MC.fullmatch(a), _MC.fullmatch(b)
    if ma and mb:
        return "".join(ma.groups(default="")) == "".join(mb.groups(default=""))
    if len(a) == len(b) == 1 and a.isalpha() and b.isalpha():
        return False  # different single letters (variables are case-sensitive: e != E)
    try:
        pa, pb = _expr_node(a), _expr_node(b)
        va, vb = _value(pa[0]), _value(pb[0])
    except (ValueError, IndexError, KeyError, RecursionError, ZeroDivisionError, OverflowError):
        return False  # unparseable (or absurdly large) and not string-equal
    decimal = _has_decimal(pa[0]) or _has_decimal(pb[0])
    if va is not None and vb is not None:  # both plain numbers: decided here, exactly
        if pa[1] == pb[1]:
            return _close(va, vb, decimal)
        return _close(va, vb, decimal) or _close(va / 100 if pa[1] else va, vb / 100 if pb[1] else vb, decimal)
    if (va is not None and tb is not None) or (vb is not None and ta is not None):
        return False
    if not sym:
        raise _NeedSympy
    return _sympy_expr_equal(pa, pb, decimal)

@functools.lru_cache(maxsize=1 << 14)
def _expr_node(s):
    """(AST, had_percent_sign). '2 1/2' is a mixed number; a trailing % is remembered, not applied."""
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    if _NUMBER.fullmatch(s):
        return ("n", Fraction(s), "." in s), pct
    if m := re.fullmatch(r"(-?)(\d+) (\d+)/(\d+)", s):
        s = f"{m[1]}({m[2]}+{m[3]}/{m[4]})"
    return _Parser(s).parse(), pct

def _value(node):
    try:
        return _rat(node)
    except _NotRational:
        return None

# -----------------------------------------------------------------------------
# sympy backend (runs only inside the worker process, see _SympyWorker)

def _to_sympy(n):
    import sympy as sp
    op = n[0]
    if op == "n": return sp.Rational(n[1].numerator, n[1].denominator)
    if op == "s": return sp.Symbol(n[1])
    if op == "c": return {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[n[1]]
    if op == "neg": return -_to_sympy(n[1])
    if op == "!":
        a = _to_sympy(n[1])
        if a.is_number and a > 5000:
            raise ValueError("factorial too large")
        return sp.factorial(a)
    if op == "f":
        args = [_to_sympy(a) for a in n[2]]
        if n[1] == "sqrt":
            return sp.root(args[0], args[1]) if len(args) > 1 else sp.sqrt(args[0])
        if n[1] in ("log", "ln", "lg"):
            return sp.log(args[0], args[1] if len(args) > 1 else 10 if n[1] == "lg" else sp.E)
        fn = {"abs": sp.Abs, "lfloor": sp.floor, "lceil": sp.ceiling, "binom": sp.binomial,
              "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(n[1]) or getattr(sp, n[1])
        return fn(*args)
    a, b = _to_sympy(n[1]), _to_sympy(n[2])
    if op == "+": return a + b
    if op == "-": return a - b
    if op == "*": return a * b
    if op == "/": return a / b
    if b.is_number and b.is_real and abs(b) > 1:  # guard before sympy evaluates 9^(9^9)
        bits = float(sp.log(abs(sp.N(a, 15)) + 2, 2)) if a.is_number else 64.0
        _check_pow(bits, float(sp.N(abs(b), 15)))
    return a ** b

_TOL_EXACT, _TOL_DECIMAL = 1e-20, 1e-6

def _num_close(x, y, decimal):
    """x, y: sympy numbers evaluated to 30 digits (may be complex)."""
    diff, scale = abs(x - y), max(abs(x), abs(y))
    if decimal:
        return bool(diff <= _TOL_DECIMAL * min(1, scale) or diff < 1e-25)
    return bool(diff <= _TOL_EXACT * scale or diff < 1e-25)

def _at_random_points(exprs, free):
    """Values of the expressions at 6 fixed pseudo-random points (real, both signs, |v| in [0.3, 2.5]);
    points where any of them is undefined are skipped."""
    import sympy as sp
    rng, rows = random.Random(0), []
    for _ in range(6):
        pt = {s: sp.Float(rng.choice([-1, 1]) * rng.uniform(0.3, 2.5), 30) for s in free}
        vals = [e.evalf(30, subs=pt) for e in exprs]
        if all(v.is_number and not v.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for v in vals):
            rows.append(vals)
    return rows

def _sym_equal(a, b, decimal):
    import sympy as sp
    if a == b:
        return True
    free = sorted(a.free_symbols | b.free_symbols, key=str)
    if not free:
        if a.has(sp.oo, -sp.oo, sp.zoo, sp.nan) or b.has(sp.oo, -sp.oo, sp.zoo, sp.nan):
            return False
        return _num_close(sp.N(a, 30), sp.N(b, 30), decimal)
    # a different value at any point proves inequality; agreement at >= 3 generic points (real or
    # complex values alike) is taken as an identity
    rows = _at_random_points([a, b], free)
    if len(rows) >= 3:
        return all(_num_close(x, y, decimal) for x, y in rows)
    return sp.simplify(a - b) == 0

def _proportional(dx, dy, decimal, sign=0):
    """dx = c * dy for a constant c != 0 (c > 0 if sign > 0): the same equation / inequality."""
    import sympy as sp
    free = sorted(dx.free_symbols | dy.free_symbols, key=str)
    ratios = [x / y for x, y in _at_random_points([dx, dy], free) if y != 0]
    if len(ratios) < 3:
        ratio = sp.simplify(dx / dy)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite and (sign <= 0 or ratio > 0))
    c = ratios[0]
    return bool(c != 0 and (sign <= 0 or sp.re(c) > 0) and all(_num_close(r, c, decimal) for r in ratios))

def _sympy_expr_equal(pa, pb, decimal):
    a, b = _to_sympy(pa[0]), _to_sympy(pb[0])
    if pa[1] != pb[1]:  # one side had a % sign: p% equals p and p/100
        return _sym_equal(a, b, decimal) or _sym_equal(a / 100 if pa[1] else a, b / 100 if pb[1] else b, decimal)
    return _sym_equal(a, b, decimal)

def _sympy_relation(item):
    import sympy as sp
    parts, ops = item[1], item[2]
    exprs = [_to_sympy(_Parser(p).parse()) for p in parts]
    rel = {"<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge, "!=": sp.Ne, "=": sp.Eq, "~": sp.Eq}
    return exprs, [rel[o] for o in ops]

def _to_set(item):
    """Interval / union / finite set / univariate inequality -> sympy set (ValueError if not a set)."""
    import sympy as sp
    kind = item[0]
    if kind == "seq" and len(item[3]) == 2:
        lo, hi = (_to_sympy(_Parser(i[1]).parse()) for i in item[3] if i[0] == "expr")
        return sp.Interval(lo, hi, item[1] == "(", item[2] == ")")
    if kind == "union":
        return sp.Union(*(_to_set(i) for i in item[1]))
    if kind == "set":
        return sp.FiniteSet(*(_to_sympy(_Parser(i[1]).parse()) for i in item[1]))
    if kind == "expr" and item[1] in ("\\emptyset", "\\varnothing"):
        return sp.EmptySet
    if kind == "rel" and item[2] == ["in"]:
        return _to_set(_parse_item(item[1][1]))
    if kind == "rel" and "in" not in item[2]:
        exprs, rels = _sympy_relation(item)
        free = set().union(*(e.free_symbols for e in exprs))
        varying = [e for e in exprs if e.free_symbols]
        if len(free) > 1 and len(varying) == 1 and len(rels) > 1:  # 0 < f(x) < 1: values of f(x)
            exprs = [sp.Symbol("_t") if e.free_symbols else e for e in exprs]
            free = {sp.Symbol("_t")}
        if len(free) == 1:
            x = free.pop()
            r = sp.Symbol(x.name, real=True)
            cond = sp.And(*(R(exprs[i], exprs[i + 1]) for i, R in enumerate(rels)))
            return cond.subs(x, r).as_set()
    raise ValueError("not a set")

def _sympy_structured_equal(x, y):
    """Relations and set-like answers: equations up to a constant factor, inequalities and
    intervals as sets of reals."""
    decimal = any(re.search(r"\d\.\d|\d[eE]", str(z)) for z in (x, y))
    if x[0] == y[0] == "rel" and all(o in ("=", "~") for o in x[2] + y[2]):
        (ex, _), (ey, _) = _sympy_relation(x), _sympy_relation(y)
        if not any(e.free_symbols for e in ex + ey):  # statements about numbers (log_3 27 = 3): side by side
            return _sym_equal(ex[0], ey[0], decimal) and _sym_equal(ex[-1], ey[-1], decimal)
        return _proportional(ex[0] - ex[-1], ey[0] - ey[-1], decimal)  # lhs - rhs up to a factor
    try:
        return _sets_equal(_to_set(x), _to_set(y), decimal)
    except Exception:  # not sets, or sympy cannot decide (NotImplementedError, TypeError)
        pass
    if x[0] == y[0] == "rel" and len(x[2]) == len(y[2]) == 1 and "~" not in x[2] + y[2]:
        flip = {"<": ">", "<=": ">="}  # multivariate: a < b  <=>  c * (b - a) > 0 for some c > 0
        (ex, _), (ey, _) = _sympy_relation(x), _sympy_relation(y)
        dx = (ex[0] - ex[1]) * (-1 if x[2][0] in flip else 1)
        dy = (ey[0] - ey[1]) * (-1 if y[2][0] in flip else 1)
        if flip.get(x[2][0], x[2][0]) != flip.get(y[2][0], y[2][0]):
            return False
        return _proportional(dx, dy, decimal, sign=0 if x[2][0] == "!=" else 1)
    return False

def _sets_equal(sx, sy, decimal):
    """Compare sets of reals interval by interval (sympy's own == is structural, its
    symmetric_difference can take seconds)."""
    import sympy as sp
    if sx == sy:
        return True
    def pieces(s):
        out = []
        for p in (s.args if isinstance(s, sp.Union) else (s,)):
            if isinstance(p, sp.FiniteSet):
                out += [(e, e, False, False) for e in p.args]
            elif isinstance(p, sp.Interval):
                out.append((p.start, p.end, bool(p.left_open), bool(p.right_open)))
            elif p != sp.EmptySet:
                raise ValueError("not a union of intervals")
        return sorted(out, key=lambda t: (float(t[0]), float(t[1])))
    px, py = pieces(sx), pieces(sy)
    return len(px) == len(py) and all(a[2:] == b[2:] and _sym_equal(a[0], b[0], decimal) and _sym_equal(a[1], b[1], decimal)
                                      for a, b in zip(px, py))

# -----------------------------------------------------------------------------
# sympy worker processes: a persistent `python verify.py --sympy-worker` per concurrent caller,
# started lazily, reused, killed (and replaced on the next call) when a comparison runs past its
# deadline. A subprocess (not fork/signal.alarm) so it works from any thread, from multiprocessing
# children, and inside CUDA/torch processes; it imports nothing from the caller's __main__.

_WORKER_CMD = [sys.executable, os.path.abspath(__file__), "--sympy-worker"]

class _SympyWorker:
    def __init__(self):
        self.proc = subprocess.Popen(_WORKER_CMD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.buf, self.ready = b"", False
        _workers.add(self)

    def readline(self, deadline):
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("sympy worker died")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def kill(self):
        _workers.discard(self)
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):  # closed here, not left to the garbage collector's warnings
            try:
                f.close()
            except Exception:
                pass

_pool_lock, _idle, _workers = threading.Lock(), [], set()

def _reset_pool_after_fork():  # a forked child must not talk to (or keep open) its parent's workers
    global _pool_lock, _idle, _workers
    for w in _workers:
        for f in (w.proc.stdin, w.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
    _pool_lock, _idle, _workers = threading.Lock(), [], set()

os.register_at_fork(after_in_child=_reset_pool_after_fork)
atexit.register(lambda: [w.kill() for w in list(_workers)])

def _sympy_equiv(a, b, timeout):
    deadline = time.monotonic() + timeout
    with _pool_lock:
        idle = [_idle.pop() for _ in range(len(_idle))]
        w = next((w for w in idle if w.proc.poll() is None), None)  # skip workers that died meanwhile
        _idle.extend(x for x in idle if x is not w and x.proc.poll() is None)
    w = w or _SympyWorker()
    try:
        if not w.ready:  # still importing sympy: if that outlasts the deadline, keep it warming up
            line = w.readline(deadline)
            if line is None:
                with _pool_lock:
                    _idle.append(w)
                return False
            w.ready = True
        w.proc.stdin.write(json.dumps([a, b]).encode() + b"\n")
        w.proc.stdin.flush()
        line = w.readline(deadline)
        if line is None:  # past the deadline: kill it and start warming a replacement right away
            w.kill()
            fresh = _SympyWorker()
            with _pool_lock:
                _idle.append(fresh)
            return False
        with _pool_lock:
            _idle.append(w) if len(_idle) < 8 else w.kill()
        return line == b"1"
    except Exception:
        w.kill()
        return False

def _worker_main():
    import resource
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]  # sympy blowups become MemoryError, not swap
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard), hard))
    _equiv("x > 3", "(3, \\infty)", True)  # warm sympy's lazy imports (~1 s) before taking requests
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            a, b = json.loads(line)
            ok = _equiv(a, b, True)
        except BaseException:
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()

# -----------------------------------------------------------------------------
# data files: code, countdown and knights-and-knaves records (load_problems)

def _code_record(rec, prompt, where):
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: a code task needs a prompt/question/problem string, got keys {sorted(rec)}")
    if "tests" in rec:
        tests = rec["tests"]
        if "inputs" in rec or "outputs" in rec:
            raise ValueError(f"{where}: a code task has either tests or inputs/outputs, not both")
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise ValueError(f"{where}: tests must be a non-empty list of assert statement strings")
        return {"prompt": prompt, "tests": tests}
    inputs, outputs = rec.get("inputs"), rec.get("outputs")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and len(inputs) == len(outputs)
            and all(isinstance(s, str) for s in inputs + outputs)):
        raise ValueError(f"{where}: inputs and outputs must be non-empty lists of strings of equal length")
    return {"prompt": prompt, "inputs": inputs, "outputs": outputs}

def _countdown_record(rec, prompt, where):
    numbers, target = rec.get("numbers", rec.get("nums")), rec.get("target")
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not (isinstance(numbers, list) and numbers and all(map(is_int, numbers)) and is_int(target)):
        raise ValueError(f"{where}: a countdown task needs numbers (a non-empty list of non-negative "
                         f"integers) and an integer target, got keys {sorted(rec)}")
    if prompt is None:
        prompt = _countdown_prompt(numbers, target)
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string")
    out = {"prompt": prompt, "numbers": numbers, "target": target}
    if rec.get("answer") is not None:
        out["answer"] = str(rec["answer"])
    return out

def _knights_record(rec, prompt, where):
    """A knights-and-knaves record, checked: names, statements (structured or English), a solution that satisfies
    every statement and is the only one. The prompt is written from the statements when missing."""
    names, statements, solution = rec.get("names"), rec.get("statements"), rec.get("solution")
    if not (isinstance(names, list) and 1 <= len(names) <= 12 and all(
            isinstance(x, str) and re.fullmatch(r"[A-Za-z]+", x) for x in names)):
        raise ValueError(f"{where}: a knights task needs names: a list of 1 to 12 one-word names (letters only)")
    if len({x.lower() for x in names}) < len(names):
        raise ValueError(f"{where}: names must be distinct (case-insensitively), got {names}")
    if reserved := [x for x in names if x.lower() in _KNIGHT_RESERVED]:  # they would make the English ambiguous
        raise ValueError(f"{where}: {reserved[0]!r} cannot be a name (a word of the puzzle's grammar)")
    if not isinstance(statements, list):
        raise ValueError(f"{where}: a knights task needs statements: a list of {{\"speaker\", \"claim\"}} objects")
    statements = [_knights_statement(s, names, f"{where}: statement {i}") for i, s in enumerate(statements, 1)]
    if not (isinstance(solution, dict) and set(solution) == set(names) and all(v in _KINDS for v in solution.values())):
        missing = [x for x in names if x not in solution] if isinstance(solution, dict) else names
        extra = [x for x in solution if x not in names] if isinstance(solution, dict) else []
        raise ValueError(f"{where}: solution must map every name to \"knight\" or \"knave\""
                         + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    knight = {x: solution[x] == "knight" for x in names}
    for i, s in enumerate(statements, 1):
        if _claim_value(s["claim"], knight) != knight[s["speaker"]]:
            raise ValueError(f"{where}: the solution does not satisfy statement {i}: {s['speaker']} is a "
                             f"{solution[s['speaker']]} but {_quote(s['claim'])} is "
                             f"{'true' if not knight[s['speaker']] else 'false'}")
    if others := [t for t in _knights_solutions(names, statements) if t != knight]:
        raise ValueError(f"{where}: the solution is not unique: {_knights_answer(names, others[0])} also "
                         f"satisfies every statement")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string")
    return _knights_problem_dict(names, statements, knight, prompt)

def _knights_statement(s, names, where):
    """{"speaker", "claim"} from a record's statement: that object with a structured or English claim, or one
    English string 'Alice says: "Bob is a knave."'. ValueError (prefixed with where) for a bad one."""
    lookup = {x.lower(): x for x in names}
    if isinstance(s, str):
        if not (m := re.fullmatch(r"\s*(\w+) says:?\s*\"?(.*?)\"?\s*", s, re.S)):
            raise ValueError(f"{where}: expected 'Name says: \"claim\"', got {s!r}")
        s = {"speaker": lookup.get(m[1].lower(), m[1]), "claim": m[2]}
    if not (isinstance(s, dict) and set(s) == {"speaker", "claim"}):
        raise ValueError(f"{where}: expected {{\"speaker\", \"claim\"}}, got {s!r}")
    if s["speaker"] not in names:
        raise ValueError(f"{where}: unknown speaker {s['speaker']!r} (names: {', '.join(names)})")
    try:
        claim = s["claim"]
        claim = _parse_claim(claim, s["speaker"], names) if isinstance(claim, str) else _check_claim(claim, names)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {"speaker": s["speaker"], "claim": claim}

def _check_claim(claim, names, atom=False):
    """A copy of the claim if it follows the grammar (knights_problem), else ValueError saying what does not.
    "and" / "or" / "if" combine two "is" atoms only, which keeps their English unambiguous."""
    c = claim if isinstance(claim, list) and claim else [None]
    op, args = c[0], c[1:]
    name = lambda x: x if isinstance(x, str) and x in names else _unknown_name(x, json.dumps(claim))
    if op == "is" and len(args) == 2 and args[1] in _KINDS:
        return ["is", name(args[0]), args[1]]
    if atom:
        raise ValueError(f"\"and\" / \"or\" / \"if\" combine two [\"is\", name, kind] atoms, got {json.dumps(claim)}")
    if op in ("and", "or", "if") and len(args) == 2:
        return [op, _check_claim(args[0], names, True), _check_claim(args[1], names, True)]
    group = args[1] if op == "exactly_one" and len(args) == 2 and args[0] in _KINDS else args
    if not (isinstance(group, list) and all(isinstance(x, str) for x in group) and len(set(group)) == len(group)):
        raise ValueError(f"a claim names each person once, as a string: {json.dumps(claim)}")
    if op == "exactly_one" and group is not args and len(group) >= 2:
        return ["exactly_one", args[0], [name(x) for x in group]]
    if op in ("same", "different") and len(args) == 2:
        return [op, name(args[0]), name(args[1])]
    raise ValueError(f"not a claim of the grammar (is, and, or, if, exactly_one, same, different): "
                     f"{json.dumps(claim)}")

# -----------------------------------------------------------------------------
# countdown: a tokenizer and exact evaluator for + - * / ( ) over integer literals, nothing else

_COUNTDOWN_SUBS = [(re.compile(p), r) for p, r in (
    (r"\\(?:times|cdot|ast)(?![a-zA-Z])|[×·⋅∗]", "*"), (r"\\div(?![a-zA-Z])|÷", "/"), (r"[−–]", "-"),
    (r"\\(?:left|right)(?![a-zA-Z])|\$", ""))]
_COUNTDOWN_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()=]))")

def _countdown_tokens(s):
    """Integer literals and operators as strings; ValueError on anything else (names, calls, dots)."""
    for pat, rep in _COUNTDOWN_SUBS:
        s = pat.sub(rep, s)
    s, out, pos = s.strip(), [], 0
    while pos < len(s):
        m = _COUNTDOWN_TOKEN.match(s, pos)
        if not m:
            raise ValueError(f"unexpected {s[pos:pos + 10]!r}")
        tok = m.group(1) or m.group(2)
        if len(tok) > 1 and tok[0] == "0":  # 03 is not the given 3
            raise ValueError("leading zero")
        out.append(tok)
        pos = m.end()
    return out

def _countdown_prompt(numbers, target):
    return (f"Using the numbers {', '.join(map(str, numbers))}, write an expression that equals {target}. "
            f"Use + - * / and parentheses, each number at most once.")

def _is_literal(tokens, target):
    return len(tokens) == 1 and tokens[0].isdigit() and int(tokens[0]) == target

def _countdown_heldout(numbers, target):
    key = f"{sorted(int(n) for n in numbers)}:{target}"
    return zlib.crc32(key.encode()) % 8 == 0  # a fixed eighth of all questions never appears in training

class _CountdownParser:
    """Recursive descent, evaluating as it goes with Fractions: expr = term (('+'|'-') term)*;
    term = atom (('*'|'/') atom)*; atom = integer | '(' expr ')'. Depth is capped (no RecursionError)."""

    def __init__(self, tokens):
        self.t, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else ""

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self):
        v = self.expr()
        if self.i != len(self.t):
            raise ValueError("trailing input")
        return v

    def expr(self):
        v = self.term()
        while self.peek() in ("+", "-"):
            v = v + self.term() if self.take() == "+" else v - self.term()
        return v

    def term(self):
        v = self.atom()
        while self.peek() in ("*", "/"):
            v = v * self.atom() if self.take() == "*" else v / self.atom()  # x / 0 raises ZeroDivisionError
        return v

    def atom(self):
        tok = self.take()
        if tok.isdigit():
            return Fraction(int(tok))
        if tok != "(":
            raise ValueError(f"unexpected {tok!r}")
        self.depth += 1
        if self.depth > 50:
            raise ValueError("nested too deeply")
        v = self.expr()
        if self.take() != ")":
            raise ValueError("unbalanced parentheses")
        self.depth -= 1
        return v

# -----------------------------------------------------------------------------
# knights and knaves: the claim grammar (evaluate, render, parse), the generator's helpers, the worked solution's
# deductions and the answer parser. A claim is a JSON list (grammar in knights_problem); truth is a {name: bool}
# with True for a knight.

_KNIGHT_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Gina", "Hank", "Ivy", "Jack", "Kate", "Leo",
                 "Mia", "Nick", "Olga", "Paul")
_KNIGHT_CLAIMS = ("is", "and", "or", "if", "exactly_one", "same", "different")
_KINDS = ("knight", "knave")
_KNIGHT_RESERVED = {"knight", "knights", "knave", "knaves", "i", "am", "is", "are", "and", "or", "if", "then", "of"}

def _kind(is_knight):
    return "knight" if is_knight else "knave"

def _claim_value(claim, knight):
    """The claim's truth when knight[x] says whether x is a knight."""
    op = claim[0]
    if op == "is":
        return knight[claim[1]] == (claim[2] == "knight")
    if op == "exactly_one":
        return sum(knight[x] == (claim[1] == "knight") for x in claim[2]) == 1
    if op in ("same", "different"):
        return (knight[claim[1]] == knight[claim[2]]) == (op == "same")
    a, b = _claim_value(claim[1], knight), _claim_value(claim[2], knight)
    return a and b if op == "and" else a or b if op == "or" else (not a) or b  # "if": a -> b

def _claim_names(claim):
    """The people a claim is about, in order of mention, each once."""
    if claim[0] == "is":
        return [claim[1]]
    if claim[0] == "exactly_one":
        return list(dict.fromkeys(claim[2]))
    if claim[0] in ("same", "different"):
        return list(dict.fromkeys(claim[1:]))
    return list(dict.fromkeys(_claim_names(claim[1]) + _claim_names(claim[2])))

def _knights_random_claim(rng, names, speaker):
    """A random claim about the inhabitants. A bare "is" claim is about someone else ("I am a knight" says nothing,
    "I am a knave" is a paradox); a compound one is about the speaker too a quarter of the time (always with two
    inhabitants). Self-reference gives facts away ("Bob and I are the same kind" says, whoever says it, that Bob
    is a knight), so more of it would leave little for the case analysis to do."""
    op = rng.choice(_KNIGHT_CLAIMS)
    others = [x for x in names if x != speaker]
    if op == "is":
        return ["is", rng.choice(others), rng.choice(_KINDS)]
    pool = names if len(others) < 2 or rng.random() < 0.25 else others
    if op in ("and", "or", "if"):  # two atoms about two different people
        x, y = rng.sample(pool, 2)
        return [op, ["is", x, rng.choice(_KINDS)], ["is", y, rng.choice(_KINDS)]]
    group = rng.sample(pool, 2 if op != "exactly_one" else rng.randint(2, min(3, len(pool))))
    group.sort(key=names.index)
    return ["exactly_one", rng.choice(_KINDS), group] if op == "exactly_one" else [op, *group]

def _knights_solutions(names, statements):
    """Every assignment ({name: bool}) of the 2^n under which each statement's truth equals its speaker's kind."""
    out = []
    for bits in range(2 ** len(names)):
        knight = {x: bool(bits >> i & 1) for i, x in enumerate(names)}
        if all(_claim_value(s["claim"], knight) == knight[s["speaker"]] for s in statements):
            out.append(knight)
    return out

def _knights_answer(names, knight):
    return ", ".join(f"{x}: {_kind(knight[x])}" for x in names)

def _knights_problem_dict(names, statements, knight, prompt=None):
    return {"prompt": prompt if prompt is not None else _knights_prompt(names, statements),
            "answer": _knights_answer(names, knight), "names": list(names), "statements": statements,
            "solution": {x: _kind(knight[x]) for x in names}}

def _knights_heldout(names, statements):
    """The split of a puzzle, by a hash of its statements with each name replaced by its position in names."""
    index = {x: i for i, x in enumerate(names)}
    anon = lambda c: [anon(d) for d in c] if isinstance(c, list) else index.get(c, c)
    key = json.dumps([len(names)] + [[index[s["speaker"]], anon(s["claim"])] for s in statements])
    return zlib.crc32(key.encode()) % 8 == 0  # a fixed eighth of all puzzles never appears in training

def _join_names(xs):
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]

def _render_claim(claim, speaker=None):
    """The claim in English, in the speaker's words when speaker is given (their own name becomes "I", listed
    last), else in the third person. Atoms are never nested inside "and" / "or" / "if", so the text is unambiguous
    and _parse_claim reads it back."""
    op = claim[0]
    me = lambda x: "I" if x == speaker else x
    group = lambda xs: [me(x) for x in xs if x != speaker] + ["I"] * (speaker in xs)
    if op == "is":
        return f"I am a {claim[2]}" if claim[1] == speaker else f"{claim[1]} is a {claim[2]}"
    if op == "and" or op == "or":
        return f"{_render_claim(claim[1], speaker)} {op} {_render_claim(claim[2], speaker)}"
    if op == "if":
        return f"if {_render_claim(claim[1], speaker)}, then {_render_claim(claim[2], speaker)}"
    if op == "exactly_one":
        return f"exactly one of {_join_names(group(claim[2]))} is a {claim[1]}"
    kinds = "the same kind" if op == "same" else "different kinds"
    return f"{_join_names(group(claim[1:]))} are {kinds}"

def _knights_prompt(names, statements):
    said = " ".join(f"{s['speaker']} says: {_quote(s['claim'], s['speaker'], '.')}" for s in statements)
    return (f"On an island live knights, who always tell the truth, and knaves, who always lie (\"A or B\" means "
            f"at least one of them). You meet {len(names)} inhabitants: {_join_names(names)}. {said} "
            f"Who is a knight and who is a knave?")

def _quote(claim, speaker=None, end=""):
    """The claim as a quoted sentence: "Bob is a knave." (end=".") in a prompt, "Bob is a knave" in a solution."""
    text = _render_claim(claim, speaker)
    return f"\"{text[:1].upper()}{text[1:]}{end}\""

_ATOM = re.compile(r"(\w+) (?:is|am) an? (knight|knave)", re.I)

def _parse_claim(text, speaker, names):
    """The claim (grammar in knights_problem) that an English sentence as _render_claim writes it states, said by
    speaker ("I" is the speaker); case-insensitive, a final period optional. ValueError names what is wrong."""
    s = " ".join(text.strip().rstrip(".").split())
    lookup = {x.lower(): x for x in names}
    name = lambda w: (speaker if w.lower() == "i" and speaker else lookup[w.lower()] if w.lower() in lookup
                      else _unknown_name(w, text))
    if m := re.fullmatch(r"if (.+?),? then (.+)", s, re.I):
        return ["if", _parse_atom(m[1], name, text), _parse_atom(m[2], name, text)]
    if m := re.fullmatch(r"exactly one of (.+) (?:is|am) an? (knight|knave)", s, re.I):
        return ["exactly_one", m[2].lower(), [name(w) for w in re.split(r",\s*(?:and\s+)?|\s+and\s+", m[1], flags=re.I)]]
    if m := re.fullmatch(r"(\w+) and (\w+) are (?:of )?(the same kind|different kinds)", s, re.I):
        return ["same" if m[3].lower() == "the same kind" else "different", name(m[1]), name(m[2])]
    for op in ("and", "or"):
        if len(parts := re.split(f" {op} ", s, flags=re.I)) == 2:
            return [op, _parse_atom(parts[0], name, text), _parse_atom(parts[1], name, text)]
    return _parse_atom(s, name, text)

def _parse_atom(s, name, text):
    if not (m := _ATOM.fullmatch(s)):
        raise ValueError(f"cannot read {text!r} as a claim of the knights-and-knaves grammar")
    return ["is", name(m[1]), m[2].lower()]

def _unknown_name(word, text):
    raise ValueError(f"unknown name {word!r} in {text!r}")

def _knights_propagate(statements, facts, lines):
    """Unit propagation: extend facts ({name: bool}, in place) with every kind that one statement forces given the
    facts so far -- its speaker and the people it names take the same value in every way of completing them that
    makes the claim's truth equal the speaker's kind -- until nothing changes, writing one line per step. Returns
    False (with a line saying why) at a statement that no completion satisfies: a contradiction."""
    changed = True
    while changed:
        changed = False
        for s in statements:
            speaker, claim = s["speaker"], s["claim"]
            open_ = [x for x in dict.fromkeys([speaker] + _claim_names(claim)) if x not in facts]
            fits = [t for bits in range(2 ** len(open_))
                    if _claim_value(claim, t := {**facts, **{x: bool(bits >> i & 1) for i, x in enumerate(open_)}})
                    == t[speaker]]
            if not fits or (forced := {x: fits[0][x] for x in open_ if all(t[x] == fits[0][x] for t in fits)}):
                lines.append(_knights_step(speaker, claim, facts, forced if fits else None))
                if not fits:
                    return False
                facts.update(forced)
                changed = True
    return True

def _knights_step(speaker, claim, facts, forced):
    """One line of the case analysis: what the statement forces (None: a contradiction)."""
    quoted = _quote(claim)
    if forced is None and speaker in facts:
        truth = facts[speaker]
        return (f"{speaker} is a {_kind(truth)}, so {quoted} must be {'true' if truth else 'false'}, but it is "
                f"{'false' if truth else 'true'}: contradiction.")
    if forced is None:
        return f"{speaker} can be neither a knight nor a knave saying {quoted}: contradiction."
    said = " and ".join(f"{x} is a {_kind(v)}" for x, v in forced.items())
    if speaker in facts:
        truth = "true" if facts[speaker] else "false"
        return f"{speaker} is a {_kind(facts[speaker])}, so {quoted} is {truth}: {said}."
    if set(forced) == {speaker} and speaker not in _claim_names(claim):  # the claim is settled by the facts
        return f"{quoted} is {'true' if forced[speaker] else 'false'}, so {said}."
    return f"{speaker} can only say {quoted} if {said}."

def _knights_refute(statements, names, facts, lines):
    """Write the deductions from facts (a supposition no solution agrees with) up to a contradiction; where they stop
    short of one, split on the next unsettled inhabitant and refute both cases."""
    if not _knights_propagate(statements, facts, lines):
        return
    if len(facts) == len(names):  # deductions settled everyone without a contradiction: another solution
        raise ValueError(f"not a puzzle with one solution: {_knights_answer(names, facts)} also fits")
    x = next(x for x in names if x not in facts)
    for value, word in ((True, "also"), (False, "instead")):
        lines.append(f"Suppose {word} {x} is a {_kind(value)}.")
        _knights_refute(statements, names, {**facts, x: value}, lines)
    lines.append("Both cases fail.")

# The answer parser (rules in knights_reward). Words an answer may hold besides names and kinds; anything else
# ("or", "not", "maybe", "either", "unknown", an unknown name) makes it unreadable.
_KIND_WORDS = {"knight": True, "knights": True, "knave": False, "knaves": False}
_COPULAS = {"is", "are", "was", "were"}
_FILLERS = _COPULAS | {"a", "an", "the", "and", "both", "all", "so", "thus", "therefore", "hence", "answer",
                       "final", "solution", "conclusion", "in", "we", "have", "conclude", "that", "then", "i", "s",
                       "none", "nobody", "but", "while", "whereas"}
_KNIGHTS_MAX_ANSWER = 2000  # characters: longer answers score 0 unread

def _knights_answer_text(completion, names):
    """The answer part of a completion: the last \\boxed{} (else <answer>), else its final lines that read as an
    answer (walking back from the end while each line holds only names, kinds and filler words)."""
    text = str(completion)
    if (answer := extract_answer(text)) is not None:
        return answer
    block = []
    for line in reversed(re.sub(r"<[^>]*>", " ", text[-20000:]).splitlines()[-50:]):
        if line.strip() or block:
            words = _knights_words(line, names)
            if not words or any(w is None for w in words):
                break
            block.insert(0, line)
    return "\n".join(block)

def _knights_words(text, names):
    """Each word classified: ("name", name) | ("kind", is_knight) | ("filler", word) | ("mark", ":" or "=") |
    None for any other word. A name written exactly as given wins over a filler word (a person called "A");
    otherwise names are case-insensitive."""
    exact, lower = set(names), {x.lower(): x for x in names}
    out = []
    for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?|[:=]", re.sub(r"\\[a-zA-Z]+", " ", text)):
        w = w[:-2] if w.lower().endswith("'s") else w  # "Alice's a knight"
        low = w.lower()
        out.append(("mark", w) if w in ":=" else ("name", w) if w in exact else
                   ("kind", _KIND_WORDS[low]) if low in _KIND_WORDS else ("filler", low) if low in _FILLERS else
                   ("name", lower[low]) if low in lower else None)
    return out

def _knights_parse_answer(text, names):
    """{name: is_knight} that the answer states, or None if any part of it is unreadable or contradictory."""
    if "?" in text or len(text) > _KNIGHTS_MAX_ANSWER:
        return None
    out = {}
    for segment in re.split(r"[;.|\n]", re.sub(r"\bno one\b", "none", text, flags=re.I)):
        words = _knights_words(segment, names)
        if any(w is None for w in words) or not _knights_segment(words, out):
            return None
    return out

def _knights_segment(words, out):
    """Read one sentence into out; False if it is unreadable or contradicts what out holds. The first name or kind
    word decides its form: names then their kind ("Alice and Bob are knights", "Alice: knight, Bob: knave", a JSON
    object) or a kind then its names ("knights: Alice, Bob; knaves: none")."""
    header_form, kind, pending, last = None, None, [], None
    for what, value in words:
        if what in ("filler", "mark"):
            if header_form and last == "name" and (what == "mark" or value in _COPULAS):
                return False  # "knights: Alice is ..." or "knights: Alice, Bob: knave": the two forms mixed
            continue
        header_form = (what == "kind") if header_form is None else header_form
        if what == "kind" and not header_form and not pending:  # "Alice is a knight knave"
            return False
        if what == "kind":
            kind, assigned, pending = value, pending, []
        else:
            assigned = [value] if header_form else []
            pending += [] if header_form else [value]
        for x in assigned:
            if out.setdefault(x, kind) != kind:  # a person named twice with both kinds
                return False
        last = what
    return not pending  # names left without a kind: a partial answer

# -----------------------------------------------------------------------------
# code sandbox
#
# Every run (a program's assert tests, a group of its stdin/stdout cases, or run_python's cells) is one
# sandbox: `unshare ... python -I -c _HARNESS`, whose job (program, tests, expected outputs, limits) it
# reads from its stdin -- an unnamed temp file of ours, so nothing of the job is ever in a file the
# program could open or on a command line. The harness is the trusted half: it confines itself (below),
# then runs the untrusted program in a separate interpreter (`python -I -c _RUNNER`, its own session,
# stdout/stderr its own, no fds of ours but two private pipes) and judges it:
#  - assert tests: the runner execs the program and then answers requests over its pipes ("call this
#    handle with these arguments", "your top-level names a, b", "iterate this", ...). The harness runs each
#    test's code in its OWN namespace with its own, untouched builtins; each name the test takes from the
#    program becomes a value (a copy of plain data) or a Remote stub that forwards calls. What comes back
#    is decoded as plain data only (exact None, bool, int, float, complex, str, bytes, list, tuple, dict,
#    set, frozenset, recursively; JSON with type tags, never pickle) or as another Remote handle, so the
#    expected values never leave the harness and every comparison runs on real plain data: an always-equal
#    object, a list subclass with its own __eq__, patched builtins, sys.modules tricks or a fake
#    excepthook in the program change nothing (a Remote compares by identity only; builtins win over
#    program names that shadow them; a test name that is a stdlib module is the harness's own import).
#    Exceptions come back as the nearest builtin exception type (so `except ValueError` tests work);
#    list / dict / set arguments are sent back after each call and updated in place. A call that times out,
#    crashes or breaks the protocol fails its test even if the test code catches exceptions, and the next
#    test gets a fresh process (the program re-run); a program that fails to start fails every test.
#  - stdin/stdout cases: one fresh runner per case, its stdin the case's input, its stdout an unnamed
#    file that the harness compares token by token with the expected output, which the program never sees.
#  - run_python: the runner re-runs the earlier cells with their output discarded, then the last one with
#    stdout and stderr going to a pipe the harness reads (head and tail kept, the middle cut).
# The verdict goes to the host on the harness's own stdout (with a per-run nonce; the runner's output
# goes elsewhere) and counts only if the harness exits 0. The harness makes itself non-dumpable
# (PR_SET_DUMPABLE 0), so the program -- same uid, no capabilities -- cannot ptrace it or open its
# /proc/<pid>/{mem,fd,environ}; in a pid namespace the harness is pid 1, which ignores the program's
# signals (even SIGKILL), and elsewhere killing it only makes the run fail.
#
# Confinement (the harness sets it up before the program exists, and the runner inherits it):
#  - enforced everywhere: wall-clock deadlines (each test, case or run_python call; a process that runs
#    past one is SIGKILLed with everything it started), RLIMIT_CPU, RLIMIT_AS (`memory_mb`, per process),
#    RLIMIT_FSIZE (16 MiB), no core dumps, RLIMIT_NPROC (a fork bomb hits EAGAIN), an empty environment
#    (PATH/LANG only; HOME and TMPDIR point at the scratch dir, the cwd), stdin from /dev/null or the
#    case's input, no_new_privs;
#  - where `unshare` works (root, or unprivileged user namespaces): no network (an empty net namespace)
#    and a private pid namespace + /proc, so every process the program starts dies with the harness and
#    the caller's processes are invisible;
#  - where its mount namespace lets us remount (the "private" mode): every mount of the host is remounted
#    read-only (and nosuid) inside it -- one that cannot be must be hidden under a read-only one, else
#    this mode is not used -- then fresh size-capped tmpfs are mounted on /tmp (64 MiB, 8192 inodes; the
#    scratch dir /tmp/sandbox is the cwd), /var/tmp and /dev/shm (16 MiB each). So the program can write
#    nowhere on the host: what it writes is in memory, capped, and gone when the run ends. The bounding
#    set is cleared, so it cannot unmount or remount its way out, even as root in a user namespace.
#    Not covered: filesystems the kernel mounts later on demand (autofs), device nodes (a read-only mount
#    still lets one write to a device its uid may open: /dev/null, a tty).
#  - as root: everything runs as uid/gid 65534 (nobody); the harness keeps only CAP_DAC_READ_SEARCH (so
#    the interpreter and stdlib stay readable wherever they are installed) and the runner has no
#    capability at all. If the runner cannot start as nobody here, both run as root with capabilities
#    dropped: then RLIMIT_NPROC does not hold and a fork bomb is bounded only by the deadline and the pid
#    namespace. As non-root, RLIMIT_NPROC counts all of the user's tasks (we allow current + 128).
#  - without unshare (the WEAK mode, see sandbox_mode and require_sandbox): no network or pid isolation;
#    the scratch dir is a host temp dir (deleted afterwards), the program can write wherever its uid may
#    and reach localhost. The harness is then a child subreaper and kills every descendant it finds
#    before it reports, but a process that escapes while the host kills a harness past its deadline can
#    survive. Run as non-root, the program has the caller's uid: it may read the caller's
#    /proc/<pid>/environ and open files, and its memory where ptrace is allowed (kernel.yama).
# Not defended: reading files its uid may read (world-readable files of the host, e.g. a dataset that
# holds the tests, if the program can find it; the run's own job is never in a file); a fork bomb's
# processes count against the uid's RLIMIT_NPROC for up to one deadline, so a concurrent sandbox that
# starts a process in that window can be refused; timing side channels; test code (trusted) that runs
# long in the harness is stopped only by the host's overall deadline.
# Not supported, by design: a program function named like a builtin or a top-level stdlib module is not
# reachable under that name from the tests (the builtin or the real module is used); program objects
# other than plain data (instances, generators, functions) are usable through Remote handles (call,
# attributes, indexing, iteration, len, bool, str) but never compared by the program's own __eq__:
# `Solution().f(x) == 3` works, `f() == Point(1, 2)` is False; test code cannot pass its own functions or
# objects to the program; after a call, a nested list the program replaced is updated in place (the
# test's references to it see the new value, as if it had been mutated).
# _sandbox_config() probes once which of these this machine allows and uses the strongest that works.

_CODEC = r'''
import builtins, json, os, select, time
__builtins__ = dict(vars(builtins))  # our own copy: a program that patches builtins cannot break the protocol

MAX_DEPTH = 200  # nesting allowed in a message (decoding recurses)

def encode(x, ref, depth=0):
    """x as JSON, each type tagged so that it decodes to exactly what it was; what is not exactly plain
    data is handed to ref(x, depth) (a handle, a conversion, or an error)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t, d = type(x), depth + 1
    if x is None or t is bool or t is str or t is float:
        return x
    if t is int:  # big ints as hex: JSON readers cap decimal digits, hex parses in linear time
        return x if -(1 << 53) < x < (1 << 53) else {"x": hex(x)}
    if t is list:
        return [encode(v, ref, d) for v in x]
    if t is dict:
        return {"d": [[encode(k, ref, d), encode(v, ref, d)] for k, v in x.items()]}
    if t is tuple or t is set or t is frozenset:
        return {"t" if t is tuple else "s" if t is set else "f": [encode(v, ref, d) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    return ref(x, depth)

def decode(j, unref, depth=0):
    """The value that encode wrote (exact builtin types only); other tags go to unref(tag, value)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t, d = type(j), depth + 1
    if j is None or t is bool or t is int or t is float or t is str:
        return j
    if t is list:
        return [decode(v, unref, d) for v in j]
    if t is not dict or len(j) != 1:
        raise ValueError("not plain data")
    (tag, v), = j.items()
    if tag == "x" and type(v) is str:
        return int(v, 16)
    if tag == "b" and type(v) is str:
        return bytes.fromhex(v)
    if type(v) is not list:
        raise ValueError("not plain data")
    if tag == "c" and len(v) == 2 and all(type(p) in (int, float) for p in v):
        return complex(v[0], v[1])
    if tag in ("t", "s", "f"):
        items = [decode(x, unref, d) for x in v]
        return tuple(items) if tag == "t" else set(items) if tag == "s" else frozenset(items)
    if tag == "d" and all(type(p) is list and len(p) == 2 for p in v):
        return {decode(k, unref, d): decode(x, unref, d) for k, x in v}
    return unref(tag, v)

def send(fd, obj, deadline=None):
    """One message: 8-byte length, then JSON. With a deadline the fd must be non-blocking."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        if deadline is not None:
            wait(fd, True, deadline)
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            pass

_SCAN = json.JSONDecoder().raw_decode  # not json.loads: its Python part looks up builtins the program may patch

def recv(fd, deadline=None, limit=1 << 62):
    n = int.from_bytes(read_exact(fd, 8, deadline), "big")
    if n > limit:
        raise ValueError("message too large")
    text = read_exact(fd, n, deadline).decode()
    obj, end = _SCAN(text)
    if end != len(text):
        raise ValueError("trailing data")
    return obj

def read_exact(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            wait(fd, False, deadline)
        try:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError("pipe closed")
        buf += chunk
    return bytes(buf)

def wait(fd, write, deadline):
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([] if write else [fd], [fd] if write else [], [], left)[1 if write else 0]:
        raise TimeoutError("deadline passed")
'''

_HARNESS = r'''
# verify-sandbox harness: the trusted half of verify.py's code sandbox (see the comment above _CODEC)
import builtins, ctypes, importlib, json, os, resource, signal, subprocess, sys, tempfile, time, types
JOB = json.loads(sys.stdin.buffer.read())
TAG = sys.argv[1]
VERDICT = os.dup(1)  # only the verdict is written here; whatever test code prints goes to /dev/null
for fd in (0, 1):
    os.dup2(os.open(os.devnull, os.O_RDWR), fd)
libc = ctypes.CDLL(None, use_errno=True)
MAX_MESSAGE = 32 << 20

def check(ok, what):
    if not ok:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)

def mount(src, dst, fs, flags, data):
    check(libc.mount(src, os.fsencode(dst), fs, flags, data) == 0, dst)

def private_mounts():
    """Own mount namespace: the host read-only, fresh size-capped tmpfs on /tmp /var/tmp /dev/shm."""
    mount(None, "/", None, 1 << 14 | 1 << 18, None)  # MS_REC | MS_PRIVATE: nothing propagates to the host
    bits = {b"ro": 1, b"nosuid": 2, b"nodev": 4, b"noexec": 8, b"nosymfollow": 256, b"noatime": 1024,
            b"nodiratime": 2048, b"relatime": 1 << 21}  # kept: a user namespace may not clear them
    points = {}
    for line in open("/proc/self/mountinfo", "rb"):  # mount point paths are octal-escaped (\040 = space)
        f = line.split()
        flags = sum(bits.get(o, 0) for o in f[5].split(b","))
        points[f[4].decode("unicode_escape").encode("latin-1")] = flags, f[f.index(b"-") + 1]
    for path, (flags, fs) in points.items():
        try:  # MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
            mount(None, path, None, flags | 32 | 4096 | 1 | 2, None)
        except OSError:  # e.g. a mount hidden under another one: what its path shows must be read-only
            # (statvfs only here, so a healthy run never waits on a network filesystem; autofs is
            # skipped: looking at it would trigger the automount)
            if fs != b"autofs" and os.path.exists(path) and not os.statvfs(path).f_flag & os.ST_RDONLY:
                raise
    for path, size in (("/tmp", "64m,nr_inodes=8192"), ("/var/tmp", "16m,nr_inodes=1024"),
                       ("/dev/shm", "16m,nr_inodes=1024")):
        if path == "/tmp" or os.path.isdir(path):  # MS_NOSUID | MS_NODEV
            mount(b"tmpfs", path, b"tmpfs", 2 | 4, f"size={size},mode=1777".encode())
    os.mkdir("/tmp/sandbox", 0o700)
    os.chdir("/tmp/sandbox")

def confine():
    """Limits, the scratch dir, then root -> nobody; all before the program exists."""
    for res, lim in ((resource.RLIMIT_CPU, JOB["cpu"]), (resource.RLIMIT_AS, JOB["memory"]),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, JOB["nproc"])):
        resource.setrlimit(res, (lim, lim))
    drop, private = JOB["drop"], JOB["private"]
    if private:
        private_mounts()
        if drop:
            os.chown(".", 65534, 65534)
    else:
        os.chdir(JOB["scratch"])
    if drop or private:  # no capability can come back on exec (bounding set), none gained by setuid binaries
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    if drop:  # root -> nobody
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    if drop or private:  # keep only CAP_DAC_READ_SEARCH (bit 2), and none inheritable: the runner gets nothing
        check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)(4, 4, 0, 0, 0, 0)) == 0, "capset")
    check(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    # non-dumpable: the program (same uid) may not ptrace us nor open our /proc/<pid>/mem, fd/, environ
    check(libc.prctl(4, 0, 0, 0, 0) == 0, "dumpable")  # PR_SET_DUMPABLE
    if os.getpid() != 1:  # no pid namespace: orphans of the program come to us, and die with us
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()

class Child:
    """The untrusted program in its own interpreter and session; we talk to it over two pipes."""

    def __init__(self, deadline, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        flags = ["-u"] if JOB["mode"] == "cells" else []  # unbuffered: stdout and stderr interleave as printed
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", *flags, "-c", JOB["runner"], TAG, str(to_r), str(from_w)],
                                         stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(to_r, from_w),
                                         start_new_session=True)
        except BaseException:
            os.close(self.to_w)
            os.close(self.from_r)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        for fd in (self.to_w, self.from_r):
            os.set_blocking(fd, False)
        try:
            send(self.to_w, {k: JOB.get(k) for k in ("mode", "program", "cells")}, deadline)
        except Exception:
            self.kill()
            raise

    def kill(self):
        """SIGKILL the program and everything it started, and reap them."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        kill_all()
        if self.proc.returncode is None:  # reaped by kill_all: don't let subprocess poll for it
            self.proc.returncode = -signal.SIGKILL
        for fd in (self.to_w, self.from_r):
            os.close(fd)

def kill_all():
    """Kill every process but us: all of the pid namespace, or (without one) every descendant, which as a
    subreaper are all our children; reap them."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if os.getpid() == 1:
            try:
                os.kill(-1, signal.SIGKILL)  # as pid 1: everyone in the namespace but us
            except OSError:
                pass
        else:
            for pid in children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)

def children():
    me, out = os.getpid(), []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat", "rb").read().rsplit(b")", 1)[1].split()[1]) == me:
                out.append(int(p))
        except (OSError, ValueError, IndexError):
            pass
    return out

# -- assert tests: the program's names as stubs, the tests run here

class Abort(BaseException):
    """The program's process timed out, died or broke the protocol: the test fails, whatever it catches."""

STATE = types.SimpleNamespace(child=None, deadline=0.0, aborted=False)
MISSING = object()

class Remote:
    """A program object. The harness may call it, read and set its attributes, index and iterate it, ask
    its len / bool / str; it never compares it by the program's rules (== is identity)."""
    __slots__ = ("_hid", "_kind")

    def __init__(self, hid, kind):
        object.__setattr__(self, "_hid", hid)
        object.__setattr__(self, "_kind", kind)

    def __call__(self, *args, **kwargs):
        return remote("call", self._hid, *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return remote("getattr", self._hid, name)

    def __setattr__(self, name, value):
        remote("setattr", self._hid, name, value)

    def __getitem__(self, key):
        return remote("getitem", self._hid, key)

    def __iter__(self):
        return remote("iter", self._hid)

    def __next__(self):
        return remote("next", self._hid)

    def __len__(self):
        return checked(remote("len", self._hid), int)

    def __bool__(self):
        return checked(remote("bool", self._hid), bool)

    def __str__(self):
        return checked(remote("str", self._hid), str)

    def __repr__(self):
        return f"<program {self._kind}>"

def checked(value, t):
    if type(value) is not t:
        raise abort("wrong type from the program")
    return value

def abort(why):
    STATE.aborted = True
    return Abort(why)

def local_ref(x, depth):  # what test code may send: plain data, and the program's own objects back
    if type(x) is Remote:
        return {"h": [x._hid, ""]}
    raise TypeError(f"cannot send a {type(x).__name__} to the program")

def remote_ref(tag, v):
    if tag == "h" and len(v) == 2 and type(v[0]) is int and type(v[1]) is str:
        return Remote(v[0], v[1][:100])
    if tag == "m" and len(v) == 1 and type(v[0]) is str:  # a module: our own import, stdlib only
        if v[0].split(".")[0] in sys.stdlib_module_names:
            return importlib.import_module(v[0])
        return MISSING
    raise ValueError("not plain data")

def remote(op, hid, *args, **kwargs):
    """One request to the program; its result as plain data or a Remote. The program's exception is
    raised here as the nearest builtin exception type."""
    child = STATE.child
    if child is None:
        raise abort("the program is not running")
    msg = {"op": op, "h": hid, "a": [encode(a, local_ref) for a in args],
           "k": {str(k): encode(v, local_ref) for k, v in kwargs.items()}}
    try:
        send(child.to_w, msg, STATE.deadline)
        reply = recv(child.from_r, STATE.deadline, MAX_MESSAGE)
        for old, new in zip(args, reply["a"]):
            sync(old, decode(new, remote_ref))
        for k, new in reply["k"].items():
            sync(kwargs.get(k), decode(new, remote_ref))
        error = remote_error(reply["raise"], reply["msg"]) if "raise" in reply else None
        result = None if error else decode(reply["ok"], remote_ref)
    except Exception as e:  # timed out, died, or sent something that is not plain data
        child.kill()
        STATE.child = None
        raise abort(f"{type(e).__name__}: {e}")
    if error:
        raise error
    return result

def remote_error(names, msg):
    if type(names) is not list or type(msg) is not str:
        raise ValueError("bad exception")
    for name in names:
        cls = builtins.__dict__.get(name) if type(name) is str else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(msg)
            except Exception:  # needs other arguments (UnicodeDecodeError): try its base
                continue
    return abort(f"the program raised {names[:1]}")  # SystemExit, KeyboardInterrupt, ...: the test fails

def sync(old, new):
    """Update a list / dict / set argument in place with what the program made of it."""
    if type(old) is not type(new) or type(old) not in (list, dict, set, tuple):
        return
    if type(old) is set:
        old.clear()
        old.update(new)
    elif type(old) is dict:
        for k in [k for k in old if k not in new]:
            del old[k]
        for k, v in new.items():
            if k in old and type(old[k]) is type(v) and type(v) in (list, dict, set):
                sync(old[k], v)
            else:
                old[k] = v
    elif len(old) != len(new):
        if type(old) is list:
            old[:] = new
    else:  # same length: keep the nested objects the test holds, update them too
        for i, (a, b) in enumerate(zip(old, new)):
            if type(a) is type(b) and type(a) in (list, dict, set, tuple):
                sync(a, b)
            elif type(old) is list:
                old[i] = b

def start_program(deadline):
    """A fresh process running the program; True once it has defined its names in time."""
    try:
        STATE.child = Child(deadline)
        if recv(STATE.child.from_r, deadline, 1 << 16) == {"ready": True}:
            return True
    except Exception:
        pass
    if STATE.child:
        STATE.child.kill()
    STATE.child = None
    return False

def code_names(code):
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= code_names(c)
    return names

def program_names(code):
    """The program's top-level names that the test uses and Python's builtins do not define (builtins
    win, so a program cannot redefine abs or sorted for the test), as values or Remotes; a stdlib
    module name is our own import of it."""
    wanted = sorted(n for n in code_names(code) if not n.startswith("__") and n not in builtins.__dict__)
    if not wanted:
        return {}
    found = remote("globals", None, wanted)
    if type(found) is not dict:
        raise abort("bad names")
    out = {}
    for name in wanted:
        if name in found and found[name] is not MISSING:
            out[name] = importlib.import_module(name) if name in sys.stdlib_module_names else found[name]
    return out

def solution_module():
    """`from solution import f` in a test: the program's names, fetched on demand."""
    m = types.ModuleType("solution")
    def fetch(name):
        found = remote("globals", None, [name]) if not name.startswith("__") else {}
        if type(found) is not dict or name not in found or found[name] is MISSING:
            raise AttributeError(name)
        return found[name]
    m.__getattr__ = fetch
    return m

def run_test(src):
    STATE.aborted = False
    try:
        code = compile(src, "test.py", "exec")
        ns = {"__builtins__": builtins, "__name__": "__test__"}
        ns.update(program_names(code))
        exec(code, ns)
        return not STATE.aborted
    except BaseException:
        return False

def run_asserts():
    sys.modules["solution"] = solution_module()
    T = JOB["timeout"]
    STATE.deadline = JOB["start"] + T  # the first test's budget includes starting the program
    started = start_program(STATE.deadline)
    results = []
    for i, src in enumerate(JOB["tests"]):
        if i:
            STATE.deadline = time.monotonic() + T  # each later test's own budget, a restart included
        if started and STATE.child is None:  # the last test killed it
            started = start_program(STATE.deadline)
        results.append(started and run_test(src))
    return {"results": results}

# -- stdin/stdout cases

def run_io():
    return {"results": [io_case(case) for case in JOB["cases"]]}

def io_case(case):
    deadline = time.monotonic() + JOB["timeout"]
    with tempfile.TemporaryFile(dir=".") as inp, tempfile.TemporaryFile(dir=".") as out:
        inp.write(case["input"].encode(errors="replace"))
        inp.seek(0)
        try:
            child = Child(deadline, stdin=inp, stdout=out)
        except Exception:
            kill_all()
            return False
        try:
            code = child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        child.kill()
        out.seek(0)
        got = out.read(16 << 20)
    return code == 0 and got.decode(errors="replace").split() == case["output"].split()

# -- run_python's cells

CONTINUATION = bytes(range(0x80, 0xC0))

class Capture:
    """The first and last `keep` bytes of a stream, and how many characters went by."""

    def __init__(self, max_chars):
        self.keep, self.head, self.tail, self.chars, self.size = 4 * max_chars + 4, bytearray(), bytearray(), 0, 0

    def add(self, data):
        self.chars += len(data.translate(None, CONTINUATION))  # UTF-8: one non-continuation byte per character
        self.size += len(data)
        room = self.keep - len(self.head)
        self.head += data[:max(room, 0)]
        self.tail += data[max(room, 0):]
        del self.tail[:-self.keep]

    def text(self, max_chars):
        half = max_chars // 2
        if self.size == len(self.head) + len(self.tail):  # nothing dropped: cut exactly
            s = (self.head + self.tail).decode(errors="replace")
            if len(s) <= max_chars:
                return s
            a, b = s[:half], s[len(s) - (max_chars - half):]
            cut = len(s) - len(a) - len(b)
        else:
            a, b = self.head.decode(errors="replace")[:half], self.tail.decode(errors="replace")
            b = b[len(b) - (max_chars - half):]
            cut = self.chars - len(a) - len(b)
        return f"{a}...[{cut} characters cut]...{b}"

def run_cells():
    T = JOB["timeout"]
    deadline, out = JOB["start"] + T, Capture(JOB["max_chars"])
    r, w = os.pipe()
    try:
        child = Child(deadline, stdout=w, stderr=w)
    except Exception as e:
        kill_all()
        return {"output": "", "error": f"could not start Python: {e}", "timed_out": False}
    finally:
        os.close(w)
    os.set_blocking(r, False)
    code = pump(child, r, out, deadline)
    report = {}
    if code == 0:
        try:
            report = recv(child.from_r, time.monotonic() + 0.1, 1 << 16)
        except Exception:
            pass
    child.kill()
    os.close(r)
    text = out.text(JOB["max_chars"])
    if code == 0:  # the runner printed the exception's line itself, in its place in the output
        error = report.get("error") if type(report) is dict and type(report.get("error")) is str else None
        return {"output": text, "error": error, "timed_out": False}
    if code is None:
        error = f"TimeoutError: the code ran longer than {T:g} s"
    elif code < 0:
        try:
            error = f"the process was killed by {signal.Signals(-code).name}"
        except ValueError:
            error = f"the process was killed by signal {-code}"
    else:
        error = f"the process exited with status {code}"
    text += ("\n" if text and not text.endswith("\n") else "") + error
    return {"output": text, "error": error, "timed_out": code is None}

def pump(child, r, out, deadline):
    """Read the program's output until it exits (its exit status) or the deadline passes (None). After
    the exit, what its leftover processes still write is read for a moment only."""
    until = None
    while True:
        code = child.proc.poll()
        now = time.monotonic()
        if code is None and now >= deadline:
            return None
        if code is not None:
            until = until or now + 0.05
            if now >= until:
                return code
        if not select.select([r], [], [], 0.01 if code is not None else min(0.05, deadline - now))[0]:
            if code is not None:
                return code
            continue
        try:
            data = os.read(r, 1 << 16)
        except BlockingIOError:
            continue
        if data:
            out.add(data)
        elif code is not None:
            return code
        else:  # every writer closed its end: wait for the exit
            try:
                return child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return None

def main():
    confine()
    verdict = {"assert": run_asserts, "io": run_io, "cells": run_cells}[JOB["mode"]]()
    if STATE.child:
        STATE.child.kill()
    kill_all()
    verdict["nonce"] = JOB["nonce"]
    os.write(VERDICT, ("\n" + json.dumps(verdict) + "\n").encode())
    os._exit(0)

main()
'''

_RUNNER = r'''
# verify-sandbox runner: the untrusted half of verify.py's code sandbox. It runs the model's program and
# answers the harness's requests; nothing it sends is trusted (the harness decodes plain data only).
import ast, builtins, sys, traceback, types
sys.set_int_max_str_digits(0)
R, W = int(sys.argv[2]), int(sys.argv[3])
HANDLES = []
BASES = (int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
CONTAINERS = (list, dict, set, tuple)
OPS = {"call": lambda o, *a, **k: o(*a, **k), "getattr": getattr, "setattr": setattr, "getitem": lambda o, k: o[k],
       "iter": iter, "next": next, "len": len, "bool": bool, "str": str}

def ref(x, depth):
    """What is not exactly plain data: a subclass as its base type (a Counter as a dict, a namedtuple as
    a tuple), a numpy value as .tolist(), a module by name, anything else as a handle."""
    if isinstance(x, types.ModuleType):
        return {"m": [x.__name__]}
    for base in BASES:
        if isinstance(x, base):
            return encode(str.__str__(x) if base is str else base(x), ref, depth + 1)
    if type(x).__module__ == "numpy" and hasattr(x, "tolist"):
        return encode(x.tolist(), ref, depth + 1)
    HANDLES.append(x)
    return {"h": [len(HANDLES) - 1, type(x).__name__]}

def unref(tag, v):
    if tag == "h" and type(v[0]) is int and 0 <= v[0] < len(HANDLES):
        return HANDLES[v[0]]
    raise ValueError("bad handle")

def message(e):
    try:
        return str(e)[:1000]
    except BaseException:
        return ""

def answer(req, g):
    """One request: the program's names, or an operation on one of its objects (then the list / dict /
    set arguments go back too, as the call may have changed them)."""
    args = [decode(a, unref) for a in req["a"]]
    if req["op"] == "globals":
        found = []
        for name in args[0]:
            try:
                found.append([name, encode(g[name], ref)])
            except Exception:
                pass
        return {"ok": {"d": found}, "a": [], "k": {}}
    kwargs = {k: decode(v, unref) for k, v in req["k"].items()}
    try:
        reply = {"ok": encode(OPS[req["op"]](unref("h", [req["h"]]), *args, **kwargs), ref)}
    except BaseException as e:
        reply = {"raise": [c.__name__ for c in type(e).__mro__ if c.__module__ == "builtins"], "msg": message(e)}
    reply["a"] = [encode(a, ref) if type(a) in CONTAINERS else None for a in args]
    reply["k"] = {k: encode(v, ref) for k, v in kwargs.items() if type(v) in CONTAINERS}
    return reply

def serve(job):
    """Assert tests: define the program's names, then answer requests until the harness hangs up."""
    sys.argv = ["main.py"]
    g = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "main.py", "exec"), g)
    except BaseException:
        os._exit(1)
    send(W, {"ready": True})
    while True:
        try:
            req = recv(R)
        except EOFError:
            os._exit(0)
        try:
            reply = answer(req, g)
        except BaseException as e:
            reply = {"raise": ["TypeError"], "msg": f"{type(e).__name__}: {message(e)}", "a": [], "k": {}}
        send(W, reply)

def run_script(job):
    """A stdin/stdout case: the program as __main__; exit status 0 unless it raised (or exited non-zero)."""
    os.close(R)
    os.close(W)
    sys.argv = ["main.py"]
    code = 0
    try:
        exec(compile(job["program"], "main.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        code = 0 if e.code is None or e.code == 0 else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
    except BaseException:
        code = 1
    os._exit(code)  # don't wait for threads or atexit handlers the program left behind

def run_cells(job):
    """run_python: earlier cells re-run with their output discarded, then the last one shown."""
    os.close(R)
    cells, g = job["cells"], {"__name__": "__main__", "__builtins__": builtins}
    out, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    for src in cells[:-1]:
        try:
            run_cell(src, g, False)
        except BaseException:
            pass
    os.dup2(out, 1)
    os.dup2(out, 2)
    error = None
    try:
        run_cell(cells[-1], g, True)
    except BaseException as e:  # as a notebook would show it, in one line: "NameError: name 'x' is not defined"
        error = traceback.format_exception_only(type(e), e)[-1].strip()
        print(error, file=sys.stderr)
    send(W, {"error": error})
    os._exit(0)

def run_cell(src, g, show):
    """exec a cell; with show, the value of a final expression is printed (repr), as a notebook shows it."""
    tree = ast.parse(src, "<cell>")
    last = tree.body.pop() if show and tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), g)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), g)
        if value is not None:
            print(repr(value))

JOB = recv(R)
{"assert": serve, "io": run_script, "cells": run_cells}[JOB["mode"]](JOB)
'''

_SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_SLOTS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_slots = threading.BoundedSemaphore(_SLOTS)  # sandboxes at once, process-wide: nested pools never oversubscribe
_GRACE = 3.0  # seconds the host waits past the harness's own deadlines (interpreter start-up, clean-up)
_sandbox = None  # (unshare prefix, drop root, private mounts) that works on this machine, probed once
_sandbox_lock = threading.Lock()
_runs = itertools.count()

def _reset_sandbox_locks_after_fork():  # a forked child holds none of the slots its parent's threads held
    global _slots, _sandbox_lock
    _slots, _sandbox_lock = threading.BoundedSemaphore(_SLOTS), threading.Lock()

os.register_at_fork(after_in_child=_reset_sandbox_locks_after_fork)

def _sandbox_config():
    """The strongest setup that runs a trivial test (and writes to its scratch dir) here: namespaces
    if `unshare` is permitted, with private read-only mounts if they can be set up, root dropped to
    nobody if we are root and the interpreter still starts afterwards."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            ns = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]
            if os.geteuid() != 0:  # unprivileged: a user namespace makes the others possible
                ns = ns[:1] + ["--user", "--map-root-user"] + ns[1:]
            options = [(pre, drop, private) for pre in ([ns] if shutil.which("unshare") else []) + [[]]
                       for private in ([True, False] if pre else [False])
                       for drop in ([True] if os.geteuid() == 0 else []) + [False]]
            probe = {"mode": "assert", "timeout": 30.0, "tests": ["assert one() == 1 and math.pi > 3"],
                     "program": "import json, math\nopen('probe.txt', 'w').close()\ndef one():\n    return 1"}
            _sandbox = next((cfg for cfg in options if _passed(_run_sandbox(probe, cfg, 512, 65.0), 1) == 1),
                            ([], False, False))
    return _sandbox

def _task_count(uid):
    """Tasks (threads included) owned by uid: RLIMIT_NPROC counts these for the whole user."""
    n = 0
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid:
                n += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            pass
    return n

def _pass_asserts(code, tests, timeout, memory_mb):
    """How many assert tests the program passes: one sandbox, the program started once (again after a
    test that kills it); each test has its own `timeout`."""
    if not tests:
        return 0
    job = {"mode": "assert", "program": code, "tests": tests, "timeout": timeout}
    return _passed(_run_sandbox(job, _sandbox_config(), memory_mb, (len(tests) + 1) * timeout + _GRACE), len(tests))

def _pass_cases(code, cases, timeout, memory_mb):
    """How many stdin/stdout cases the program passes: a fresh process per case, the cases spread over
    up to one sandbox per core."""
    if not cases:
        return 0
    from concurrent.futures import ThreadPoolExecutor
    config, k = _sandbox_config(), min(len(cases), _SLOTS)

    def run(chunk):
        job = {"mode": "io", "program": code, "cases": chunk, "timeout": timeout}
        return _passed(_run_sandbox(job, config, memory_mb, len(chunk) * (timeout + 0.5) + _GRACE), len(chunk))
    with ThreadPoolExecutor(k) as ex:
        return sum(ex.map(run, [cases[i::k] for i in range(k)]))

def _passed(verdict, n):
    results = verdict.get("results") if verdict else None
    return sum(r is True for r in results) if type(results) is list and len(results) == n else 0

def _run_sandbox(job, config, memory_mb, wait_s):
    """The harness's verdict (a dict) on `job`, run in sandbox `config` and given wait_s seconds from its
    start (the harness keeps its own, shorter deadlines); None if it failed, ran out of time or its
    verdict lacks the run's nonce. Waits for one of the _SLOTS first."""
    prefix, drop, private = config
    with _slots:
        scratch = None if private else tempfile.mkdtemp(prefix="verify-sandbox-")
        try:
            if scratch and drop:
                os.chown(scratch, 65534, 65534)
            job = dict(job, runner=_CODEC + _RUNNER, nonce=os.urandom(16).hex(), scratch=scratch, drop=drop,
                       private=private, memory=memory_mb << 20, cpu=math.ceil(wait_s) + 1,
                       nproc=_task_count(65534 if drop else os.getuid()) + 128, start=time.monotonic())
            tag = f"verify-sandbox-{os.getpid()}-{next(_runs)}"  # names our processes in ps (tests look for it)
            rc, out = _spawn(prefix + [sys.executable, "-I", "-c", _CODEC + _HARNESS, tag],
                             json.dumps(job).encode(), scratch or "/", job["start"] + wait_s)
        finally:
            if scratch:
                _remove_tree(scratch)
    try:
        verdict = json.loads(out.rstrip().rsplit(b"\n", 1)[-1])
    except ValueError:
        return None
    return verdict if rc == 0 and type(verdict) is dict and verdict.get("nonce") == job["nonce"] else None

def _spawn(cmd, stdin, cwd, deadline):
    """Run cmd in a session of its own, its stdin and stdout unnamed temp files, until it exits or the
    deadline passes; then SIGKILL its process group. Returns (exit status, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        proc = subprocess.Popen(cmd, stdin=inp, stdout=out, stderr=subprocess.DEVNULL, cwd=cwd,
                                env=_SANDBOX_ENV, start_new_session=True)
        inp.close()  # the job now lives only in the harness's fd 0, which it closes once read
        pause = 0.001
        # wait without reaping, so the process group id stays ours until we have killed it
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
        out.seek(0)
        return rc, out.read()

def _remove_tree(path):
    for parent, dirs, _ in os.walk(path):  # the program may have chmod-ed its own dirs to 000
        for d in dirs:
            try:
                os.chmod(os.path.join(parent, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)

if __name__ == "__main__" and sys.argv[1:] == ["--sympy-worker"]:
    _worker_main()
