"""The Debian packaging (packaging/) agrees with the code: paths, config keys, dependencies,
manual pages, and what the maintainer scripts do on install, upgrade, remove and purge."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from agent import __version__
from agent import config as config_mod

TOP = Path(__file__).resolve().parents[2]
PKG = TOP / "packaging"
VENV = "/usr/lib/dynoagent/venv"
# The commands in /usr/bin and the module each launcher runs.
COMMANDS = {"dynoagent": "agent.cli.dynoagent", "dynoctl": "agent.cli.dynoctl",
            "dynocoord": "dynocoord.cli"}


def _installs() -> dict[str, str]:
    """build-deb's `install SRC "$STAGE/DEST"` lines: packaged path -> source in the tree."""
    found: dict[str, str] = {}
    text = (PKG / "build-deb").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip().startswith("install ") \
            else []
        if len(words) >= 3 and words[-1].startswith("$STAGE/"):
            found[words[-1].removeprefix("$STAGE")] = words[-2].replace("$PKG", "packaging")
    return found


def test_unit_execstart_is_the_packaged_launcher() -> None:
    installs = _installs()
    assert installs["/usr/lib/systemd/system/dynoagent.service"] == "systemd/dynoagent.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(TOP / "systemd" / "dynoagent.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert installs[argv[0]] == "packaging/bin/dynoagent"
    assert argv[1:] == ["serve", "--config", str(config_mod.DEFAULT_CONFIG_PATH)]
    assert installs[str(config_mod.DEFAULT_CONFIG_PATH)] == "packaging/agent.toml"
    assert installs["/usr/lib/sysusers.d/dynoagent.conf"] == "systemd/dynoagent.sysusers"
    assert installs["/usr/lib/tmpfiles.d/dynoagent.conf"] == "systemd/dynoagent.tmpfiles"
    conffiles = (PKG / "debian" / "conffiles").read_text().split()
    assert conffiles == [str(config_mod.DEFAULT_CONFIG_PATH)]


def test_every_entry_point_has_a_launcher() -> None:
    with (TOP / "pyproject.toml").open("rb") as f:
        assert set(tomllib.load(f)["project"]["scripts"]) == set(COMMANDS)


# dynoctl's launcher is a Python script (see test_dynoctl_launcher_starts_python_directly).
SHELL_LAUNCHED = sorted(set(COMMANDS) - {"dynoctl"})


@pytest.mark.parametrize("command", SHELL_LAUNCHED)
def test_launcher_runs_the_entry_point_in_the_venv(command: str) -> None:
    module = COMMANDS[command]
    assert _installs()[f"/usr/bin/{command}"] == f"packaging/bin/{command}"
    launcher = (PKG / "bin" / command).read_text()
    exec_line = next(line for line in launcher.splitlines() if line.startswith("exec "))
    # -I: no PYTHONPATH, user site or current directory in a root process.
    assert shlex.split(exec_line) == ["exec", f"{VENV}/bin/python3", "-I", "-m", module, "$@"]
    assert os.access(PKG / "bin" / command, os.X_OK)
    _assert_entry_point(command, module)
    source = (TOP / f"{module.replace('.', '/')}.py").read_text()
    assert 'if __name__ == "__main__":\n    sys.exit(main())' in source


