"""`compare` (an engine against PyTorch eager) and `inspect` (what an engine folder holds)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.errors import EngineError, OptionError
from dscompile.cli import Bars, _emit, _mb, _status_line, app, guard


@app.command()
def compare(
    checkpoint: Path = typer.Argument(..., help="The checkpoint the engine was exported from."),
    out: Path = typer.Argument(..., help="Engine folder."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default: the dtype's, scaled by max|ref|)."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance, against max|ref| (default 0)."),
    decode_steps: int = typer.Option(4, help="Decode steps after the prefill."),
    batch: int = typer.Option(2, help="Batch rows (rows after the first are left-padded)."),
    prompt_len: int = typer.Option(8, help="Prompt length."),
    seed: int = typer.Option(0, help="Input seed."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, torch or tensorrt."),
    provider: str = typer.Option("auto", help="auto, cpu or cuda."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of hidden-state error by layer."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check an engine against PyTorch eager: per step and output, and the first diverging layer.

    Exit 0 within tolerance, 1 outside it, 2 on bad input.
    """
    start = time.perf_counter()
    with guard():
        from dscompile.api import compare as compare_api

        with Bars(not as_json) as bars:
            report = compare_api(checkpoint, out, backend=backend, provider=provider, decode_steps=decode_steps,
                                 batch=batch, prompt_len=prompt_len, seed=seed, atol=atol, rtol=rtol, plot=plot,
                                 progress=bars)
        from dscompile.verify.compare import scheme_of
        from dscompile.runtime.manifest import load_manifest

        scheme = scheme_of(load_manifest(out))
        lines = [f"{'step':>4} {'graph':8s} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'cache max':>10}  result"]
        if scheme is not None:
            lines.insert(0, f"vs eager with the same {scheme.name} weights (the lowering's distance, judged)")
        for s in report["steps"]:
            lines.append(f"{s['step']:>4} {s['graph']:8s} {s['logits']['max_abs']:10.3g} {s['logits']['max_rel']:10.3g} "
                         f"{s['logits']['mean_abs']:10.3g} {s['cache']['max_abs']:10.3g}  "
                         f"{'ok' if s['passed'] else 'OVER (atol %.3g)' % s['atol']}")
        layers = report.get("layers")
        if layers:
            first = layers.get("first_diverging_layer")
            if first is not None:
                lines.append(f"first diverging layer: {first} (hidden state after block {first} is out of tolerance)")
            elif not report["passed"]:
                lines.append("first diverging layer: none (every block's hidden state is within tolerance: the "
                             "difference comes after the last block, or in a decode step)")
            else:
                lines.append("first diverging layer: none (every block's hidden state is within tolerance)")
            lines.append(f"  located in {layers['located_in']}")
        if "scheme" in report:
            lines.append(f"vs fp32 eager ({scheme.name} block {scheme.block_size}: quantization's cost, not judged)")
            lines.append(f"{'step':>4} {'graph':8s} {'rel rms':>10} {'KL':>10} {'top-1':>10}")
            for s in report["scheme"]["steps"]:
                lines.append(f"{s['step']:>4} {s['graph']:8s} {s['logits_rel_rms']:10.3g} {s['kl']:10.3g} "
                             f"{s['top1_agreement']:10.3g}")
            m = report["scheme"]["mean"]
            lines.append(f"mean {'':8s} {m['logits_rel_rms']:10.3g} {m['kl']:10.3g} {m['top1_agreement']:10.3g}")
        lines.append(_status_line(report["passed"], start))
        _emit(report, as_json, lines)
        if not report["passed"]:
            raise typer.Exit(1)


