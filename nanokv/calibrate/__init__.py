"""python -m nanokv.calibrate: the per-model profiles that DuoAttention, HeadKV, Retrieval Head,
RazorAttention, KVSharer, LoRC, Palu, ECKVH, KVTuner, WKVQuant, KVQuant, SKVQ, Loki, Double
Sparsity, Squeezed Attention and MInference read.

    python -m nanokv.calibrate duoattention --model smollm2-135m
    python -m nanokv.calibrate headkv --model smollm2-135m --samples 20 --length 2048 --out profile.json
    python -m nanokv.calibrate headkv_r2 --model smollm2-135m      # for headkv profile=reason (HeadKV-R2)
    python -m nanokv.calibrate retrieval_head --model smollm2-135m
    python -m nanokv.calibrate razorattention --model smollm2-135m
    python -m nanokv.calibrate kvtuner --model smollm2-135m         # then --method kvtuner (target=4)
    python -m nanokv.calibrate wkvquant --model smollm2-135m        # then --method wkvquant (bits=4)
    python -m nanokv.calibrate loki --model llama3.2-1b --load-format dummy --out loki.safetensors
                                    # random weights, random token ids: a profile to time with, no more

Some methods decide per (layer, kv-head) from a profile of the model made ahead of time. This
command loads the model as LLM does, runs it over calibration text with a dense attention of its
own (plain causal attention with GQA, float32; the `attention` callable of nanokv/models/llama.py),
records what the method's scoring needs, and writes one artifact. There is no dataset to read:
the text is the quality harness's own filler (nanokv/haystack.py, varied prose), the same
for a given --seed.

- duoattention (read by DuoAttention, and by LServe for its streaming heads): NVIDIA kvpress's
  training-free "on-the-fly" DuoAttention score
  (kvpress/presses/duo_attention_press.py, `duo_attention_on_the_fly`; the paper trains a gate per
  head instead). Per layer and sample: the mean pre-RoPE query and key over the text's tokens
  (the model hands the attention post-RoPE q and k; RoPE is undone by rotating each token back by
  its own angle), each repeated at positions 0..q_len-1 (q_len = 500) with RoPE, the last query's
  softmax attention over those keys, score = the mean over positions of its cumulative sum (the
  area under the cumulative attention curve), averaged over the query heads of each kv-head and
  over samples. High: a retrieval head; low: a streaming head.
- headkv: Retrieval Head scores (Wu et al., Retrieval Head Mechanistically Explains Long-Context
  Factuality, arXiv 2404.15574), as HeadKV (arXiv 2410.19258) uses them, from a teacher-forced
  needle-in-a-haystack copy probe: a context with a needle sentence ("One of the special magic
  numbers for X is: V."), the question, the start of the reply, then V's tokens fed as the reply.
  For each answer token, a head copies when its argmax attention, from the query that predicts
  that token, lands inside the needle on a token equal to the one predicted; score = copies /
  answer tokens, averaged over samples and over the query heads of each kv-head. The needle's
  value is a number, a word pair or a uuid in turn, at depths 0, 0.25, .., 1 in turn. (The paper
  lets the model generate and counts only samples it answers right, each copy weighing 1 /
  needle length; teacher forcing gives every sample the same answer tokens, so a small model
  that misses the needle still yields a profile.) This is HeadKV-R's profile (the official
  head_choice=copy); the artifact records "profile": "copy".
- headkv_r2: HeadKV-R2's retrieval-reasoning profile (the official head_choice=reason, the
  paper's headline; FYYFU/HeadKV Important_Head/retrieval_head_detection_r2.py), for method headkv
  with profile=reason. The needle gives two people's favorite things and their ages ("John's
  favorite thing is to ... Mary's favorite thing is to ... John is 12 years old. Mary is 13 years
  old."), the question asks for the older one's or the younger one's (in turn; names, pastimes,
  ages and sentence order drawn per probe), and the correct person's sentence is fed as the reply
  ("Based on the content of the text, Question: ...?\nAnswer:", the official template). For each
  answer token, per query head: the k most attended slots of the query that predicts it (k = the
  sentence's length), and the attention probability of each one inside the sentence / k, summed
  over the answer tokens; averaged over samples and over the query heads of each kv-head. Unlike
  the copy score, attention mass rather than top-1 copies, so almost every head scores above 0.
  (The official probe decodes greedily and keeps only samples answered with token F1 > 0.5; the
  small models here rarely pick the right person, so that filter would leave no sample: teacher
  forcing with the right answer instead, every sample kept.) The artifact records "profile": "reason".

- retrieval_head: the Retrieval Head detector itself (Wu et al., arXiv 2404.15574; official
  nightdessert/Retrieval_Head retrieval_head_detection.py), for method retrieval_head: headkv's
  teacher-forced copy probe, scored as the official code scores it. A head copies an answer token
  when the argmax attention of the query that predicts it lands inside the answer's own span in
  the needle (the official real_needle: here the needle's value) on a token equal to the one
  predicted; a query head's score is its copies / the span's length, averaged over samples; a
  kv-head's is the max over its query heads (it serves every query head of its group, so one
  retrieval query head makes its cache a retrieval head's). Heads above 0.1 are retrieval heads
  (the paper's threshold; the method applies it). Unlike the official detector: teacher forcing
  with every sample kept (it decodes greedily and keeps samples with ROUGE-1 recall > 0.5), and
  nanokv's synthetic needles, as headkv's.
- razorattention: RazorAttention's data-free head profile (Tang et al., arXiv 2407.15891; no
  public code): random ordinary token ids, distinct within a segment, the segment repeated 4
  times after the tokenizer's BOS; for the queries of copies 2..4, the softmax attention on the
  previous occurrence of their own token (echo score) and on the token after it (induction score),
  averaged over those queries and the samples per query head, then the max over each kv-head's
  query heads. "head_scores" holds the induction scores and "echo_scores" the echo ones; the
  method protects the top 14% induction and top 1% echo kv-heads.

- kvsharer: the layer pairs KVSharer shares (nanokv/calibrate/kvsharer.py: most dissimilar
  layers first, each pair kept while the final hidden states stay close to the unshared model's).

- lorc, palu: per layer and head group, orthonormal bases of the pre-RoPE keys and of the values,
  ordered by importance, with their spectra (nanokv/calibrate/lowrank.py: the SVD of W_k and W_v
  for lorc, from the weights alone; the whitened SVD over calibration text for palu, with each
  layer's Fisher information).
- eckvh: the same bases and spectra, from the SVD of each group's stacked pre-RoPE keys and
  values over calibration text (nanokv/calibrate/eckvh.py; ECKVH, arXiv 2406.07056).

- kvtuner: per layer and candidate (K bits, V bits) pair, the relative error of the layer's
  attention output with its K/V alone quantized by KIVI (nanokv/calibrate/kvtuner.py); the method
  clusters the layers and searches the pairs for its memory target when it binds the artifact.
- wkvquant: per layer, each K and V channel's centre and radius, and per bit width the smoothing
  exponent and clip ratio that best keep the attention output (nanokv/calibrate/wkvquant.py).

- kvquant: per layer, KVQuant's non-uniform codebooks (2 and 4 bits) for the pre-RoPE keys and the
  values, k-means over calibration activations normalized as the codec does
  (nanokv/calibrate/kvquant.py).
- skvq: per layer and kv-head, SKVQ's channel clusters (k-means on each channel's min and max),
  and per layer the clip ratios of least error (nanokv/calibrate/skvq.py).

- loki: per layer and kv-head, the principal directions of the post-RoPE keys and the variance
  along each (nanokv/calibrate/loki.py).
- double_sparsity: per layer and head, each channel's mean |q k| (post-RoPE, the official "qk"
  outliers), |q| and |k| (pre-RoPE) (nanokv/calibrate/double_sparsity.py).
- squeezed_attention: the threshold on the centroid estimate of attention for every target sparsity:
  the quantiles 0, 0.01, .., 1 of each clustered key's estimate, over all layers and kv-heads and per
  layer (nanokv/calibrate/squeezed_attention.py; --clusters, --window as the method's options).

- minference: per layer and query head, the sparse pattern (A-shape, Vertical-Slash or Block-Sparse)
  whose tiles keep the most of the head's dense attention at a budget of a quarter of the sample
  (nanokv/calibrate/minference.py; the paper's search reads one sample).

The artifact's format, where it lives and how it is checked and loaded: nanokv/artifacts.py.
"""

from __future__ import annotations

from nanokv.calibrate.dense import DenseAttention, calibration_texts, run_dense
from nanokv.calibrate.duoattention import Q_LEN, duo_head_scores, duoattention_scores, undo_rope
from nanokv.calibrate.headkv import (copy_hits, copy_scores, fold_query_heads, headkv_scores, needle_probe,
                                     reason_probe, reason_scores, retrieval_head_scores)
from nanokv.calibrate.razorattention import echo_induction_hits, razor_scores, repeated_random_tokens
from nanokv.artifacts import FORMAT, LOWRANK, PROFILES, artifact_path, command, load_calibration, model_key, write_artifact

# the pieces, for callers and tests (not the command line, nanokv.calibrate.cli: it imports this module)
__all__ = ["FORMAT", "LOWRANK", "PROFILES", "write_artifact", "model_key", "artifact_path", "command", "load_calibration",
           "DenseAttention", "calibration_texts", "run_dense", "Q_LEN", "duo_head_scores", "duoattention_scores",
           "undo_rope", "copy_scores", "headkv_scores", "needle_probe", "reason_probe", "reason_scores",
           "copy_hits", "fold_query_heads", "retrieval_head_scores", "echo_induction_hits", "razor_scores",
           "repeated_random_tokens"]
