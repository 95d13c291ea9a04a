"""Tests for tools.py: the tool formats, BM25 search and the corpus loader, the built-in knowledge base, and the
builtin:search and builtin:tool_arithmetic tasks with their worked solutions. No torch; a few seconds.
Run: python -m pytest tests/test_tools.py -q"""

import json
import math
import os
import random
import subprocess
import sys
import zlib

import pytest

import tools
from tools import (NO_RESULTS, PYTHON_FORMAT, SEARCH_FORMAT, BM25Index, Document, format_results, load_corpus,
                   search_observation_body, tokenize)
from verify import accuracy_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_turns(text, fmt):
    """[(call text, observation body)] read from a completion the way the rollout engine reads one: a call
    ends at call_close after a call_open, and what follows it must be result_open + body + result_close."""
    turns, pos = [], 0
    while (start := text.find(fmt.call_open, pos)) >= 0:
        end = text.index(fmt.call_close, start + len(fmt.call_open))
        call, pos = text[start + len(fmt.call_open):end], end + len(fmt.call_close)
        assert text.startswith(fmt.result_open, pos), text[pos:pos + 40]
        body_end = text.index(fmt.result_close, pos + len(fmt.result_open))
        turns.append((call, text[pos + len(fmt.result_open):body_end]))
        pos = body_end + len(fmt.result_close)
    return turns


def test_no_torch():
    """tools.py is data only: the engine and the tests import it without torch."""
    code = "import sys, tools; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

# -----------------------------------------------------------------------------
# formats


def test_formats():
    assert PYTHON_FORMAT.call("print(1)\n") == "```python\nprint(1)\n```"
    assert PYTHON_FORMAT.observation("3\n") == "\n```output\n3\n```\n"  # print's newline is not doubled
    assert SEARCH_FORMAT.call("Ostrava") == "<search>Ostrava</search>"
    assert SEARCH_FORMAT.observation("[A] b") == "\n<information>[A] b</information>\n"


def test_prompt_templates():
    for template, syntax in ((tools.SEARCH_PROMPT_TEMPLATE, "<search>"), (tools.PYTHON_PROMPT_TEMPLATE, "```python")):
        assert template.count("{question}") == 1 and template.startswith("{question}\n")
        assert "\\boxed{}" in template and syntax in template and "<think>" in template

# -----------------------------------------------------------------------------
# BM25 and the corpus

THREE_DOCS = [Document("a", "Apple", "apple pie"), Document("b", "Pie", "cherry pie recipe"),
              Document("c", "Stone", "river stone")]


def test_bm25_hand_computed():
    # tokens: a = apple apple pie (3), b = pie cherry pie recipe (4), c = stone river stone (3); avgdl = 10/3
    index = BM25Index(THREE_DOCS)
    idf_apple = math.log((3 - 1 + 0.5) / (1 + 0.5) + 1)  # n(apple) = 1
    idf_pie = math.log((3 - 2 + 0.5) / (2 + 0.5) + 1)  # n(pie) = 2
    norm_a, norm_b = 1 - 0.75 + 0.75 * 3 / (10 / 3), 1 - 0.75 + 0.75 * 4 / (10 / 3)
    expected_a = idf_apple * 2 * 2.5 / (2 + 1.5 * norm_a) + idf_pie * 1 * 2.5 / (1 + 1.5 * norm_a)
    expected_b = idf_pie * 2 * 2.5 / (2 + 1.5 * norm_b)
    assert index.score("apple pie", 0) == pytest.approx(expected_a, rel=1e-12)
    assert index.score("Apple, PIE!", 0) == pytest.approx(1.93986885, abs=1e-8)  # the same, worked by hand
    assert index.score("apple pie", 1) == pytest.approx(expected_b, rel=1e-12)
    assert index.score("apple pie", 2) == 0.0
    assert index.score("pie pie apple", 0) == index.score("apple pie", 0)  # a repeated query term counts once
    assert index.search("apple pie", k=3) == THREE_DOCS[:2]  # c holds no query term: not returned


def test_bm25_rare_term_ranks_first():
    docs = [Document(str(i), f"Note {i}", "the market opens at dawn and the market closes at dusk") for i in range(6)]
    docs.append(Document("rare", "Harbour", "the harbour opens at dawn"))
    index = BM25Index(docs)
    assert index.search("market harbour", k=1)[0].id == "rare"  # one rare term beats two common ones
    assert [d.id for d in index.search("market", k=7)] == [str(i) for i in range(6)]


def test_bm25_ties_in_corpus_order_and_k():
    docs = [Document(i, "Same", "identical text") for i in ("z", "y", "x")]
    index = BM25Index(docs)
    assert [d.id for d in index.search("identical", k=3)] == ["z", "y", "x"]
    assert [d.id for d in index.search("identical", k=2)] == ["z", "y"]
    assert index.search("identical", k=0) == []


