"""Both frontends, one engine: our model's capture and transformers' DeepseekV2/V3ForCausalLM's
(`export --frontend transformers`) give engines that agree with each other and with transformers'
eager model, rewrite the same regions and hold the same cache.

Per variant (v2: group-limited routing; v2-lite: no q_lora, greedy; v3: noaux_tc, interleaved
RoPE): a prefill of a left-padded batch and 16 decode steps, every engine fed transformers'
greedy token (teacher forcing), logits of the real positions within the fp32 bound.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_close
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.capture.frontends.transformers import load_transformers_model
from dscompile.verify.eager import TransformersEagerEngine
from dscompile.runtime.contract import position_ids
from dscompile.runtime.ort_engine import OrtEngine

pytest.importorskip("transformers", reason="transformers is the frontend under test (pip install '.[test]')")

DECODE_STEPS = 16


def _rewrites(manifest: dict) -> dict:
    return {(phase, p["name"]): (p["count"], p["expected"], p["unmatched"])
            for phase, g in manifest["graphs"].items() for p in g["passes"]["passes"]}


@pytest.mark.parametrize("variant", ["v2", "v2-lite", "v3"])
def test_both_frontends_agree_with_transformers(variant, exported, exported_ckpt, export_limits, tmp_path):
    checkpoint = exported_ckpt(variant)
    ours = exported(variant)
    theirs = tmp_path / "transformers"
    export_checkpoint(checkpoint, theirs, ExportOptions.within(export_limits, frontend="transformers"))
    m_ours, m_theirs = (json.loads((d / "manifest.json").read_text()) for d in (ours, theirs))
    assert m_theirs["frontend"]["name"] == "transformers" and m_ours["frontend"]["name"] == "dscompile"
    rewrites_theirs, rewrites_ours = _rewrites(m_theirs), _rewrites(m_ours)
    assert all(count == expected for count, expected, _ in rewrites_ours.values())
    for phase in m_ours["graphs"]:  # the cache appends: transformers' two per layer, ours none
        assert rewrites_theirs.pop((phase, "squeeze_cache_append"))[0] == 2 * m_ours["model"]["num_hidden_layers"]
        assert rewrites_ours.pop((phase, "squeeze_cache_append"))[0] == 0
    assert rewrites_theirs == rewrites_ours
    assert m_theirs["cache"] == m_ours["cache"]
    assert m_theirs["weights"]["bytes"] == m_ours["weights"]["bytes"]  # one copy each, the same weights

    engines = {"dscompile": OrtEngine.load(ours, provider="cpu"), "transformers": OrtEngine.load(theirs, provider="cpu")}
    eager = TransformersEagerEngine(*load_transformers_model(checkpoint, torch.float32, "cpu"))
    gen = torch.Generator().manual_seed(7)
    B, S = 3, 9
    ids = torch.randint(0, eager.info.vocab_size, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[1, :3], mask[2, :6] = 0, 0  # left padding
    pos = position_ids(mask)
    caches = {name: None for name in engines}
    eager_cache = None
    for step in range(DECODE_STEPS + 1):
        want, eager_cache = eager.step(ids, pos, mask, eager_cache)
        real = mask[:, -ids.shape[1]:].bool()  # logits of padding positions mean nothing
        got = {}
        for name, engine in engines.items():
            got[name], caches[name] = engine.step(ids, pos, mask, caches[name])
            assert_close(got[name][real], want[real], what=f"{variant} {name} engine vs transformers, step {step}")
        assert_close(got["transformers"][real], got["dscompile"][real], what=f"{variant} engines, step {step}")
        ids = want[:, -1].argmax(-1, keepdim=True)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], dim=1)
