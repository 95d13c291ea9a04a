"""Tokenizer tests: ids, decode and chat-template strings must equal what Hugging Face transformers gives.

Run from the repo root (which puts the root on sys.path): python -m pytest tests/test_tokenizer.py -q
transformers / tokenizers / jinja2 are only the test oracle here; the Tokenizer itself never imports them.
"""
import json
import os
import random

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from model import Tokenizer

# -----------------------------------------------------------------------------
# test data

CORPUS = [
    "Hello world! This is a test.",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine; we've done it, you'd agree.",
    "SHOUTING CONTRACTIONS: I'M, YOU'LL, WE'VE, IT'S",
    "def f(x):\n    if x > 0:\n        return x ** 2\n\treturn -x  # a tab\n",
    "class A:\n    pass\n\n\n\nx = [1, 2, 3]  \n",
    "Numbers: 1234567 and 3.14 and 1,000,000 and 0.5e-10, 2024-11-22, v1.2.3, x1y22z333",
    "spaces before digits:  42   7\t9\n 8 \n\n12",
    "café naïve résumé Ångström Ελληνικά русский",
    "decomposed: cafe\u0301 nai\u0308ve A\u030angstro\u0308m",  # NFC composes these
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
    "emoji 😀🎉👍🏽 👨\u200d👩\u200d👧 flags 🇫🇷 and ❤️",
    "whitespace   runs\t\t\ttabs\n\n\nnewlines   \n  trailing spaces   ",
    "   leading spaces",
    "\n\n\n",
    " ",
    "",
    "mixed\r\nline\rendings\r\n",
    "special <|im_start|>user\nhi<|im_end|> and <|endoftext|> inside text",
    "<|im_start|><|im_end|><|im_start|>",
    "almost special <|im_start and im_end|> <|unknown|>",
    "math: $\\frac{a}{b}$ = 2^{10} ≈ 1.0e3, ∑ x_i ≤ ∞",
    "punctuation!!! ??? ... --- *** ((( ))) {{{}}} ''' \"\"\"",
    "unicode spaces:\u00a0nbsp\u2003em\u3000ideographic\u2028line-sep\u0085nel",
    "control chars \x00\x01\x1c\x1e\x1f\x7f end",
    "<think>\nreasoning\n</think>\n\nanswer",
]
# SmolLM2's vocab has no token for 21 byte values; HF drops them. Of those, 0x04 0x06 0x13 0x14 0x16 0x1d are chars,
# 0xf1/0xf2 lead 4-byte UTF-8 sequences (planes 4-11), and 0xc0 0xc1 0xf5-0xff never occur in UTF-8.
# ("!!\x1d!!" is one piece for HF, whose \s excludes \x1d, unlike Python's.)
UNKNOWN_BYTE_TEXTS = [
    "a\x04b", "!!\x04!!", "!!\x1d!!", "x \x1d y", "\x06\x13\x14\x16\x1d", "end\x1d", "\x04 start", "1\x142\x163",
    "plane 4 \U00040000 and plane 8 \U00080001 chars", "..\U00040000..", "<|im_end|>\x04<|im_start|>",
]


def _soup(n=200, seed=0):
    """Random strings over characters chosen to stress regex pieces, whitespace runs and specials."""
    pool = (list("abcXYZ019 '\t\n\r.,!?-_()\"") + list("éüßñ\u0301\u0308ΩЖ中文あ한😀👍\u200d🏽") +
            ["\u00a0", "\u2003", "\u3000", "\x85", "\x1c", "\x1f", "  ", "\n\n", "'s", "'LL", "123", "<|im_start|>",
             "<|im_end|>", "<|endoftext|>", "<think>"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


TEXTS = CORPUS + _soup()

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 2+2?"}],
    "system + user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Count to 3."}],
    "system + multi-turn ending in assistant": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."}],
    "whitespace around content": [{"role": "system", "content": "  padded system \n"},
                                  {"role": "user", "content": "\n  hi there  \n"},
                                  {"role": "assistant", "content": " ok "}],
    "thinking in history": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"}],
    "reasoning_content field": [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4"}],
}

# The pre-tokenizer regexes from the real tokenizer.json files of Qwen2/2.5/3 and Llama 3.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Real chat templates (data, copied from the checkpoints' tokenizer_config.json "chat_template").
# Qwen/Qwen2-7B-Instruct (Qwen2-*-Instruct)
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                  "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
                  "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen/Qwen2.5-7B-Instruct (the same template ships with every Qwen2.5-*-Instruct size)
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# Qwen/Qwen3-0.6B (Qwen3 hybrid-thinking models)
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
                   "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# meta-llama/Llama-3.1-8B-Instruct
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# meta-llama/Llama-3.2-3B-Instruct (uses strftime_now: today's date)
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
TEMPLATES = {  # name -> (template, which synthetic tokenizer carries it)
    "Qwen2-Instruct": (QWEN2_TEMPLATE, "qwen2"), "Qwen2.5-Instruct": (QWEN25_TEMPLATE, "qwen2"),
    "Qwen3": (QWEN3_TEMPLATE, "qwen2"), "Meta-Llama-3-Instruct": (LLAMA3_TEMPLATE, "llama3"),
    "Llama-3.1-Instruct": (LLAMA31_TEMPLATE, "llama3"), "Llama-3.2-Instruct": (LLAMA32_TEMPLATE, "llama3"),
}

