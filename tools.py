"""
Data for tool-integrated reasoning: the text formats of the two built-in tools, a BM25 search engine over a
document corpus, and the built-in tasks that need the tools, with worked solutions holding real tool calls and
their real outputs. Plain stdlib (no torch); the rollout engine and the tool registry live elsewhere and import
the formats from here.

Top to bottom:
- Formats. ToolFormat, PYTHON_FORMAT (Qwen2.5-Math TIR: "```python\\n<code>\\n```", then
  "\\n```output\\n<stdout>\\n```\\n") and SEARCH_FORMAT (R1-Searcher / Search-R1: "<search>query</search>", then
  "\\n<information>results</information>\\n"); the task names SEARCH_TASK and TOOL_ARITHMETIC_TASK and their
  prompt templates SEARCH_PROMPT_TEMPLATE and PYTHON_PROMPT_TEMPLATE.
- Search. Document, load_corpus (a JSONL corpus of {"id", "title", "text"}), tokenize, BM25Index (Okapi BM25,
  k1 = 1.5, b = 0.75; title and text both indexed), shorten and format_results (the observation body: one
  "[title] text" line per document, each text cut to DEFAULT_MAX_CHARS at a word boundary, or NO_RESULTS) and
  search_observation_body (what the search tool returns for a query: DEFAULT_SEARCH_K documents).
- The built-in knowledge base. Invented people and cities (Person, City, KnowledgeBase), generated from a fixed
  seed (KNOWLEDGE_BASE_SEED) so that no pretrained model can know them: knowledge_base_facts() and
  knowledge_base() (one short document per entity: 360 documents of 45-82 characters).
- Task builtin:search. Questions about the knowledge base needing one lookup ("In which city was X born?") or
  two ("Which river flows through the city where X was born?"): search_problems, search_worked_solution.
- Task builtin:tool_arithmetic. Sums and products of 3-digit numbers with 6-digit answers, one line of Python with
  the tool:
  tool_arithmetic_problem, tool_arithmetic_problems, evaluate_arithmetic, tool_arithmetic_worked_solution.

How the engine uses a format: a row pauses when its text ends with call_close after a call_open; the call is
the text between them; the engine appends observation(output), i.e. result_open + output + result_close,
where output loses its trailing newlines (Python's stdout "42\\n" is shown as "```output\\n42\\n```").

Each task has disjoint "train" and "heldout" splits fixed by a crc32 hash, however the problems were generated:
of the expression (tool_arithmetic: an eighth of all expressions held out), or of the city a question is about
(search: an eighth of the cities held out, with every question about them or about the people born there).
Problems are plain dicts graded by verify.accuracy_reward (math_reward on "answer").
"""

import ast
import collections
import functools
import importlib
import math
import os
import random
import re
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import verify

# -----------------------------------------------------------------------------
# formats


@dataclass(frozen=True)
class ToolFormat:
    """How a tool call and its result are written in the model's text."""
    call_open: str
    call_close: str
    result_open: str
    result_close: str

    def call(self, text):
        return self.call_open + text + self.call_close

    def observation(self, output):
        """What the engine appends right after a call: output without its trailing newlines, wrapped."""
        return self.result_open + output.rstrip("\n") + self.result_close


PYTHON_FORMAT = ToolFormat("```python\n", "```", "\n```output\n", "\n```\n")
SEARCH_FORMAT = ToolFormat("<search>", "</search>", "\n<information>", "</information>\n")

SEARCH_TASK = "builtin:search"
TOOL_ARITHMETIC_TASK = "builtin:tool_arithmetic"

# The user turn of each task, used like sample.PROMPT_TEMPLATE: "{question}" is replaced by the problem's "prompt".
SEARCH_PROMPT_TEMPLATE = (
    "{question}\nThink step by step inside <think> </think> tags. To look something up, write <search>query"
    "</search>; the results will appear between <information> and </information>. Then give the final answer "
    "in \\boxed{}.")
PYTHON_PROMPT_TEMPLATE = (
    "{question}\nThink step by step inside <think> </think> tags. You may run Python code by writing it in a "
    "```python block; what it prints will appear in an ```output block. Then give the final answer in "
    "\\boxed{}.")

