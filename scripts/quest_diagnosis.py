"""Why Quest loses retrieval accuracy on a model: how much of the true attention its pages catch.

For retrieval samples of the eval harness, every decode step of every layer Quest reads, this
computes the full attention over the whole cache (the plain-torch twin) and compares two
selections of the same number of pages per kv-head:

- quest:  the top pages by Quest's bound (what the engine reads),
- oracle: the top pages by the attention they really receive (the most any page selection of
  that size could catch).

It prints, per layer, the share of each query head's attention mass that lands in the selected
pages (1.0 = nothing lost), and then the eval score with the engine reading `--mode` pages
(quest, or oracle: the engine reads the oracle's pages). If the oracle keeps full's accuracy and
Quest does not, the bound ranks pages badly; if the oracle fails too, the budget is too small for
how spread this model's attention is.

    python scripts/quest_diagnosis.py --budget 256 --mode quest
    python scripts/quest_diagnosis.py --budget 256 --mode oracle
"""

import argparse
from collections import defaultdict

import torch

from nanokv.kernels.reference import gather_blocks, paged_attention, quest_pages
from nanokv import LLM, SamplingParams
from nanokv.engine import attention as step_attention
from nanokv.eval.grid import encode
from nanokv.eval.tasks import make_sample, score

# layer -> per head and step: attention mass caught by each selection; whether Quest's pages miss
# the page with the most attention; how loose the bound is, and how far apart pages' true maxima are
caught = defaultdict(lambda: {"quest": [], "oracle": [], "missed": [], "slack": [], "spread": []})
current_layer = [0]
mode = ["quest"]


def patch_engine():
    call, selected_pages = step_attention.StepAttention.__call__, step_attention.StepAttention._selected_pages

    def tracking_call(self, layer, *args):
        current_layer[0] = layer
        return call(self, layer, *args)

    def measured_selection(self, q, tables, lengths):
        cache, bs = self.cache, self.cache.block_size
        pool = cache.pool
        b, H, nb = tables.shape
        far = torch.full((b, 1), 1 << 30, device=q.device)
        _, probs = paged_attention(q[:, None], far, pool.k, pool.v, pool.pos, tables, lengths, return_probs=True)
        page_mass = probs[:, :, :, 0].reshape(b, H, -1, nb, bs).sum(-1)           # [b, H, group, nb]
        keys = gather_blocks(pool.k, tables).float()                                # [b, H, nb * bs, D]
        logits = torch.einsum("bhgd,bhsd->bhgs", q.float().view(b, H, -1, q.shape[-1]), keys)
        held = torch.arange(nb * bs, device=q.device) < lengths[..., None]
        logits = logits.masked_fill(~held[:, :, None], float("-inf"))
        true_max = logits.reshape(b, H, -1, nb, bs).amax(-1).amax(2)                  # [b, H, nb]
        bounds = cache.kernels.page_scores(q, *cache.key_bounds(), tables)
        num_blocks = (lengths + bs - 1) // bs
        picked = {"quest": selected_pages(self, q, tables, lengths),
                  "oracle": quest_pages(page_mass.amax(dim=2), tables, lengths, bs, self.selector.pages_to_read(bs))}
        # which of the head's pages each selection reads [b, H, nb]
        keep = {name: (tables[..., :, None] == reduced[..., None, :]).any(-1) & (tables >= 0)
                for name, (reduced, _) in picked.items()}
        record = caught[current_layer[0]]
        for name, k in keep.items():
            record[name] += (page_mass * k[:, :, None]).sum(-1).flatten().tolist()
        top = page_mass.amax(dim=2).argmax(-1, keepdim=True)
        record["missed"] += (~keep["quest"].gather(-1, top)).flatten().float().tolist()
        real = torch.arange(nb, device=q.device) < num_blocks[..., None]
        record["slack"] += ((bounds - true_max)[real]).tolist()
        record["spread"] += torch.stack([t[r].std() for t, r in zip(true_max.flatten(0, 1), real.flatten(0, 1))
                                         if r.sum() > 1]).tolist()
        return picked[mode[0]]

    step_attention.StepAttention.__call__ = tracking_call
    step_attention.StepAttention._selected_pages = measured_selection


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--mode", choices=["quest", "oracle"], default="quest")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--tasks", default="niah_number,niah_word,niah_multikey")
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    mode[0] = args.mode
    patch_engine()
    llm = LLM(args.model, method="quest", budget=args.budget)
    scores = []
    for task in args.tasks.split(","):
        for i in range(args.samples):
            sample = make_sample(task, args.length, lambda s: len(encode(llm, s)[0]), 0, i)
            ids, n = encode(llm, sample)
            [out] = llm.generate([(ids[:n], ids[n:])], SamplingParams(max_tokens=sample.max_tokens))
            scores.append(score(out.text, sample.answers, sample.metric))
            print(f"{task} #{i}: {score(out.text, sample.answers, sample.metric):.2f} {out.text!r} "
                  f"(answer {sample.answers})")
    print(f"\nattention mass in the {args.budget // llm.cache.block_size} pages read, per layer "
          f"(mean over decode steps and query heads; min = the worst head-step):")
    print("missed: share of head-steps whose most-attended page Quest does not read; slack: bound minus the page's"
          " true largest q.k (mean); spread: std over a head's pages of their true largest q.k (mean)")
    print(f"{'layer':>5} {'quest':>7} {'oracle':>7} {'quest min':>10} {'oracle min':>10} {'missed':>7} "
          f"{'slack':>7} {'spread':>7}")
    mean = lambda v: sum(v) / len(v)
    for layer in sorted(caught):
        r = caught[layer]
        print(f"{layer:>5} {mean(r['quest']):7.3f} {mean(r['oracle']):7.3f} {min(r['quest']):10.3f} "
              f"{min(r['oracle']):10.3f} {mean(r['missed']):7.3f} {mean(r['slack']):7.2f} {mean(r['spread']):7.2f}")
    every = {name: [x for layer in caught.values() for x in layer[name]] for name in caught[2]}
    print(f"  all {mean(every['quest']):7.3f} {mean(every['oracle']):7.3f} {'':21} {mean(every['missed']):7.3f} "
          f"{mean(every['slack']):7.2f} {mean(every['spread']):7.2f}")
    print(f"\n{args.mode} at budget {args.budget}: mean score {100 * sum(scores) / len(scores):.1f} "
          f"over {len(scores)} samples")


if __name__ == "__main__":
    main()
