"""The photos dataset (crops of scikit-image's bundled photos) and the path a user with their own photos takes:
an ImageFolder tree -> train.py -> bdiff.sample -> bdiff.evaluate in feature spaces of the folder's own classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("skimage")

from bdiff.datasets import photos
from bdiff.lit.data import ImageFolderDataModule
from bdiff.metrics.features import DATA_SPACES, classifier_path
from bdiff.metrics.references import RealData
from tests.conftest import CONFIGS, cli_args

FEW = ("astronaut", "camera", "coins", "moon")  # two colour-free, one colour, one held out below


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photos.write_photos(tmp_path_factory.mktemp("photos") / "tree", crops_per_photo=12, size=8, photos=FEW)


def test_writes_one_class_folder_per_photo_of_rgb_pngs(tree: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in tree.iterdir()) == sorted(FEW)
    files = sorted(tree.glob("*/*.png"))
    assert len(files) == 12 * len(FEW)
    image = Image.open(files[0])
    assert image.mode == "RGB" and image.size == (8, 8)
    grey = np.asarray(Image.open(tree / "camera" / "00000.png"))
    assert (grey[..., 0] == grey[..., 1]).all()  # a grey photo is repeated to three channels
    again = photos.write_photos(tmp_path / "again", crops_per_photo=12, size=8, photos=FEW)
    assert all((again / f.relative_to(tree)).read_bytes() == f.read_bytes() for f in files)  # the seed fixes the tree


def test_crops_differ_in_place_scale_and_flip() -> None:
    photo = photos.load_photo("astronaut")
    crops = photos.random_crops(photo, 20, 32, np.random.default_rng(0))
    assert crops.shape == (20, 32, 32, 3) and crops.dtype == np.uint8
    assert len({c.tobytes() for c in crops}) == 20


def test_refuses_an_existing_folder_and_leaves_nothing_half_written(tree: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileExistsError, match="delete it or choose another"):
        photos.write_photos(tree, crops_per_photo=1, size=8, photos=FEW)
    real = photos.load_photo

    def fail_on_moon(name: str) -> np.ndarray:
        if name == "moon":
            raise OSError("disk full")
        return real(name)

    monkeypatch.setattr(photos, "load_photo", fail_on_moon)
    with pytest.raises(OSError, match="disk full"):
        photos.write_photos(tmp_path / "out", crops_per_photo=2, size=8, photos=FEW)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_unknown_photo_and_bad_size_are_named() -> None:
    with pytest.raises(ValueError, match="unknown photo 'lena'"):
        photos.load_photo("lena")
    with pytest.raises(ValueError, match="size"):
        photos.write_photos("/nonexistent/never", size=4)


def test_split_labels_number_the_kept_classes_and_the_held_out_ones(tree: Path) -> None:
    dm = ImageFolderDataModule(str(tree), image_size=8, exclude_classes=["coins"])
    dm.setup("fit")
    labels, names = dm.split_labels("train")
    assert names == ["astronaut", "camera", "moon"] and set(labels.tolist()) == {0, 1, 2}
    assert len(labels) == len(dm.train_dataset)
    held, held_names = dm.split_labels("heldout")
    assert held_names == ["coins"] and held.tolist() == [0] * 12


def test_user_photos_train_sample_and_evaluate_in_their_own_feature_spaces(tree: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    from bdiff.evaluate import main as evaluate
    from bdiff.lit.cli import main as train
    from bdiff.sample import main as sample

    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path / "cache"))
    cli = train(CONFIGS / "digits.yaml", cli_args(
        tmp_path / "run", "--data=bdiff.lit.data.ImageFolderDataModule", f"--data.root={tree}", "--data.image_size=8",
        "--data.channels=3", "--data.batch_size=16", "--data.exclude_classes=[coins]", "--model.net.in_channels=3",
        "--trainer.max_steps=6"))
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    out = tmp_path / "s.npz"
    sample(["--ckpt", str(ckpt), "--sampler", str(CONFIGS / "sampler" / "ddim.yaml"), "--n", "12", "--out", str(out)])
    metrics = evaluate(["--samples", str(out), "--ckpt", str(ckpt), "--train-features-if-missing"])
    assert tuple(metrics["spaces"]) == DATA_SPACES and metrics["features"] == "classifier"
    assert all(row["fd"] > 0 for row in metrics["spaces"].values())
    data = RealData.of_datamodule(ImageFolderDataModule(str(tree), image_size=8, exclude_classes=["coins"]))
    assert data.class_names == ["astronaut", "camera", "moon"]
    net = torch.load(classifier_path("classifier", tmp_path / "cache" / "features", data.key), weights_only=True)
    assert net["config"]["num_classes"] == 3 and net["config"]["in_channels"] == 3
    assert [row["t"] for row in metrics["calibration"]] == [10, 50, 100, 250, 500, 750, 950]
    with pytest.raises(ValueError, match="use 'classifier'"):
        classifier_path("digits", data_key=data.key)


def test_command_line_errors_are_one_line(tree: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bdiff.console import exit_on_user_error

    for argv, says in ((["--crops-per-photo", "abc", "out"], "crops_per_photo"), ([str(tree)], "already exists")):
        monkeypatch.setattr("sys.argv", ["python -m bdiff.datasets.photos", *argv])
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(photos.main)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and says in err, err
