"""Feature extractors for FID/KID: the digits feature net (trained through Lightning), loading by name, errors.

bdiff.metrics only loads the cached nets; a missing one is a FileNotFoundError that names the command making it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from bdiff.lit.data import DigitsDataModule
from bdiff.lit.feature_module import LabelledDigitsDataModule, ensure_feature_nets, export_checkpoint, main
from bdiff.metrics.feature_net import FeatureExtractor, FeatureNet, FeatureNetConfig
from bdiff.metrics.features import default_cache_dir, get_feature_extractor
from tests.conftest import CONFIGS

FEATURE_CONFIG = CONFIGS / "features" / "digits.yaml"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature cache made by the documented command, with a 2-epoch run instead of 20."""
    cache = tmp_path_factory.mktemp("features")
    path = main(["cache", "--cache-dir", str(cache), "--max-epochs", "2"])
    assert path == cache / "digits.pt"
    return cache


@pytest.fixture
def no_torch_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch_fidelity`` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)


def test_short_training_writes_an_accurate_net(cache_dir: Path) -> None:
    payload = torch.load(cache_dir / "digits.pt", weights_only=True)
    assert payload["config"]["image_size"] == 8 and payload["config"]["in_channels"] == 1
    assert payload["meta"]["val_accuracy"] > 0.8


def test_digits_extractor_maps_images_to_features(cache_dir: Path) -> None:
    ext = get_feature_extractor("digits", cache_dir=cache_dir)
    assert isinstance(ext, FeatureExtractor) and ext.num_features == 64
    x = torch.rand(5, 1, 8, 8)
    feats = ext(x)
    assert feats.shape == (5, 64) and torch.isfinite(feats).all() and not feats.requires_grad
    ext.train()  # torchmetrics calls .train() on its children: BatchNorm must stay frozen
    assert not ext.training and not ext.net.training
    torch.testing.assert_close(ext(x), feats, rtol=0, atol=0)


def test_digits_features_separate_real_from_noise_in_fid(cache_dir: Path) -> None:
    from sklearn.datasets import load_digits
    from torchmetrics.image.fid import FrechetInceptionDistance

    x = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    fid = FrechetInceptionDistance(feature=get_feature_extractor("digits", cache_dir=cache_dir))
    fid.update(x[:800], real=True)
    fid.update(x[800:1600], real=False)
    real_vs_real = float(fid.compute())
    fid.reset()
    fid.update(x[:800], real=True)
    fid.update(torch.rand(800, 1, 8, 8), real=False)
    assert real_vs_real < 0.1 * float(fid.compute())


def test_missing_cache_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="digits.pt") as exc:
        get_feature_extractor("digits", cache_dir=tmp_path)
    assert "python -m bdiff.lit.feature_module cache" in str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_default_cache_dir_follows_bdiff_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "features" / "digits.pt")):
        get_feature_extractor("digits")
    monkeypatch.delenv("BDIFF_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "bdiff" / "features"


def test_ensure_feature_nets_trains_only_what_is_missing(tmp_path: Path) -> None:
    """What ``bdiff-evaluate --train-features-if-missing`` runs: the cache command's training, in process, for the
    digits classifiers missing from the cache (other names are skipped); the command writes the same net."""
    assert ensure_feature_nets(["pixels", "digits", "digits"], cache_dir=tmp_path, max_epochs=1) == [tmp_path / "digits.pt"]
    assert ensure_feature_nets(["digits"], cache_dir=tmp_path, max_epochs=1) == []  # there already
    assert get_feature_extractor("digits", cache_dir=tmp_path)(torch.rand(2, 1, 8, 8)).shape == (2, 64)
    again = torch.load(main(["cache", "--cache-dir", str(tmp_path / "again"), "--max-epochs", "1"]), weights_only=True)
    for key, value in torch.load(tmp_path / "digits.pt", weights_only=True)["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key  # same seed, same net


def test_wrong_image_shape_or_range_is_a_clear_error(cache_dir: Path) -> None:
    ext = get_feature_extractor("digits", cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"trained on 1x8x8 images but got 1x28x28"):
        ext(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"got 3x8x8"):
        ext(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        ext(torch.rand(2, 1, 8, 8) * 2 - 1)


def test_corrupt_cache_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "digits.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="digits.pt.*python -m bdiff.lit.feature_module cache"):
        get_feature_extractor("digits", cache_dir=tmp_path)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="'fidnet'.*digits, digits_mlp, classifier, classifier_mlp, pixels, inception"):
        get_feature_extractor("fidnet")
    with pytest.raises(ValueError, match="fallback"):
        get_feature_extractor("inception", fallback="resnet")


def test_inception_without_torch_fidelity_names_the_package(no_torch_fidelity: None) -> None:
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity") as exc:
        get_feature_extractor("inception")
    assert "pip install torch-fidelity" in str(exc.value)


def test_inception_without_weights_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    url = "https://example.invalid/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
    fake.URL_INCEPTION_V3 = url  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=str(expected)):
        get_feature_extractor("inception")


def test_inception_falls_back_to_digits_with_a_warning(no_torch_fidelity: None, cache_dir: Path) -> None:
    with pytest.warns(RuntimeWarning, match="falling back to 'digits'.*torch-fidelity"):
        ext = get_feature_extractor("inception", cache_dir=cache_dir, fallback="digits")
    assert ext.name == "digits" and ext(torch.rand(3, 1, 8, 8)).shape == (3, 64)


def test_labelled_split_is_the_diffusion_split() -> None:
    labelled, plain = LabelledDigitsDataModule(seed=3), DigitsDataModule(seed=3)
    labelled.setup("fit")
    plain.setup("fit")
    for ours, theirs in ((labelled.train_dataset, plain.train_dataset), (labelled.val_dataset, plain.val_dataset)):
        assert len(ours) == len(theirs)
        for i in (0, len(ours) - 1):
            x, y = ours[i]
            torch.testing.assert_close(x * 2 - 1, theirs[i])
            assert 0 <= int(y) <= 9


def test_feature_net_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="image_size"):
        FeatureNet(FeatureNetConfig(image_size=2))


