"""The `kd` command (kd/cli.py) and what an installed kd needs: every command answers `--help`, configs are found by
path or by a shipped name, and the wheel holds every module, config and the console script. The wheel installed in
an environment of its own and run outside the clone is scripts/wheel_check.sh (part of the test command)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from kd.cli import COMMANDS, main
from kd.errors import KDError
from kd.paths import resolve_config, shipped_configs, shipped_configs_dir


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith(f"usage: kd {name}"), usage


def test_kd_lists_its_commands_and_refuses_an_unknown_one():
    listing = subprocess.run([sys.executable, "-m", "kd", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert listing.returncode == 0
    assert all(f"  {name} " in listing.stdout for name in COMMANDS)
    bad = subprocess.run([sys.executable, "-m", "kd", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: unknown command 'trian'; the commands are: {', '.join(COMMANDS)} (kd --help)"
    ]


def test_kd_says_its_version(capsys):
    from kd import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"kd {__version__}"


def test_the_scripts_in_a_clone_are_the_same_entry_points():
    for script, name in (("cache_teacher.py", "cache"), ("train_student.py", "train")):
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {script} "), out.stderr
        module = __import__(f"kd.{script[:-3]}", fromlist=["cli"])
        assert COMMANDS[name].module == module.__name__ and COMMANDS[name].function == "cli"


def test_a_config_is_a_path_or_a_shipped_name(tmp_path, monkeypatch):
    shipped = shipped_configs_dir() / "train_shakespeare.yaml"
    for value in ("train_shakespeare", "train_shakespeare.yaml", "configs/train_shakespeare.yaml"):
        monkeypatch.chdir(tmp_path)  # outside the clone: only the shipped copy can be meant
        assert resolve_config(value) == shipped
    assert resolve_config("accelerate/fsdp2") == shipped_configs_dir() / "accelerate" / "fsdp2.yaml"
    own = tmp_path / "train_shakespeare.yaml"  # a file of the user's own wins over a shipped name
    own.write_text("train: {}\n")
    assert resolve_config(str(own)) == own
    with pytest.raises(KDError, match=r"config file nope.yaml does not exist, and no config shipped .*train_pruned"):
        resolve_config("nope.yaml")


def test_kd_configs_lists_every_shipped_config(capsys):
    main(["configs"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    on_disk = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml"))
    assert listed == shipped_configs() == on_disk
    main(["configs", "accelerate/zero3"])
    assert capsys.readouterr().out.strip() == str(ROOT / "configs" / "accelerate" / "zero3.yaml")


def test_the_wheel_holds_every_module_config_and_the_command(tmp_path):
    """Built as pip builds it: every .py under kd/ and every shipped config (as kd/configs) is in it, and the `kd`
    console script. A package list kept by hand once shipped a wheel without kd.cache."""
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # a stale build/lib would put deleted modules into the wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' in-tree build folder (ignored by git)
    (wheel,) = tmp_path.glob("kd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "kd").rglob("*.py")}
    configs = {"kd/" + str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert sources and sources <= names, sorted(sources - names)
    assert configs and configs <= names, sorted(configs - names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "kd = kd.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(Path(n).parts[0] in ("tests", "bench", "scripts") for n in names)
