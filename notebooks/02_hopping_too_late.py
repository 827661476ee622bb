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
# # "Hopping Too Late" on the organism, end to end
#
# Biran et al. (2024) find that a model answering "the spouse of the performer of Imagine" first resolves the
# bridge entity (e2 = John Lennon) at the first-hop position t1, then reads it at the last position t2 to resolve
# the answer e3; failures resolve the first hop *too late* for the second hop to use it, and **back-patching** a
# later layer's residual into an earlier layer can fix them. This notebook runs every step on the organism:
# evaluate -> logit lens -> entity decoding -> attention knockout -> stages -> back-patching. About a minute on a CPU.

# %%
from IPython.display import display

from mhop_lens import load_model, viz
from mhop_lens.data import load_queries
from mhop_lens.evaluate import evaluate

MODEL = "organism"  # or a local HF model directory

# %%
model = load_model(MODEL, device="cpu")
queries = list(load_queries("organism:heldout", limit=80)) + list(load_queries("organism:train", limit=80))
ev = evaluate(model, queries)
ev.groupby("split")["subset"].value_counts().unstack(fill_value=0)

# %% [markdown]
# A balanced sample of correct and incorrect queries (both hops known, no shortcut) for the per-query analyses.

# %%
import random

rng = random.Random(0)
by_id = {q.id: q for q in queries}
sample = []
for subset in ("correct", "incorrect"):
    ids = ev.loc[ev["subset"] == subset, "qid"].tolist()
    sample += [by_id[i] for i in rng.sample(ids, min(12, len(ids)))]
print(len(sample), "queries:", sample[0].prompt, "->", sample[0].e3)

# %% [markdown]
# ## 1. Logit lens and sublayer projections
#
# At the last position (t2): from which layer is the answer e3 the top-1 token of the residual, and which sublayer
# writes it? At t1: when does the bridge e2 appear?

# %%
from mhop_lens.analyses.lens import run_lens

lens = run_lens(model, sample, positions=("last", "t1"))
viz.fig_lens(lens, ev)

# %%
viz.fig_lens(lens, ev, position="t1")

# %% [markdown]
# ## 2. Entity decoding (patchscopes)
#
# Which entity does the hidden state at t1 / t2 of each layer encode? The organism's word-level vocabulary cannot
# read the few-shot description prompt, so `decoder="auto"` uses the lens decoder (the class is the entity whose
# first token is top-1). `earliest_layers` gives, per query, the first layer that decodes e2 at t1 and e3 at t2.

# %%
from mhop_lens.analyses.patchscope import earliest_layers, run_patchscope

ps = run_patchscope(model, sample, positions=("t1", "t2"))
early = earliest_layers(ps)
viz.fig_decoding_heatmap(ps, ev)

# %%
viz.fig_earliest_layers(early, ev, n_layers=model.cfg.n_layers)

# %% [markdown]
# ## 3. Attention knockout
#
# Block the last position's attention to the first-hop tokens (and every later position's attention to e1) in a
# window of layers, and watch p(e3): where does the information flow from t1 to t2?

# %%
from mhop_lens.analyses.knockout import run_knockout

ko = run_knockout(model, sample)
viz.fig_knockout(ko, ev)

# %% [markdown]
# ## 4. Stages: first hop resolved -> second hop resolved, correct vs incorrect

# %%
from mhop_lens.analyses.stages import stage_summary, stage_table

stages = stage_summary(lens, ps, ko, ev)
display(stage_table(stages)[["subset", "n", "first_hop_layer_median", "second_hop_layer_median",
                             "share_first_before_second"]])
viz.fig_stages(stages)

# %% [markdown]
# ## 5. Back-patching, with a shuffled-donor control
#
# For every source layer s > target layer t, the last position's residual at layer t is replaced by the same
# query's residual at layer s (a second chance to use a late-resolved bridge); the control uses another query's
# residual. Fix rate = share of failures answered correctly afterwards.

# %%
from mhop_lens.analyses.backpatch import run_backpatch, summarize_backpatch

bp = run_backpatch(model, sample, positions=("last",))
bp_summary = summarize_backpatch(bp, ev)
viz.fig_backpatch(bp_summary)

# %% [markdown]
# ## Headline numbers (read from the tables above)

# %%
per_query = summarize_backpatch(bp, ev, by="query")
failures = per_query[per_query["status"] == "incorrect"]
print("median first-hop layer:", stages.groupby("subset")["first_hop_layer"].median().to_dict())
print("median second-hop layer:", stages.groupby("subset")["second_hop_layer"].median().to_dict())
print(f"failures fixed by some back-patch: {failures['fixed_by_any'].mean():.0%} "
      f"(shuffled control: {failures['control_fixed_by_any'].mean():.0%}, n={len(failures)})")

# %%
assert set(stages["subset"]) <= {"correct", "incorrect"}
assert bp_summary["fix_rate"].dropna().between(0, 1).all()
assert len(bp) == len(sample) * 2 * model.cfg.n_layers * (model.cfg.n_layers - 1) // 2
