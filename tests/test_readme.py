"""Every command shown in README.md runs (in a small mode) on this machine.

Commands are read from the README's ``bash`` blocks and inline code spans. Each is
run for real in a subprocess, rewritten only where it must be: placeholders (and
the notebook runner's default checkpoint) get the session's tiny checkpoint and
temp paths, training runs stop after 2 steps,
sample counts shrink, and commands that need a GPU, a cluster launcher or a dataset
download are type-checked with ``--print_config`` instead. The install-and-test
quickstart command is what CI itself runs, so it is not repeated here.

The text checks: a newcomer finds what bdiff is, its picture and both quickstart commands on the
first screen, and every link (files, BENCHMARKS.md section anchors) resolves.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()
INSTALL_AND_TRAIN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python train.py"
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'
FIRST_SCREEN = 40  # lines


def readme_commands() -> list[str]:
    """Shell commands in ```bash blocks (continuations joined, comments dropped) and inline `python ...` and
    `bdiff-... ...` (console command) spans."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    commands += re.findall(r"(?<!`)`((?:python|bdiff-(?:train|sample|evaluate|critic)) [^`]+)`", README)
    out = []
    for cmd in commands:
        cmd = cmd.split("&&")[-1].strip()  # quickstart chains: the last part is the command itself
        cmd = re.sub(r"^\.venv/bin/python", "python", cmd)
        if "pytest" not in cmd and cmd not in out:
            out.append(cmd)
    return out


CRITIC = "runs/critic/digits/checkpoints/last.ckpt"
NEEDS_HARDWARE_OR_NETWORK = ("--trainer.accelerator gpu", "torchrun", "srun", "configs/mnist.yaml", "configs/cifar10.yaml")


def rewrite(cmd: str, ckpt: Path, tmp: Path) -> list[str]:
    """The command as run here (see module docstring)."""
    cmd = cmd.replace("runs/bdiff/<run id>/checkpoints/last.ckpt", str(ckpt)).replace("<ckpt>", str(ckpt))
    cmd = cmd.replace("<config>", "configs/debug.yaml").replace("/path/to/images", str(tmp / "images"))
    cmd = cmd.replace("samples.npz", str(tmp / "samples.npz")).replace("/tmp/04.ipynb", str(tmp / "04.ipynb"))
    cmd = cmd.replace("data/photos", str(tmp / "photos_written"))  # the photos writer: a folder of its own
    args = shlex.split(cmd)
    if "bdiff.datasets.photos" in cmd:
        return [*args, "--crops-per-photo", "2"]
    if "train.py" in args or args[0] == "bdiff-train":  # bdiff-train: the console command of train.py
        args = ["python", *args[args.index("train.py") :]] if "train.py" in args else args
        if any(marker in cmd for marker in NEEDS_HARDWARE_OR_NETWORK) or "--print_config" in args:
            return [*args, "--print_config"] if "--print_config" not in args else args
        args += ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                 f"--trainer.default_root_dir={tmp / 'runs'}", f"--trainer.logger.init_args.save_dir={tmp / 'runs'}"]
        if "photos32" in cmd:
            from bdiff.datasets.photos import write_photos

            photos = tmp / "photos"
            if not photos.exists():
                write_photos(photos, crops_per_photo=4)
            args += [f"--data.init_args.root={photos}"]
        if "image_folder" in cmd or "photos32" in cmd:
            args += ["--trainer.callbacks=[]", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0"]
        return args
    if "bdiff.lit.critic_module" in cmd or args[0] == "bdiff-critic":  # small, every output in tmp (not runs/critic)
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp / "critic" / "checkpoints"), "save_last": True}}
        return [*args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp / 'runs'}",
                f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--data.cache_dir={tmp / 'fakes'}",
                f"--trainer.callbacks=[{json.dumps(checkpoint)}]"]
    args = [str(tmp / "critic" / "checkpoints" / "last.ckpt") if a == CRITIC else a for a in args]
    if "notebooks/execute.py" in cmd and "--ckpt" not in args:
        args += ["--ckpt", str(ckpt)]  # a fresh clone has no runs/ for the default to find
    if "bdiff.sample" in cmd or args[0] == "bdiff-sample":
        swap = {"--accelerator": "cpu", "--devices": "2", "--n": "16"}
        args = [swap.get(args[i - 1], a) if i and args[i - 1] in swap else a for i, a in enumerate(args)]
        if "--out" not in args:  # its default, samples.npz in the working directory, would land in the repository
            args += ["--out", str(tmp / "samples.npz")]
        i = args.index("--out") + 1
        args[i] = str(tmp / Path(args[i]).name)  # every output in tmp
    return args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("readme")
    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (tmp / "images" / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 36), tuple(c + 2 * i for c in colour)).save(tmp / "images" / cls / f"{i}.png")
    return tmp


COMMANDS = readme_commands()


def test_readme_shows_the_commands_we_expect() -> None:
    joined = "\n".join(COMMANDS)
    for needed in ("python train.py", "bdiff.sample", "--nfe", "bdiff.evaluate", "feature_module cache",
                   "notebooks/execute.py", "critic_module fit", "--critic", "--keep", "bdiff.recalibrate", "--model.epistemic_gp false"):
        assert needed in joined, needed


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command: str, last_ckpt: Path, workspace: Path) -> None:
    evaluates = "bdiff.evaluate" in command or command.startswith("bdiff-evaluate")
    if evaluates and not (workspace / "samples.npz").exists():
        subprocess.run([sys.executable, "-m", "bdiff.sample", "--ckpt", str(last_ckpt), "--sampler",
                        "configs/sampler/dpmpp.yaml", "--n", "16", "--out", str(workspace / "samples.npz")],
                       cwd=ROOT, check=True, capture_output=True)
    args = rewrite(command, last_ckpt, workspace)
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "BDIFF_CACHE": str(workspace / "cache"),
           "PYTHONPATH": str(ROOT)}
    if args[0].startswith("bdiff-"):  # a console command (pyproject [project.scripts]) of this environment
        args[0] = str(Path(sys.executable).parent / args[0])
    args = [sys.executable if args[0] == "python" else args[0], *args[1:]]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation other than ``-`` and
    ``_`` dropped, spaces to hyphens, ``-1``, ``-2`` ... on repeats. Lines inside code fences are not headings."""
    anchors: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_github_anchors_follow_githubs_rule() -> None:
    doc = "# Benchmarks\n## Sampler quality at 5, 10 and 20 NFE\n```bash\n# a comment\n```\n## Uncertainty: what `x` does\n## Benchmarks\n"
    assert github_anchors(doc) == {"benchmarks", "sampler-quality-at-5-10-and-20-nfe", "uncertainty-what-x-does", "benchmarks-1"}


