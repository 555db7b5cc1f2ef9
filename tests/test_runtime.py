"""easyanimate.runtime: allocator tuning (glibc mallopt, once per process, opt-out) and the AdamW variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# AdamW (single-tensor, the plain default) on three 48 MiB parameters: each step allocates and frees param-sized
# temporaries, which glibc by default maps afresh (above its 32 MiB dynamic mmap ceiling) and faults in again
CHILD = """
import json, resource, torch
from easyanimate.runtime import tune_allocator
s = tune_allocator()
torch.set_num_threads(1)
ps = [torch.nn.Parameter(torch.zeros(12 << 20)) for _ in range(3)]
opt = torch.optim.AdamW(ps, lr=1e-3, foreach=False)
def step():
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
step(); step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps({"state": s, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3}))
"""


def _child(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting():
    tuned = _child({})
    off = _child({"EASYANIMATE_MALLOC_TUNE": "0"})
    assert tuned["state"]["enabled"] and tuned["state"]["mmap_threshold"] == 1 << 30, tuned
    assert off["state"] == {"applied": True, "enabled": False, "reason": "EASYANIMATE_MALLOC_TUNE=0"}, off
    # measured: ~110k minor faults per step untuned, ~8k tuned (the fresh gradients of the loop itself)
    assert off["faults"] > 50000, f"expected page faults per AdamW step without tuning, got {off['faults']}"
    assert tuned["faults"] * 5 < off["faults"], f"tuned: {tuned['faults']} faults per step, untuned {off['faults']}"


def test_adamw_is_fused_on_cpu_and_matches_the_default_update(monkeypatch):
    from easyanimate.runtime import adamw, fused_adamw_supported

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    assert fused_adamw_supported(params)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = adamw(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.03, eps=1e-10)
    monkeypatch.setenv("EASYANIMATE_ADAMW", "default")
    plain = adamw(twins, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.03, eps=1e-10)
    assert fused.defaults["fused"] is True and plain.defaults["foreach"] is False and not plain.defaults["fused"]
    for step in range(3):
        g = [torch.randn_like(p, generator=torch.Generator().manual_seed(step)) for p in params]
        for p, q, gi in zip(params, twins, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