# -----------------------------------------------------------------------------
# search: a JSONL corpus and a BM25 index over it

DEFAULT_SEARCH_K = 1  # documents per search (the built-in questions name their entity exactly: its document is first)
DEFAULT_MAX_CHARS = 300  # characters of each document's text in an observation
NO_RESULTS = "No documents found."  # the observation body of a search that matches nothing


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def load_corpus(path):
    """The Documents of a JSONL file of {"id", "title", "text"} records (all three non-empty strings, ids
    unique). ValueError names path:line for a bad record."""
    documents, first_line_of_id = [], {}
    for lineno, record in verify.read_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("id", "title", "text"):
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
        if record["id"] in first_line_of_id:
            raise ValueError(f"{where}: duplicate id {record['id']!r} (first at line {first_line_of_id[record['id']]})")
        first_line_of_id[record["id"]] = lineno
        documents.append(Document(record["id"], record["title"], record["text"]))
    if not documents:
        raise ValueError(f"{path}: no documents found (empty file)")
    return documents


def tokenize(text):
    """Lower-cased runs of letters and digits: "Vorin Kessaly, b. 1874" -> ["vorin", "kessaly", "b", "1874"]."""
    return re.findall(r"[a-z0-9]+", text.lower())


class BM25Index:
    """Okapi BM25 (Robertson & Zaragoza 2009) over each document's title and text, built once."""

    def __init__(self, documents, k1=1.5, b=0.75):
        self.documents, self.k1, self.b = list(documents), k1, b
        self.term_counts = [collections.Counter(tokenize(d.title + " " + d.text)) for d in self.documents]
        self.lengths = [sum(counts.values()) for counts in self.term_counts]
        self.average_length = sum(self.lengths) / max(len(self.lengths), 1)
        self.postings = collections.defaultdict(list)  # term -> indices of the documents holding it
        for i, counts in enumerate(self.term_counts):
            for term in counts:
                self.postings[term].append(i)

    def idf(self, term):
        # IDF(q) = ln((N - n(q) + 0.5) / (n(q) + 0.5) + 1): Lucene's form, never negative for common terms
        n = len(self.postings.get(term, ()))
        return math.log((len(self.documents) - n + 0.5) / (n + 0.5) + 1)

    def score(self, query, i):
        """BM25 score of document i for the query; each distinct query term counts once."""
        # score(D, Q) = sum_{q in Q} IDF(q) * f(q, D) * (k1 + 1) / (f(q, D) + k1 * (1 - b + b * |D| / avgdl))
        total, length_norm = 0.0, 1 - self.b + self.b * self.lengths[i] / self.average_length
        for term in set(tokenize(query)):
            f = self.term_counts[i].get(term, 0)
            total += self.idf(term) * f * (self.k1 + 1) / (f + self.k1 * length_norm)
        return total

    def search(self, query, k=DEFAULT_SEARCH_K):
        """The k best documents holding at least one query term, best first; equal scores in corpus order.
        An empty query (or one whose terms no document holds) finds nothing."""
        candidates = {i for term in tokenize(query) for i in self.postings.get(term, ())}
        ranked = sorted(candidates, key=lambda i: (-self.score(query, i), i))
        return [self.documents[i] for i in ranked[:k]]


def shorten(text, max_chars):
    """text if it fits in max_chars, else cut at the last space that leaves room for "..." (mid-word only when
    the first word alone is too long), with "..." appended: never longer than max_chars."""
    if len(text) <= max_chars:
        return text
    cut = text[:max(max_chars - 3, 0)]
    if text[len(cut)] != " " and " " in cut:  # the cut splits a word: drop the part of it kept
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "..."


def format_results(documents, max_chars=DEFAULT_MAX_CHARS):
    """The observation body of a search: "[title] text" per document (text shortened to max_chars), one per
    line, or NO_RESULTS."""
    if not documents:
        return NO_RESULTS
    return "\n".join(f"[{d.title}] {shorten(d.text, max_chars)}" for d in documents)


def search_observation_body(index, query, k=DEFAULT_SEARCH_K, max_chars=DEFAULT_MAX_CHARS):
    """What the search tool returns for a query: format_results of the index's top k."""
    return format_results(index.search(query, k), max_chars)

