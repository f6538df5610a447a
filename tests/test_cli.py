"""The front doors' shared contract: real models by default, one precedence rule for the config,
a one-line preflight refusal (exit 2) before any Ray process starts, and the tiny model labelled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from capray.cli import build_parser, main
from capray.config import REAL_SD_MODEL, TINY_MODEL, TINY_MODEL_NOTE, CaprayConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "capray" / "samples"


def test_defaults_name_the_real_models_and_only_the_tiny_model_is_labelled(tiny_model_dir):
    model = CaprayConfig().model
    assert (model.sd, model.style_network, model.style_weights) == (REAL_SD_MODEL, "vgg19", "imagenet")
    assert model.notes == [] and load_config(preset="paper").model.notes == []
    assert load_config(preset="smoke").model.sd == TINY_MODEL
    assert load_config(preset="smoke").model.notes == [TINY_MODEL_NOTE]
    assert model.model_copy(update={"sd": str(tiny_model_dir)}).notes == [TINY_MODEL_NOTE]  # `models tiny` output


# -- one precedence rule: preset → config file → --set → dedicated flags --------------------------------

def effective_config(argv: list[str]):
    """The config a front door would run with, parsed by the real `capray` parser."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from capray.serve.command import serve_args

        return serve_args(args).load()
    from importlib import import_module

    return import_module(args._module).build_config(args)


DOORS = {  # command line before the shared options, and one dedicated flag vs the --set it must beat
    "protect": (["protect", "in", "out"], ["--method", "fsmg"], "attack.method=simac",
                lambda c: c.attack.method == "fsmg"),
    "serve": (["serve"], ["--port", "9001"], "serve.port=9000", lambda c: c.serve.port == 9001),
    "evaluate": (["evaluate", "--clean", "c", "--out", "o"], ["--lora"], "evaluate.lora=false",
                 lambda c: c.evaluate.lora is True),
}


@pytest.mark.parametrize("door", sorted(DOORS))
def test_every_front_door_applies_preset_then_file_then_set_then_flags(door, tmp_path):
    head, flag, beaten_set, flag_won = DOORS[door]
    config_file = tmp_path / "capray.yaml"
    config_file.write_text("model: {sd: file/model, resolution: 96}\nattack: {eps: 0.03, alpha: 0.003}\nseed: 7\n")
    base = [*head, "--preset", "smoke", "--config", str(config_file)]

    cfg = effective_config(base)  # the file beats the preset; the preset fills the rest
    assert (cfg.model.sd, cfg.model.resolution, cfg.seed) == ("file/model", 96, 7)
    assert cfg.model.style_weights == "random" and cfg.attack.outer_loops == 2  # from smoke

    cfg = effective_config([*base, "--set", "model.sd=set/model", "--set", "attack.eps=0.02"])
    assert (cfg.model.sd, cfg.attack.eps, cfg.attack.alpha) == ("set/model", 0.02, 0.003)  # --set beats the file

    cfg = effective_config([*base, "--set", "model.sd=set/model", "--model", "flag/model", "--set", beaten_set, *flag])
    assert cfg.model.sd == "flag/model" and flag_won(cfg)  # dedicated flags beat --set, wherever they stand


# -- preflight: one line, exit 2, before any Ray process ------------------------------------------------

PROBE = """
import contextlib, io, json, sys
import psutil, ray
from capray.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
print(json.dumps({"results": results, "ray_initialized": ray.is_initialized(),
                  "children": [p.name() for p in psutil.Process().children(recursive=True)]}))
"""


def test_preflight_refuses_each_front_door_in_one_line_before_ray_starts(tmp_path, tiny_model_dir):
    not_a_model = tmp_path / "not-a-model"
    (not_a_model / "unet").mkdir(parents=True)
    failures = {  # extra options → what the one line must say
        "missing hub model": ([], [REAL_SD_MODEL, str(tmp_path / "hf" / "hub"), "`capray models fetch`"]),
        "missing style weights": (["--model", str(tiny_model_dir), "--preset", "paper"],
                                  ["vgg19", str(tmp_path / "torch"), "`capray models fetch`"]),
        "bad local directory": (["--model", str(not_a_model), "--set", "model.style_weights=random"],
                                [str(not_a_model), "not an SD-format directory", "vae/ missing"]),
    }
    doors = {"protect": lambda i: ["protect", str(SAMPLES), str(tmp_path / f"out{i}")],
             "serve": lambda i: ["serve"],
             "evaluate": lambda i: ["evaluate", "--clean", str(SAMPLES), "--out", str(tmp_path / f"report{i}")]}
    cases = [(door, name, make(i) + extra, expected)
             for i, (door, make) in enumerate(doors.items()) for name, (extra, expected) in failures.items()]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": ""}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([argv for _, _, argv, _ in cases])],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    for (door, name, _, expected), result in zip(cases, report["results"]):
        lines = result["stderr"].strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1, (door, name, result)
        assert lines[0].startswith(f"capray {door}: ") and "Traceback" not in result["stderr"]
        assert all(part in lines[0] for part in expected), (door, name, lines[0])
    assert report["ray_initialized"] is False and report["children"] == []  # no raylet, no GCS, no workers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model"]  # nothing written anywhere


def test_debug_shows_the_traceback_an_expected_error_otherwise_hides(tmp_path, capsys, monkeypatch):
    argv = ["protect", str(SAMPLES), str(tmp_path / "out"), "--set", "attack.eps=-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "attack.eps" in err
    assert main(["--debug", *argv]) == 2 and "Traceback" in capsys.readouterr().err
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err  # after the command too

    from capray.models import command as models_command

    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(models_command, "run_list", broken)  # an unexpected error: still one line, exit 1
    assert main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "capray models: RuntimeError: disk on fire (rerun with --debug for the traceback)"
    assert main(["models", "list", "--debug"]) == 1 and "Traceback" in capsys.readouterr().err


# -- the tiny model says so in every output -------------------------------------------------------------

@pytest.mark.ray
def test_a_tiny_model_run_is_labelled_in_run_json_manifest_and_summary(ray_cluster, tmp_path, capsys):
    from capray.io.manifest import read_manifest

    src = tmp_path / "in"
    shutil.copytree(SAMPLES / "astronaut", src / "astronaut")
    out = tmp_path / "out"
    rc = main(["protect", str(src), str(out), "--preset", "smoke", "--quiet", "--set", "attack.outer_loops=1",
               "--set", "attack.adv_steps=2", "--set", "batch.cpus_per_actor=0.25"])
    assert rc == 0
    assert json.loads((out / "run.json").read_text())["notes"] == [TINY_MODEL_NOTE]
    (row,) = read_manifest(str(out)).to_pylist()
    assert row["status"] == "ok" and TINY_MODEL_NOTE in row["notes"]
    assert f"capray protect: {TINY_MODEL_NOTE}" in capsys.readouterr().err.splitlines()
