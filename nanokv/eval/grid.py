"""The method x budget x length x task grid: samples, runs through the batching engine,
resumes, and the tables and plots.

Every sample's result is one line of `samples.jsonl` in the output folder, written as soon as
its batch finishes; a rerun with the same folder skips what is there. `results.json`,
`results.csv`, `table.md` and the plots are rebuilt from that file at the end.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from nanokv.eval.tasks import Sample, make_sample, score

PLACEMENTS = {
    "after": "question after the compressed context (query-agnostic, kvpress's setting)",
    "inside": "question inside the compressed prompt (query-aware)",
}


@dataclass(frozen=True)
class Setting:
    method: str
    compression: float = 0.0
    budget: int | None = None

    @property
    def label(self) -> str:
        if self.budget is not None:
            return f"{self.method}@{self.budget}tok"
        return f"{self.method}@{self.compression:g}" if self.compression else self.method


def settings(methods: list[str], compressions: list[float], budgets: list[int]) -> list[Setting]:
    """`full`, quantization alone (kivi, int4, ...) and cacheblend once; a reader (quest, loki, an offloader)
    or a sparse prefill at each budget; every other method at each compression and each budget."""
    from nanokv.methods import runs_once, selects_pages

    out = []
    for m in methods:
        if runs_once(m):
            out.append(Setting(m))
            continue
        if not selects_pages(m):
            out += [Setting(m, compression=c) for c in compressions]
        out += [Setting(m, budget=b) for b in budgets]
    return out


def key(setting: Setting, length: int, task: str, placement: str, index: int) -> str:
    return f"{setting.label}|{length}|{task}|{placement}|{index}"


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def run(llm_factory, grid: list[Setting], lengths: list[int], tasks: list[str], placements: list[str],
        samples: int, seed: int, out: Path, log=print):
    """Run every missing (setting, length, task, placement, sample) and append it to samples.jsonl."""
    from nanokv import SamplingParams

    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.jsonl"
    finished = done_keys(path)
    cache: dict[tuple, tuple[Sample, list[int], int]] = {}
    for setting in grid:
        todo = [(length, task, placement, i) for length in lengths for task in tasks for placement in placements
                for i in range(samples) if key(setting, length, task, placement, i) not in finished]
        if not todo:
            log(f"{setting.label}: done already")
            continue
        llm = llm_factory(setting)
        for length in lengths:
            batch = [t for t in todo if t[0] == length]
            if not batch:
                continue
            prompts, params = [], []
            for _, task, placement, i in batch:
                if (task, length, i) not in cache:
                    sample = make_sample(task, length, lambda s: len(encode(llm, s)[0]), seed, i)
                    cache[task, length, i] = (sample, *encode(llm, sample))
                sample, ids, n = cache[task, length, i]
                prompts.append((ids[:n], ids[n:]) if placement == "after" else ids)
                params.append(SamplingParams(max_tokens=sample.max_tokens))
            log(f"{setting.label}: {len(batch)} prompts of {length} tokens")
            outputs = llm.generate(prompts, params, use_tqdm=True)
            with path.open("a") as f:
                for (_, task, placement, i), output in zip(batch, outputs):
                    sample = cache[task, length, i][0]
                    cached = len(output.prompt_token_ids) + len(output.token_ids) - 1
                    f.write(json.dumps({
                        "key": key(setting, length, task, placement, i), **asdict(setting), "setting": setting.label,
                        "length": length, "task": task, "placement": placement, "index": i,
                        "prompt_tokens": len(output.prompt_token_ids), "score": score(output.text, sample.answers,
                                                                                      sample.metric),
                        "kv_bytes_per_token": output.metrics["kv_cache_bytes"] / cached,
                        "kv_bytes_per_token_full": output.metrics["kv_cache_bytes_uncompressed"] / cached,
                        "kv_bytes_per_token_unrounded": output.metrics["kv_cache_bytes_theory"] / cached,
                        "answers": sample.answers, "output": output.text}) + "\n")


def encode(llm, sample: Sample) -> tuple[list[int], int]:
    return llm.encode_with_question(sample.context, sample.question, answer_prefix=sample.answer_prefix)


def summarize(out: Path) -> list[dict]:
    """Mean score and KV bytes per token per (setting, placement), over lengths and tasks; and per
    task. Writes results.json, results.csv, table.md."""
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    groups = defaultdict(list)
    for r in rows:
        groups[r["setting"], r["method"], r["compression"], r["budget"], r["placement"], r["length"], r["task"]].append(r)
    cells = [{"setting": k[0], "method": k[1], "compression": k[2], "budget": k[3], "placement": k[4],
              "length": k[5], "task": k[6], "samples": len(v),
              "accuracy": 100 * sum(r["score"] for r in v) / len(v),
              "kv_bytes_per_token": sum(r["kv_bytes_per_token"] for r in v) / len(v),
              "kv_bytes_per_token_full": sum(r["kv_bytes_per_token_full"] for r in v) / len(v),
              # no block rounding (NaN for samples written before it was recorded)
              "kv_bytes_per_token_unrounded": sum(r.get("kv_bytes_per_token_unrounded", math.nan) for r in v) / len(v)}
             for k, v in groups.items()]
    (out / "results.json").write_text(json.dumps(cells, indent=1))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    (out / "table.md").write_text(table(cells))
    return cells


def table(cells: list[dict]) -> str:
    """Markdown: one row per task (and the mean), one column per setting, per placement."""
    lines = []
    for placement in sorted({c["placement"] for c in cells}):
        part = [c for c in cells if c["placement"] == placement]
        order = {c["setting"]: (c["setting"] != "full", c["method"], c["compression"], c["budget"] or 0) for c in part}
        settings_ = sorted(order, key=order.get)  # full first, then by method and numerically by setting
        tasks = sorted({c["task"] for c in part})
        lines += [f"\n{PLACEMENTS[placement]}: accuracy (%), mean over lengths {sorted({c['length'] for c in part})}\n",
                  "| task | " + " | ".join(settings_) + " |", "|---" * (len(settings_) + 1) + "|"]
        for task in tasks + ["mean"]:
            values = []
            for s in settings_:
                chosen = [c for c in part if c["setting"] == s and (task == "mean" or c["task"] == task)]
                values.append(f"{sum(c['accuracy'] for c in chosen) / len(chosen):.1f}" if chosen else "-")
            lines.append(f"| {task} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], out: Path) -> list[Path]:
    """accuracy vs compression ratio and accuracy vs KV bytes per token, a line per method, a panel
    per placement (needs matplotlib: pip install nanokv[plot])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placements = sorted({c["placement"] for c in cells})
    saved = []
    for name, x_of, xlabel in (("accuracy_vs_compression.png", lambda c: c["compression"], "compression ratio (fraction removed)"),
                               ("accuracy_vs_kv_bytes.png", lambda c: c["kv_bytes_per_token"] / 1024, "KV KiB per token")):
        fig, axes = plt.subplots(1, len(placements), figsize=(6 * len(placements), 4.2), squeeze=False)
        for ax, placement in zip(axes[0], placements):
            part = [c for c in cells if c["placement"] == placement and c["budget"] is None]
            by_setting = defaultdict(list)  # one point per setting: the mean over its tasks and lengths
            for c in part:
                by_setting[c["method"], c["compression"]].append(c)
            points = {k: (sum(x_of(c) for c in v) / len(v), sum(c["accuracy"] for c in v) / len(v))
                      for k, v in by_setting.items()}
            full = [p for (m, _), p in points.items() if m == "full"]
            for method in sorted({m for m, _ in points} - {"full"}):
                line = sorted(full + [p for (m, _), p in points.items() if m == method])  # from full: nothing removed
                ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=method)
            if full:
                ax.axhline(full[0][1], ls="--", color="gray", label="full")
            ax.set_title(PLACEMENTS[placement], fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        saved.append(out / name)
    return saved
