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

How the engine uses a format: a row pauses when its text ends with call_close after a call_open; the call is
the text between them; the engine appends observation(output), i.e. result_open + output + result_close,
where output loses its trailing newlines (Python's stdout "42\\n" is shown as "```output\\n42\\n```").
"""

import collections
import math
import re
from dataclasses import dataclass

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

DEFAULT_SEARCH_K = 2  # documents per search
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
