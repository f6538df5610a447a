"""benchmarks/gpu_step.py: the CPU smoke run works end to end, and what it builds/projects is right.

The GPU figures themselves can only come from a GPU run; here we check that the script runs the
same code path on the tiny model, that its RESULT line parses, that the identity projection is the
sum it claims to be, and that the "full-size" architecture really is SD 2.1-base's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"
RESULT = re.compile(
    r"^RESULT gpu_step device=(\S+) mfu=(\S+) step_ms=(\S+) candidates_per_s=(\S+) identity_s=(\S+) peak_gb=(\S+)$"
)


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_prints_a_parseable_finite_result(capray_cache, tmp_path):
    out_json = tmp_path / "gpu_step.json"
    env = dict(os.environ, CAPRAY_CACHE=str(capray_cache))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out_json)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = RESULT.match(last)
    assert match, last
    device, *numbers = match.groups()
    values = [float(v) for v in numbers]
    assert device == "cpu"
    assert all(math.isfinite(v) and v > 0 for v in values), values

    report = json.loads(out_json.read_text())
    assert report["figures"]["errors"] == {}
    # issue 20's leaner scoring, measured side by side: one call per step, less memory, the same λ and pixels
    lean = report["figures"]["lean_scoring"]
    assert (lean["before"]["calls"], lean["after"]["calls"]) == (13, 1) and lean["same"] is True
    assert lean["after"]["peak_mb"] < lean["before"]["peak_mb"]
    assert "λ diagnostics" in proc.stdout and "λ stopped choosing: False" in proc.stdout
    mfu, step_ms, cand_per_s, identity_s, peak_gb = values
    def printed(value: float, decimals: int):  # the RESULT line rounds
        return pytest.approx(value, abs=0.51 * 10**-decimals)

    assert step_ms == printed(report["figures"]["ms"]["pgd_step"], 3)
    assert identity_s == printed(report["identity_s"], 2)
    # smoke preset: 2 outer loops × 2 PGD steps, CAP on the last half, 1 + 1 surrogate steps per loop, R = 10
    assert report["plan"] == {"pgd_steps": 4, "cap_steps": 2, "surrogate_steps": 4, "surrogate_copies": 2,
                              "candidates_per_cap_step": 11}
    ms = report["figures"]["ms"]
    expected = (4 * ms["pgd_step"] + 2 * (ms["cap_extra"] + 11 * ms["candidate"])
                + 4 * ms["surrogate_step"] + 2 * ms["surrogate_copy"]) / 1e3
    assert report["identity_s"] == pytest.approx(expected, rel=1e-9)
    best = report["figures"]["candidates"][str(report["figures"]["best_batch"])]
    assert cand_per_s == printed(best["images_per_s"], 2)
    assert ms["candidate"] == pytest.approx(best["ms"] / report["figures"]["best_batch"], rel=1e-9)
    # every pass was counted, and a candidate forward costs less than a forward + backward PGD step
    flops = report["figures"]["flops"]
    assert 0 < flops["candidate"] < flops["pgd_step"]
    assert mfu == printed(report["identity_flops"] / report["identity_s"] / (report["peak_tflops"] * 1e12), 4)
    assert report["mfu"] == pytest.approx(report["identity_flops"] / report["identity_s"]
                                          / (report["peak_tflops"] * 1e12), rel=1e-9)
    # the end-to-end protect_group check ran the real engine and respected the budget
    protect = report["protect"]
    assert protect["pgd_steps"] == 4 and protect["within_budget"] is True
    assert protect["linf_255"] <= round(0.05 * 127.5)


def test_paper_plan_is_300_pgd_steps_150_with_cap_and_300_surrogate_steps():
    from capray.config import load_config

    plan = _load_script().paper_plan(load_config(preset="paper"), candidates=101)
    assert plan == {"pgd_steps": 300, "cap_steps": 150, "surrogate_steps": 300, "surrogate_copies": 50,
                    "candidates_per_cap_step": 101}


def test_full_size_architecture_has_sd21_base_parameter_counts():
    """Published parameter counts of stabilityai/stable-diffusion-2-1-base's UNet, VAE and OpenCLIP-H text tower."""
    nets = _load_script().build_sd21_networks("meta")
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