# -----------------------------------------------------------------------------
# the built-in knowledge base: invented people and cities, the same every run

KNOWLEDGE_BASE_SEED = "tools-knowledge-base-v1"
PROFESSIONS = ("baker", "weaver", "potter", "sculptor", "cartographer", "glassblower", "astronomer", "clockmaker",
               "bookbinder", "shipwright", "herbalist", "engraver", "violinist", "architect", "tanner", "beekeeper")
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "s", "l", "th")
_DOCUMENT_WORDS = {"is", "a", "an", "born", "in", "city", "on", "the", "river", "founded", "by"}


@dataclass(frozen=True)
class Person:
    name: str
    profession: str
    birthplace: str  # a City's name
    birth_year: int

    def document(self):
        article = "an" if self.profession[0] in "aeiou" else "a"
        return Document(_slug("person", self.name), self.name,
                        f"{self.name} is {article} {self.profession} born in {self.birthplace} in {self.birth_year}.")


@dataclass(frozen=True)
class City:
    name: str
    country: str
    river: str
    founder: str  # an invented person who has no document of their own

    def document(self):
        text = f"{self.name} is a city in {self.country} on the {self.river} river, founded by {self.founder}."
        return Document(_slug("city", self.name), self.name, text)


@dataclass(frozen=True)
class KnowledgeBase:
    people: tuple
    cities: tuple

    def city(self, name):
        return next(c for c in self.cities if c.name == name)

    def documents(self):
        return [p.document() for p in self.people] + [c.document() for c in self.cities]


