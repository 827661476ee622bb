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
# # Workshop: where does a two-hop model hop?
#
# Four exercises on the shipped organism. Each has a cell for your code, a **hidden solution** (a collapsed cell
# tagged `solution`: click the "..." to reveal it, or delete its contents and write your own) and a **check** cell
# whose asserts tell you whether your answer is right. Run the notebook top to bottom once first: with the
# solutions in place every check passes.

# %%
import pandas as pd

from mhop_lens import load_model, viz
from mhop_lens.data import load_queries
from mhop_lens.evaluate import evaluate, summarize

MODEL = "organism"  # or a local HF model directory

# %%
model = load_model(MODEL, device="cpu")
queries = list(load_queries("organism:heldout", limit=80)) + list(load_queries("organism:train", limit=80))
ev = evaluate(model, queries)
by_id = {q.id: q for q in queries}
ev.head(3)

# %% [markdown]
# ## Exercise 1: accuracy per split
#
# Compute the two-hop accuracy (`two_hop_correct`) of the held-out and the trained queries from `ev`, as a dict
# `acc = {"heldout": ..., "train": ...}`. Which split does the organism compose better, and why might that be?

# %% jupyter={"source_hidden": true} tags=["solution"]
acc = ev.groupby("split")["two_hop_correct"].mean().to_dict()
acc

# %%
# check
ref = summarize(ev)["by_split"]
assert set(acc) == {"heldout", "train"}
assert all(abs(acc[s] - ref[s]["accuracy"]["two_hop"]) < 1e-9 for s in acc), "compare with summarize(ev)"
print("Exercise 1 passed:", {s: f"{a:.0%}" for s, a in acc.items()})

# %% [markdown]
# ## Exercise 2: when does the answer appear?
#
# Run the logit lens (`mhop_lens.analyses.lens.run_lens`) on the correct and incorrect queries (`sample`, below)
# at the last position. For each query find the **earliest layer whose residual (`site == "resid_post"`) has e3 at rank
# 0**, as a Series `first_e3` indexed by qid (queries where it never happens are left out). Then compare the
# median for correct and incorrect queries.

# %%
sample = [by_id[q] for q in ev.loc[ev["subset"] != "other", "qid"]][:40]
len(sample)

# %% jupyter={"source_hidden": true} tags=["solution"]
from mhop_lens.analyses.lens import run_lens

lens = run_lens(model, sample, positions=("last",))
resid = lens[(lens["site"] == "resid_post") & (lens["e3_rank"] == 0)]
first_e3 = resid.groupby("qid")["layer"].min()
first_e3.groupby(ev.set_index("qid")["subset"]).median()

# %%
# check: the stage summary computes the same thing as resid_e3_layer
from mhop_lens.analyses.patchscope import run_patchscope
from mhop_lens.analyses.stages import stage_summary

stages = stage_summary(lens, run_patchscope(model, sample, positions=("t1", "t2"), progress=False))
expected = stages.set_index("qid")["resid_e3_layer"].dropna()
assert first_e3.sort_index().astype(float).equals(expected.sort_index().astype(float))
print("Exercise 2 passed")

# %% [markdown]
# ## Exercise 3: back-patching by hand
#
# `run_backpatch` gives one row per (query, s, t, donor). Using only that frame and `ev`, compute the **fix rate**
# of the pair (s, t) = (n_layers - 1, 0): the share of *incorrect* queries that become correct when the real
# (`donor == "self"`) late residual is patched in. Store it in `fix`.

# %%
from mhop_lens.analyses.backpatch import run_backpatch, summarize_backpatch

bp = run_backpatch(model, sample, positions=("last",))
s, t = model.cfg.n_layers - 1, 0

# %% jupyter={"source_hidden": true} tags=["solution"]
failed = set(ev.loc[ev["subset"] == "incorrect", "qid"])
rows = bp[(bp["s"] == s) & (bp["t"] == t) & (bp["donor"] == "self") & bp["qid"].isin(failed)]
fix = rows["correct"].mean()
fix

# %%
# check
ref = summarize_backpatch(bp, ev).set_index(["s", "t"]).loc[(s, t), "fix_rate"]
assert abs(fix - ref) < 1e-9 or (pd.isna(fix) and pd.isna(ref))
print(f"Exercise 3 passed: fix rate {fix:.0%}")
viz.fig_backpatch(bp, ev)

# %% [markdown]
# ## Exercise 4: which layer moves the bridge to the last position?
#
# Run the attention knockout (`mhop_lens.analyses.knockout.run_knockout`) with the single edge `"last->r1"` (in the
# organism's possessive prompts "X 's r1 's r2", the first hop completes at r1) and window 0 (one layer at a time).
# Find the layer whose knockout lowers p(e3) most on average (`e3_prob_change`), call it `layer`, and show the
# attention patterns of its heads with `mhop_lens.viz.attention.attention_html`.

# %% jupyter={"source_hidden": true} tags=["solution"]
from mhop_lens.analyses.knockout import run_knockout

ko = run_knockout(model, sample, edges=("last->r1",), window=0)
layer = int(ko.groupby("centre")["e3_prob_change"].mean().idxmin())
layer

# %%
# check
from IPython.display import HTML

from mhop_lens.viz.attention import attention_html, attention_patterns

means = ko.groupby("centre")["e3_prob_change"].mean()
assert means[layer] == means.min()
heads = [(layer, h) for h in range(model.cfg.n_heads)]
tokens, patterns, names = attention_patterns(model, sample[0].prompt, heads)
assert abs(patterns.sum(-1) - 1).max() < 1e-4  # every attention row is a distribution
print(f"Exercise 4 passed: layer {layer}")
HTML(attention_html(model, sample[0].prompt, heads))
