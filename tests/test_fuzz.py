"""Bad-input fuzzing (issue 7) of the sampler and data entry points, with hypothesis.

Each property draws valid arguments and then breaks at most two of them (wrong type, NaN/inf,
out of range, wrong shape or dtype, malformed file). Allowed outcomes:

* nothing broken: the call succeeds and its result is well formed;
* something broken: it succeeds (the junk happened to be acceptable) or raises ValueError /
  FileNotFoundError whose message names a broken argument, key or file (argparse:
  ``SystemExit(2)`` with an ``error:`` line).

Anything else (IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, an
AssertionError or RuntimeError from torch/torchvision/PIL) is a crash and fails the test.
Runs are derandomized with no example database, so CI sees the same examples every time;
inputs are tiny (8x8 images, a 100-step schedule). ``pytest tests/test_fuzz.py
--hypothesis-show-statistics`` prints how often each outcome occurred. What was tried and
what it found: RELIABILITY.md, "Sampling".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from bdiff.checkpoint import load_model
from bdiff.lit.data import DigitsDataModule, ImageFolderDataModule, MNISTDataModule
from bdiff.metrics.samples_file import SampleSet, load_samples, save_samples
from bdiff.sample import main, parse_args
from bdiff.sampling import DDIM, DDPM, DPMSolverPP2M, Sampler, UniPC
from bdiff.sampler_callbacks import Recorder, VarianceWeightedBlending
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.recipe import load_recipe
from tests.test_sample_memory import tiny_checkpoint

FUZZ = settings(
    max_examples=30, deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=list(HealthCheck),
)
CLEAR = (ValueError, FileNotFoundError)

# Junk for any argument: wrong types, NaN/inf, negative and zero, all small (a value that is
# accepted never asks for much work).
NOT_INT = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.lists(st.integers(-1, 2), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
JUNK = st.one_of(NOT_INT, st.integers(-3, 3))


def broken_names(names: Any) -> st.SearchStrategy[set[str]]:
    """A third of the time nothing, else one or two of ``names``."""
    some = st.lists(st.sampled_from(sorted(names)), min_size=1, max_size=2, unique=True).map(set)
    return st.one_of(st.just(set()), some, some)


@st.composite
def args_with_bad(draw: st.DrawFn, valid: dict[str, st.SearchStrategy], bad: dict[str, st.SearchStrategy]) -> tuple[set[str], dict]:
    """Valid values for every argument, then junk for at most two of them; returns (broken names, values)."""
    broken = draw(broken_names(bad))
    return broken, {k: draw(bad[k] if k in broken else v) for k, v in valid.items()}


def expect_clear(fn: Callable[[], Any], broken: set[str], names: dict[str, str] | None = None) -> Any:
    """``fn()``'s result; with nothing broken it must succeed, else an error must name a broken argument.

    ``names`` maps an argument to the word its error message uses (default: the argument's name).
    """
    try:
        result = fn()
    except CLEAR as e:
        assert broken, f"valid arguments were refused: {e!r}"
        message = str(e).lower()
        words = [(names or {}).get(b, b).lower() for b in broken]
        assert any(w in message for w in words), f"unclear error {e!r}; expected it to name one of {words}"
        event(f"{type(e).__name__}")  # outcome counts: pytest --hypothesis-show-statistics
        return e
    event("succeeded" + (" despite junk" if broken else ""))
    return result


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.ckpt")


@pytest.fixture(scope="module")
def den(ckpt: Path):
    return load_model(ckpt, num_samples=2)


# ------------------------------------------------------------------------------ sampler
SAMPLER_ARGS = args_with_bad(
    valid={
        "stepper": st.sampled_from([DDIM(), DDPM(), DPMSolverPP2M(), UniPC(), DDIM(eta=0.5)]),
        "steps": st.integers(1, 6),
        "max_iterations": st.one_of(st.none(), st.integers(50, 200)),
        "propagation": st.sampled_from(["tweedie", "independent_eps"]),
        "callbacks": st.lists(st.sampled_from([VarianceWeightedBlending(), Recorder(max_samples=1)]), max_size=2),
        "spacing": st.sampled_from(["trailing", "karras"]),
        "rho": st.floats(0.5, 10),
    },
    bad={
        "stepper": JUNK, "steps": st.one_of(JUNK, st.integers(-2, 0), st.integers(101, 10**6)),
        "max_iterations": st.one_of(JUNK, st.integers(-2, 0)),
        "propagation": JUNK, "callbacks": st.one_of(JUNK, st.lists(JUNK, min_size=1, max_size=2)),
        "spacing": JUNK, "rho": st.one_of(JUNK, st.floats(-5, 0)),
    },
)


@settings(FUZZ, max_examples=40)
@given(case=SAMPLER_ARGS)
def test_sampler_arguments(den, case: tuple[set[str], dict]) -> None:
    broken, a = case
    sampler = expect_clear(lambda: Sampler(den, a["stepper"], a["steps"], a["callbacks"],
                                           max_iterations=a["max_iterations"], propagation=a["propagation"],
                                           spacing=a["spacing"], rho=a["rho"]), broken)
    if isinstance(sampler, Sampler):
        try:
            result = sampler.sample(2, seed=0)
        except RuntimeError as e:  # a max_iterations bound the caller chose (junk), named in the message
            assert "max_iterations" in broken and "max_iterations" in str(e)
            return
        assert result.images.shape == (2, *den.image_shape) and torch.isfinite(result.images).all()


@settings(FUZZ, max_examples=40)
@given(case=args_with_bad(
    valid={"n": st.integers(1, 3), "seed": st.integers(), "first_index": st.integers(0, 2**70)},
    bad={"n": st.one_of(JUNK, st.integers(-3, 0)), "seed": NOT_INT,
         "first_index": st.one_of(JUNK, st.integers(-(2**70), -1))},
))
def test_sample_arguments(den, case: tuple[set[str], dict]) -> None:
    broken, a = case
    sampler = Sampler(den, DDIM(), 2)
    result = expect_clear(lambda: sampler.sample(a["n"], seed=a["seed"], first_index=a["first_index"]), broken)
    if not isinstance(result, Exception):
        assert result.images.shape == (a["n"], *den.image_shape) and torch.isfinite(result.images).all()


@settings(FUZZ, max_examples=40)
@given(case=args_with_bad(
    valid={"shape": st.integers(1, 3).map(lambda b: (b, 1, 8, 8)), "dtype": st.just(torch.float32),
           "fill": st.sampled_from(["normal", "large"])},
    bad={"shape": st.lists(st.integers(0, 9), max_size=5).map(tuple),
         "dtype": st.sampled_from([torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]),
         "fill": st.sampled_from(["nan", "inf"])},
))
def test_run_with_bad_x_T(den, case: tuple[set[str], dict]) -> None:
    broken, a = case
    x = torch.randn(a["shape"])
    if x.numel() and a["fill"] != "normal":
        x.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "large": 1e4}[a["fill"]]
    x = x.to(a["dtype"])
    noise = NoiseSource(0, range(a["shape"][0] if a["shape"] else 1))
    words = {"shape": "shape", "dtype": "dtype", "fill": "nan or inf"}
    state = expect_clear(lambda: Sampler(den, DDIM(), 2).run(x, noise), broken, words)
    if isinstance(state, Exception):
        assert "x_t" in str(state).lower()
    else:
        assert state.x.shape == x.shape and torch.isfinite(state.x).all()


# ------------------------------------------------------------------------------ recipes
CALLBACK_OPTIONS: dict[str, dict[str, st.SearchStrategy]] = {
    "VarianceWeightedBlending": {"strength": st.floats(0, 2)},
    "AdaptiveStepSize": {"tol": st.floats(0.01, 2), "max_extra_nfe": st.integers(0, 4),
                 "sigma_floor": st.floats(0, 0.1)},
    "UncertainRegionRefinement": {"tol": st.floats(0.01, 2), "jump": st.integers(1, 80), "max_passes": st.integers(0, 2),
               "t_range": st.lists(st.integers(0, 99), min_size=2, max_size=2).map(sorted)},
    "Recorder": {"keys": st.lists(st.sampled_from(Recorder.KEYS), max_size=3, unique=True), "every": st.integers(1, 3),
                 "max_records": st.integers(1, 5), "max_samples": st.integers(1, 3)},
}  # CriticCorrection needs a trained critic file; tests/test_critic*.py cover it


@st.composite
def callback_spec(draw: st.DrawFn, junk_option: bool) -> dict:
    name = draw(st.sampled_from(sorted(CALLBACK_OPTIONS)))
    options = CALLBACK_OPTIONS[name]
    init_args = {k: draw(v) for k, v in options.items() if draw(st.booleans())}
    if junk_option:
        init_args[draw(st.sampled_from([*options, "bogus"]))] = draw(st.one_of(JUNK, st.floats(-5, -0.01), st.integers(-5, 0)))
    return {"class_path": name, "init_args": init_args}


def _part(name: str, **init_args: object) -> dict:
    return {"class_path": name, "init_args": init_args}


RECIPE_ARGS = args_with_bad(
    valid={
        "stepper": st.one_of(st.sampled_from(["DDIM", "DDPM", "DPMSolverPP2M", "UniPC"]),
                             st.builds(lambda eta: _part("DDIM", eta=eta), st.floats(0, 1))),
        "steps": st.integers(1, 6),
        "posterior_samples": st.integers(1, 4),
        "callbacks": st.lists(callback_spec(False), max_size=3),
        "grid": st.one_of(st.sampled_from(["trailing", "karras"]).map(lambda g: _part("ScheduleGrid", spacing=g)),
                          st.builds(lambda r: _part("ScheduleGrid", spacing="karras", rho=r), st.floats(0.5, 10))),
        "colour": st.just(None),
    },
    bad={
        "stepper": st.one_of(JUNK, st.builds(lambda n, v: _part(n, eta=v), st.sampled_from(["DDIM", "Heun"]), JUNK)),
        "steps": st.one_of(JUNK, st.integers(-2, 0)),
        "posterior_samples": st.one_of(JUNK, st.integers(-2, 0)),
        "callbacks": st.one_of(st.just(True), st.integers(1, 3), st.floats(allow_nan=True).filter(bool), st.text(min_size=1, max_size=3),
                               st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=1), st.lists(JUNK, min_size=1, max_size=2),
                               st.lists(callback_spec(True), min_size=1, max_size=2)),
        "grid": st.one_of(JUNK, st.builds(lambda r: _part("ScheduleGrid", spacing="karras", rho=r), JUNK)),
        "colour": JUNK,
    },
)


@settings(FUZZ, max_examples=60)
@given(case=RECIPE_ARGS)
def test_recipe_from_random_dicts(den, case: tuple[set[str], dict]) -> None:
    broken, values = case
    data = {k: v for k, v in values.items() if k != "colour" or "colour" in broken}
    words = {"colour": "colour", "callbacks": "callback"}
    recipe = expect_clear(lambda: load_recipe(data, name="fuzz"), broken, words)
    if isinstance(recipe, Exception):
        return
    result = recipe.build(den).sample(2, seed=1)  # a validated recipe (steps <= T here) samples without error
    assert torch.isfinite(result.images).all() and (result.nfe >= 1).all()


@settings(FUZZ, max_examples=30)
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))), raw=st.booleans())
def test_recipe_from_random_yaml(text: str, raw: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed_recipe.yaml"
        path.write_bytes(text.encode("latin-1", "replace") if raw else text.encode())
        expect_clear(lambda: load_recipe(path), {"fuzzed_recipe"})  # names the file or the recipe


# ----------------------------------------------------------------------------------- CLI
TOKENS = st.sampled_from(["--ckpt", "--sampler", "--n", "--seed", "--out", "--batch-size", "--devices", "--accelerator",
                          "-1", "0", "3", "x", "1e3", "2.5", "cuda", "mps", "cpu", "", "--bogus", "a.npz"])


@settings(FUZZ, max_examples=60)
@given(argv=st.lists(TOKENS, max_size=8))
def test_cli_parse_args(argv: list[str]) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(argv)
    except SystemExit as e:
        assert e.code == 2 and "error:" in err.getvalue()
        event("usage error")
        return
    event("parsed")
    assert args.n >= 1 and args.batch_size >= 1 and args.devices >= 1 and args.ckpt is not None


CLI_ARGS = args_with_bad(
    valid={"ckpt": st.just("ok"), "config": st.just("ok"), "out": st.sampled_from(["ok", "nested", "existing"]),
           "n": st.integers(1, 5), "batch_size": st.integers(1, 4)},
    bad={"ckpt": st.sampled_from(["missing", "junk", "truncated", "directory"]),
         "config": st.sampled_from(["missing", "junk yaml", "list", "bad steps", "unknown callback"]),
         "out": st.just("directory"), "n": st.integers(-1, 0), "batch_size": st.integers(-1, 0)},
)


@settings(FUZZ, max_examples=30)
@given(case=CLI_ARGS)
def test_cli_main(ckpt: Path, case: tuple[set[str], dict]) -> None:
    broken, a = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "junk.ckpt").write_bytes(b"\x80\x02not a checkpoint")
        (root / "cut.ckpt").write_bytes(ckpt.read_bytes()[:5000])
        ckpt_path = {"ok": ckpt, "missing": root / "none.ckpt", "junk": root / "junk.ckpt",
                     "truncated": root / "cut.ckpt", "directory": root}[a["ckpt"]]
        config = root / "recipe_zz.yaml"
        (root / "old.npz").write_bytes(b"an earlier run")
        config.write_text({"ok": "stepper: DDIM\nsteps: 2\nposterior_samples: 2\n", "junk yaml": "{: [", "list": "- 1\n",
                           "bad steps": "stepper: DDIM\nsteps: 0\n", "missing": "",
                           "unknown callback": "stepper: DDIM\nsteps: 2\ncallbacks: [Magic]\n"}[a["config"]])
        if a["config"] == "missing":
            config.unlink()
        out = {"ok": root / "s.npz", "nested": root / "a" / "b" / "s.npz", "existing": root / "old.npz", "directory": root}[a["out"]]
        argv = ["--ckpt", str(ckpt_path), "--sampler", str(config), "--n", str(a["n"]), "--batch-size", str(a["batch_size"]),
                "--out", str(out)]
        err = io.StringIO()
        words = {"ckpt": ckpt_path.name, "config": "recipe_zz"}
        early = {"n", "batch_size", "out"}  # the parser checks these
        if a["config"] in ("missing", "junk yaml", "list", "unknown callback"):
            early.add("config")  # a --sampler file the parser refuses (not a mapping, an unknown class): its error
        expected = broken - early or ({"(a usage error)"} if broken else set())
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                result = expect_clear(lambda: main(argv), expected, words)
        except SystemExit as e:  # the parser's checks: --n, --batch-size, --out, --config
            assert e.code == 2 and "error:" in err.getvalue() and broken & early
            assert broken & early != {"config"} or "config" in err.getvalue().split("error:")[-1]
            event("usage error")
            return
        if not isinstance(result, Exception):
            assert load_samples(out).images.shape == (a["n"], 1, 8, 8) and not broken
        if isinstance(result, Exception) or a["out"] != "existing":
            assert (root / "old.npz").read_bytes() == b"an earlier run"  # a failed run overwrites nothing
        assert not [p for p in root.rglob(".*") if p.is_file()], "temporary files left behind"


# --------------------------------------------------------------------------- samples file
KINDS = st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, "<U2"])
ELEMENTS = st.floats(-2, 2, width=16) | st.sampled_from([np.nan, np.inf, -np.inf])


@st.composite
def random_array(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, ...]] | None = None) -> np.ndarray:
    """Any small array: odd shapes (empty ones too), dtypes, NaN/inf and out-of-range values."""
    empty_images = st.sampled_from([(2, 0, 3, 3), (2, 1, 0, 3), (0, 1, 3, 3)])
    s = draw(shape if shape is not None else empty_images | hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3))
    values = np.resize(np.asarray(draw(st.lists(ELEMENTS, min_size=1, max_size=6)), dtype=np.float64), s)
    dtype = draw(st.one_of(st.just(np.float32), KINDS))
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(str).astype(dtype) if np.dtype(dtype).kind == "U" else values.astype(dtype)


def valid_arrays(n: int = 2) -> dict[str, np.ndarray]:
    g = np.random.default_rng(n)
    return {"images": g.random((n, 1, 3, 3), dtype=np.float32), "variance": g.random((n, 1, 3, 3), dtype=np.float32) / 10,
            "nfe": np.float64(5), "seconds": np.float64(0.5), "config": np.asarray(json.dumps({"sampler": "ddim"}))}


BAD_ARRAY = {
    "images": st.one_of(random_array(), st.none()), "variance": random_array(),
    "nfe": st.one_of(random_array(st.sampled_from([(), (2,)])), st.none()),
    "seconds": st.one_of(random_array(st.sampled_from([(), (2,)])), st.none()),
    "config": st.one_of(st.sampled_from(["{not json", "[1]", "3", ""]).map(np.asarray), random_array(), st.none()),
}


@settings(FUZZ, max_examples=80)
@given(broken=broken_names(BAD_ARRAY), data=st.data())
def test_load_samples_from_random_arrays(broken: set[str], data: st.DataObject) -> None:
    arrays: dict[str, Any] = valid_arrays()
    for key in broken:
        arrays[key] = data.draw(BAD_ARRAY[key], label=key)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.npz"
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        loaded = expect_clear(lambda: load_samples(path), broken)
    if not isinstance(loaded, Exception):
        assert loaded.images.ndim == 4 and torch.isfinite(loaded.images).all()
        assert -1e-6 <= loaded.images.min() and loaded.images.max() <= 1 + 1e-6


def _tensor(a: np.ndarray | None) -> Any:
    return a if a is None or a.dtype.kind == "U" else torch.from_numpy(np.ascontiguousarray(a))


BAD_VALUE = {
    "images": random_array(), "variance": random_array(),
    "nfe": st.one_of(JUNK, st.floats(-5, 0), st.complex_numbers(max_magnitude=3)), "seconds": st.one_of(JUNK, st.floats(-5, -0.01)),
    "config": st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2), st.just({"f": object()})),
}


@settings(FUZZ, max_examples=60)
@given(broken=broken_names(BAD_VALUE), data=st.data())
def test_save_samples_from_random_values(broken: set[str], data: st.DataObject) -> None:
    good = valid_arrays()
    values: dict[str, Any] = {"images": _tensor(good["images"]), "variance": _tensor(good["variance"]), "nfe": 5.0,
                              "seconds": 0.5, "config": {"sampler": "ddim"}}
    for key in broken:
        drawn = data.draw(BAD_VALUE[key], label=key)
        values[key] = _tensor(drawn) if key in ("images", "variance") else drawn
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.npz"
        done = expect_clear(lambda: save_samples(path, SampleSet(**values)), broken)
        if isinstance(done, Exception):
            assert not list(Path(d).iterdir()), "a refused samples set left a file behind"
        else:
            assert load_samples(path).images.shape == tuple(values["images"].shape)


# ------------------------------------------------------------------------------ data modules
@settings(FUZZ, max_examples=30)
@given(case=args_with_bad(
    valid={"batch_size": st.integers(1, 300), "num_workers": st.just(0), "val_fraction": st.floats(0.05, 0.95),
           "seed": st.integers(-(2**63), 2**64 - 1)},
    bad={"batch_size": st.one_of(JUNK, st.integers(-2, 0)), "num_workers": st.one_of(JUNK, st.integers(-3, -1)),
         "val_fraction": st.one_of(JUNK, st.floats(-1, 0), st.floats(1, 2)),
         "seed": st.one_of(st.integers(2**64, 2**80), st.integers(-(2**80), -(2**63) - 1), st.sampled_from([1.5, "0", None, True]))},
))
@example(case=({"seed"}, {"batch_size": 8, "num_workers": 0, "val_fraction": 0.1, "seed": 2**64}))  # once an overflow in setup()
def test_digits_arguments(case: tuple[set[str], dict]) -> None:
    broken, a = case
    dm = expect_clear(lambda: DigitsDataModule(**a), broken)
    if isinstance(dm, DigitsDataModule):
        dm.setup()
        x = next(iter(dm.train_dataloader()))
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
PNG_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "I;16"}


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG declaring width x height grey pixels whose pixel data is empty."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


GOOD_FILE = st.tuples(st.just("image"), st.sampled_from(MODES), st.integers(1, 40), st.integers(1, 40),
                      st.sampled_from(["random", "nan", "inf", "zeros"]))
BAD_FILE = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("header"), *[st.sampled_from([1, 7, 20000, 2**31 - 1])] * 2),  # 20000 x 20000: a decompression bomb
    st.tuples(st.just("truncated"), st.integers(8, 30)),
)


def _write_file(path: Path, spec: tuple, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    if spec[0] == "bytes":
        path.with_suffix(".png").write_bytes(spec[1])
    elif spec[0] == "header":
        path.with_suffix(".png").write_bytes(_png_header_only(spec[1], spec[2]))
    elif spec[0] == "truncated":
        full = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (spec[1], spec[1], 3), dtype=np.uint8)).save(full, "PNG")
        path.with_suffix(".png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    else:
        _, mode, w, h, fill = spec
        if mode == "F":  # float pixels, NaN/inf included
            a = rng.normal(size=(h, w)).astype(np.float32) * 1e3
            a.flat[0] = {"nan": np.nan, "inf": np.inf}.get(fill, a.flat[0])
            img = Image.fromarray(a)
        else:
            img = Image.new(mode, (w, h))
            if fill == "random":
                img = Image.frombytes(mode, (w, h), rng.bytes(len(img.tobytes())))
        path = path.with_suffix(".png" if mode in PNG_MODES else ".tif")
        img.save(path)
    return path


@settings(FUZZ, max_examples=40)
@given(good=st.lists(GOOD_FILE, min_size=2, max_size=3), bad_files=st.lists(BAD_FILE, max_size=1),
       case=args_with_bad(valid={"image_size": st.integers(4, 12), "channels": st.sampled_from([1, 3])},
                          bad={"image_size": st.one_of(JUNK, st.integers(-2, 3)), "channels": JUNK}))
def test_image_folder_with_bad_files(good: list[tuple], bad_files: list[tuple], case: tuple[set[str], dict]) -> None:
    broken, a = case
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "cls"
        folder.mkdir()
        for i, spec in enumerate(good):
            _write_file(folder / f"good{i}", spec, i)
        broken |= {_write_file(folder / f"bad{i}", spec, i).name for i, spec in enumerate(bad_files)}
        dm = expect_clear(lambda: ImageFolderDataModule(d, a["image_size"], a["channels"], batch_size=2, val_fraction=0.2), broken)
        if isinstance(dm, Exception):
            return

        def load_all() -> list[torch.Tensor]:
            dm.setup()
            return [ds[i] for ds in (dm.train_dataset, dm.val_dataset) for i in range(len(ds))]

        items = expect_clear(load_all, broken)
        if not isinstance(items, Exception):
            for x in items:
                assert x.shape == (a["channels"], a["image_size"], a["image_size"]) and x.dtype == torch.float32
                assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def _idx(shape: tuple[int, ...], type_code: int, data: bytes) -> bytes:
    """An idx file (MNIST's format): magic (type code, ndim), big-endian sizes, then the data."""
    return struct.pack(">I", type_code * 256 + len(shape)) + struct.pack(f">{len(shape)}I", *shape) + data


@settings(FUZZ, max_examples=30)
@given(case=args_with_bad(
    valid={"image_shape": st.integers(2, 6).map(lambda n: (n, 28, 28)), "image_type": st.just(0x08), "labels": st.just(None),
           "extra_bytes": st.just(0), "image_size": st.one_of(st.none(), st.sampled_from([4, 8]))},
    bad={"image_shape": st.lists(st.integers(0, 30), max_size=4).map(tuple), "image_type": st.sampled_from([0x09, 0x0D, 0x02]),
         "labels": st.integers(0, 8), "extra_bytes": st.sampled_from([-4, -1, 1, 4])},
))
def test_mnist_with_bad_files(monkeypatch: pytest.MonkeyPatch, case: tuple[set[str], dict]) -> None:
    broken, a = case
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", lambda *args, **kw: pytest.fail("download"))
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        shape = a["image_shape"]
        n_bytes = int(np.prod(shape, dtype=np.int64)) * {0x08: 1, 0x09: 1, 0x0D: 4, 0x02: 1}[a["image_type"]] + a["extra_bytes"]
        (raw / "train-images-idx3-ubyte").write_bytes(_idx(shape, a["image_type"], os.urandom(max(0, n_bytes))))
        labels = a["labels"] if a["labels"] is not None else (shape[0] if shape else 0)
        (raw / "train-labels-idx1-ubyte").write_bytes(_idx((labels,), 0x08, bytes(labels)))
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (raw / name).write_bytes(b"")
        dm = MNISTDataModule(root=d, download=False, image_size=a["image_size"], batch_size=2, val_fraction=0.5)

        def load_all() -> list[torch.Tensor]:
            dm.setup()
            return [ds[i] for ds in (dm.train_dataset, dm.val_dataset) for i in range(len(ds))]

        items = expect_clear(load_all, {"mnist"} if broken else set())  # every error names the MNIST folder
        if not isinstance(items, Exception):
            side = a["image_size"] or 28
            for x in items:
                assert x.shape == (1, side, side) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
