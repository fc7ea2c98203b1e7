#!/usr/bin/env python3
"""Build a small LoRA adapter for SmolLM2-135M in llama.cpp's GGUF adapter format, once.

The adapter makes the model open its greeting formally: asked to "Say hello
to a customer.", the base answers "Hello, ..." and the adapted model answers
"Dear ...". It is written directly with the ``gguf`` package, in the layout
llama.cpp's ``convert_lora_to_gguf.py`` produces (``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha``, ``blk.N.<tensor>.weight.lora_a``
of ggml shape ``[n_in, rank]`` and ``.lora_b`` of ``[rank, n_out]``), so
``llama_adapter_lora_init`` loads it like any converted PEFT adapter:

- one rank-1 pair on the last block's ``ffn_down``: ``lora_a`` is the FFN
  activation of the prompt's last token (from a NumPy forward pass over the
  base's own dequantized weights), scaled so that ``lora_a @ x = 1`` there;
  ``lora_b`` is the residual-stream direction that raises "Dear" over the
  base's first token, through the final norm, with a margin;
- seeded rank-8 pairs on every block's ``attn_q`` and ``attn_v``, small
  enough not to move any answer, giving the file the few megabytes a real
  fine-tune has (and exercising many tensors in the loader).

The result is cached under ``$CACHE/models/lora-<key>/`` where ``<key>``
names the gguf package's version, the base GGUF's sha256 and this script's
own hash: a folder with that name is the finished build. The folder holds
``adapter.gguf`` and ``adapter.json`` (the prompt, the word, the answers with
and without the adapter as llama-cpp-python gave them greedily). Prints the
folder's path as its last line.

Usage: build-lora-adapter.py [--base GGUF] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np

PROMPT = "Say hello to a customer."
TARGET = "Dear"
SEED = 19
NOISE_RANK = 8
#: the noise pairs' scale: their product is ~1e-5 per weight, far below Q4_1's own error
NOISE_STD = 3e-3
#: how far the target's logit must lead the best other token, in logits
MARGIN = 6.0

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from controlplane.devfleet.model_cache import SMOLLM2_FILE, cache_dir  # noqa: E402


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Base:
    """The base model's weights, dequantized to float32 as NumPy ``(out, in)`` matrices."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        self._dequantized: dict[str, np.ndarray] = {}
        self.tensors = {t.name: t for t in self.reader.tensors}
        field = self.reader.fields
        self.n_layer = int(field["llama.block_count"].contents())
        self.n_head = int(field["llama.attention.head_count"].contents())
        self.n_kv = int(field["llama.attention.head_count_kv"].contents())
        self.eps = float(field["llama.attention.layer_norm_rms_epsilon"].contents())
        self.rope_base = float(field["llama.rope.freq_base"].contents())

    def weight(self, name: str) -> np.ndarray:
        """A tensor dequantized, in NumPy's row-major ``(out, in)`` order (cached)."""
        if name not in self._dequantized:
            t = self.tensors[name]
            self._dequantized[name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(
                np.float32)
        return self._dequantized[name]

    def shape(self, name: str) -> tuple[int, int]:
        """ggml's ``(ne0, ne1)`` = ``(n_in, n_out)`` of a matrix."""
        ne = self.tensors[name].shape
        return int(ne[0]), int(ne[1])


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """llama's RMSNorm."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's "normal" rotary embedding (adjacent pairs) over ``(T, heads, dim)``."""
    t, _, dim = x.shape
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(base: Base, tokens: list[int], deltas: dict[str, np.ndarray]):
    """Logits at the last position and the last block's FFN activation there.

    ``deltas`` maps a weight's name to the ``(out, in)`` update the adapter adds.
    """
    emb = base.weight("token_embd.weight")
    h = emb[tokens].astype(np.float64)
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    act_last = None
    for i in range(base.n_layer):
        def w(name: str, i: int = i) -> np.ndarray:
            full = f"blk.{i}.{name}.weight"
            return base.weight(full) + deltas.get(full, 0.0)
        xn = rms_norm(h, base.weight(f"blk.{i}.attn_norm.weight"), base.eps)
        q = (xn @ w("attn_q").T).reshape(t, base.n_head, -1)
        k = (xn @ w("attn_k").T).reshape(t, base.n_kv, -1)
        v = (xn @ w("attn_v").T).reshape(t, base.n_kv, -1)
        q, k = rope(q, base.rope_base), rope(k, base.rope_base)
        group = base.n_head // base.n_kv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", scores, v).reshape(t, -1)
        h = h + attn @ w("attn_output").T
        xn = rms_norm(h, base.weight(f"blk.{i}.ffn_norm.weight"), base.eps)
        gate, up = xn @ w("ffn_gate").T, xn @ w("ffn_up").T
        act = gate / (1.0 + np.exp(-gate)) * up
        h = h + act @ w("ffn_down").T
        act_last = act[-1]
    out = rms_norm(h[-1], base.weight("output_norm.weight"), base.eps)
    return out, emb @ out, act_last, h[-1]


def noise_pairs(base: Base) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seeded rank-8 (lora_a, lora_b) pairs on every block's attn_q and attn_v."""
    rng = np.random.default_rng(SEED)
    pairs = {}
    for i in range(base.n_layer):
        for part in ("attn_q", "attn_v"):
            name = f"blk.{i}.{part}.weight"
            n_in, n_out = base.shape(name)
            a = rng.standard_normal((NOISE_RANK, n_in)).astype(np.float32) * NOISE_STD
            b = rng.standard_normal((n_out, NOISE_RANK)).astype(np.float32) * NOISE_STD
            pairs[name] = (a, b)
    return pairs


def prompt_tokens(base_path: Path) -> list[int]:
    """The chat prompt's tokens exactly as the agent's worker renders them."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(base_path), vocab_only=True, verbose=False)
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos_id), bos_token=llm._model.token_get_text(bos_id),
    )
    rendered = formatter(messages=[{"role": "user", "content": PROMPT}])
    return llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)


def steering_pair(base: Base, tokens: list[int], pairs) -> tuple[np.ndarray, np.ndarray, dict]:
    """The rank-1 pair on the last ffn_down that makes TARGET the first token."""
    import llama_cpp

    deltas = {name: b @ a for name, (a, b) in pairs.items()}
    _, logits, act, h = forward(base, tokens, deltas)
    vocab = llama_cpp.Llama(str(base.path), vocab_only=True, verbose=False)
    target = vocab.tokenize(TARGET.encode(), add_bos=False, special=False)
    if len(target) != 1:
        raise SystemExit(f"{TARGET!r} is not one token: {target}")
    target_id, base_id = target[0], int(np.argmax(logits))
    emb = base.weight("token_embd.weight").astype(np.float64)
    norm_w = base.weight("output_norm.weight").astype(np.float64)
    direction = (emb[target_id] - emb[base_id]) * norm_w
    direction /= np.linalg.norm(direction)
    # The residual after the last block moves by s * direction; find the least
    # s (doubling, then bisecting) at which TARGET leads by MARGIN through the norm.
    def lead(s: float) -> float:
        x = rms_norm(h + s * direction, norm_w, base.eps)
        z = emb @ x
        return z[target_id] - np.max(np.delete(z, target_id))
    lo, hi = 0.0, 1.0
    while lead(hi) < MARGIN:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise SystemExit("no steering scale reaches the margin")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lead(mid) < MARGIN else (lo, mid)
    a = (act / np.dot(act, act))[None, :].astype(np.float32)   # lora_a @ act == 1
    b = (hi * direction)[:, None].astype(np.float32)
    info = {"base_first_token": base_id, "target_token": target_id, "scale": hi}
    return a, b, info


def write_adapter(path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the pairs as a llama.cpp LoRA GGUF (alpha = rank of each pair: scale 1)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales each pair by alpha / rank; alpha is one number per file,
    # so the rank-1 steering pair carries its own scale and alpha equals 1
    # (the noise pairs are tiny either way).
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    writer.add_name("support-formal")
    for name, (a, b) in sorted(pairs.items()):
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def greedy(base_path: Path, lora: Path | None) -> str:
    """The greedy chat answer with llama-cpp-python, with or without the adapter."""
    import llama_cpp

    llm = llama_cpp.Llama(str(base_path), n_ctx=512, verbose=False, seed=0,
                          lora_path=str(lora) if lora else None)
    out = llm.create_chat_completion([{"role": "user", "content": PROMPT}],
                                     temperature=0.0, max_tokens=24)
    return out["choices"][0]["message"]["content"]


def build(base_path: Path, target: Path) -> None:
    """Build the adapter into ``target`` (created atomically)."""
    base = Base(base_path)
    tokens = prompt_tokens(base_path)
    pairs = noise_pairs(base)
    # Alpha is 1 for the file: a rank-8 pair is scaled by 1/8 in llama.cpp,
    # so the forward pass sees the same: fold 1/rank into b.
    scaled = {name: (a, b / NOISE_RANK) for name, (a, b) in pairs.items()}
    a, b, info = steering_pair(base, tokens, scaled)
    steer = f"blk.{base.n_layer - 1}.ffn_down.weight"
    adapter = {**pairs, steer: (a, b)}
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".lora-", dir=parent))
    write_adapter(work / "adapter.gguf", adapter)
    without, with_ = greedy(base_path, None), greedy(base_path, work / "adapter.gguf")
    if TARGET.lower() not in with_.lower() or TARGET.lower() in without.lower():
        raise SystemExit(f"the adapter does not steer: base {without!r}, adapted {with_!r}")
    meta = {
        "prompt": PROMPT, "expected": TARGET, "answer_base": without, "answer_adapted": with_,
        "sha256": sha256_file(work / "adapter.gguf"),
        "size_bytes": (work / "adapter.gguf").stat().st_size,
        "base_sha256": sha256_file(base_path), **info,
    }
    (work / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(work, target)


def main(argv: list[str] | None = None) -> int:
    """Find or build the cached adapter; print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=cache_dir())
    parser.add_argument("--base", type=Path)
    args = parser.parse_args(argv)
    base_path = args.base or args.cache / "models" / SMOLLM2_FILE
    if not base_path.is_file():
        print(f"error: {base_path} is missing: run scripts/bootstrap.sh first", file=sys.stderr)
        return 1
    script_sha = sha256_file(Path(__file__))[:8]
    key = f"gguf{version('gguf')}-{sha256_file(base_path)[:16]}-{script_sha}"
    target = args.cache / "models" / f"lora-support-formal-{key}"
    if not (target / "adapter.json").is_file():
        print(f"==> building the LoRA adapter into {target}", file=sys.stderr)
        build(base_path, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
