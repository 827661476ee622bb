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
#: Every architecture ``make_config`` builds (the architecture matrix of tests/test_arch_matrix.py); the first three
#: are the suite's default fixtures. Windowed ones use ``WINDOW``-token sliding / local attention.
MATRIX = ARCHITECTURES + (
    "mistral", "qwen2", "qwen2-sliding", "qwen3", "gemma", "gemma2", "gemma2-nocap", "gemma3", "phi", "phi3",
    "opt", "gptj", "falcon", "stablelm", "olmo2", "cohere", "gpt-bigcode", "codegen", "gpt-neo", "mpt", "bloom",
    "starcoder2",
)
#: Sliding / local attention window of the windowed tiny models (tokens): shorter than the long test prompts.
WINDOW = 16

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
    """An HF config of ``arch`` (one of ``MATRIX``) with the given shape; bos/pad ids follow ``make_tokenizer``."""
    import transformers as tf

    d_mlp = d_mlp or 4 * d_model
    kv = n_kv_heads or max(1, n_heads // 2)
    d_head = d_model // n_heads
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    # the common shape of Llama-like configs (hidden_size / intermediate_size / num_*)
    llama_like = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=kv, max_position_embeddings=n_ctx, **ids)
    gemma = dict(llama_like, head_dim=d_head, query_pre_attn_scalar=d_head, hidden_activation="gelu_pytorch_tanh")
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if arch == "neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                                num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=n_ctx,
                                rotary_pct=0.25, use_parallel_residual=True, **ids)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=WINDOW)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen2-sliding":  # sliding window on the layers from max_window_layers on
        return tf.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=d_head)
    if arch == "gemma":
        return tf.GemmaConfig(**{k: v for k, v in gemma.items() if k != "query_pre_attn_scalar"})
    if arch in ("gemma2", "gemma2-nocap"):
        cap = dict(final_logit_softcapping=2.0, attn_logit_softcapping=50.0) if arch == "gemma2" else dict(
            final_logit_softcapping=None, attn_logit_softcapping=None)
        return tf.Gemma2Config(**gemma, sliding_window=WINDOW, **cap)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**gemma, sliding_window=WINDOW, sliding_window_pattern=2,
                                   final_logit_softcapping=2.0)
    if arch == "phi":
        return tf.PhiConfig(**{k: v for k, v in llama_like.items() if k != "num_key_value_heads"},
                            partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=d_model, ffn_dim=d_mlp, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, max_position_embeddings=n_ctx, word_embed_proj_dim=d_model,
                            dropout=0.0, **ids)
    if arch == "gptj":
        return tf.GPTJConfig(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                             n_head=n_heads, n_inner=d_mlp, rotary_dim=d_head // 2, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **ids)
    if arch == "falcon":
        return tf.FalconConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                               num_attention_heads=n_heads, multi_query=True, alibi=False, parallel_attn=True,
                               new_decoder_architecture=False, max_position_embeddings=n_ctx, **ids)
    if arch == "stablelm":
        return tf.StableLmConfig(**llama_like, partial_rotary_factor=0.25)
    if arch == "olmo2":
        return tf.Olmo2Config(**llama_like)
    if arch == "cohere":
        return tf.CohereConfig(**llama_like, logit_scale=0.25)
    if arch == "gpt-bigcode":
        return tf.GPTBigCodeConfig(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                                   n_head=n_heads, n_inner=d_mlp, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, **ids)
    if arch == "codegen":
        return tf.CodeGenConfig(vocab_size=vocab_size, n_positions=n_ctx, n_ctx=n_ctx, n_embd=d_model,
                                n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, rotary_dim=d_head // 2,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "gpt-neo":  # alternating global / local attention
        kinds = [[["global", "local"], (n_layers + 1) // 2]]
        return tf.GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=n_ctx, hidden_size=d_model,
                               num_layers=2 * ((n_layers + 1) // 2), num_heads=n_heads, intermediate_size=d_mlp,
                               attention_types=kinds, window_size=WINDOW, resid_dropout=0.0, embed_dropout=0.0,
                               attention_dropout=0.0, **ids)
    if arch == "mpt":  # ALiBi
        return tf.MptConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                            expansion_ratio=d_mlp // d_model, max_seq_len=n_ctx, attn_config={"alibi": True},
                            **ids)
    if arch == "bloom":  # ALiBi
        return tf.BloomConfig(vocab_size=vocab_size, hidden_size=d_model, n_layer=n_layers, n_head=n_heads,
                              hidden_dropout=0.0, attention_dropout=0.0, **ids)
    if arch == "starcoder2":
        return tf.Starcoder2Config(**llama_like, sliding_window=WINDOW, residual_dropout=0.0, embedding_dropout=0.0)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {MATRIX}.")


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


def load_tiny_model(path: str | os.PathLike, device: str = "cpu", **kw):
    """``load_model`` of a ``save_tiny_model`` directory with its tokenizer passed explicitly.

    transformers 5 picks the tokenizer class from the model type for some architectures (a BPE tokenizer saved
    beside a Qwen2 config loads as ``Qwen2Tokenizer`` and returns no ids), and the bridge reloads a tokenizer that
    does not add BOS itself through ``AutoTokenizer``; a ``PreTrainedTokenizerFast`` with ``add_bos_token`` set is
    used as it is (the suite prepends BOS itself, ``tokens.encode``)."""
    from transformers import PreTrainedTokenizerFast

    from mhop_lens.models import load_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), add_bos_token=True)
    return load_model(str(path), device=device, tokenizer=tokenizer, **kw)


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
