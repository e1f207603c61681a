"""Chart of tokens/s, kawai vs llama.cpp (and transformers), from benchmarks/results/*.json.

    .venv-bench/bin/python benchmarks/chart.py [--out docs/benchmarks.png] [RESULT.json ...]

Also prints the Markdown results table of docs/benchmarks.md.

For each (model, threads, prompt tokens) the newest result file is used (file names start with the date). Three panels:
prefill tok/s and decode tok/s (one group of bars per model and thread count, log scale so the fp32
transformers bars stay readable), and the kawai / llama.cpp ratios. matplotlib is in .venv-bench only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "benchmarks.png"
ENGINE_COLORS = {"kawai": "#d1495b", "llama.cpp": "#00798c", "transformers": "#a5a5a5"}


def newest_per_config(paths: list[Path]) -> list[dict]:
    """One report per (model, threads, prompt tokens), the newest by file name; sorted by those."""
    chosen: dict[tuple[str, int, int], tuple[str, dict]] = {}
    for path in sorted(paths):
        report = json.loads(path.read_text())
        chosen[(report["model"], report["threads"], report["prompt_tokens"])] = (path.name, report)
    return [chosen[key][1] for key in sorted(chosen)]


def draw(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    labels = [f"{short_name(r['model'])}\n{r['threads']} thread{'s' * (r['threads'] > 1)}, {r['prompt_tokens']} prompt"
              for r in reports]
    engines = [e for e in ENGINE_COLORS if any(e in r["engines"] for r in reports)]
    width = 0.8 / len(engines)
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.6 * len(reports) + 2), 13))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tokens/s"),
                           (axes[1], "decode_tok_s", "decode tokens/s")):
        for i, engine in enumerate(engines):
            xs, ys = [], []
            for j, report in enumerate(reports):
                if engine in report["engines"]:
                    xs.append(j + (i - (len(engines) - 1) / 2) * width)
                    ys.append(report["engines"][engine][key])
            bars = ax.bar(xs, ys, width, label=engine, color=ENGINE_COLORS[engine])
            ax.bar_label(bars, fmt="%.0f" if key == "prefill_tok_s" else "%.1f", fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title + " (log scale, higher is better)", fontsize=10)
        ax.set_xticks(range(len(reports)), labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    draw_ratios(axes[2], reports, labels)
    first = reports[0]
    isa = first["machine"].get("kawai_isa")
    fig.suptitle(f"kawai{f' ({isa})' if isa else ''} vs llama.cpp on {first['machine']['cpu']}: "
                 f"{first['gen_tokens']} tokens generated")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def short_name(model_id: str) -> str:
    """qwen2.5-coder-0.5b-instruct-q4_k_m -> qwen2.5-coder-0.5b\nq4_k_m"""
    name = model_id.replace("-instruct", "")
    head, _, quant = name.rpartition("-q")
    return f"{head}\nq{quant}" if head else name


def draw_ratios(ax, reports: list[dict], labels: list[str]) -> None:
    """kawai / llama.cpp for prefill and decode tok/s (1.0 = as fast)."""
    width = 0.35
    for i, (key, name, color) in enumerate((("prefill_tok_s", "prefill", "#edae49"),
                                             ("decode_tok_s", "decode", "#66a182"))):
        have = [j for j, r in enumerate(reports) if f"{key}_vs_llama_cpp" in r["ratios"]]
        ratios = [reports[j]["ratios"][f"{key}_vs_llama_cpp"] for j in have]
        bars = ax.bar([j + (i - 0.5) * width for j in have], ratios, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("kawai / llama.cpp (1.0 = as fast)", fontsize=10)
    ax.set_xticks(range(len(reports)), labels, fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def markdown_table(reports: list[dict]) -> str:
    """The results table of docs/benchmarks.md: one row per (model, threads, engine)."""
    rows = ["| model | threads | prompt | engine | prefill tok/s | decode tok/s | ttft s | weight GB/s (of read BW) "
            "| serving RSS MB | kawai/llama.cpp prefill, decode |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        ratios = r["ratios"]
        vs = (f"{ratios['prefill_tok_s_vs_llama_cpp']:.2f}x, {ratios['decode_tok_s_vs_llama_cpp']:.2f}x"
              if "decode_tok_s_vs_llama_cpp" in ratios else "")
        for engine in ENGINE_COLORS:
            e = r["engines"].get(engine)
            if e is None:
                continue
            rss = e.get("serving_peak_rss_mb")
            rows.append(
                f"| {r['model']} | {r['threads']} | {r['prompt_tokens']} | {engine} | {e['prefill_tok_s']:.1f} "
                f"| {e['decode_tok_s']:.2f} "
                f"| {e['ttft_s']:.2f} | {e['weight_gb_s']:.2f} ({r['machine']['mem_read_gb_s']:.1f}) "
                f"| {f'{rss:.0f}' if rss else '-'} | {vs if engine == 'kawai' else ''} |"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="result files (default: benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    paths = args.results or sorted((HERE / "results").glob("*.json"))
    if not paths:
        raise SystemExit("chart: no result files; run benchmarks/compare.py first")
    reports = newest_per_config(paths)
    draw(reports, args.out)
    print(f"wrote {args.out} ({len(reports)} configurations)")
    print(markdown_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
