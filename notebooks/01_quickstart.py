# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mhop_lens quickstart
#
# Load the shipped **two-hop organism** (a 4-layer GPT-2 trained on made-up facts such as "Mokar 's spouse" and
# on some of their two-hop compositions), evaluate it, run one analysis, draw one figure. Runs on a CPU in about a
# minute.

# %%
import pandas as pd

from mhop_lens import load_model, viz
from mhop_lens.data import load_queries
from mhop_lens.evaluate import evaluate, summarize

MODEL = "organism"  # or a local HF model directory

# %%
model = load_model(MODEL, device="cpu")
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads, d_model", model.cfg.d_model)

# %% [markdown]
# ## Evaluate
#
# `load_queries("organism:heldout")` gives two-hop queries whose composition was never trained (the organism saw
# both one-hop facts); `"organism:train"` gives trained compositions. `evaluate` scores the two-hop prompt, each
# hop alone and two shortcuts, and puts every query in a `subset`: *correct* / *incorrect* (both hops known, no
# shortcut) or *other*.

# %%
queries = list(load_queries("organism:heldout", limit=60)) + list(load_queries("organism:train", limit=60))
ev = evaluate(model, queries)
summary = summarize(ev)
pd.DataFrame({split: block["accuracy"] for split, block in summary["by_split"].items()})

# %%
ev[["qid", "split", "two_hop_correct", "hop1_correct", "hop2_correct", "subset"]].head()

# %% [markdown]
# ## One analysis: the logit lens
#
# `run_lens` projects each layer's residual, attention output and MLP output at the last position through the
# model's own final norm and unembedding, and records the rank and probability of the bridge entity e2 and the
# answer e3. One row per (query, site, layer).

# %%
from mhop_lens.analyses.lens import run_lens

sample = [q for q in queries if q.id in set(ev.loc[ev["subset"] != "other", "qid"])][:40]
lens = run_lens(model, sample, positions=("last",))
lens.head()

# %% [markdown]
# ## One figure, saved offline (HTML loading the `plotly.min.js` written beside it; PNG/PDF where Chromium is
# installed; `plotlyjs="inline"` writes a single file instead)

# %%
fig = viz.fig_lens(lens, ev)
paths = viz.save_figure(fig, "outputs", "quickstart_lens")
print([p.name for p in paths])
fig

# %%
assert len(lens) == len(sample) * 3 * model.cfg.n_layers
assert (paths[0].suffix == ".html") and (paths[0].parent / "plotly.min.js").stat().st_size > 1_000_000