def knowledge_base_facts(seed=KNOWLEDGE_BASE_SEED, n_people=300, n_cities=60, n_countries=8, n_rivers=24):
    """People and cities with invented names (every name word used once across countries, rivers, cities and
    person names, so an entity's exact name finds its own document first) and random facts: a person's
    profession, birthplace and birth year; a city's country, river and founder. Same seed, same facts."""
    rng, taken = random.Random(seed), set(_DOCUMENT_WORDS) | set(PROFESSIONS)
    countries = _invented_words(rng, n_countries, taken)
    rivers = _invented_words(rng, n_rivers, taken)
    city_names = _invented_words(rng, n_cities, taken)
    first_names, surnames = _invented_words(rng, n_people // 5, taken), _invented_words(rng, n_people // 2, taken)
    full_names = set()
    while len(full_names) < n_people + n_cities:  # people, then the cities' founders
        full_names.add(f"{rng.choice(first_names)} {rng.choice(surnames)}")
    full_names = sorted(full_names)
    rng.shuffle(full_names)
    cities = tuple(City(name, rng.choice(countries), rng.choice(rivers), founder)
                   for name, founder in zip(city_names, full_names[n_people:]))
    people = tuple(Person(name, rng.choice(PROFESSIONS), rng.choice(city_names), rng.randint(1650, 1950))
                   for name in full_names[:n_people])
    return KnowledgeBase(people, cities)


def knowledge_base():
    """The built-in corpus: one Document per person and per city of knowledge_base_facts()."""
    return knowledge_base_facts().documents()


def _invented_words(rng, count, taken):
    """count new capitalised pseudo-words of 4-8 letters (2-3 syllables), none in taken; adds them to taken."""
    words = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        if 4 <= len(word) <= 8 and word not in taken:
            taken.add(word)
            words.append(word.capitalize())
    return words


def _slug(kind, name):
    return f"{kind}-{'-'.join(tokenize(name))}"

# -----------------------------------------------------------------------------
# builtin:search: questions about the knowledge base, answered by one or two searches


def search_problems(split, n, seed=0, hops=(1, 2)):
    """n problems from the "train" or "heldout" split, of the given hop counts; same seed, same problems
    (distinct while n is at most the split's size, then repeating). Each is {"prompt", "answer", "hops",
    "entity", "queries"}: entity is the person or city asked about (its exact name is in the question),
    queries the searches that answer it (the entity, then for two hops the city its document names).
    Splits: a question is held out when the city it is about (a person's birthplace, or the city itself) is
    held out, an eighth of the cities chosen by a hash of their names; so no fact a held-out question needs
    (its person's document or its city's) is read in any training question's worked solution at k=1 (at
    larger k a neighbour's document may show one)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    kb = knowledge_base_facts()
    questions = [(c.name, q) for c in kb.cities for q in _city_questions(c)]  # (the city it is about, question)
    questions += [(p.birthplace, q) for p in kb.people for q in _person_questions(p, kb.city(p.birthplace))]
    heldout_cities = set(sorted((c.name for c in kb.cities), key=lambda name: zlib.crc32(name.encode()))[
        :len(kb.cities) // 8])  # exactly an eighth (crc32 % 8 would hold out a few cities more or less)
    pool = [q for city, q in questions if q["hops"] in hops and (city in heldout_cities) == (split == "heldout")]
    if not pool:
        raise ValueError(f"no {split} search problems with hops in {hops}")
    rng, out = random.Random(f"search-{split}-{seed}"), []
    while len(out) < n:
        batch = list(pool)
        rng.shuffle(batch)
        out += batch
    return out[:n]


def _person_questions(person, city):
    name, chain = person.name, [person.name, city.name]  # two hops: the person's document names the city
    return [_search_problem(f"In which city was {name} born?", city.name, [name]),
            _search_problem(f"What is the profession of {name}?", person.profession, [name]),
            _search_problem(f"In which country was {name} born?", city.country, chain),
            _search_problem(f"Which river flows through the city where {name} was born?", city.river, chain),
            _search_problem(f"Who founded the city where {name} was born?", city.founder, chain)]


def _city_questions(city):
    return [_search_problem(f"In which country is the city of {city.name}?", city.country, [city.name]),
            _search_problem(f"Which river flows through {city.name}?", city.river, [city.name]),
            _search_problem(f"Who founded {city.name}?", city.founder, [city.name])]


def _search_problem(prompt, answer, queries):
    return {"prompt": prompt, "answer": answer, "hops": len(queries), "entity": queries[0],
            "queries": list(queries)}


def search_worked_solution(problem, index, k=DEFAULT_SEARCH_K, max_chars=DEFAULT_MAX_CHARS):
    """The R1-format completion of a search problem with real tool calls: in <think>, each of the problem's
    queries as a search call followed by exactly what the search tool returns for it (the index's top k,
    format_results), then the boxed answer:
    "<think>\\n<search>X</search>\\n<information>[X] X is ...</information>\\n</think>\\n\\boxed{...}"."""
    calls = "".join(SEARCH_FORMAT.call(query) + SEARCH_FORMAT.observation(
        search_observation_body(index, query, k, max_chars)) for query in problem["queries"])
    return f"<think>\n{calls}</think>\n\\boxed{{{problem['answer']}}}"

# -----------------------------------------------------------------------------
# builtin:tool_arithmetic: sums and products of big numbers, one line of Python with the tool


def tool_arithmetic_problem(rng, min_operands=3, max_operands=3, min_digits=3, max_digits=3, operators="+*",
                            answer_digits=6):
    """A random problem: {"prompt", "answer", "expr"}, e.g. "Compute 482*771+512." with answer "372134". Operands
    have min_digits..max_digits digits (no leading zero), joined by random operators (Python's precedence: * before
    +); drawn again until the answer has answer_digits digits (None: any). operators="+-*" adds subtraction, and with
    it negative answers. The default keeps every worked solution the same shape (three 3-digit numbers, a 6-digit
    answer: a*b+c or a+b*c), so a 1M-parameter model can learn where to copy from; wider settings are harder."""
    while True:
        digits = [rng.randint(min_digits, max_digits) for _ in range(rng.randint(min_operands, max_operands))]
        operands = [rng.randint(10 ** (d - 1), 10 ** d - 1) for d in digits]
        expr = str(operands[0]) + "".join(rng.choice(operators) + str(x) for x in operands[1:])
        answer = str(evaluate_arithmetic(expr))
        if answer_digits is None or len(answer.lstrip("-")) == answer_digits:
            return {"prompt": f"Compute {expr}.", "answer": answer, "expr": expr}


def tool_arithmetic_problems(split, n, seed=0, **difficulty):
    """n problems from the "train" or "heldout" split; same seed, same problems. The splits are disjoint by
    construction: a hash of the expression puts a fixed eighth of all expressions in heldout."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, out = random.Random(f"tool_arithmetic-{split}-{seed}"), []
    while len(out) < n:
        problem = tool_arithmetic_problem(rng, **difficulty)
        heldout = zlib.crc32(problem["expr"].encode()) % 8 == 0  # a fixed eighth never appears in training
        if heldout == (split == "heldout"):
            out.append(problem)
    return out


def evaluate_arithmetic(expr):
    """The exact integer value of an expression of integer literals, + - * and parentheses, as Python computes
    it; ValueError on anything else (it is parsed, never executed)."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC_OPERATORS:
            return _ARITHMETIC_OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not integer + - * arithmetic: {ast.unparse(node)!r}")
    try:
        return value(ast.parse(expr, mode="eval").body)
    except (SyntaxError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ValueError(f"not an expression: {expr[:100]!r}") from e


_ARITHMETIC_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def tool_arithmetic_worked_solution(problem, use_tool=True):
    """The R1-format completion of a tool_arithmetic problem. With the tool: one Python call printing the
    expression, followed by exactly the observation the interpreter's output gives (PYTHON_FORMAT), then the
    boxed answer: "<think>\\n```python\\nprint(1+2)\\n```\\n```output\\n3\\n```\\n</think>\\n\\boxed{3}". Without:
    the equation written directly, "<think>\\n1+2=3\\n</think>\\n\\boxed{3}" (a no-tool baseline on the same
    problems)."""
    answer = problem["answer"]
    if not use_tool:
        return f"<think>\n{problem['expr']}={answer}\n</think>\n\\boxed{{{answer}}}"
    printed = f"{evaluate_arithmetic(problem['expr'])}\n"  # what print() writes for an int
    call = PYTHON_FORMAT.call(f"print({problem['expr']})\n")
    return f"<think>\n{call}{PYTHON_FORMAT.observation(printed)}</think>\n\\boxed{{{answer}}}"


def search_no_tool_solution(problem):
    """The completion of a search problem without the tool (the no-tool baseline: the answer from memory)."""
    return f"<think>\nI recall the answer.\n</think>\n\\boxed{{{problem['answer']}}}"

# -----------------------------------------------------------------------------
# the tools a rollout calls, and the pool that runs their calls

@dataclass(frozen=True)
class Tool:
    """A tool the model calls while it writes: its name, how its calls and results are written, and
    run(calls) -> (output, error): calls are this sample's calls to the tool so far, the current one last (the
    python tool re-runs the earlier ones so that their variables exist), output the observation's body."""
    name: str
    format: ToolFormat
    run: Callable


