"""pyproject.toml: the wheel installs into fresh virtual environments; with the base dependencies only
(no torch) `bat-tag` tags a file, and with the `train` extra's packages `python pretrain.py --help` runs
outside the checkout.

Offline and fast: the wheel is built without build isolation, and the fresh environments see the
already-installed dependency packages through a .pth file (a folder of links to exactly the packages
the declared requirements resolve to) instead of downloading and copying them. `pip check` in the
fresh environment proves the declared requirements are met by what it sees. The full-isolation
version (plain `pip install` into new venvs) is in the README's install section."""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")


def marker_holds(req: str) -> bool:
    from pip._vendor.packaging.requirements import Requirement

    r = Requirement(req)
    return r.marker is None or r.marker.evaluate({"extra": ""})


def closure(reqs) -> set[str]:
    """The installed distributions a list of requirements needs, dependencies included."""
    todo, seen = [r for r in reqs if marker_holds(r)], set()
    while todo:
        name = requirement_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        todo += [r for r in (md.distribution(name).requires or []) if marker_holds(r)]
    return seen


def link_packages(dists, folder: Path) -> None:
    """folder/<top-level entry> -> the installed files of these distributions (packages, .libs, dist-info)."""
    folder.mkdir(parents=True)
    for name in dists:
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (folder / top).exists() and (base / top).exists():
                (folder / top).symlink_to(base / top)


def fresh_venv(path: Path, packages: Path | None, wheel: Path) -> Path:
    """A venv without pip, seeing `packages` through a .pth file, with the wheel installed (no deps)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if packages is not None:
        Path(site, "deps.pth").write_text(str(packages) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # every declared requirement is there
    return python


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy: building in the checkout would leave build/ and *.egg-info there."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bat", src / "bat", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (whl,) = (tmp / "dist").glob("bat_audio-*.whl")
    return whl


def test_requirements_txt_and_pyproject_agree():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = {ln.replace(" ", "") for ln in lines if ln}
    base = {r.replace(" ", "") for r in PYPROJECT["dependencies"]}
    extras = PYPROJECT["optional-dependencies"]
    train, test = ({r.replace(" ", "") for r in extras[k]} for k in ("train", "test"))
    assert base | train | test == reqs  # the same pins and markers, nothing missing on either side
    assert "torch==2.13.0" in train and not any(requirement_name(r) == "torch" for r in base)
    assert PYPROJECT["name"] == "bat-audio" and PYPROJECT["scripts"]["bat-tag"] == "bat.tag:main"


def test_slow_e2e_bat_tag_from_the_wheel_with_base_dependencies_only(wheel, tagger_export, tmp_path):
    deps = closure(PYPROJECT["dependencies"])
    assert "torch" not in deps and {"numpy", "soundfile", "soxr"} <= deps
    link_packages(deps, tmp_path / "base_packages")
    python = fresh_venv(tmp_path / "venv", tmp_path / "base_packages", wheel)
    model = tagger_export[0] / "model.onnx"  # test_tag.py's tagger of three classes (tone, noise, clicks)
    audio = tmp_path / "clip.wav"
    sf.write(audio, np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 0.1, 22050)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = clean_env()
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, cwd=away, env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    res = subprocess.run([str(python.parent / "bat-tag"), str(model), str(audio), "--top-k", "3"], capture_output=True,
                         text=True, cwd=away, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    labels = {x.rsplit(" ", 1)[0] for x in line.split(": ")[1].split(", ")}
    assert line.startswith(f"{audio}: ") and labels == {"tone", "noise", "clicks"}
    where = subprocess.run([str(python), "-c", "import bat.tag, bat.shards; print(bat.tag.__file__)"],
                           capture_output=True, text=True, cwd=away, env=env, check=True).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")  # the installed copy, not the checkout
    usage = subprocess.run([str(python.parent / "bat-tag"), "--help"], capture_output=True, text=True, cwd=away, env=env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: bat-tag "), usage.stdout[:200]
    # the torch-free tools end on bad input with one error line, as the scripts do (no tqdm, no torch here)
    for argv in ([str(python.parent / "bat-tag"), str(model), str(away / "missing.wav")],
                 [str(python), "-m", "bat.audioset", str(away / "AudioSet"), str(away / "manifests")],
                 [str(python), "-m", "bat.shards", str(away / "nothing"), str(away / "shards")]):
        bad = subprocess.run(argv, capture_output=True, text=True, cwd=away, env=env, timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and "Traceback" not in bad.stderr and lines[-1].startswith(("error: ", str(away))), \
            (argv, bad.stderr[-2000:])
    hint = subprocess.run([str(python), "-c", "import bat; bat.spectrogram"], capture_output=True, text=True, cwd=away,
                          env=env)  # a torch module of the package: the error says what installs it
    assert hint.returncode != 0 and "pip install 'bat-audio[train]'" in hint.stderr.strip().splitlines()[-1], hint.stderr


def test_slow_e2e_pretrain_help_outside_the_checkout_with_the_train_extra(wheel, tmp_path):
    extra = PYPROJECT["optional-dependencies"]["train"]
    deps = closure(PYPROJECT["dependencies"] + extra)
    assert {"torch", "tyro", "safetensors"} <= deps
    link_packages(deps, tmp_path / "train_packages")
    python = fresh_venv(tmp_path / "venv", tmp_path / "train_packages", wheel)
    away = tmp_path / "project"
    away.mkdir()
    shutil.copy(ROOT / "pretrain.py", away / "pretrain.py")  # the script is a file users copy
    res = subprocess.run([str(python), "pretrain.py", "--help"], capture_output=True, text=True, cwd=away,
                         env=clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--data" in res.stdout and "--model" in res.stdout
    where = subprocess.run([str(python), "-c", "import bat.pretraining; print(bat.pretraining.__file__)"],
                           capture_output=True, text=True, cwd=away, env=clean_env(), check=True).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")


def test_import_bat_does_not_import_torch(tmp_path):
    code = "import sys, bat, bat.audio, bat.shards, bat.tag; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**clean_env(), "PYTHONPATH": str(ROOT)}, check=True)
    assert res.stdout.strip() == "False"


