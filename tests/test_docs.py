"""The manual, the sample config and the bash completion agree with the programs (issue 12).

- the generated files (man pages, etc/lockd.conf, completion/lockctl.bash) are what
  ``make docs`` makes from man/manual.toml and the parsers now: none is stale;
- every option and subcommand that ``--help`` shows (the real commands' output) is in the
  page, and the pages render without warnings from groff;
- the keys of lockd.conf(5), of the sample and of docs/operating.md's table are exactly
  ``lockd.config.KEYS``, and the sample, uncommented, parses with ``lockd.config`` into the
  defaults;
- the completion works through bash's own ``complete`` machinery;
- ``make install-docs DESTDIR=...`` installs the pages, the completion and the sample.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lockd import config

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man"


def generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("manpages", REPO / "scripts" / "manpages.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain(roff: str) -> str:
    """A page's text with the roff escapes this project uses taken out."""
    return re.sub(r"\\f[BIR]", "", roff).replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def helped(*argv: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *argv, "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


def option_names(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def test_generated_files_are_current() -> None:
    for path, text in generator().generate().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run `make docs`"


def test_lockd_page_has_every_option() -> None:
    page = plain((MAN / "lockd.8").read_text())
    opts = option_names(helped("lockd.daemon").split("Exit codes")[0])
    assert {"--config", "--state-dir", "--socket", "--log-level"} <= opts
    assert not [o for o in opts if o not in page], opts


def test_lockctl_page_has_every_option_and_command() -> None:
    page = plain((MAN / "lockctl.1").read_text())
    top = helped("lockd.ctl.cli")
    commands = re.findall(r"^    (\S+)\s", top.split("positional arguments:")[1], re.M)
    assert {"status", "locks", "metrics", "verify", "dump"} <= set(commands)
    missing = [o for o in option_names(top.split("exit status:")[0]) if o not in page]
    for cmd in commands:
        assert f"\n{cmd}" in page.replace(".TP\n", "\n"), f"command {cmd} not in lockctl(1)"
        text = helped("lockd.ctl.cli", cmd)
        missing += [f"{cmd} {o}" for o in option_names(text.split("columns:")[0]) if o not in page]
    assert not missing, missing
    for code in range(8):  # every exit status
        assert f".TP\n\\fB{code}\\fR" in (MAN / "lockctl.1").read_text()


def test_pages_render_cleanly(tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    for page in ("lockd.8", "lockctl.1", "lockd.conf.5"):
        out = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0 and out.stderr == "", (page, out.stderr)


def test_config_keys_everywhere_are_exactly_keys() -> None:
    conf5 = (MAN / "lockd.conf.5").read_text()
    in_page = re.findall(r"^\.TP\n\\fB([\w\\-]+)\\fR \(default", conf5, re.M)
    assert sorted(k.replace("\\-", "-") for k in in_page) == sorted(config.KEYS)
    sample = (REPO / "etc" / "lockd.conf").read_text()
    assert sorted(re.findall(r"^#(\w+) = ", sample, re.M)) == sorted(config.KEYS)
    ops = (REPO / "docs" / "operating.md").read_text()
    table = ops.split("## Configuration", 1)[1].split("\n## ")[0]
    in_docs = re.findall(r"^\| `\[?(\w+)\]?` \|", table, re.M)
    assert sorted(in_docs) == sorted(config.KEYS), in_docs


def test_sample_config_parses_to_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    sample = (REPO / "etc" / "lockd.conf").read_text()
    assert config.read_file(_write(tmp_path / "as-shipped.conf", sample)) == {}
    uncommented = re.sub(r"^#(\w+ = )", r"\1", sample, flags=re.M)
    values = config.read_file(_write(tmp_path / "all.conf", uncommented))
    assert sorted(values) == sorted(config.KEYS)
    if os.geteuid() != 0:
        pytest.skip("the path defaults shown are root's")
    defaults = config.Config()
    # keys whose default is "none": the sample shows an example value instead
    examples = {key for key in values if getattr(defaults, key) in (None, {})}
    assert examples >= {"socket_group", "lockspaces"}
    for key, value in values.items():
        if key not in examples:
            assert value == getattr(defaults, key), key
    config.Config(**{k: v for k, v in values.items() if k != "socket_group"}).validate()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def complete(line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), through ``complete -p``."""
    script = (
        'source "$1"; words=($2); [[ $2 == *" " ]] && words+=("");'
        " spec=$(complete -p lockctl); fn=${spec#*-F }; fn=${fn%% *};"
        ' COMP_WORDS=("${words[@]}"); COMP_CWORD=$((${#words[@]} - 1)); COMP_LINE=$2;'
        ' COMP_POINT=${#2}; $fn lockctl "${words[-1]}" "${words[-2]}";'
        ' printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash",
         str(REPO / "completion" / "lockctl.bash"), line],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion(tmp_path: Path) -> None:
    assert complete("lockctl lo") == ["locks"]
    assert set(complete("lockctl ")) >= {"status", "locks", "verify", "metrics", "dump"}
    assert "--timeout" in complete("lockctl --t")
    assert complete("lockctl locks --lo") == ["--lockspace"]
    assert complete("lockctl acquire /x --fence ") == ["kill", "term", "none"]
    assert complete("lockctl locks -o res") == ["RESOURCE"]
    assert complete("lockctl locks -o RESOURCE,to") == ["RESOURCE,TOKEN"]
    assert complete("lockctl history --limit ") == []
    dump = complete("lockctl dump --")
    assert "--state-dir" in dump and "--socket" not in dump
    assert "--output" not in complete("lockctl status --")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somefile").touch()
    assert complete(f"lockctl dump --state-dir {tmp_path}/some") == [f"{tmp_path}/somedir"]
    assert f"{tmp_path}/somefile" in complete(f"lockctl acquire {tmp_path}/some")


def test_make_install_docs(tmp_path: Path) -> None:
    out = subprocess.run(
        ["make", "-s", "install-docs", f"DESTDIR={tmp_path}"], cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    installed = (
        "share/man/man8/lockd.8",
        "share/man/man1/lockctl.1",
        "share/man/man5/lockd.conf.5",
        "share/bash-completion/completions/lockctl",
    )
    for rel in installed:
        assert (tmp_path / "usr/local" / rel).is_file(), rel
    conf = tmp_path / "etc/lockd/lockd.conf"
    assert conf.read_text() == (REPO / "etc" / "lockd.conf").read_text()
    conf.write_text("# mine\n")  # an existing config is never overwritten
    subprocess.run(["make", "-s", "install-docs", f"DESTDIR={tmp_path}"], cwd=REPO, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    assert conf.read_text() == "# mine\n"