@dataclass
class ToolCall:
    """One call in a rollout: the tool, the text between its delimiters, the output that came back (the
    observation's body), whether that was an error (an exception, a timeout, a crash) and the seconds it took."""
    tool: str
    text: str
    output: str = ""
    error: bool = False
    seconds: float = 0.0


def python_tool(timeout=5.0, memory_mb=512, fmt=PYTHON_FORMAT):
    """Python in verify.py's sandbox (no network, nothing written on the host, time and memory capped): the
    output is what the last call printed (a traceback's last line on an exception), as a notebook shows it."""
    def run(calls):
        result = verify.run_python(calls, timeout=timeout, memory_mb=memory_mb)
        return result.output, result.error is not None or result.timed_out
    return Tool("python", fmt, run)


def search_tool(index, k=DEFAULT_SEARCH_K, max_chars=DEFAULT_MAX_CHARS, fmt=SEARCH_FORMAT):
    """BM25 search over a corpus: the top k documents of the call's query (in memory: it cannot hang)."""
    return Tool("search", fmt, lambda calls: (search_observation_body(index, calls[-1].strip(), k, max_chars), False))


# A user's tool runs in a child interpreter, so that a call that hangs or eats memory can be killed.
_USER_TOOL_RUNNER = r"""
import importlib, resource, sys
limit = int(sys.argv[3]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
function = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
sys.stdout.write(str(function(sys.stdin.read())))
"""