def test_fit_config_trains_checkpoints_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(FEATURE_CONFIG), "--print_config"])
    assert exc.value.code in (0, None) and "num_features: 64" in capsys.readouterr().out
    cli = main(
        [
            "fit",
            "--config",
            str(FEATURE_CONFIG),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert "val/acc" in cli.trainer.callback_metrics
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert last.is_file() and (last.parent.parent / "metrics.csv").is_file()
    path = export_checkpoint(last, tmp_path / "cache")
    assert get_feature_extractor("digits", cache_dir=path.parent)(torch.rand(2, 1, 8, 8)).shape == (2, 64)


def test_fit_config_refuses_mismatched_net(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.net.image_size=8"):
        main(
            [
                "fit",
                "--config",
                str(FEATURE_CONFIG),
                "--model.net.image_size=28",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )


def test_inception_features_when_available() -> None:
    pytest.importorskip("torch_fidelity")
    from bdiff.metrics.features import inception_weights_path

    if not inception_weights_path().is_file():
        pytest.skip(f"FID Inception weights not cached at {inception_weights_path()}")
    ext = get_feature_extractor("inception")
    assert ext.num_features == 2048 and ext(torch.rand(2, 1, 8, 8)).shape == (2, 2048)


def test_second_feature_space_is_a_differently_built_classifier(cache_dir: Path) -> None:
    """``digits_mlp``: a fully connected net from another seed, written by ``cache --arch mlp``; its
    features and its confidence are usable, and differ from the CNN's."""
    from sklearn.datasets import load_digits

    path = main(["cache", "--cache-dir", str(cache_dir), "--max-epochs", "2", "--arch", "mlp"])
    assert path == cache_dir / "digits_mlp.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["arch"] == "mlp" and payload["meta"]["val_accuracy"] > 0.8
    mlp, cnn = (get_feature_extractor(n, cache_dir=cache_dir) for n in ("digits_mlp", "digits"))
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) for m in mlp.net.modules())
    real = torch.as_tensor(load_digits().images[:200], dtype=torch.float32).unsqueeze(1) / 16.0
    assert mlp(real).shape == (200, 64)
    assert mlp.confidence(real).mean() > mlp.confidence(torch.rand(200, 1, 8, 8)).mean()
    assert cnn.is_classifier and mlp.is_classifier


def test_pixel_space_and_quality_in_every_space(cache_dir: Path) -> None:
    from sklearn.datasets import load_digits

    from bdiff.metrics.report import quality_in_spaces

    pixels = get_feature_extractor("pixels")
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(pixels(x), x.flatten(1))
    assert not pixels.is_classifier and pixels.num_features == 64
    with pytest.raises(ValueError, match="pixel features"):
        pixels(torch.rand(2, 1, 4, 4))
    real = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    cnn = get_feature_extractor("digits", cache_dir=cache_dir)
    refs = {"digits": (cnn, cnn(real[:900])), "pixels": (pixels, pixels(real[:900]))}
    good = quality_in_spaces(real[900:], refs)
    bad = quality_in_spaces(torch.rand(897, 1, 8, 8), refs)
    assert set(good) == {"digits", "pixels"} and "confidence" in good["digits"] and "confidence" not in good["pixels"]
    for space in refs:  # held-out real digits are far closer to the real ones than noise is, in every space
        assert good[space]["fd"] * 5 < bad[space]["fd"]
    assert good["digits"]["confidence"] > bad["digits"]["confidence"]
