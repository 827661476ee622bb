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
# # True/False heads on the GAR organism, end to end
#
# GAR (Generalized Associative Recall) asks compositional questions about an in-context list ("David has a pig.
# Sharon has pants. ... So does David own a kind of animal?"). On counter-paired Yes/No rows (same prompt, one
# fact changed) we find **True/False heads**: heads whose output pushes true statements towards "Yes" (or false ones
# towards "No"), score them by attribution patching and exact patching, draw them as a circuit, and check by
# ablation that they matter more than random heads. Runs on the shipped GAR organism on a CPU.

# %%
from IPython.display import display

from mhop_lens import load_model, viz
from mhop_lens.gar.evaluate import evaluate as gar_evaluate
from mhop_lens.organism_gar.world import build_world, examples

model = load_model("organism-gar", device="cpu")
exs = examples(build_world(), seed=1_000_003, n_per_task=6, cxt_len=2)
print(len(exs), "examples, e.g.\n", exs[0].prompt, "->", exs[0].answer)

# %% [markdown]
# ## 1. Accuracy by form and difficulty, and the compositionality gap

# %%
gar = gar_evaluate(model, exs)
viz.fig_gar_accuracy(gar)

# %% [markdown]
# ## 2. Score every head on the counter-pairs (attribution, exact patching, attention contrasts)

# %%
from mhop_lens.analyses.heads import control, find_heads

scores, top = find_heads(model, exs, k=4)
display(top[["layer", "head", "type", "score", "atp", "act_d"]])
print(control(scores[scores["group"] == "all"], k=4))
viz.fig_head_heatmap(scores)

# %%
viz.fig_circuit(scores, top)

# %% [markdown]
# ## 3. Ablate them: accuracy before -> after, against random heads

# %%
from mhop_lens.analyses.head_interventions import intervene, summarize

cls = [e for e in exs if e.kind == "cls"]
heads = list(zip(top["layer"], top["head"], strict=True))
inter = intervene(model, cls, heads, kind="zero", n_random=3)
display(summarize(inter))
viz.fig_intervention_bars(inter)

# %% [markdown]
# ## 4. Their attention patterns on one prompt (circuitsvis, works offline)

# %%
from IPython.display import HTML

from mhop_lens.viz.attention import attention_html, save_attention

save_attention(model, cls[0].prompt, heads, "outputs/true_false_heads_attention.html")
HTML(attention_html(model, cls[0].prompt, heads))

# %%
assert set(top["type"]) <= {"true", "false"} and len(top) == 4
assert set(inter["condition"]) == {"before", "target", "random"}
