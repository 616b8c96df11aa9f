"""The bench report: the targets judged on it, its text table and its plot.

A target comparing two measurements is judged on the two run alternately (`alternating`,
`context_scaling`); the table's medians, taken minutes apart on a machine whose speed drifts, are
shown beside it. The table names the systems that wrap transformers ("hf", "hf-onnx") where the
report holds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _find(result: dict, system: str, phase: str, batch: int, context: int) -> dict | None:
    """The report's row of that measurement, or None."""
    return next((r for r in result["results"] if r["system"] == system and r["phase"] == phase
                 and r["batch"] == batch and r["context"] == context), None)


def _alternating(result: dict, reference: str, phase: str, batch: int, context: int) -> float | None:
    """Our time over `reference`'s for that row, measured alternately; None where not measured."""
    row = next((r for r in result.get("alternating", []) if r["reference"] == reference and r["phase"] == phase
                and r["batch"] == batch and r["context"] == context), None)
    return row["time_ratio"] if row else None


def targets(result: dict) -> list[dict[str, Any]]:
    """Issue 6's targets for "ours", where this run measured what they need.

    A target comparing two measurements is judged on the two run alternately (`alternating`,
    `context_scaling`); "table" is the same ratio from the table's medians, taken minutes apart."""
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None, table: float | None = None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "table": table,
                    "passed": None if value is None else ok})

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["ms"] / b["ms"] if a and b else None

    for context, need in ((128, 0.85), (1024, 0.80), (4096, 0.80)):
        r = _find(result, "ours", "decode", 1, context)
        if r:
            add(f"decode B=1 P={context}: fraction of bandwidth floor", r["floor_fraction"], f">= {need}",
                r["floor_fraction"] >= need)
    for reference, label, needs in (("hf", "transformers eager", ((1024, 1.7), (4096, 5.0))),
                                    ("hf-onnx", "transformers' ONNX export", ((1024, 5.0), (4096, 15.0)))):
        for context, need in needs:
            ours, theirs = _find(result, "ours", "decode", 1, context), _find(result, reference, "decode", 1, context)
            t = _alternating(result, reference, "decode", 1, context)
            if ours and reference in result["systems"]:
                v = 1.0 / t if t else None
                table = ratio(theirs, ours)
                add(f"decode B=1 P={context}: speedup vs {label}", v, f">= {need}", v is not None and v >= need,
                    table)
    scaling = result.get("context_scaling", {}).get("ours")
    long, short = _find(result, "ours", "decode", 1, 4096), _find(result, "ours", "decode", 1, 128)
    if long and short:
        v = scaling["ratio"] if scaling and scaling["contexts"] == [128, 4096] else None
        add("decode B=1: step at P=4096 / step at P=128", v, "<= 1.2", v is not None and v <= 1.2,
            ratio(long, short))
    for phase, batch, context, name in (("decode", 4, 128, "decode B=4 P=128"),
                                        ("prefill", 1, 0, f"prefill {result['prefill']['tokens']} tokens")):
        ours, theirs = _find(result, "ours", phase, batch, context), _find(result, "hf", phase, batch, context)
        if ours and theirs:
            v = _alternating(result, "hf", phase, batch, context)
            add(f"{name}: time / transformers eager's", v, "<= 0.8", v is not None and v <= 0.8,
                ratio(ours, theirs))
    return out


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    """`v` formatted, or "-" where it is None."""
    return "-" if v is None else format(v, spec) + unit


def _load_lines(load: dict[str, dict]) -> list[str]:
    """One row per system: load time, RSS growth and RSS after load (and our weights file beside
    them), then what each loader does."""
    if not load:
        return []
    lines = ["load: each system alone in a fresh process, after its imports; RSS growth = RSS after load - "
             "before; resident = PSS growth once loaded and run one step (16-token prompt + 1 decode step; "
             "counts mapped weights once); MB = 1e6 bytes; growth/weights = resident / the engine's weights file"]
    mb = lambda v: f"{v / 1e6:.0f}"  # noqa: E731
    for name, e in load.items():
        if "error" in e:
            lines.append(f"load    {name:18s} failed: {e['error']}")
            continue
        params = f" (parameters {mb(e['parameter_bytes'])} MB)" if e.get("parameter_bytes") else ""
        weights = (f"; weights file {mb(e['weights_bytes'])} MB{params}, growth/weights "
                   f"{e['growth_over_weights']:.2f}x" if "weights_bytes" in e else "")
        lines.append(f"load    {name:18s} {e['load_s']:7.2f} s  resident +{mb(e['resident_growth'])} MB, "
                     f"RSS +{mb(e['rss_growth'])} MB -> "
                     f"{mb(e['rss_after'])} MB, peak {mb(e['rss_peak'])} MB{weights} (after: "
                     f"{mb(e['rss_anon_after'])} MB anonymous, {mb(e['rss_file_after'])} MB file-backed; "
                     f"imports before the load {e['import_s']:.1f} s, {mb(e['rss_start'])} -> "
                     f"{mb(e['rss_before'])} MB)")
    loaders: dict[str, list[str]] = {}
    for name, e in load.items():
        loaders.setdefault(e["loader"], []).append(name)
    lines += [f"load    {', '.join(names)}: {loader}" for loader, names in loaders.items()]
    return lines