# -----------------------------------------------------------------------------
# helpers and fixtures


def hf_ids(hf, texts):
    return hf(list(texts), add_special_tokens=False)["input_ids"]


def assert_same_ids(ours, hf, texts):
    theirs = hf_ids(hf, texts)
    bad = [(t, o, h) for t, o, h in zip(texts, (ours.encode(t) for t in texts), theirs) if o != h]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"


SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "gpt2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def build_hf_tokenizer(kind, vocab_size=1000):
    """Train a tiny byte-level BPE shaped like the real family: Qwen2 (Split regex + NFC), Llama 3 (Split regex),
    GPT-2 (ByteLevel regex). Special tokens come after the learned vocab, as in those checkpoints."""
    tok = HFTokenizer(models.BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if kind == "qwen2" else LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for t in CORPUS * 20 if "<|" not in t], trainer)
    tok.add_special_tokens(SPECIALS[kind])
    if kind == "qwen2":
        tok.add_tokens(["<think>", "</think>"])  # Qwen3 has these as added, non-special tokens
    return tok


def write_checkpoint(folder, hf_tok, chat_template=None):
    """A checkpoint-like folder: tokenizer.json + tokenizer_config.json."""
    os.makedirs(folder, exist_ok=True)
    hf_tok.save(os.path.join(folder, "tokenizer.json"))
    llama = "<|begin_of_text|>" in hf_tok.get_vocab()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": "<|begin_of_text|>" if llama else None, "eos_token": "<|eot_id|>" if llama else "<|im_end|>"}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """kind -> (our Tokenizer, transformers tokenizer) for the small trained tokenizers; built once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = write_checkpoint(tmp_path_factory.mktemp(kind), build_hf_tokenizer(kind))
            cache[kind] = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


# -----------------------------------------------------------------------------
# real checkpoint: SmolLM2-135M-Instruct (Digits + ByteLevel pre-tokenizer, 21 bytes without a token)

def test_smollm2_ids_match_transformers(smollm2):
    assert_same_ids(*smollm2, TEXTS)


def test_smollm2_unknown_bytes_are_dropped_like_transformers(smollm2):
    ours, hf = smollm2
    assert_same_ids(ours, hf, UNKNOWN_BYTE_TEXTS)
    assert all(i < ours.vocab_size for t in UNKNOWN_BYTE_TEXTS for i in ours.encode(t))
    assert ours.encode("\x04\x06\x13\x14\x16\x1d") == []


def test_smollm2_decode_round_trip(smollm2):
    ours, _ = smollm2
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_smollm2_decode_matches_transformers(smollm2):
    ours, hf = smollm2
    for ids in hf_ids(hf, TEXTS):
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_smollm2_decode_invalid_utf8_gives_replacement_char(smollm2):
    ours, hf = smollm2
    ids = ours.encode("snowman ☃ and 😀")[:-1]  # cut inside the emoji's bytes
    assert "\ufffd" in ours.decode(ids)
    assert ours.decode(ids) == hf.decode(ids)


def test_smollm2_token_attributes_match_transformers(smollm2):
    ours, hf = smollm2
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.special_tokens == hf.get_added_vocab()
    assert ours.token_to_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.token_to_id(" the") == hf.convert_tokens_to_ids("Ġthe")
    assert ours.token_to_id("\x04") is None and ours.token_to_id("not one token at all") is None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_smollm2_chat_template_matches_transformers(smollm2, conversation, add_generation_prompt):
    ours, hf = smollm2
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_save_pretrained_round_trip(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save_pretrained(tmp_path)
    assert_same_ids(Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path), TEXTS)
    assert Tokenizer.from_pretrained(tmp_path).chat_template == ours.chat_template


# -----------------------------------------------------------------------------
# synthetic Qwen2-style (Split regex + NFC), Llama-3-style (Split regex) and GPT-2-style (ByteLevel regex) tokenizers

@pytest.mark.parametrize("kind", ["qwen2", "llama3", "gpt2"])
def test_synthetic_ids_match_transformers(synthetic, kind):
    assert_same_ids(*synthetic(kind), TEXTS)


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "gpt2"])
def test_synthetic_decode_matches_transformers(synthetic, kind):
    ours, hf = synthetic(kind)
    for ids in hf_ids(hf, TEXTS):
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_qwen2_style_applies_nfc(synthetic):
    ours, _ = synthetic("qwen2")
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")
    assert ours.decode(ours.encode("cafe\u0301")) == "caf\u00e9"


def test_synthetic_vocab_size_covers_added_tokens(synthetic):
    ours, hf = synthetic("qwen2")
    assert ours.vocab_size == len(hf) == max(hf.get_vocab().values()) + 1
    assert ours.encode("<think>") == [hf.convert_tokens_to_ids("<think>")]