@app.command()
def inspect(
    out: Path = typer.Argument(..., help="Engine folder."),
    trt_compat: bool = typer.Option(False, "--trt-compat", help="Check every ONNX node against TensorRT's parser."),
    plan: bool = typer.Option(False, "--plan", help="A sharded OUT's plan: bytes per rank (at the engine's dtype, "
                                                    "bf16 and FP8) and all-reduce traffic per decode step and per "
                                                    "prefill token."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an engine folder holds: graphs, IO, op counts, weights, cache, passes."""
    with guard():
        from dscompile.runtime.manifest import read_manifest

        manifest = read_manifest(out, graphs_only_ok=True)
        if manifest.get("sharding") is not None:
            info = sharding_plan(manifest)
            _emit(info, as_json, plan_lines(manifest, info))
            return
        if plan:
            raise OptionError(f"{out}: --plan describes a sharded export (dscompile export ... --tp N --ep M); this "
                              "one runs on one device")
        from dscompile.runtime.weights import resident_estimate

        c, cfg = manifest["cache"], manifest["model"]
        info = {
            "model": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                             "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "topk_method")},
            "dtype": manifest["dtype"], "target": manifest["target"], "runtime": manifest.get("runtime", "onnxruntime"), "opset": manifest["opset"],
            "limits": manifest["limits"], "cache": c, "weights": manifest["weights"],
            "graphs_only": bool(manifest.get("graphs_only")),
            "graphs": {name: {k: g.get(k) for k in ("file", "inputs", "outputs", "op_counts", "passes", "moe_lowering",
                                                    "in_place")}
                       for name, g in manifest["graphs"].items()},
        }
        lines = [f"model    {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg.get('n_routed_experts')} experts; dtype {manifest['dtype']}; opset {manifest['opset']}",
                 f"limits   {manifest['limits']}",
                 *([f"frontend {f['name']}: {f['code']} {f['version']}"] if (f := manifest.get("frontend")) else []),
                 f"cache    {c['bytes_per_token']} bytes/token vs {c['mha_equivalent_bytes_per_token']} for MHA "
                 f"({c['compression']}x smaller)",
                 f"weights  {_mb(manifest['weights'].get('bytes', 0))} in {manifest['weights'].get('file')}"
                 + (" (planned, not written: a graph-only export)" if info["graphs_only"] else "")]
        weights = manifest["weights"]
        layouts = weights.get("layouts")
        if layouts is not None and weights.get("parameter_bytes"):
            lines.append(f"         {weights['bytes'] / weights['parameter_bytes']:.3f}x the parameter bytes; beyond one "
                         f"copy: second layouts {_mb(layouts['second_layout_bytes'])}, computed by passes "
                         f"{_mb(layouts['computed_bytes'])}")
        quant = manifest.get("quantization")
        if quant:
            info["quantization"] = quant
            errors = quant.get("weights_error") or {}
            worst = max(errors.items(), key=lambda kv: kv[1]["max_rel"], default=None)
            lines.append(f"quant    {quant['scheme']}, block {quant['block_size']} ({quant['bits_per_weight']:g} bits "
                         f"per weight with scales); kernels {quant['accuracy_level']} (accuracy_level); float32 "
                         f"weights kept {_mb(quant['float_weight_bytes'])}"
                         + (f"; worst weight error {worst[1]['max_rel']:.3f} of its max |w| ({worst[0]})" if worst else ""))
        info["files"] = manifest.get("files", {})
        for name, f in sorted(info["files"].items()):
            lines.append(f"file     {name:24s} {_mb(f['bytes'])}")
        info["resident_estimate"] = resident_estimate(out, manifest)
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
                             f"(TensorScatter x{g['in_place']['op_counts'].get('TensorScatter', 0)}; ONNX Runtime CPU)")
        if trt_compat:
            from dscompile.lowering.tensorrt.compat import check_out_dir

            info["trt_compat"] = compat = check_out_dir(out)
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
        _emit(info, as_json, lines)


def sharding_plan(manifest: dict) -> dict:
    """A sharded manifest's plan, sized: weights per rank at the engine's dtype, bf16 and FP8 (one byte per
    parameter), cache per rank, and the all-reduces' volume per decode step and per prefill token."""
    sh = manifest["sharding"]
    missing = [k for k in ("parameters", "hidden_size", "activation_bytes", "groups", "all_reduces_per_step",
                           "weight_bytes", "cache_bytes_per_token_per_rank", "plan") if k not in sh]
    if missing:
        raise EngineError(f"manifest.json: sharding lacks {', '.join(missing)}; re-export with this dscompile")
    counts, D, act = sh["parameters"], sh["hidden_size"], sh["activation_bytes"]
    groups = {name: len(ranks[0]) for name, ranks in sh["groups"].items()}
    traffic = {}
    for phase, reduces in sh["all_reduces_per_step"].items():
        per_token = {g: n * D * act for g, n in reduces.items()}  # bytes each all-reduce carries per token
        # A ring all-reduce of M bytes over N ranks sends 2(N-1)/N * M from each rank.
        sent = sum(m * 2 * (groups[g] - 1) / groups[g] for g, m in per_token.items())
        traffic[phase] = {"all_reduces": reduces, "bytes_per_token": sum(per_token.values()),
                          "ring_bytes_sent_per_rank_per_token": int(sent)}
    return {
        "plan": {k: sh[k] for k in ("tp", "ep", "world_size", "plan", "groups")},
        "model": {k: manifest["model"].get(k) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                        "num_attention_heads", "n_routed_experts")},
        "dtype": manifest["dtype"],
        "graphs_only": bool(manifest.get("graphs_only")),
        "parameters": counts,
        "weight_bytes_per_rank": {manifest["dtype"]: sh["weight_bytes"]["per_rank"], "bfloat16": 2 * counts["per_rank"],
                                  "fp8": counts["per_rank"]},
        "cache_bytes_per_token_per_rank": sh["cache_bytes_per_token_per_rank"],
        "activation_bytes": act,
        "traffic": traffic,
        "ranks": sh["ranks"],
        "programs": {phase: g.get("program") for phase, g in manifest["graphs"].items()},
    }


def plan_lines(manifest: dict, info: dict) -> list[str]:
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
