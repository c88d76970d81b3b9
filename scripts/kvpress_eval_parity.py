"""The eval harness's samples through kvpress's pipeline and through nanokv: scores side by side.

kvpress pins transformers < 5.3, so this runs in its own virtual environment:

    python3.11 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf jinja2
    PYTHONPATH=. /tmp/kvenv/bin/python scripts/kvpress_eval_parity.py

SmolLM2 in float32, the question after the compressed context (kvpress's setting), compression
0.5, kvpress's settings on both sides (scripts/kvpress_parity.py). Both engines get the same
token ids: nanokv's sample and chat formatting, handed to kvpress's pipeline after its own
tokenization step (its `_forward` takes context and question ids), greedy decoding.
"""

import argparse

import torch
import transformers
from kvpress import KVPressTextGenerationPipeline

from nanokv import LLM, SamplingParams
from nanokv.eval.grid import encode
from nanokv.eval.tasks import make_sample, score
from nanokv.hub import resolve_model
from scripts.kvpress_parity import PAIRS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_number,niah_word,niah_multikey")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--methods", default="snapkv,knorm,streaming_llm")
    args = parser.parse_args()
    path = resolve_model("smollm2-135m").path
    tasks, lengths = args.tasks.split(","), [int(n) for n in args.lengths.split(",")]
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)

    base = LLM(str(path), dtype="float32")
    samples = [make_sample(t, n, lambda s: len(encode(base, s)[0]), 0, i)
               for t in tasks for n in lengths for i in range(args.samples)]
    encoded = [encode(base, s) for s in samples]
    print(f"{len(samples)} samples: tasks {tasks}, lengths {lengths}; compression {args.compression}")
    print(f"{'method':14} {'nanokv':>7} {'kvpress':>8} {'diff':>6}  same answer text")
    for method in ["full"] + args.methods.split(","):
        if method == "full":
            press, options, llm = None, {}, base
        else:
            make_press, options = PAIRS[method]
            press = make_press(args.compression)
            llm = LLM(str(path), dtype="float32", method=method, compression=args.compression, **options)
        outs = llm.generate([(ids[:n], ids[n:]) for ids, n in encoded],
                            [SamplingParams(max_tokens=s.max_tokens) for s in samples], use_tqdm=False)
        ours = [o.text for o in outs]
        theirs = []
        for s, (ids, n) in zip(samples, encoded):
            with torch.no_grad():
                answer = pipe._forward({"context_ids": torch.tensor([ids[:n]]), "questions_ids": [torch.tensor([ids[n:]])]},
                                       max_new_tokens=s.max_tokens, press=press)[0]
            theirs.append(answer)
        a = 100 * sum(score(o, s.answers, s.metric) for o, s in zip(ours, samples)) / len(samples)
        b = 100 * sum(score(o, s.answers, s.metric) for o, s in zip(theirs, samples)) / len(samples)
        same = sum(x.strip() == y.strip() for x, y in zip(ours, theirs))
        print(f"{method:14} {a:7.1f} {b:8.1f} {a - b:+6.1f}  {same}/{len(samples)}", flush=True)


if __name__ == "__main__":
    main()
