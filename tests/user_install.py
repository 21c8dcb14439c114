"""A user's install of the built wheels, for tests/test_wheel_install.py.

1. ``scripts/build_dists`` builds every wheel into a temporary folder.
2. A fresh virtualenv in a temporary folder outside the checkout.
3. torch: the machine's pinned torch (the one this test runs with), made visible to the new
   virtualenv through a folder of symlinks to torch and its dependency closure and a ``.pth`` line,
   as a user who installed torch first has it. Installing the CUDA build again would copy several
   GB each run; pip sees these distributions as installed and does not fetch them.
4. ``pip install --no-index --find-links DIST --find-links WHEELHOUSE 'hertz-agents[...]'``: the
   rest, offline. The wheelhouse (``~/.cache/hertz-agents/wheelhouse``, or
   ``$HERTZ_AGENTS_WHEELHOUSE``) persists between runs on a machine; when a wheel is missing (a
   new machine, a changed dependency), it is filled once from the package registry with the exact
   versions pip resolves (``pip install --dry-run --report``), then the offline install runs.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
EXTRAS = "hertz-agents[pipecat,livekit,server]"
OUR_DISTRIBUTIONS = {"hertz-agents", "hertz-agents-small", "pipecat-hertz", "livekit-plugins-hertz"}


def wheelhouse() -> Path:
    default = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "hertz-agents"
        / "wheelhouse"
    )
    return Path(os.environ.get("HERTZ_AGENTS_WHEELHOUSE") or default)


@dataclass
class UserInstall:
    """The installed virtualenv and how to run things in it like a user."""

    venv: Path
    workdir: Path
    env: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @cached_property
    def site_packages(self) -> Path:
        return Path(
            self.python("import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        )

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a command of the virtualenv from the work folder; a failure shows its output."""
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def python(self, code: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(["python", "-c", code], timeout=timeout)


def install_like_a_user(root: Path) -> UserInstall:
    """Build the wheels and install them in a fresh virtualenv under ``root`` (module doc)."""
    dist = root / "dist"
    _check(
        [
            "bash",
            str(REPO / "scripts" / "build_dists"),
            "--outdir",
            str(dist),
            "--python",
            sys.executable,
        ]
    )
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    venv_python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    torch_dir = root / "machine-torch"
    _link_distributions(["torch"], torch_dir)
    Path(purelib, "machine_torch.pth").write_text(f"{torch_dir}\n")
    house = wheelhouse()
    house.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv_python)]
    offline = [
        *pip,
        "install",
        "-q",
        "--no-compile",
        "--no-index",
        "--find-links",
        str(dist),
        "--find-links",
        str(house),
        EXTRAS,
    ]
    env = {**os.environ, "PIP_FIND_LINKS": ""}
    if subprocess.run(offline, env=env, capture_output=True, text=True).returncode != 0:
        _fill_wheelhouse(pip, dist, house, root / "report.json", env)
        _check(offline, env=env)
    workdir = root / "work"
    workdir.mkdir()
    user_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "HERTZ_AGENTS_CKPT", "VIRTUAL_ENV")
        and not k.startswith("PYTEST")
    }
    user_env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",  # no network at run time
            "XDG_CACHE_HOME": str(root / "cache"),  # no model folder of this machine's user
            "HOME": str(root / "home"),
        }
    )
    return UserInstall(venv=venv, workdir=workdir, env=user_env)


def _fill_wheelhouse(
    pip: list[str], dist: Path, house: Path, report: Path, env: dict[str, str]
) -> None:
    """Fetch, from the package registry, exactly the wheels the offline install lacks."""
    _check(
        [
            *pip,
            "install",
            "-q",
            "--dry-run",
            "--report",
            str(report),
            "--find-links",
            str(dist),
            EXTRAS,
        ],
        env=env,
    )
    wanted = []
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonicalize_name(name) not in OUR_DISTRIBUTIONS:
            wanted.append(f"{name}=={version}")
    # `pip wheel` keeps wheels as they are and builds one for a package published only as an sdist.
    _check(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(house), *wanted],
        env=env,
    )


def _link_distributions(names: list[str], target: Path) -> None:
    """Symlink the installed distributions ``names`` and their dependency closure into ``target``.

    Requirements are followed with their extras (torch needs ``cuda-toolkit[cublas,cufft,...]``).
    """
    target.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        dist = metadata.distribution(name)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, "")] + [
                    (requirement.name, e) for e in requirement.extras
                ]
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top == "__pycache__" or top.endswith(".pth"):
                continue
            link = target / top
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(top))))


def _check(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise AssertionError(
            f"{command[:6]}... exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
