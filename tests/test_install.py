"""The package as a user installs it: the README's install commands, run in fresh virtual
environments, install it from a clone and as a wheel built by `python -m build`; the
wheel runs the demo, and the commands the demo prints run as printed.

The fresh environments see the test environment's packages (torch, Lightning, …) through a
path file, and pip runs offline (``PIP_NO_INDEX``) without build isolation, taking
setuptools from there too; that is the only change to the README's commands.
fisher-monitor itself comes only from what the commands install (the repository is not
on the path).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Stands for the clone in the README's commands.
CLONE = "/path/to/fisher-monitor"


def readme_install_commands() -> list[str]:
    """The command lines of the README's Install block (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def clone(tmp_path: Path) -> Path:
    """A copy of the repository as a clone has it (no build outputs, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    target = tmp_path / "clone"
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.split("\0")):
            if (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    else:  # not a git checkout: the packaged parts
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
        shutil.copytree(
            ROOT / "fisher_monitor",
            target / "fisher_monitor",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return target


def fresh_venv(path: Path) -> Path:
    """A virtual environment without fisher-monitor that sees this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # a plain path line: the directory joins sys.path, its own .pth files (an editable
    # install of the repository) are not run
    Path(site, "_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_environment(venv: Path | None = None) -> dict[str, str]:
    """The environment without the repository on the path; ``venv`` activated, pip offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(MPLBACKEND="Agg", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PIP_NO_BUILD_ISOLATION"] = "0"  # pip's spelling of --no-build-isolation
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def run_readme_command(line: str, source: Path, venv: Path, cwd: Path) -> str:
    """Run one README install line in ``venv`` (activated) with the clone at ``source``."""
    line = line.replace(CLONE, str(source))
    if line.startswith("python -m build"):
        if importlib.util.find_spec("build") is None:  # not installed here: pip's own build
            target = line.split()[-1]
            line = f"python -m pip wheel --no-deps -w {target}/dist {target}"
        else:
            line = line.replace("python -m build", "python -m build --no-isolation")
    result = subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env=clean_environment(venv),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{line}\n{output[-4000:]}"
    return output


def installed_from(python: Path, cwd: Path) -> Path:
    """Where ``python`` imports fisher_monitor from."""
    where = subprocess.run(
        [str(python), "-c", "import fisher_monitor; print(fisher_monitor.__file__)"],
        cwd=cwd,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(where.stdout.strip())


def printed_commands(output: str) -> dict[str, str]:
    """The commands the demo printed after "open it with:" and "rebuild it:"."""
    found = {}
    for label, name in (("open it with:", "tensorboard"), ("rebuild it:", "report")):
        match = re.search(rf"{label}\s+(.+?)(?:\s{{3}}\(or: make \w+\))?$", output, re.M)
        assert match, f"the demo printed no {name} command:\n{output}"
        found[name] = match[1].strip()
    return found


def serve(command: str, cwd: Path, env: dict[str, str], timeout: float = 90.0) -> str:
    """Start ``command`` (a TensorBoard as printed), wait for its front page; its URL."""
    process = subprocess.Popen(
        shlex.split(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            match = re.search(r"(http://[^\s]+:\d+/)", line)
            if match:
                url = match[1].replace("localhost", "127.0.0.1")
                with urllib.request.urlopen(url + "data/runs", timeout=30) as response:
                    return response.read().decode()
        pytest.fail(f"`{command}` served nothing:\n{''.join(lines)[-3000:]}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_readme_install_from_a_clone_and_as_a_wheel_then_the_demo(tmp_path):
    commands = readme_install_commands()
    assert [c.split()[:4] for c in commands] == [
        ["python", "-m", "pip", "install"],
        ["python", "-m", "build", "--wheel"],
        ["python", "-m", "pip", "install"],
    ]
    source = clone(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    # from the clone
    from_clone = tmp_path / "from-clone"
    python = fresh_venv(from_clone)
    output = run_readme_command(commands[0], source, from_clone, work)
    assert "deprecated" not in output.lower(), output[-4000:]  # no project.license warnings
    assert installed_from(python, work).is_relative_to(from_clone)
    version = subprocess.run(
        [str(from_clone / "bin" / "fisher-monitor"), "--version"],
        env=clean_environment(),
        capture_output=True,
        text=True,
    )
    assert version.returncode == 0 and version.stdout.startswith("fisher-monitor ")

    # as a wheel built by `python -m build`
    output = run_readme_command(commands[1], source, from_clone, work)
    assert "deprecated" not in output.lower(), output[-4000:]
    (wheel,) = (source / "dist").glob("fisher_monitor-*.whl")
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    run_readme_command(commands[2], source, venv, work)
    assert installed_from(python, work).is_relative_to(venv)  # the wheel, not the clone

    # the demo, and the commands it prints, as printed, in a shell that did not activate
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("output"))
    env = clean_environment()
    demo = subprocess.run(
        [str(python), "examples/quickstart.py", "--fast"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    printed = printed_commands(demo.stdout)
    # the new environment's own executables, by full path
    assert printed["tensorboard"].startswith(str(venv / "bin"))
    assert printed["report"].startswith(str(venv / "bin" / "fisher-monitor"))
    report_html = work / "runs" / "quickstart" / "version_0" / "report" / "report.html"
    report_html.unlink()
    report = subprocess.run(["bash", "-c", printed["report"]], cwd=work, env=env, text=True)
    assert report.returncode == 0
    assert report_html.is_file()
    assert "quickstart/version_0" in serve(printed["tensorboard"], work, env)
