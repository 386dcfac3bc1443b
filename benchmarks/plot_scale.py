"""Plots of ``scale.py`` results: inferos / llama.cpp ratios per shape, and each KV config's memory.

    python benchmarks/plot_scale.py OUT.png benchmarks/results/scale-*.json [--only ratios|kv]

Panels in rows of up to three: the first has, for every model and quant measured with llama.cpp in its
run, the ratios inferos / llama.cpp of RSS after load, prefill tok/s (short and long prompt) and decode tok/s
(each thread count), with issue 15's goals drawn as lines; then one panel per model whose KV configs were
measured (KV bytes inside peak RSS). Only ratios of the same run are drawn; a missing value is left out.
Needs matplotlib (``pip install 'inferos[plot]'``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2 ** 30


def ratio_bars(model: dict) -> dict[str, float]:
    """The ratios inferos / llama.cpp of one model entry, by label; missing values left out."""
    bars: dict[str, float] = {}
    load = model.get("load", {})
    a, b = load.get("inferos", {}).get("rss_after_load_bytes"), load.get("llama.cpp", {}).get("rss_after_load_bytes")
    if a and b:
        bars["RSS after load"] = a / b
    for p in model.get("prefill", []):
        if p["ratio_x"].get("prefill_tps"):
            bars[f"prefill @{p['seq']}"] = p["ratio_x"]["prefill_tps"]
    for d in model.get("decode", []):
        if d["ratio_x"].get("decode_tps"):
            bars[f"decode {d['threads']} thr"] = d["ratio_x"]["decode_tps"]
    return bars


def build(result: dict) -> str | None:
    """Which llama.cpp build a run measured (``scale.llama_build``'s words), or None."""
    return (result.get("host", {}).get("llama_cpp") or {}).get("build")


def plot(results: list[dict], path: Path, only: str | None = None) -> None:
    """Write the figure for ``results`` (parsed scale JSONs) to ``path`` (PNG, SVG or PDF by suffix);
    ``only`` = ``"ratios"`` or ``"kv"`` draws just those panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(r, m) for r in results for m in r.get("models", [])]
    speed = [(f"{m['model']}\n{m['quant']}" + ("\nAVX2 peer" if "AVX2 (" in (build(r) or "") else ""),
              ratio_bars(m), build(r)) for r, m in models if ratio_bars(m)]
    kv = [m for _, m in models if any(c.get("peak_rss_bytes") for c in m.get("kv", {}).get("configs", []))]
    speed = [] if only == "kv" else speed
    kv = [] if only == "ratios" else kv
    panels = (1 if speed else 0) + len(kv)
    if not panels:
        raise SystemExit("nothing to plot: no ratios and no KV configs in these results")
    cols = min(3, panels)  # rows of at most three panels
    rows = -(-panels // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    if speed:
        ax = axes.pop(0)
        labels = sorted({k for _, bars, _ in speed for k in bars}, key=lambda k: (k.split()[0], k))
        width = 0.8 / max(1, len(labels))
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(speed))]
            ax.bar(xs, [bars.get(label, 0) for _, bars, _ in speed], width, label=label)
        ax.set_xticks(range(len(speed)), [name for name, _, _ in speed], fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.2, color="tab:red", linestyle=":", linewidth=0.8, label="decode goal 1.2x")
        ax.axhline(1.5, color="tab:purple", linestyle=":", linewidth=0.8, label="prefill goal 1.5x")
        builds = {b for _, _, b in speed if b}
        ax.set_title("inferos / llama.cpp, same run" + (f"\n(llama.cpp: {'; '.join(sorted(builds))})" if builds else ""),
                     fontsize=9)
        ax.set_ylabel("ratio")
        ax.legend(fontsize=7, ncol=2)
    for ax, m in zip(axes, kv):
        configs = m["kv"]["configs"]
        names = [f"{r['engine']}\n{r['config']}" for r in configs]
        ax.bar(names, [(r["peak_rss_bytes"] or 0) / GIB for r in configs], label="peak RSS")
        ax.bar(names, [(r["kv_bytes"] or 0) / GIB for r in configs], label="KV bytes")
        ax.set_ylabel("GiB")
        ax.set_title(f"{m['model']} {m['quant']}, {m['kv']['ctx']} tokens of context", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str]) -> int:
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = argv[i + 1] if i + 1 < len(argv) else ""
        argv = argv[:i] + argv[i + 2:]
    if len(argv) < 2 or only not in (None, "ratios", "kv"):
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    plot([json.loads(Path(f).read_text()) for f in argv[1:]], Path(argv[0]), only)
    print(f"wrote {argv[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
