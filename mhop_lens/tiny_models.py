"""Tiny randomly initialised HF models of real architectures, saved locally, for tests and benchmarks.

No hub is needed: the tokenizer is a small byte-level BPE (GPT-2 style, so names split into several tokens and
words carry a leading space) trained in milliseconds on a built-in corpus, or a word-level tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

ARCHITECTURES = ("gpt2", "llama", "neox")

CORPUS = """
The spouse of the performer of Imagine is Yoko Ono. The performer of Imagine is John Lennon.
The spouse of John Lennon is Yoko Ono. The capital of the country of the Eiffel Tower is Paris.
The mother of the author of Hamlet is Mary Arden. The author of Hamlet is William Shakespeare.
The birthplace of the founder of Microsoft is Seattle. The founder of Microsoft is Bill Gates.
The currency of the country of Kyoto is the yen. The country of Kyoto is Japan. The river of London is the Thames.
David has a pig. Sharon has pants. So David owns a kind of animal. Is it true? Yes. No. The answer is
Syria: Syria is a country in the Middle East, Leonardo DiCaprio: Leonardo DiCaprio is an American actor,
Samsung: Samsung is a South Korean multinational corporation, x
"""


def make_tokenizer(kind: Literal["bpe", "word"] = "bpe", vocab_size: int = 512, words: list[str] | None = None):
    """A fast HF tokenizer built offline; ``word`` uses ``words`` (or the corpus words) as its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<pad>", "<unk>"]
    if kind == "word":
        from mhop_lens.training import word_tokenizer

        vocab_words = words or sorted(set(CORPUS.replace(".", " .").replace(",", " ,").split()))
        return word_tokenizer(specials + [w for w in vocab_words if w not in specials])
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_config(arch: str, vocab_size: int, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int | None,
                n_ctx: int, d_mlp: int | None):
    """An HF config of ``arch`` with the given shape; bos/pad ids follow ``make_tokenizer``."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    d_mlp = d_mlp or 4 * d_model
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                          n_head=n_heads, n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                           num_hidden_layers=n_layers, num_attention_heads=n_heads,
                           num_key_value_heads=n_kv_heads or max(1, n_heads // 2), max_position_embeddings=n_ctx,
                           tie_word_embeddings=False, **ids)
    if arch == "neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=n_ctx,
                             rotary_pct=0.25, use_parallel_residual=True, **ids)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}.")


def save_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    n_ctx: int = 128,
    tokenizer=None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ``arch`` model + tokenizer to ``out_dir`` (loadable by ``load_model``)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    cfg = make_config(arch, len(tokenizer), n_layers, d_model, n_heads, n_kv_heads, n_ctx, d_mlp)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


#: Shapes of the models the two-hop studies run on (d_model, heads, kv heads, MLP width, vocabulary, depth).
REAL_SHAPES = {
    "llama3-8b": dict(arch="llama", vocab_size=128_256, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                      d_mlp=14_336, n_ctx=8192),
    "llama2-7b": dict(arch="llama", vocab_size=32_000, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32,
                      d_mlp=11_008, n_ctx=4096),
    "llama2-13b": dict(arch="llama", vocab_size=32_000, n_layers=40, d_model=5120, n_heads=40, n_kv_heads=40,
                       d_mlp=13_824, n_ctx=4096),
}


def pad_tokenizer(tokenizer, vocab_size: int):
    """``tokenizer`` (a ``make_tokenizer`` BPE) with placeholder tokens ``<unused{id}>`` up to ``vocab_size`` ids.

    The placeholders live in the BPE vocabulary (no merge produces them), so encoding is unchanged, loading stays
    fast (no 100k added tokens) and an id past the trained vocabulary decodes to its placeholder, never to ''.
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer already has {len(tokenizer)} tokens, more than vocab_size={vocab_size}.")
    taken = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"<unused{i}>"] = i
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>",
                                   eos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def shaped_config(shape: str | dict, n_layers: int | None = None, vocab_size: int | None = None):
    """The HF config of a real model shape (a ``REAL_SHAPES`` name or a dict of ``make_config`` arguments), with
    optionally fewer layers or another vocabulary size."""
    spec = dict(REAL_SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    spec["n_layers"] = n_layers or spec["n_layers"]
    spec["vocab_size"] = vocab_size or spec["vocab_size"]
    return make_config(spec.pop("arch"), spec["vocab_size"], spec["n_layers"], spec["d_model"], spec["n_heads"],
                       spec.get("n_kv_heads"), spec.get("n_ctx", 2048), spec.get("d_mlp"))


def save_shaped_model(
    out_dir: str | os.PathLike,
    shape: str | dict = "llama3-8b",
    *,
    n_layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    weights: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised model of a real shape (any width and vocabulary) + a padded tokenizer.

    Timing and memory do not depend on weight values, so this tells the cost of e.g. Llama-3-8B without its
    weights. ``n_layers`` cuts the depth to what the machine holds. ``weights=False`` saves only the config and
    tokenizer: build the model where it runs with ``build_shaped_model`` (a 32-layer 8B model on a GPU, without
    writing 32 GB to disk).
    """
    from transformers import AutoModelForCausalLM

    cfg = shaped_config(shape, n_layers, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad_tokenizer(make_tokenizer(), cfg.vocab_size).save_pretrained(out)
    if not weights:
        cfg.save_pretrained(out)
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    del model
    return out


def build_shaped_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0):
    """A randomly initialised HF model of the config saved in ``path``, built directly on ``device`` in ``dtype``
    (pass it to ``load_model(path, hf_model=...)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