def user_tool(spec, timeout=5.0, memory_mb=1024, fmt=None):
    """--tools mypkg.mymodule:function: a callable text -> text, called with the call's text in a child Python
    process (the current folder importable) killed after `timeout` seconds, its address space capped at memory_mb;
    written <function>...</function> and answered <result>...</result> unless --tool_formats says otherwise."""
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--tools {spec}: cannot import it ({e})") from None
    if not callable(function):
        raise ValueError(f"--tools {spec}: not a callable")

    def run(calls):
        try:
            proc = subprocess.run([sys.executable, "-c", _USER_TOOL_RUNNER, module, name, str(memory_mb)],
                                  input=calls[-1], capture_output=True, text=True, timeout=timeout, cwd=os.getcwd())
        except subprocess.TimeoutExpired:
            return f"Error: {name} did not answer within {timeout:g} s", True
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            return f"Error: {last}", True
        return proc.stdout, False
    return Tool(name, fmt or ToolFormat(f"<{name}>", f"</{name}>", "\n<result>", "</result>\n"), run)


class ToolRunner:
    """Runs tool calls concurrently on a pool of worker threads (the work itself happens in a sandbox process, a
    child interpreter or in memory), so N calls cost about N / workers call latencies; a call that has not answered
    within `timeout` seconds of starting (queueing does not count) is answered with an error, and its row goes on."""

    def __init__(self, workers=None, timeout=10.0):
        self.pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
        self.timeout = timeout

    def submit(self, tool, calls):
        """Start tool.run(calls) -> (future, the ToolCall that ready() fills in once it has answered, a box the
        worker puts its start time in)."""
        started = []
        return self.pool.submit(self.run, tool, calls, started), ToolCall(tool.name, calls[-1]), started

    @staticmethod
    def run(tool, calls, started):
        """tool.run(calls) -> (output, error, seconds); a broken tool answers with its error, the rollout goes on."""
        started.append(time.monotonic())
        try:
            output, error = tool.run(calls)
        except Exception as e:
            output, error = f"Error: {type(e).__name__}: {e}", True
        return output, error, time.monotonic() - started[0]

    def ready(self, future, call, started):
        """Whether the call has its answer (filled into call): done, or past the timeout since it started running
        (then an error; whatever it returns later is ignored)."""
        if future.done():
            call.output, call.error, call.seconds = future.result()
            return True
        if started and time.monotonic() - started[0] > self.timeout:
            call.output, call.error, call.seconds = f"Error: no answer within {self.timeout:g} s", True, self.timeout
            return True
        return False

    def next_deadline(self, pending):
        """The soonest moment one of the (future, call, started) calls times out, or None while all are queued."""
        starts = [s[0] for _, _, s in pending if s]
        return min(starts) + self.timeout if starts else None


def tool_names(spec):
    """--tools "python, search" -> ["python", "search"] (a user's tool: "module:function")."""
    return [t.strip() for t in spec.split(",") if t.strip()]


def tool_formats(spec, custom=None):
    """{tool name: its ToolFormat} for --tools spec, with --tool_formats' overrides (ValueError naming the flag on a
    mistake). What sft.py needs to mask the tools' outputs, and make_tools to run them."""
    formats = {}
    for name in tool_names(spec):
        if name not in ("python", "search") and ":" not in name:
            raise ValueError(f"--tools {name}: unknown tool (python, search, or module:function)")
        short = name.partition(":")[2] or name
        formats[short] = {"python": PYTHON_FORMAT, "search": SEARCH_FORMAT}.get(
            name, ToolFormat(f"<{short}>", f"</{short}>", "\n<result>", "</result>\n"))
    for name, given in (custom or {}).items():
        if name not in formats:
            raise ValueError(f"--tool_formats names a tool not in --tools: {name}")
        if not (isinstance(given, list) and len(given) == 4 and all(isinstance(x, str) and x for x in given)):
            raise ValueError(f"--tool_formats {name}: four non-empty strings (call open, call close, result open, "
                             f"result close), got {given!r}")
        formats[name] = ToolFormat(*given)
    if len({f.call_open for f in formats.values()}) < len(formats):
        raise ValueError(f"--tools {spec}: two tools with the same call delimiter")
    return formats


