"""One module per method; each is a plain function over a model and data that returns a tidy DataFrame.

"Hopping Too Late" (two-hop queries):

- ``lens``: logit lens of the residual and sublayer projection of attention / MLP outputs, per layer and position.
- ``patchscope``: Patchscopes-style decoding of which entity (e1 / e2 / e3 / other) a hidden state holds.
- ``knockout``: attention knockout of query -> key edges in a window of layers.
- ``backpatch``: back-patching a later layer's residual into an earlier layer, with a shuffled-donor control.
- ``stages``: per-query stage summary (first hop, propagation, second hop, extraction) from the tables above.

Circuits and heads (two-hop and GAR):

- ``patching``: activation patching clean -> corrupted (residual by layer x position, per head).
- ``attribution``: attribution patching (AtP, integrated gradients) and exact patching as its reference.
- ``edge_attribution``: edge AtP and EAP-IG between heads (q/k/v-side inputs), MLP inputs and the output, and exact
  path patching of edges.
- ``faithfulness``: keep the top-n edges (or heads), ablate the rest, metric recovered vs n against random circuits.
- ``heads``: True/False-head discovery on counter-paired Yes/No data, with a random-head control.
- ``head_interventions``: scale, zero, mean-ablate or re-point heads during evaluation, with a random control.

Shared pieces: ``sites`` (named token positions), ``partial_forward`` (re-run only the changed positions from a
layer over a cached prefix), ``metrics`` (logit differences), ``pairs`` (counter-paired prompts).
"""
