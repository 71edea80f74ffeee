"""The evaluation entry point on the session's tiny checkpoint and real samples from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bdiff.evaluate import main as evaluate
from bdiff.sample import main as sample
from tests.conftest import CONFIGS


def test_evaluate_writes_json_markdown_and_reliability_plot(last_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "s.npz"
    sample(["--ckpt", str(last_ckpt), "--sampler", str(CONFIGS / "sampler" / "dpmpp.yaml"), "--n", "60", "--out", str(out)])
    metrics = evaluate(["--samples", str(out), "--ckpt", str(last_ckpt), "--out-dir", str(tmp_path / "eval"),
                        "--train-features-if-missing"])
    for key in ("fd", "kid", "precision", "recall", "nfe", "seconds", "auroc_worst_20", "fd_drop_uncertain", "peak_memory_mb"):
        assert key in metrics, key
    assert metrics["fd"] > 0 and 0 <= metrics["precision"] <= 1 and metrics["peak_memory_mb"] > 0
    assert set(metrics["spaces"]) == {"digits", "digits_mlp", "pixels"}  # three feature spaces, built differently
    assert metrics["spaces"]["digits"]["fd"] == metrics["fd"] and 0 < metrics["spaces"]["digits_mlp"]["confidence"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 60
    assert "| fd |" in (tmp_path / "eval" / "metrics.md").read_text().replace("| n | fd |", "| fd |")
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 0
    assert [row["t"] for row in metrics["calibration"]] == [10, 50, 100, 250, 500, 750, 950]
    # Filtering by the per-sample score, in every space, against a random drop of as many samples.
    assert set(metrics["filtering"]) == {"digits", "digits_mlp", "pixels"}
    digits = metrics["filtering"]["digits"]
    assert {"fd_certain", "fd_random", "precision_certain", "precision_random", "recall_certain", "recall_random",
            "error_certain", "error_random"} <= set(digits)
    assert "error_certain" not in metrics["filtering"]["pixels"]  # no classifier there
    assert "least certain by the per-sample score" in (tmp_path / "eval" / "metrics.md").read_text()


def test_evaluate_without_feature_weights_says_how_to_get_them(tmp_path: Path, monkeypatch, last_ckpt: Path) -> None:
    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "s.npz"
    sample(["--ckpt", str(last_ckpt), "--sampler", str(CONFIGS / "sampler" / "ddim.yaml"), "--n", "4", "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="bdiff.lit.feature_module cache"):
        evaluate(["--samples", str(out)])


def test_evaluate_refuses_a_bad_samples_file(tmp_path: Path) -> None:
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.full((4, 1, 8, 8), 2.0, dtype=np.float32), nfe=10.0, seconds=1.0, config="{}")
    with pytest.raises(ValueError, match="images"):
        evaluate(["--samples", str(bad)])


def test_evaluate_logs_into_the_sampling_run(last_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """Metrics of a samples file drawn with --wandb-project go into that sampling run (resumed by id),
    one scalar per feature space; another project gets a run of its own."""
    import numpy as np

    import bdiff.wandb_log as wandb_log
    from bdiff.metrics.samples_file import SampleSet, save_samples

    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path / "cache"))
    made: list[dict] = []

    class FakeRun:
        def __init__(self, project: str, dir: Path, **init) -> None:
            made.append({"project": project, **init})

        def log(self, payload, what: str) -> bool:
            made[-1]["logged"] = payload()
            return True

        def finish(self) -> None:
            made[-1]["finished"] = True

    monkeypatch.setattr(wandb_log, "SafeRun", FakeRun)
    images = torch.as_tensor(np.random.default_rng(0).random((40, 1, 8, 8)), dtype=torch.float32)
    config = {"wandb": {"project": "bdiff", "run_id": "abc123"}}
    save_samples(tmp_path / "s.npz", SampleSet(images, None, 10.0, 1.0, config))
    for project in ("bdiff", "other"):
        evaluate(["--samples", str(tmp_path / "s.npz"), "--train-features-if-missing", "--wandb-project", project,
                  "--features", "pixels", "digits"])
    same, other = made
    assert same["id"] == "abc123" and same["resume"] == "allow" and same["finished"]
    assert "id" not in other
    assert same["logged"]["pixels/fd"] == same["logged"]["fd"] and "digits/confidence" in same["logged"]


def test_evaluate_takes_its_options_from_a_printed_yaml_config(tmp_path: Path, capsys) -> None:
    import numpy as np
    import yaml

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.full((4, 1, 8, 8), 2.0, dtype=np.float32), nfe=10.0, seconds=1.0, config="{}")
    with pytest.raises(SystemExit) as stop:
        evaluate(["--samples", str(bad), "--features", "pixels", "digits", "--print_config"])
    assert stop.value.code == 0
    job = tmp_path / "evaluate.yaml"
    job.write_text(capsys.readouterr().out)
    assert yaml.safe_load(job.read_text())["features"] == ["pixels", "digits"]
    with pytest.raises(ValueError, match="images"):  # the config's samples file reached the loader
        evaluate(["--config", str(job)])
