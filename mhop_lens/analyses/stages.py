"""Stage summary of two-hop resolution per query ("Hopping Too Late" section 5), from the other tables.

Stages, each an earliest (or most effective) layer, NA when never reached:

1. first hop resolved: ``first_hop_layer`` = earliest source layer whose patchscope decodes e2 at t1;
2. information propagated: ``propagation_layer`` = knockout centre whose window most lowers e3's probability when
   the last position cannot attend to t1 (``propagation_drop``, relative, must reach ``-min_drop``), and
   ``attn_e3_layer`` = earliest layer whose attention output at the last position projects e3 to top-1;
3. second hop resolved: ``second_hop_layer`` = earliest source layer decoding e3 at t2;
4. prediction extracted: ``extraction_layer`` = earliest layer from which the residual lens at the last position
   keeps the model's final prediction at top-1 through the last layer.

``subset``: 'correct' / 'incorrect' (/ 'other') from an evaluation frame (``evaluate.evaluate``) when given, else
the lens frame's ``correct`` (greedy first token == e3's first token); ``correct_source`` names which.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mhop_lens.analyses.lens import RESID
from mhop_lens.analyses.patchscope import earliest_layers


def _earliest(frame: pd.DataFrame, mask: pd.Series, column: str = "layer") -> pd.Series:
    return frame[mask].groupby("qid")[column].min()


def _extraction_layer(lens: pd.DataFrame) -> pd.Series:
    """Earliest layer l with the final prediction top-1 in every layer >= l (resid lens, last position)."""
    res = lens[lens["site"].isin(RESID) & (lens["position"] == "last")].sort_values(["qid", "layer"])

    def first_stable(g: pd.DataFrame) -> float:
        top = (g["pred_rank"].to_numpy() == 0)[::-1]
        run = int(np.argmin(top)) if not top.all() else len(top)
        return float(g["layer"].to_numpy()[len(top) - run]) if run else np.nan

    return res.groupby("qid")[["layer", "pred_rank"]].apply(first_stable)


def _propagation(knockout: pd.DataFrame, edge: str | None, min_drop: float) -> pd.DataFrame:
    """Per query: the knockout centre with the largest relative drop of p(e3) for the propagation edge."""
    if edge is None:
        k = knockout[knockout["edge"].str.startswith("last->") & knockout["t1_key"]]
    else:
        k = knockout[knockout["edge"] == edge]
    if k.empty:
        return pd.DataFrame(columns=["propagation_layer", "propagation_drop", "propagation_edge"])
    worst = k.loc[k.groupby("qid")["e3_prob_change"].idxmin()].set_index("qid")
    layer = worst["centre"].where(worst["e3_prob_change"] <= -min_drop)
    return pd.DataFrame({"propagation_layer": layer, "propagation_drop": worst["e3_prob_change"],
                         "propagation_edge": worst["edge"]})


def stage_summary(lens_frame: pd.DataFrame, patchscope_frame: pd.DataFrame,
                  knockout_frame: pd.DataFrame | None = None, evaluation_frame: pd.DataFrame | None = None,
                  propagation_edge: str | None = None, min_drop: float = 0.5) -> pd.DataFrame:
    """One row per query: the stage layers above, ``first_before_second`` and the correct/incorrect ``subset``.

    Columns: ``qid, subset, correct_source, first_hop_layer, second_hop_layer, first_before_second,
    propagation_layer, propagation_drop, propagation_edge, attn_e3_layer, resid_e3_layer, extraction_layer``.
    ``propagation_edge`` defaults to the knockout edges from the last position to the query's t1 (``t1_key``).
    """
    hops = earliest_layers(patchscope_frame).set_index("qid")
    out = pd.DataFrame(index=pd.Index(pd.unique(lens_frame["qid"]), name="qid"))
    last = lens_frame["position"] == "last"
    if evaluation_frame is not None:
        ev = evaluation_frame.set_index("qid")
        out["subset"] = ev["subset"].reindex(out.index).fillna("other")
        scorer = "gen" if "two_hop_output" in ev.columns else "logprob"  # the gen scorer keeps its texts
        out["correct_source"] = f"evaluation ({scorer} scorer)"
    else:
        correct = lens_frame.groupby("qid")["correct"].first().reindex(out.index)
        out["subset"] = np.where(correct, "correct", "incorrect")
        out["correct_source"] = "greedy first token == e3 first token"
    out["first_hop_layer"] = hops["e2_t1_layer"].reindex(out.index)
    out["second_hop_layer"] = hops["e3_t2_layer"].reindex(out.index)
    out["first_before_second"] = hops["first_before_second"].reindex(out.index).astype("boolean")
    if knockout_frame is not None and len(knockout_frame):
        out = out.join(_propagation(knockout_frame, propagation_edge, min_drop))
    else:
        out["propagation_layer"], out["propagation_drop"], out["propagation_edge"] = np.nan, np.nan, None
    out["attn_e3_layer"] = _earliest(lens_frame, last & (lens_frame["site"] == "attn_out")
                                     & (lens_frame["e3_rank"] == 0))
    out["resid_e3_layer"] = _earliest(lens_frame, last & lens_frame["site"].isin(RESID)
                                      & (lens_frame["e3_rank"] == 0))
    out["extraction_layer"] = _extraction_layer(lens_frame)
    return out.reset_index()


def stage_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per subset: query count, how often each stage is found, its median layer, and the hop-order share.

    ``share_first_before_second`` is over queries where both hops were decoded (``n_both_hops``);
    ``share_first_before_second_all`` counts queries with a missing hop as not ordered.
    """
    layers = ["first_hop_layer", "propagation_layer", "second_hop_layer", "attn_e3_layer", "resid_e3_layer",
              "extraction_layer"]
    rows = []
    for subset, g in summary.groupby("subset"):
        row = {"subset": subset, "n": len(g)}
        both = g["first_before_second"].notna()
        row["n_both_hops"] = int(both.sum())
        row["share_first_before_second"] = float(g.loc[both, "first_before_second"].mean()) if both.any() else np.nan
        row["share_first_before_second_all"] = float(g["first_before_second"].fillna(False).mean())
        for col in layers:
            row[f"{col}_found"] = float(g[col].notna().mean())
            row[f"{col}_median"] = float(g[col].median()) if g[col].notna().any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