def make_tools(args):
    """The Tools a run uses (task_tools: --tools, or the built-in task's), with their flags (ValueError naming the
    flag on a mistake)."""
    spec = task_tools(args)
    formats, tools = tool_formats(spec, args.tool_formats), []
    for name in tool_names(spec):
        short = name.partition(":")[2] or name
        if name == "python":
            tool = python_tool(args.tool_timeout, args.tool_memory_mb, formats[short])
        elif name == "search":
            index = BM25Index(load_corpus(args.corpus)) if args.corpus else builtin_search_index()
            tool = search_tool(index, args.search_top_k, args.search_max_chars, formats[short])
        else:
            tool = user_tool(name, args.tool_timeout, args.tool_memory_mb, formats[short])
        tools.append(tool)
    return tools


def observation_spans(text, formats):
    """[(start, end)] of the tool outputs in a text: each result_open ... result_close right after a call of the
    same tool (call_open ... call_close), sorted. sft.py keeps them out of the loss."""
    spans = []
    for f in formats:
        for call in re.finditer(re.escape(f.call_open) + ".*?" + re.escape(f.call_close), text, re.S):
            end = text.find(f.result_close, call.end() + len(f.result_open))
            if text.startswith(f.result_open, call.end()) and end >= 0:
                spans.append((call.end(), end + len(f.result_close)))
    return sorted(spans)


# -----------------------------------------------------------------------------
# every built-in task by its --data name: generated problems (train / held-out) and worked solutions

@dataclass(frozen=True)
class Task:
    """A built-in task: problems(split, n, seed) of its "train" or "heldout" split, solution(problem, show_steps)
    its worked solution, the tool those solutions call (sft.py masks its outputs; the RL scripts give it to the
    policy unless --tools says otherwise) and the committed tiny policy trained on it (the RL scripts' default)."""
    problems: Callable
    solution: Callable
    tool: str = ""
    checkpoint: str = "checkpoints/tiny-sft"
    max_new_tokens: int = 64  # room for its worked solutions (the RL scripts' default --max_new_tokens)


TASKS = {
    "builtin": Task(verify.builtin_problems, verify.worked_solution),
    "builtin:countdown": Task(verify.countdown_problems, verify.countdown_worked_solution,
                              checkpoint="checkpoints/tiny-countdown"),
    "builtin:knights": Task(verify.knights_problems, verify.knights_worked_solution, checkpoint="checkpoints/tiny-knights",
                            max_new_tokens=512),
    TOOL_ARITHMETIC_TASK: Task(tool_arithmetic_problems, tool_arithmetic_worked_solution, "python",
                               "checkpoints/tiny-tool-arithmetic", 96),
    SEARCH_TASK: Task(search_problems, lambda problem, show_steps=True: search_worked_solution(
        problem, builtin_search_index()) if show_steps else search_no_tool_solution(problem), "search",
        "checkpoints/tiny-search", 320),
}
BUILTIN_TASKS = tuple(TASKS)


def is_builtin(data):
    return data in TASKS


def task_problems(data, split, n, seed=0):
    """n problems of the split ("train" or "heldout") of the built-in task that --data names."""
    if data not in TASKS:
        raise ValueError(f"--data {data}: not a built-in task ({', '.join(TASKS)}) and not a file")
    return TASKS[data].problems(split, n, seed)


def task_solution(data, problem, show_steps=True):
    """The worked solution of a built-in problem. show_steps=False is the terse one (for the tool tasks: without
    the tool, the no-tool baseline's data)."""
    return TASKS[data].solution(problem, show_steps)


def task_tools(args):
    """The tools a run uses: --tools, or by default the built-in task's tool (--data, or sample.py's --eval); "none"
    for none."""
    data = getattr(args, "data", None) or getattr(args, "eval", None)
    spec = args.tools or (TASKS[data].tool if is_builtin(data) else "")
    return "" if spec == "none" else spec


def default_max_new_tokens(data, fallback):
    """The completion budget a built-in task's worked solutions need (fallback for a file)."""
    return max(TASKS[data].max_new_tokens, fallback) if is_builtin(data) else fallback


def default_checkpoint(data):
    """The committed tiny policy of a built-in task where there is one (else checkpoints/tiny-sft)."""
    path = TASKS[data].checkpoint if is_builtin(data) else "checkpoints/tiny-sft"
    return path if os.path.isdir(path) else "checkpoints/tiny-sft"


@functools.cache
def builtin_search_index():
    """The BM25 index of the built-in knowledge base (built once: it is the same every run)."""
    return BM25Index(knowledge_base())