def test_overlapping_added_tokens_longest_match_wins(tmp_path):
    tok = build_hf_tokenizer("gpt2", 300)
    tok.add_special_tokens(["<x>", "<x><y>", "<y>"])  # HF matches added tokens leftmost-longest
    write_checkpoint(tmp_path, tok)
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(ours, hf, ["<x><y>", "a<x><y>b<x>c<y>", "<x><x><y><y>", "<x> <y>"])
    assert len(ours.encode("<x><y>")) == 1


# -----------------------------------------------------------------------------
# chat templates of real checkpoints, rendered by transformers vs by us

@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """template name -> (our Tokenizer, transformers tokenizer), both loaded from a folder with that template."""
    cache = {}

    def get(name):
        if name not in cache:
            template, kind = TEMPLATES[name]
            folder = write_checkpoint(tmp_path_factory.mktemp("tpl"), build_hf_tokenizer(kind, vocab_size=400), template)
            cache[name] = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return cache[name]
    return get


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_template_matches_transformers(templated, template, conversation, add_generation_prompt):
    ours, hf = templated(template)
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_that_raises_gives_its_message_and_the_checkpoint(tmp_path):
    # Gemma's templates refuse conversations whose roles do not alternate, with raise_exception
    strict = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{{ message['content'] }}{% endfor %}")
    ours = Tokenizer.from_pretrained(write_checkpoint(tmp_path, build_hf_tokenizer("gpt2", 300), strict))
    with pytest.raises(ValueError, match=rf"{tmp_path}.*roles must alternate"):
        ours.apply_chat_template(CONVERSATIONS["system + user"])
    assert ours.apply_chat_template(CONVERSATIONS["multi-turn"]) == "Hi!Hello. How can I help?Count to 3."


def test_missing_chat_template_raises(tmp_path):
    ours = Tokenizer.from_pretrained(write_checkpoint(tmp_path, build_hf_tokenizer("gpt2", 300)))
    with pytest.raises(ValueError, match="no chat_template"):
        ours.apply_chat_template(CONVERSATIONS["user only"])


def test_chat_template_jinja_file_is_read(tmp_path):
    write_checkpoint(tmp_path, build_hf_tokenizer("gpt2", 300))  # no chat_template in tokenizer_config.json ...
    (tmp_path / "chat_template.jinja").write_text(QWEN2_TEMPLATE)  # ... but where newer transformers save it
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS["multi-turn"]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -----------------------------------------------------------------------------
# errors: what we can't encode exactly must fail loudly at load time

def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        Tokenizer.from_pretrained(tmp_path / "no_such_checkpoint")


@pytest.mark.parametrize("model", ["wordpiece", "unigram", "sentencepiece_bpe"])
def test_non_byte_level_bpe_raises(tmp_path, model):
    if model == "wordpiece":
        tok = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    elif model == "unigram":
        tok = HFTokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0)], unk_id=0))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:  # Llama-2 / Mistral style: BPE over Metaspace pieces with byte fallback
        tok = HFTokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*only byte-level BPE"):
        Tokenizer.from_pretrained(tmp_path)


def test_unknown_pre_tokenizer_raises(tmp_path):
    tok = build_hf_tokenizer("gpt2", 300)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(use_regex=False)])
    write_checkpoint(tmp_path, tok)
    with pytest.raises(ValueError, match=r"tokenizer\.json.*unsupported pre_tokenizer.*Whitespace"):
        Tokenizer.from_pretrained(tmp_path)


def test_merge_order_disagreeing_with_id_order_raises(tmp_path):
    write_checkpoint(tmp_path, build_hf_tokenizer("llama3", 400))
    with open(tmp_path / "tokenizer.json") as f:
        data = json.load(f)
    merges = data["model"]["merges"]
    merges[10], merges[20] = merges[20], merges[10]  # merge #10 now makes a token with a larger id than merge #11
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"tokenizer\.json.*merge #\d+"):
        Tokenizer.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# the from-scratch byte-level tokenizer

def test_byte_level_ids_are_bytes_then_specials():
    tok = Tokenizer.byte_level()
    assert tok.encode("héllo\n") == list("héllo\n".encode("utf-8"))
    assert tok.encode("<|im_start|>a<|im_end|><|endoftext|>") == [257, 97, 258, 256]
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (259, 258, 258, None)


def test_byte_level_transformers_gives_same_ids(tmp_path):
    ours = Tokenizer.byte_level()
    ours.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(ours, hf, TEXTS)
    assert (hf.eos_token_id, len(hf)) == (ours.eos_token_id, ours.vocab_size)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_byte_level_transformers_gives_same_chat_template(tmp_path, add_generation_prompt):
    ours = Tokenizer.byte_level()
    ours.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS.values():
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_byte_level_reloads_as_same_tokenizer(tmp_path):
    ours = Tokenizer.byte_level()
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (again.special_tokens, again.eos_token_id, again.vocab_size) == (ours.special_tokens, ours.eos_token_id, ours.vocab_size)
    assert again.apply_chat_template(CONVERSATIONS["multi-turn"]) == ours.apply_chat_template(CONVERSATIONS["multi-turn"])
