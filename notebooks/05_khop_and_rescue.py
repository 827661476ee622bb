# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Beyond two hops, and back-patching as a fix
#
# Two parts, both on the shipped organisms and through the same library API any model uses:
#
# 1. **k-hop chains.** `KHopQuery` records (the two-hop record is the k = 2 view), evaluation per hop and per
#    prefix chain with the compositionality gap per depth, and the logit lens of every bridge entity at its own
#    position, on the three-hop organism (`load_model("organism-khop")`).
# 2. **Rescue.** Back-patching turned into a rule chosen *without the answer*: selected on a train split of
#    queries, scored on held-out ones, beside a same-norm random-direction control. The per-query oracle is shown
#    for scale only; it is not a fix.
#
# Sample sizes are small so the notebook runs in a few minutes on a CPU; `mhop-lens khop` and `mhop-lens rescue`
# run the full versions (docs/khop.md, docs/rescue.md).

# %%
import pandas as pd

from mhop_lens import load_model
from mhop_lens.analyses.khop import resolution_profile, run_khop_lens
from mhop_lens.analyses.rescue import run_rescue
from mhop_lens.data import load_queries
from mhop_lens.data.khop import load_khop_queries
from mhop_lens.evaluate import evaluate_khop, summarize_khop
from mhop_lens.viz.khop import fig_resolution

N_CHAINS = 300  # held-out three-hop chains
N_RESCUE = 600  # held-out two-hop queries for the rescue (half train, half test)

# %% [markdown]
# ## Three-hop chains
#
# A query is a chain e1 -r1-> e2 -r2-> e3 -r3-> e4 rendered in composing order ("Zapus 's spouse 's boss 's
# rival"). Its prefix chains (e1 -> e2, e1 -> e3) and single hops (e_j -r_j-> e_{j+1}) are prompts of their own.

# %%
khop_model = load_model("organism-khop")
chains = load_khop_queries("organism-khop:heldout", limit=N_CHAINS)
q = chains[0]
print(q.prompt, "->", q.answer)
print([q.prefix_prompt(d) for d in range(1, q.k + 1)])
print([q.hop_prompt(j) for j in range(1, q.k + 1)])

# %% [markdown]
# Per depth d: accuracy of the depth-d prefix chain, of hop d alone, and the compositionality gap (chains whose
# hops 1..d are all known but whose depth-d chain fails). `step_gap` counts only the failures that appear at hop
# d (prefix right, hop d known, chain wrong).

# %%
frame = evaluate_khop(khop_model, chains, progress=False)
summarize_khop(frame)

# %% [markdown]
# Where is each hop resolved? The logit lens of every bridge entity at its own position (e2 at r1, e3 at r2, the
# answer e4 at r3), successes against failures.

# %%
lens = run_khop_lens(khop_model, chains, progress=False)
profile = resolution_profile(lens)
fig_resolution(profile)

# %% [markdown]
# ## Back-patching as a fix
#
# Three rules, each chosen on the train half and scored on the test half: one fixed (position, s, t) pair, the
# same kind of pair gated by a signal the model has without the answer (entropy / margin of the last position,
# lens rank of its own bridge guess at t1), and a learned affine map from layer s into layer t. `net` is the
# change in test accuracy with its 95% bootstrap interval; `control_net` applies a random direction of the same
# norm to the same queries.

# %%
two_hop_model = load_model("organism")
queries = list(load_queries("organism:heldout", limit=N_RESCUE))
table, selection = run_rescue(two_hop_model, queries, map_steps=40, progress=False)
cols = ["method", "position", "s", "t", "gate", "acc_before", "acc_after", "fixes", "breaks", "net", "net_lo",
        "net_hi", "control_net"]
table[cols]

# %% [markdown]
# The last row is the oracle: the best pair chosen per failure *after* seeing the answer. It bounds what any
# query-independent rule could fix at that position; the rows above it are what a rule chosen without the answer
# actually does on queries it never saw.

# %%
pd.Series(selection["train_net"]).sort_values(ascending=False).head()