def table_lines(result: dict) -> list[str]:
    """The report as text: one row per measurement, then load time and memory, cache, floors,
    skipped systems, targets."""
    bw = result["bandwidth"]
    spread = (f"{bw['paired_min'] / 1e9:.1f}-{bw['paired_max'] / 1e9:.1f} over the run"
              if bw.get("paired_min") is not None else "no paired readings")
    lines = [f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s median (sum over {bw['tensor_bytes'] / 2**30:.1f} GiB, "
             f"{result['threads']} threads, read before every timed run: {spread}; "
             f"start {bw['start'] / 1e9:.1f}, end {bw['end'] / 1e9:.1f}); "
             f"GEMM {result['gemm_flops'] / 1e9:.0f} GFLOP/s ({result['gemm']['size']}³, median of the readings "
             f"before prefill runs); load {result['machine']['loadavg_start'][0]:.1f} -> "
             f"{result['machine']['loadavg_end'][0]:.1f}",
             f"median (and best) of {result['repeats']} runs after {result['warmup']} warm-up; prefill "
             f"{result['prefill']['tokens']} tokens, batch 1; floor% = median over runs of (floor at the bandwidth "
             "read just before the run) / run time; vs X = X's median / this median",
             f"{'system':18s} {'phase':8s} {'B':>2} {'P':>5} {'ms':>9} {'best ms':>9} {'GB/s':>5} {'floor ms':>9} "
             f"{'floor%':>7} {'vs hf':>6} {'vs hf-onnx':>10}"]
    for r in result["results"]:
        lines.append(f"{r['system']:18s} {r['phase']:8s} {r['batch']:>2} {r['context'] or '-':>5} {r['ms']:9.1f} "
                     f"{r['best_ms']:9.1f} {r['bandwidth'] / 1e9:5.1f} "
                     f"{r['floor_ms']:9.1f} {100 * r['floor_fraction']:6.0f}% "
                     f"{_fmt(r['speedup_vs_hf'], '5.2f', 'x'):>6} "
                     f"{_fmt(r['speedup_vs_hf_onnx'], '9.2f', 'x'):>10}")
    if result.get("context_scaling"):
        short, long = next(iter(result["context_scaling"].values()))["contexts"]
        lines.append(f"decode B=1 step at P={long} / step at P={short}, the two run alternately: " + ", ".join(
            f"{name} {v['ratio']:.2f}x" for name, v in result["context_scaling"].items()))
    lines += _load_lines(result.get("load", {}))
    c = result["cache"]
    lines.append(f"cache bytes/token: ours {c['ours_bytes_per_token']}, MHA-equivalent "
                 f"{c['mha_equivalent_bytes_per_token']}, transformers' DynamicCache "
                 f"{c['transformers_bytes_per_token'] if c['transformers_bytes_per_token'] is not None else '-'}")
    w = result["floors"]["decode"][0]
    lines.append(f"decode floor B=1: {w['weight_bytes'] / 1e9:.3f} GB of weights + cache "
                 f"({result['model']['num_hidden_layers']} layers x (C+R) x 4 bytes per token)")
    for attempt in result.get("hf_onnx_export", {}).get("attempts", []):
        rope = f", {attempt['rope']} RoPE" if "rope" in attempt else ""
        lines.append(f"hf-onnx: {attempt['exporter']}, {attempt['graph']}{rope}: "
                     f"{'exported' if attempt['ok'] else attempt['error']} ({attempt['seconds']} s)")
    export = result.get("hf_onnx_export", {})
    if export.get("file"):
        rope = (f"RoPE {export['rope']} (logits {export['rope_rewrite_max_abs_diff']:.1e} from transformers' code), "
                if "rope_rewrite_max_abs_diff" in export else "")
        impl = export.get("implementations", {})
        lines.append(f"hf-onnx graph: {rope}attention {impl.get('attention')}, experts {impl.get('experts')}; "
                     f"ONNX Runtime vs transformers' model as loaded: max abs diff "
                     f"{export.get('ort_max_abs_diff', float('nan')):.1e}")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    if result.get("alternating"):
        lines.append("run alternately, our time / the reference's (transformers', llama.cpp's): " + ", ".join(
            f"{r['system']} / {r['reference']} {r['phase']} B={r['batch']}{' P=' + str(r['context']) if r['context'] else ''} "
            f"{r['time_ratio']:.2f}" for r in result["alternating"]))
    for name, cases in result.get("profile", {}).items():
        from dscompile.bench.profile import profile_lines

        for what, prof in cases.items():
            lines += profile_lines(name, what, prof)
    for t in result["targets"]:
        mark = {True: "pass", False: "MISS", None: "n/a"}[t["passed"]]
        table = f"  (table medians: {t['table']:.2f})" if t.get("table") is not None else ""
        lines.append(f"target  {t['target']:58s} {_fmt(t['value'], '.2f'):>6} ({t['goal']}) {mark}{table}")
    return lines


def plot(result: dict, path: Path) -> None:
    """PNG: decode step latency vs context, one line per system (solid B=1, dashed larger batches) and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for bi, batch in enumerate(result["batches"]):
        for si, system in enumerate(result["systems"]):
            rows = sorted((r for r in result["results"] if r["system"] == system and r["phase"] == "decode"
                           and r["batch"] == batch), key=lambda r: r["context"])
            if rows:
                ax.plot([r["context"] for r in rows], [r["ms"] for r in rows], styles[bi % 4], marker="o",
                        color=f"C{si}", label=f"{system} B={batch}")
        floors = sorted((f for f in result["floors"]["decode"] if f["batch"] == batch), key=lambda f: f["batch"])
        ax.plot([f["context"] for f in floors], [f["ms"] for f in floors], styles[bi % 4], color="black",
                label=f"bandwidth floor B={batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (past tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"decode latency, {result['threads']} threads, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(result: dict) -> str:
    """The report as indented JSON, keys sorted (paths as strings)."""
    return json.dumps(result, indent=2, sort_keys=True, default=str)