def test_empty_and_unmatched_queries():
    index = BM25Index(THREE_DOCS)
    for query in ("", "   ", "?!", "banana"):
        assert index.search(query, k=2) == []
        assert search_observation_body(index, query) == NO_RESULTS
    assert BM25Index([]).search("apple") == []


def test_tokenize():
    assert tokenize("Vorin Kessaly, b. 1874 (Ostrava)") == ["vorin", "kessaly", "b", "1874", "ostrava"]
    assert tokenize("") == []


def test_format_results_and_cutting():
    docs = [Document("1", "Long", "word " * 100), Document("2", "Short", "tiny text")]
    body = format_results(docs, max_chars=30)
    first, second = body.split("\n")
    assert second == "[Short] tiny text"
    text = first[len("[Long] "):]
    assert text == "word word word word word..."  # cut between words, 27 <= 30 characters
    assert tools.shorten("one two three four", 10) == "one two..."  # the cut falls at a space: both words kept
    assert tools.shorten("abcdefghijklmnop", 10) == "abcdefg..."  # one overlong word: cut inside it
    assert tools.shorten("exactly ten", 11) == "exactly ten"
    assert format_results([]) == NO_RESULTS


def write_jsonl(tmp_path, lines):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_load_corpus(tmp_path):
    path = write_jsonl(tmp_path, [{"id": "d1", "title": "Apple", "text": "apple pie"}, "",
                                  {"id": "d2", "title": "Pie", "text": "cherry pie", "extra": 1}])
    assert load_corpus(path) == [Document("d1", "Apple", "apple pie"), Document("d2", "Pie", "cherry pie")]


@pytest.mark.parametrize("second_line, message", [
    ({"id": "d2", "title": "Pie"}, ":2: 'text' must be a non-empty string"),
    ({"id": "d2", "title": "  ", "text": "t"}, ":2: 'title' must be a non-empty string"),
    ({"id": 7, "title": "Pie", "text": "t"}, ":2: 'id' must be a non-empty string"),
    ({"id": "d1", "title": "Pie", "text": "t"}, ":2: duplicate id 'd1' (first at line 1)"),
    ('{"id": "d2", ', ":2: malformed JSON"),
    ('["d2"]', ":2: expected a JSON object"),
])
def test_load_corpus_errors_name_the_line(tmp_path, second_line, message):
    path = write_jsonl(tmp_path, [{"id": "d1", "title": "Apple", "text": "apple pie"}, second_line])
    with pytest.raises(ValueError) as error:
        load_corpus(path)
    assert str(error.value).startswith(path) and message in str(error.value)


def test_load_corpus_empty_file(tmp_path):
    path = write_jsonl(tmp_path, [""])
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(path)

# -----------------------------------------------------------------------------
# the built-in knowledge base


@pytest.fixture(scope="module")
def kb():
    return tools.knowledge_base_facts()


@pytest.fixture(scope="module")
def index():
    return BM25Index(tools.knowledge_base())


def test_knowledge_base_is_fixed(kb):
    assert tools.knowledge_base() == tools.knowledge_base() == kb.documents()
    assert len(kb.people) == 300 and len(kb.cities) == 60
    assert tools.knowledge_base_facts(seed="another") != kb
    # pinned: the built-in corpus must not drift between versions (worked solutions and checkpoints depend on it)
    assert kb.people[0].document().text == "Foufeth Routeth is a shipwright born in Pirdivei in 1871."
    assert kb.cities[0].document().text == "Nusi is a city in Brinnor on the Vesdre river, founded by Drupir Dethlen."


def test_knowledge_base_names_unique(kb):
    documents = kb.documents()
    assert len({d.title for d in documents}) == len({d.id for d in documents}) == len(documents)
    founders = {c.founder for c in kb.cities}
    assert len(founders) == len(kb.cities) and not founders & {p.name for p in kb.people}
    city_words = {c.name for c in kb.cities} | {c.country for c in kb.cities} | {c.river for c in kb.cities}
    name_words = {w for name in [p.name for p in kb.people] + list(founders) for w in name.split()}
    assert not city_words & name_words  # a place name never doubles as part of a person's name
    assert all(p.birthplace in {c.name for c in kb.cities} for p in kb.people)
    assert all(len(tokenize(d.title)) == len(d.title.split()) for d in documents)  # plain words only


def test_every_exact_name_finds_its_own_document_first(kb, index):
    for document in kb.documents():
        assert index.search(document.title, k=1) == [document], document.title
    for city in kb.cities:  # a founder, who has no document, finds the city they founded
        assert index.search(city.founder, k=1) == [city.document()]

