"""Times the Triton kernels of the dsc ops on a CUDA GPU against their bandwidth floors.

MLA decode attention reads the whole latent cache once per step, so its floor is the cache bytes
over the device's copy bandwidth; the routed MoE experts read the weights of every expert that
received a token. Each kernel is timed with CUDA events (median after warm-up) next to the
reference torch op, and the ratio is printed.

    python benchmarks/gpu_kernels.py [--json OUT.json] [--reps 20]

Shapes: B batch, P cached tokens, H heads, C kv_lora_rank, R rope dim; MoE: T tokens, D hidden,
E experts, K active experts per token, I expert intermediate.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

# DeepSeek-V2/V3 MLA latent cache and V3 MoE shapes.
H, C, R = 128, 512, 64
D, I, E, TOP_K, N_GROUP, TOPK_GROUP = 7168, 2048, 256, 8, 8, 4
DTYPE = torch.bfloat16


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(reps: int) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() / ms / 1e6


def bench_latent_attention(reps: int, copy_gbs: float) -> list[dict]:
    from dscompile.runtime.ops.latent_attention import latent_attention_reference
    from dscompile.runtime.ops.triton_kernels import triton_latent_attention

    rows = []
    for P in (1024, 4096, 16384):
        for B in (1, 4, 8, 16, 32):
            q = torch.randn(B, H, 1, C, device="cuda", dtype=DTYPE)
            qr = torch.randn(B, H, 1, R, device="cuda", dtype=DTYPE)
            kv = torch.randn(B, P, C, device="cuda", dtype=DTYPE)
            kr = torch.randn(B, P, R, device="cuda", dtype=DTYPE)
            mask = torch.zeros(B, 1, 1, P, device="cuda", dtype=DTYPE)
            scale = (C + R) ** -0.5
            args = (q, qr, kv, kr, mask, scale)
            ms = time_ms(lambda: triton_latent_attention(*args), reps)
            ref_ms = time_ms(lambda: latent_attention_reference(*args), max(3, reps // 4))
            cache_bytes = B * P * (C + R) * 2
            moved = cache_bytes + 2 * q.nbytes + qr.nbytes + mask.nbytes   # out is q-sized
            gbs = moved / ms / 1e6
            rows.append(dict(kernel="latent_attention", P=P, B=B, H=H, C=C, R=R, ms=ms,
                             bytes=moved, gbs=gbs, pct_copy_bw=100 * gbs / copy_gbs,
                             ref_ms=ref_ms, speedup_vs_ref=ref_ms / ms))
            r = rows[-1]
            print(f"mla  P={P:6d} B={B:3d}  {ms:8.4f} ms  {moved / 1e6:9.1f} MB  {gbs:7.1f} GB/s"
                  f"  {r['pct_copy_bw']:5.1f}% of copy  ref {ref_ms:8.3f} ms"
                  f"  x{r['speedup_vs_ref']:.1f}", flush=True)
            del q, qr, kv, kr, mask
    return rows


def bench_moe(reps: int, copy_gbs: float) -> list[dict]:
    from dscompile.runtime.ops.moe import moe_experts_reference, route
    from dscompile.runtime.ops.triton_kernels import triton_moe_experts

    w1 = torch.randn(E, I, D, device="cuda", dtype=DTYPE) * D ** -0.5
    w3 = torch.randn(E, I, D, device="cuda", dtype=DTYPE) * D ** -0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=DTYPE) * I ** -0.5
    gate = torch.randn(E, D, device="cuda", dtype=DTYPE)
    bias = torch.zeros(E, device="cuda")
    per_expert_bytes = 3 * I * D * w1.element_size()
    rows = []
    for T in (1, 16, 128, 1024):
        x = torch.randn(T, D, device="cuda", dtype=DTYPE)
        weights, idx = route(x, gate, bias, TOP_K, N_GROUP, TOPK_GROUP, "noaux_tc", True, 2.5)
        args = (x, w1, w2, w3, weights, idx)
        ms = time_ms(lambda: triton_moe_experts(*args), reps)
        ref_ms = time_ms(lambda: moe_experts_reference(*args), max(3, reps // 4))
        touched = int(torch.unique(idx).numel()) * per_expert_bytes
        flops = T * TOP_K * 3 * 2 * I * D
        gbs = touched / ms / 1e6
        rows.append(dict(kernel="moe_experts", T=T, D=D, I=I, E=E, K=TOP_K, ms=ms,
                         bytes=touched, gbs=gbs, pct_copy_bw=100 * gbs / copy_gbs,
                         tflops=flops / ms / 1e9, ref_ms=ref_ms, speedup_vs_ref=ref_ms / ms))
        r = rows[-1]
        print(f"moe  T={T:5d}  {ms:8.4f} ms  {touched / 1e9:6.2f} GB weights  {gbs:7.1f} GB/s"
              f"  {r['pct_copy_bw']:5.1f}% of copy  {r['tflops']:6.1f} TFLOP/s"
              f"  ref {ref_ms:8.3f} ms  x{r['speedup_vs_ref']:.1f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the measurements to this file")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu_kernels: needs triton ({exc})")
        return 1
    copy_gbs = copy_bandwidth_gbs(opts.reps)
    device = torch.cuda.get_device_name()
    print(f"device: {device}   copy bandwidth: {copy_gbs:.1f} GB/s")
    results = dict(device=device, copy_gbs=copy_gbs,
                   latent_attention=bench_latent_attention(opts.reps, copy_gbs),
                   moe=bench_moe(opts.reps, copy_gbs))
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