def _assert_entry_point(command: str, module: str) -> None:
    """The launcher's module is the pyproject entry point's."""
    with (TOP / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts[command] == f"{module}:main"


def test_dynoctl_launcher_starts_python_directly(tmp_path: Path) -> None:
    """Debian's python3 (the venv's interpreter; lintian wants its own path), isolated (-I)
    and without the site module (-S), with the venv's site-packages on its path; run as a
    script, it runs the entry point's main."""
    assert _installs()["/usr/bin/dynoctl"] == "packaging/bin/dynoctl"
    launcher = PKG / "bin" / "dynoctl"
    assert os.access(launcher, os.X_OK)
    text = launcher.read_text()
    assert text.splitlines()[0] == "#!/usr/bin/python3 -IS"
    _assert_entry_point("dynoctl", "agent.cli.dynoctl")
    # Run by this interpreter as the package would run it, with VENV pointing at a venv
    # whose site-packages holds a stand-in `agent.cli.dynoctl` that reports what it sees.
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = tmp_path / "venv" / "lib" / version / "site-packages"
    (site / "agent" / "cli").mkdir(parents=True)
    (site / "agent" / "__init__.py").write_text("")
    (site / "agent" / "cli" / "__init__.py").write_text("")
    (site / "agent" / "cli" / "dynoctl.py").write_text(
        "import sys\n"
        "def main():\n"
        "    print(sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules, sys.argv[1:])\n"
        "    return 3\n")
    script = tmp_path / "dynoctl"
    script.write_text(text.replace(f'VENV = "{VENV}"', f'VENV = "{tmp_path / "venv"}"'))
    done = subprocess.run([sys.executable, "-IS", str(script), "ps", "--json"],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": "/nonexistent"})
    assert (done.returncode, done.stdout) == (3, "1 1 False ['ps', '--json']\n"), done.stderr


def _conffile_values() -> dict[str, object]:
    """The shipped agent.toml with every commented-out setting enabled."""
    lines = [line[1:] for line in (PKG / "agent.toml").read_text().splitlines()
             if re.match(r"#(\[|[a-z_]+ = )", line)]
    return tomllib.loads("\n".join(lines))


def test_conffile_sets_nothing() -> None:
    assert tomllib.loads((PKG / "agent.toml").read_text()) == {}


def test_conffile_documents_every_key_with_its_default() -> None:
    values = _conffile_values()
    assert set(values) == set(config_mod._PARSERS)
    parsed = config_mod.from_mapping(values)
    defaults = config_mod.Config()
    examples = {"coordinator_url", "coordinator_token_file", "coordinator_ca_file",
                "coordinator_client_cert_file", "coordinator_client_key_file",
                "overlay_address", "log_drains_ca_file"}
    for key in set(values) - examples - {"socket", "slug_roots", "sizes"}:
        assert getattr(parsed, key) == getattr(defaults, key), key
    assert parsed.socket_path == defaults.socket_path
    assert parsed.effective_slug_roots == defaults.effective_slug_roots
    assert parsed.sizes == defaults.sizes  # the example table restates a default size
    for key in examples:
        assert getattr(defaults, key) is None, key


def test_requirements_pin_every_dependency() -> None:
    pins: dict[str, str] = {}
    for line in (PKG / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    with (TOP / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert project["version"] == __version__
    for dependency in project["dependencies"]:
        req = Requirement(dependency)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not in packaging/requirements.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is not {req}"


def _mkman() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkman", PKG / "mkman.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_man_escape() -> None:
    escape = _mkman().escape
    assert escape(".hidden") == "\\&.hidden"
    assert escape("a\\b --x") == "a\\eb \\-\\-x"
    assert escape("≈ 5") == "\\[u2248] 5"


def test_every_command_has_a_man_page() -> None:
    build = (PKG / "build-deb").read_text()
    for command in COMMANDS:
        section = _mkman().PAGES[command]["section"]
        assert f'mkman.py" {command} "$version" > "$work/man/{command}.{section}"' in build
        assert re.search(rf"^for page in .*\b{command}\.{section}\b", build, re.M), command


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man (man-db)")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_man_page_renders_without_warnings(command: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    page = tmp_path / f"{command}.1"
    page.write_text(_mkman().page(command, __version__))
    # As lintian renders it: groff warnings (a line too long for 80 columns...) fail.
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANROFFSEQ": ""}
    result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                             str(page)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env,
                          timeout=60).stdout
    assert "COMMANDS" in text and f"{command} " in text
    if command == "dynoagent":
        assert "dynoagent serve" in text and "dynoagent stack build" in text
    if command == "dynocoord":
        # serve's own options (dynocoord.server's parser), not the client's placeholder
        assert "usage: dynocoord serve [-h] --etcd" in text and "dynocoord ps:scale" in text


# -- maintainer scripts, run with every command they call replaced by a recording stub ------

STUBS = ("getent", "systemd-sysusers", "groupadd", "systemd-tmpfiles", "deb-systemd-helper",
         "deb-systemd-invoke", "systemctl")


def _run_script(name: str, args: list[str], tmp_path: Path, *, getent_status: int = 0,
                helper_was_enabled: bool = True) -> list[str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    for stub in STUBS:
        status = 0
        if stub == "getent":
            status = getent_status
        body = f'echo "{stub} $*" >> {log}\n'
        if stub == "deb-systemd-helper":
            enabled = 0 if helper_was_enabled else 1
            body += f'[ "$1 $2" = "--quiet was-enabled" ] && exit {enabled}\n'
        (stubs / stub).write_text(f"#!/bin/sh\n{body}exit {status}\n")
        (stubs / stub).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "DPKG_ROOT": str(tmp_path / "root")}
    result = subprocess.run(["sh", str(PKG / "debian" / name), *args], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines() if log.exists() else []


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def test_postinst_first_install_creates_group_and_enables_without_starting(
        tmp_path: Path) -> None:
    calls = _run_script("postinst", ["configure", ""], tmp_path, getent_status=2)
    assert "systemd-sysusers /usr/lib/sysusers.d/dynoagent.conf" in calls
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/dynoagent.conf" in calls
    assert "deb-systemd-helper enable dynoagent.service" in calls
    assert not [c for c in calls if c.startswith("deb-systemd-invoke")
                or re.match(r"systemctl .*\b(start|restart)\b", c)]


def test_postinst_keeps_an_administrators_disable(tmp_path: Path) -> None:
    calls = _run_script("postinst", ["configure", "0.0.9"], tmp_path, helper_was_enabled=False)
    assert "deb-systemd-helper update-state dynoagent.service" in calls
    assert "deb-systemd-helper enable dynoagent.service" not in calls
    assert not [c for c in calls if c.startswith("systemd-sysusers")]  # the group exists


@pytest.mark.skipif(not _systemd_running(), reason="needs systemd as PID 1 (/run/systemd/system)")
def test_postinst_upgrade_restarts_only_a_running_agent(tmp_path: Path) -> None:
    calls = _run_script("postinst", ["configure", "0.0.9"], tmp_path)
    assert "deb-systemd-invoke try-restart dynoagent.service" in calls


def test_postinst_upgrade_without_systemd_touches_no_service(tmp_path: Path) -> None:
    if _systemd_running():
        pytest.skip("systemd runs here: the upgrade restarts the agent")
    calls = _run_script("postinst", ["configure", "0.0.9"], tmp_path)
    assert not [c for c in calls if c.startswith(("deb-systemd-invoke", "systemctl"))]


def test_prerm_stops_the_agent_on_remove_only() -> None:
    # The upgrade path must never stop the agent: dynos would go unsupervised for the whole
    # unpack (and debhelper-style stop/start is not what the unit's KillMode promises).
    text = (PKG / "debian" / "prerm").read_text()
    assert re.search(r'if \[ "\$1" = remove \] && \[ -d /run/systemd/system \]; then\n'
                     r"\s+deb-systemd-invoke stop dynoagent.service", text)
    assert text.count("deb-systemd-invoke") == 1


@pytest.mark.parametrize("records", [False, True])
def test_postrm_purge_keeps_state_only_while_dyno_records_remain(tmp_path: Path,
                                                                 records: bool) -> None:
    root = tmp_path / "root"
    (root / "etc" / "dynoagent").mkdir(parents=True)
    (root / "etc" / "dynoagent" / "token").write_text("secret")
    dynos = root / "var" / "lib" / "dynoagent" / "dynos"
    dynos.mkdir(parents=True)
    if records:
        (dynos / "d-1.json").write_text("{}")
    calls = _run_script("postrm", ["purge"], tmp_path)
    assert "deb-systemd-helper purge dynoagent.service" in calls
    assert not (root / "etc" / "dynoagent").exists()
    assert (root / "var" / "lib" / "dynoagent").exists() == records


def test_postrm_remove_keeps_config_and_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "dynoagent").mkdir(parents=True)
    (root / "var" / "lib" / "dynoagent").mkdir(parents=True)
    _run_script("postrm", ["remove"], tmp_path)
    assert (root / "etc" / "dynoagent").exists()
    assert (root / "var" / "lib" / "dynoagent").exists()