def test_first_screen_has_what_bdiff_is_its_picture_and_the_quickstart() -> None:
    first = README.splitlines()[:FIRST_SCREEN]
    assert first[0].startswith("# bdiff")
    assert any("docs/images/digits_samples.png" in line for line in first), "the samples picture"
    assert INSTALL_AND_TRAIN in first, f"the install-and-train command within the first {FIRST_SCREEN} lines"
    block = "\n".join(first).split("<!-- test-command -->\n", 1)[-1].split("\n<!-- /test-command -->", 1)[0]
    assert block == f"```bash\n{TEST_COMMAND}\n```", "the CI test block (.ci/run runs it) within the first screen"


def test_readme_links_resolve() -> None:
    """Every relative link in README.md, BENCHMARKS.md and docs/*.md names an existing file, and every
    BENCHMARKS.md#anchor an existing section (README and code docstrings cite those sections by title)."""
    anchors = github_anchors(BENCHMARKS)
    sources = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    linked_sections = 0
    for source in sources:
        for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            assert file.exists(), f"{source.name}: {target}"
            if anchor and file.name == "BENCHMARKS.md":
                assert anchor in anchors, f"{source.name}: {target} (BENCHMARKS.md has {sorted(anchors)})"
                linked_sections += 1
    assert linked_sections, "README links its claims to BENCHMARKS.md sections"


def test_every_measured_claim_links_to_its_benchmarks_section() -> None:
    section = README.split("## What it measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    assert 0 < len(rows) <= 10
    for row in rows:
        assert "](BENCHMARKS.md#" in row, row
