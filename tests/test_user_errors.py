"""Bad input to ``bdiff.sample`` / ``bdiff.evaluate`` ends in one line ``error: <message>``, exit 2 (issue 15).

Tried as a new user would: a checkpoint carrying a pickle payload, a truncated checkpoint, a PNG
renamed .ckpt, a recipe with ``steps: -3``, an object-array samples file. ``--debug`` (or
``BDIFF_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdiff import scripts
from tests.conftest import CONFIGS, ROOT

RECIPE = str(CONFIGS / "sampler" / "ddim.yaml")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)


def pickled_ckpt(path: Path) -> Path:
    torch.save({"hyper_parameters": {}, "state_dict": {}, "payload": argparse.Namespace(run="os.system")}, path)
    return path


def truncated_ckpt(path: Path) -> Path:
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    return path


def png_ckpt(path: Path) -> Path:
    path.write_bytes(PNG)
    return path


def bad_recipe(path: Path) -> Path:
    path.write_text("stepper: DDIM\nsteps: -3\n")
    return path


def object_samples(path: Path) -> Path:
    np.savez(path, images=np.array([{"a": 1}], dtype=object), nfe=10.0, seconds=1.0, config="{}")
    return path


SAMPLE_CASES = {
    "pickle payload": (lambda d: ["--ckpt", str(pickled_ckpt(d / "p.ckpt")), "--sampler", RECIPE], "carries pickled"),
    "truncated": (lambda d: ["--ckpt", str(truncated_ckpt(d / "t.ckpt")), "--sampler", RECIPE], "truncated"),
    "png renamed": (lambda d: ["--ckpt", str(png_ckpt(d / "img.ckpt")), "--sampler", RECIPE], "cannot read checkpoint"),
    "steps -3": (lambda d: ["--ckpt", str(png_ckpt(d / "img.ckpt")), "--sampler", str(bad_recipe(d / "r.yaml"))],
                 "steps must be an integer >= 1"),
}


def run_command(command: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Run ``bdiff-<command> argv`` in process; assert exit 2; the stderr text."""
    monkeypatch.setattr(sys, "argv", [f"bdiff-{command}", *argv])
    with pytest.raises(SystemExit) as stop:
        getattr(scripts, command)()
    assert stop.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_bdiff_sample_refuses_bad_input_in_one_line(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    make_args, words = SAMPLE_CASES[case]
    monkeypatch.delenv("BDIFF_DEBUG", raising=False)
    err = run_command("sample", [*make_args(tmp_path), "--out", str(tmp_path / "s.npz")], monkeypatch, capsys)
    assert "\n" not in err and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "s.npz").exists()


def test_bdiff_evaluate_refuses_an_object_array_samples_file(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BDIFF_DEBUG", raising=False)
    err = run_command("evaluate", ["--samples", str(object_samples(tmp_path / "o.npz"))], monkeypatch, capsys)
    assert "\n" not in err and err.startswith("error: ") and "pickled object array" in err, err


def test_debug_flag_and_env_var_show_the_traceback(tmp_path: Path, monkeypatch) -> None:
    argv = ["--ckpt", str(png_ckpt(tmp_path / "img.ckpt")), "--sampler", RECIPE, "--out", str(tmp_path / "s.npz")]
    monkeypatch.setattr(sys, "argv", ["bdiff-sample", *argv, "--debug"])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        scripts.sample()
    monkeypatch.setattr(sys, "argv", ["bdiff-sample", *argv])
    monkeypatch.setenv("BDIFF_DEBUG", "1")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        scripts.sample()


def test_python_m_form_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("BDIFF_DEBUG", None)
    samples = str(object_samples(tmp_path / "o.npz"))
    done = subprocess.run([sys.executable, "-m", "bdiff.evaluate", "--samples", samples], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and "\n" not in done.stderr.strip(), done.stderr
    debug = subprocess.run([sys.executable, "-m", "bdiff.evaluate", "--samples", samples, "--debug"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
