"""`inspect`: what an engine folder holds (the report is dscompile/inspect.py's; this prints it)."""

from __future__ import annotations

from pathlib import Path

import typer

from dscompile.cli import _emit, _mb, app, guard


@app.command()
def inspect(
    out: Path = typer.Argument(..., help="Engine folder."),
    trt_compat: bool = typer.Option(False, "--trt-compat", help="Check every ONNX node against TensorRT's parser."),
    ort_cuda_compat: bool = typer.Option(False, "--ort-cuda-compat",
                                         help="Check every ONNX node against ONNX Runtime's CUDA kernels: list the "
                                              "nodes it would run on CPU, and why (exit 1 when one has no CUDA "
                                              "kernel)."),
    plan: bool = typer.Option(False, "--plan", help="A sharded OUT's plan: bytes per rank (at the engine's dtype, "
                                                    "bf16 and FP8) and all-reduce traffic per decode step and per "
                                                    "prefill token."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an engine folder holds: graphs, IO, op counts, weights, cache, passes."""
    with guard():
        from dscompile.inspect import inspect as inspect_api

        report = inspect_api(out, trt_compat=trt_compat, plan=plan, ort_cuda_compat=ort_cuda_compat)
        _emit(report, as_json, plan_lines(report) if "plan" in report else report_lines(report))
    if not (report.get("ort_cuda_compat") or {}).get("compatible", True):
        raise typer.Exit(1)


def report_lines(info: dict) -> list[str]:
    """The text of a one-device OUT's report."""
    cfg, c, weights = info["model"], info["cache"], info["weights"]
    lines = [f"model    {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
             f"{cfg['n_routed_experts']} experts; dtype {info['dtype']}; opset {info['opset']}",
             f"limits   {info['limits']}",
             *([f"frontend {f['name']}: {f['code']} {f['version']}"] if (f := info["frontend"]) else []),
             f"cache    {c['bytes_per_token']} bytes/token vs {c['mha_equivalent_bytes_per_token']} for MHA "
             f"({c['compression']}x smaller)",
             f"weights  {_mb(weights.get('bytes', 0))} in {weights.get('file')}"
             + (" (planned, not written: a graph-only export)" if info["graphs_only"] else "")]
    layouts = weights.get("layouts")
    if layouts is not None and weights.get("parameter_bytes"):
        lines.append(f"         {weights['bytes'] / weights['parameter_bytes']:.3f}x the parameter bytes; beyond one "
                     f"copy: second layouts {_mb(layouts['second_layout_bytes'])}, computed by passes "
                     f"{_mb(layouts['computed_bytes'])}")
    quant = info.get("quantization")
    if quant:
        errors = quant.get("weights_error") or {}
        worst = max(errors.items(), key=lambda kv: kv[1]["max_rel"], default=None)
        lines.append(f"quant    {quant['scheme']}, block {quant['block_size']} ({quant['bits_per_weight']:g} bits "
                     f"per weight with scales), lm_head {quant.get('lm_head_bits') or quant['bits']} bits; kernels "
                     f"{quant['accuracy_level']} (accuracy_level); float32 "
                     f"weights kept {_mb(quant['float_weight_bytes'])}"
                     + (f"; worst weight error {worst[1]['max_rel']:.3f} of its max |w| ({worst[0]})" if worst else ""))
    native = info.get("native_ops")
    if native:
        lines.append(f"native   {', '.join(native['ops'])} ({native['domain']}, runtime/native): "
                     + ("builds and loads here" if native["available"] else f"cannot run here: {native['unavailable']}"))
    for name, f in sorted(info["files"].items()):
        lines.append(f"file     {name:24s} {_mb(f['bytes'])}")
    for backend, r in info["resident_estimate"].items():
        lines.append(f"memory   {backend:16s} {_mb(r['bytes'])} of weights ({r['how']})")
    for name, g in info["graphs"].items():
        lines.append(f"graph    {name}: {g['file']}, {sum((g['op_counts'] or {}).values())} nodes")
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in g["inputs"][:3])
        lines.append(f"  inputs  {ins}, + {len(g['inputs']) - 3} cache tensors")
        top = sorted((g["op_counts"] or {}).items(), key=lambda kv: -kv[1])[:8]
        lines.append("  ops     " + ", ".join(f"{k} {v}" for k, v in top))
        for p in g["passes"]["passes"]:
            expected = f" of {p['expected']} regions" if p.get("expected") is not None else " regions"
            lines.append(f"  pass    {p['name']}: {p['count']}{expected} rewritten")
            lines += [f"  pass    {p['name']}: not rewritten: {u['region']}: {u['step']}: {u['found']}"
                      for u in p.get("unmatched", [])]
        if g.get("in_place"):
            lines.append(f"  in place {g['in_place']['file']}: the cache written in capacity buffers "
                         f"(TensorScatter x{g['in_place']['op_counts'].get('TensorScatter', 0)}; ONNX Runtime CPU"
                         + ("; any number of new tokens: it runs every step)"
                            if g["in_place"].get("new_tokens") == "any" else ")"))
    compat = info.get("trt_compat")
    if compat is not None:
        table = compat["table"]
        lines.append(f"tensorrt checked against TensorRT {table['tensorrt_version']}'s ONNX parser ({table['source']})")
        for name, result in sorted(compat["files"].items()):
            verdict = "compatible" if result["compatible"] else "NOT compatible"
            lines.append(f"  {name}: {verdict}, {result['errors']} error(s), {result['warnings']} warning(s)")
            seen = set()
            for f in result["findings"]:
                key = (f["severity"], f["op_type"], f["reason"])
                if key not in seen:  # one line per distinct problem, not per node
                    seen.add(key)
                    lines.append(f"    {f['severity']:7s} {f['op_type']}: {f['reason']}")
    cuda = info.get("ort_cuda_compat")
    if cuda is not None:
        from dscompile.lowering.ort_cuda_compat import format_report  # noqa: PLC0415 - only this flag needs it

        table = cuda["table"]
        lines.append(f"cuda     checked against ONNX Runtime {table['onnxruntime'].split(' ')[0]}'s CUDA kernels "
                     f"({table['repository']} {table['file']} at {table['commit'][:12]}): "
                     + ("every node of the graphs a CUDA engine opens has a CUDA kernel" if cuda["compatible"] else
                        f"{cuda['unsupported']} node(s) without a CUDA kernel"))
        lines += format_report(cuda)
    return lines


def plan_lines(info: dict) -> list[str]:
    """The text of a sharded OUT's plan (dscompile.inspect.sharding_plan)."""
    p, m, c = info["plan"], info["model"], info["parameters"]

    def gb(b: float) -> str:
        return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"

    def count(n: float) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"

    lines = [f"model    {m['model_type']}, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
             f"{m['num_attention_heads']} heads, {m['n_routed_experts']} experts; dtype {info['dtype']}",
             f"plan     tp {p['tp']} x ep {p['ep']} = {p['world_size']} ranks: {p['plan']}",
             f"params   {count(c['per_rank'])} per rank ({count(c['replicated'])} replicated on every rank, "
             f"{count(c['split'])} split)",
             "weights  per rank: " + ", ".join(f"{gb(b)} at {k}" for k, b in info["weight_bytes_per_rank"].items()),
             f"cache    {info['cache_bytes_per_token_per_rank']} bytes per token on every rank (the latent cache is "
             "replicated)"]
    for phase, t in info["traffic"].items():
        reduces = ", ".join(f"{n} over {g.removeprefix('dscompile.')}" for g, n in t["all_reduces"].items())
        unit = "per token of a decode step" if phase == "decode" else "per prompt token"
        lines.append(f"traffic  {phase}: all-reduces {reduces}; {t['bytes_per_token'] / 1e3:.1f} kB {unit} "
                     f"({info['activation_bytes']}-byte activations), each rank sends "
                     f"{t['ring_bytes_sent_per_rank_per_token'] / 1e3:.1f} kB (ring)")
    lines.append("files    " + ("programs only (graph-only export)" if info["graphs_only"] else
                                ", ".join(f"rank {r['rank']}: {r['weights']['file']}" for r in info["ranks"])))
    return lines