# -----------------------------------------------------------------------------
# builtin:search


@pytest.fixture(scope="module")
def all_search_problems():
    return {split: tools.search_problems(split, 10_000) for split in ("train", "heldout")}


def test_search_splits(kb, all_search_problems):
    train, heldout = ({p["prompt"] for p in all_search_problems[s]} for s in ("train", "heldout"))
    assert len(train) + len(heldout) == 5 * len(kb.people) + 3 * len(kb.cities)  # every question in one split
    assert not train & heldout
    assert 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.17
    assert tools.search_problems("train", 50, seed=3) == tools.search_problems("train", 50, seed=3)
    assert tools.search_problems("train", 50, seed=3) != tools.search_problems("train", 50, seed=4)
    assert len({p["prompt"] for p in tools.search_problems("heldout", len(heldout))}) == len(heldout)  # no repeats
    assert {p["hops"] for p in tools.search_problems("train", 200, hops=(2,))} == {2}
    with pytest.raises(ValueError):
        tools.search_problems("test", 1)


def test_search_heldout_facts_never_read_in_training(kb, index, all_search_problems):
    heldout_cities = {kb.city(p["queries"][-1]).name if p["hops"] == 2 else _city_of(kb, p["entity"])
                      for p in all_search_problems["heldout"]}
    assert heldout_cities == set(sorted((c.name for c in kb.cities), key=lambda n: zlib.crc32(n.encode()))[:7])
    for problem in all_search_problems["train"]:
        solution = tools.search_worked_solution(problem, index, k=1)
        assert not any(city in solution for city in heldout_cities), problem


def _city_of(kb, entity):
    people = {p.name: p.birthplace for p in kb.people}
    return people.get(entity, entity)


def test_search_chains(kb, index, all_search_problems):
    people = {p.name: p for p in kb.people}
    for problem in all_search_problems["train"] + all_search_problems["heldout"]:
        entity, queries = problem["entity"], problem["queries"]
        assert entity in problem["prompt"] and queries[0] == entity and len(queries) == problem["hops"]
        if problem["hops"] == 2:  # person -> their birthplace (named in the person's document) -> the city
            person = people[entity]
            assert queries[1] == person.birthplace and person.birthplace in person.document().text
            city = kb.city(queries[1])
            assert problem["answer"] in {city.country, city.river, city.founder}
        last_document = index.search(queries[-1], k=1)[0]
        assert last_document.title == queries[-1] and problem["answer"] in last_document.text


def test_search_worked_solutions(index, all_search_problems):
    problems = all_search_problems["train"][:300] + all_search_problems["heldout"][:100]
    for k in (1, 2):
        for problem in problems:
            solution = tools.search_worked_solution(problem, index, k)
            assert solution.startswith("<think>\n<search>")
            assert solution.endswith(f"</think>\n\\boxed{{{problem['answer']}}}")
            turns = tool_turns(solution, SEARCH_FORMAT)
            assert [call for call, _ in turns] == problem["queries"]
            for query, body in turns:  # exactly what the search tool returns for that query
                assert body == format_results(index.search(query, k), tools.DEFAULT_MAX_CHARS)
                assert body.count("\n") == k - 1
            assert accuracy_reward(problem, solution) == 1.0


def test_search_pinned_example(index):
    problem = next(p for p in tools.search_problems("train", 100, hops=(2,)) if "river" in p["prompt"])
    assert problem == {"prompt": "Which river flows through the city where Vospu Posthu was born?", "answer": "Starkel",
                       "hops": 2, "entity": "Vospu Posthu", "queries": ["Vospu Posthu", "Deintar"]}
    assert tools.search_worked_solution(problem, index, k=1) == (
        "<think>\n"
        "<search>Vospu Posthu</search>\n"
        "<information>[Vospu Posthu] Vospu Posthu is an engraver born in Deintar in 1825.</information>\n"
        "<search>Deintar</search>\n"
        "<information>[Deintar] Deintar is a city in Vuleikes on the Starkel river, founded by Vamus Hortin."
        "</information>\n"
        "</think>\n\\boxed{Starkel}")


def test_search_answers_grade_as_text(kb, all_search_problems):
    """Each answer, boxed, earns 1.0 in any case; every other answer of the same kind earns 0.0."""
    answers_of_kind = {"city": {c.name for c in kb.cities}, "country": {c.country for c in kb.cities},
                       "river": {c.river for c in kb.cities}, "founder": {c.founder for c in kb.cities},
                       "profession": set(tools.PROFESSIONS)}
    for kind, answers in answers_of_kind.items():
        answers = sorted(answers)
        for answer, wrong in zip(answers, answers[1:] + answers[:1]):
            problem = {"prompt": "?", "answer": answer}
            assert accuracy_reward(problem, f"</think>\n\\boxed{{{answer.upper()}}}") == 1.0, answer
            assert accuracy_reward(problem, f"</think>\n\\boxed{{{wrong}}}") == 0.0, (answer, wrong)
    problem = all_search_problems["train"][0]
    assert accuracy_reward(problem, "</think>\n\\boxed{}") == 0.0
    assert accuracy_reward(problem, f"no box: {problem['answer']}") == 0.0


