"""The Triton kernels compiled ahead of time for sm_90a, without a GPU (verify/triton_aot.py).

Each run is a child process without TRITON_INTERPRET: this test process runs Triton interpreted
where there is no GPU (tests/conftest.py), and one process cannot compile and interpret.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (it only exists for Linux x86-64)")

_CHECK = """
import json
from dscompile.runtime.ops import triton_kernels as tk
from dscompile.verify import triton_aot

rows = triton_aot.compile_all(targets=("sm_90a",), models=("v3",), dtypes=("bfloat16",), phases=("decode",))
# A configuration known to spill (64-row MoE blocks at 4 warps): the check must see it fail.
launch = next(l for l in triton_aot.launches("v3", triton_aot.DTYPES["bfloat16"], "prefill")
              if l.fn.__name__ == "_moe_gate_up_kernel")
spilling = tk.Launch(launch.fn, launch.grid, launch.args, launch.constexprs, dict(launch.options, num_warps=4),
                     launch.dynamic)
bad = triton_aot.compile_launch(spilling, "sm_90a", "v3 bfloat16 prefill at 4 warps")
print(json.dumps({"rows": [dict(vars(r), ok=r.ok) for r in rows], "bad": dict(vars(bad), ok=bad.ok)}))
"""


def test_decode_kernels_compile_for_sm90a_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"]: r for r in out["rows"]}
    assert set(kernels) == {"_mla_split_kernel", "_mla_combine_kernel", "_moe_gate_up_kernel", "_moe_down_kernel"}
    for name, row in kernels.items():
        assert row["error"] is None, f"{name}: {row['error']}"
        assert row["registers"] and row["registers"] <= 255, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{name} spills: {row}"
        assert 0 < row["shared_bytes"] <= row["shared_limit"], row
        assert row["ok"]
    # The check can fail: a configuration that spills is reported as such.
    assert out["bad"]["error"] is None and out["bad"]["spill_stores"] > 0 and not out["bad"]["ok"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DSCOMPILE_SLOW"),
                    reason="40 ahead-of-time compiles (~6 min on 2 cores): set DSCOMPILE_SLOW=1 to run it")
def test_every_kernel_compiles_for_every_target():
    """The whole matrix (sm_80 and sm_90a; V2-Lite and V3; three dtypes; decode and prefill): minutes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "dscompile.verify.triton_aot", "--json"], env=env,
                          capture_output=True, text=True, timeout=3600)
    report = json.loads(done.stdout)
    failed = [r for r in report["kernels"] if not r["ok"]]
    assert done.returncode == 0 and not failed, json.dumps(failed, indent=1)[:3000]


def test_launches_follow_the_target():
    # 32-head blocks of 16-bit MLA spill on sm_80 (ptxas: 8 B stores), so the wrapper takes 16 there.
    import torch
    from dscompile.verify import triton_aot

    def block_h(target):
        split = [l for l in triton_aot.launches("v3", torch.bfloat16, "decode", target)
                 if l.fn.__name__ == "_mla_split_kernel"]
        return {l.constexprs["BLOCK_H"] for l in split}

    assert block_h("sm_80") == {16} and block_h("sm_90a") == {32}
