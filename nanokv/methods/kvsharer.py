"""kvsharer: whole layers read an earlier layer's KV and keep none of their own.

Paper: KVSharer: Efficient Inference via Layer-Wise Dissimilar KV Cache Sharing (Yang et al.,
2024), arXiv 2410.18517. Which layer reads which comes from a search made ahead of time by
`python -m nanokv.calibrate kvsharer` (nanokv/calibrate/kvsharer.py): layer pairs most
dissimilar in their average KV first, each kept while the final hidden states stay close to the
unshared model's. A shared layer computes its own queries (its keys and values are dropped) and
attends over its source layer's cache; it holds no blocks, so its share of the KV bytes is
freed whole. Nothing is evicted token by token.

Knob: `compression=r` shares round(r x L) layers: the first that many pairs the search kept
(the greedy search's first k pairs are what a search for k keeps). The paper shares 12.5-25% of
the layers. A budget does not apply (the unit is a layer).

Defaults: the calibration's (30 samples of 64 tokens, threshold 0.5: official code
yangyifei729/KVSharer @ 39e5c19, test_llama.ipynb).
What differs:
- calibration text: nanokv's prose haystack (nanokv/haystack.py), not the official
  data/wiki_demo.txt lines (the chosen pairs depend on the data).
- the artifact holds up to L/2 pairs and compression picks the first round(r L); the official
  search stops at SHARE_LAYERS (the same pairs, the greedy search keeping a prefix).
"""

from nanokv.methods.base import CALIBRATION_FILE, Method


def layer_sources(pairs: list[list[int]], num_layers: int) -> list[int]:
    """The layer map once `pairs` [(later, earlier), ...] are applied in order."""
    sources = list(range(num_layers))
    for later, earlier in pairs:
        sources[later] = earlier
        for layer, source in enumerate(sources):  # a layer reading one that reads another reads that one
            sources[layer] = sources[source]
    return sources


class KVSharer(Method):
    name = "kvsharer"
    description = "calibrated layer pairs: a shared layer attends over an earlier layer's KV and holds none"
    paper = "https://arxiv.org/abs/2410.18517"
    calibration = "kvsharer"
    options = {"calibration_file": CALIBRATION_FILE}
    sources: list[int] | None = None  # from bind_calibration

    def check_budget(self):
        if self.budget is not None:
            raise ValueError("kvsharer shares whole layers: give compression (the fraction of layers that read "
                             "another layer's KV), not budget")

    def bind_calibration(self, artifact: dict):
        L, pairs = artifact["num_layers"], artifact["pairs"]
        shared = round(self.compression * L)
        if shared > len(pairs):
            raise ValueError(f"compression={self.compression} shares {shared} of {L} layers, but the kvsharer "
                             f"calibration holds {len(pairs)} pairs; run `python -m nanokv.calibrate kvsharer "
                             f"--model {artifact['model']} --share-layers {shared}`")
        self.sources = layer_sources(pairs[:shared], L)

    def layer_sources(self, num_layers: int) -> list[int] | None:
        return self.sources if self.compresses else None


    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n if self.sources is None or self.sources[layer] == layer else 0