def test_search_observation_sizes(kb, index):
    """Observations stay short enough for a small model's context: ~90-120 characters at k=1, ~150-200 at k=2."""
    for k, limit in ((1, 130), (2, 210)):
        sizes = [len(SEARCH_FORMAT.observation(search_observation_body(index, d.title, k))) for d in kb.documents()]
        assert max(sizes) <= limit, (k, max(sizes))

# -----------------------------------------------------------------------------
# builtin:tool_arithmetic


def test_tool_arithmetic_pinned_example():
    problem = {"prompt": "Compute 48213*7719+5126.", "answer": "372161273", "expr": "48213*7719+5126"}
    assert tools.tool_arithmetic_worked_solution(problem) == (
        "<think>\n```python\nprint(48213*7719+5126)\n```\n```output\n372161273\n```\n</think>\n\\boxed{372161273}")
    assert tools.tool_arithmetic_worked_solution(problem, use_tool=False) == (
        "<think>\n48213*7719+5126=372161273\n</think>\n\\boxed{372161273}")


def test_tool_arithmetic_problems():
    train, heldout = tools.tool_arithmetic_problems("train", 400), tools.tool_arithmetic_problems("heldout", 100)
    assert not {p["expr"] for p in train} & {p["expr"] for p in heldout}
    assert all(zlib.crc32(p["expr"].encode()) % 8 == 0 for p in heldout)
    assert train == tools.tool_arithmetic_problems("train", 400) != tools.tool_arithmetic_problems("train", 400, seed=1)
    for p in train + heldout:
        numbers = p["expr"].replace("*", "+").split("+")
        assert 2 <= len(numbers) <= 3 and all(3 <= len(n) <= 5 and n[0] != "0" for n in numbers)
        assert p["prompt"] == f"Compute {p['expr']}." and p["answer"] == str(eval(p["expr"]))
    assert {op for p in train for op in p["expr"] if not op.isdigit()} == {"+", "*"}
    hard = tools.tool_arithmetic_problems("train", 50, min_digits=6, max_digits=6, operators="-")
    assert all(len(n) == 6 for p in hard for n in p["expr"].split("-")) and any(p["answer"][0] == "-" for p in hard)


def test_evaluate_arithmetic():
    rng = random.Random(0)
    for _ in range(200):
        expr = "".join(str(rng.randint(0, 10 ** 6)) + rng.choice("+-*") for _ in range(rng.randint(1, 5)))[:-1]
        assert tools.evaluate_arithmetic(expr) == eval(expr)
    assert tools.evaluate_arithmetic("(2+3)*-4") == -20
    for bad in ("2**3", "1/2", "7//2", "x+1", "1+", "__import__('os').getpid()", "1.5*2", "True+1", ""):
        with pytest.raises(ValueError):
            tools.evaluate_arithmetic(bad)


def test_tool_arithmetic_worked_solutions():
    problems = (tools.tool_arithmetic_problems("train", 150)
                + tools.tool_arithmetic_problems("heldout", 50, operators="+-*"))
    for problem in problems:
        solution = tools.tool_arithmetic_worked_solution(problem)
        [(code, output)] = tool_turns(solution, PYTHON_FORMAT)
        assert code == f"print({problem['expr']})\n" and output == str(eval(problem["expr"]))
        assert solution == ("<think>\n" + PYTHON_FORMAT.call(code) + PYTHON_FORMAT.observation(output + "\n")
                            + f"</think>\n\\boxed{{{problem['answer']}}}")
        for use_tool in (True, False):
            text = tools.tool_arithmetic_worked_solution(problem, use_tool)
            assert accuracy_reward(problem, text) == 1.0
            assert accuracy_reward(problem, text.replace(problem["answer"], str(int(problem["answer"]) + 1))) == 0.0
    # the real interpreter prints exactly the observed output (a handful, in one process)
    sample = problems[::25]
    program = "".join(tool_turns(tools.tool_arithmetic_worked_solution(p), PYTHON_FORMAT)[0][0] for p in sample)
    printed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert printed.splitlines() == [tool_turns(tools.tool_arithmetic_worked_solution(p), PYTHON_FORMAT)[0][1]
                                    for p in sample]
