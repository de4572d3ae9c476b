"""Safety on nodes without a kernel: empty inputs, removal limits, the state file,
failure reporting (logs, metrics, exit codes) and finding OS tools."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from svcrules.cli import app
from svcrules.cli import run as cli_run
from svcrules.compiler import prepare
from svcrules.errors import InputError, LockTimeout, RemovalRefused, StateError
from svcrules.inputs.config import Overrides
from svcrules.kernel.lock import exclusive
from svcrules.kernel.metrics import previous_failures
from svcrules.kernel.safety import Policy, check_removals
from svcrules.kernel.state import LEGACY_FILES, Meta, StateStore
from svcrules.kernel.tools import find_tool
from tests.k8s import dump, node_config, service

runner = CliRunner()


def meta(*ports: str) -> Meta:
    return Meta(ports={p: "d" for p in ports})


# Empty inputs


def test_empty_stdin_is_an_error_unless_allowed() -> None:
    flags = Overrides(node_name="n", node_ips=["192.0.2.1"])
    job = prepare(["-"], overrides=flags, stdin=io.StringIO(""), allow_empty=False)
    with pytest.raises(InputError) as exc:
        job.compile()
    assert "<stdin>: empty input" in str(exc.value) and "pipefail" in str(exc.value)
    ok = prepare(["-"], stdin=io.StringIO(dump([node_config()])), allow_empty=True)
    assert ok.compile().plan.families[0].ports == ()


def test_inputs_without_a_service_are_an_error(tmp_path: Path) -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    f = tmp_path / "only-deployment.yaml"
    f.write_text(dump([node_config(), deploy]))
    res = runner.invoke(app, ["compile", str(f)])
    assert res.exit_code == 2 and res.stdout == "" and "no Services" in res.stderr
    res = runner.invoke(app, ["compile", str(f), "--allow-empty"])
    assert res.exit_code == 0 and "table ip svcrules" in res.stdout


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    res = runner.invoke(
        app, ["compile", str(tmp_path / "inputs"), "--node-name", "n", "--node-ip", "192.0.2.1"]
    )
    assert res.exit_code == 2 and "no input files found" in res.stderr


# Removal limits


def test_removal_limits() -> None:
    old = meta("a", "b", "c", "d")
    check_removals(old, meta("a", "b", "c"), Policy())  # 25 %
    check_removals(old, meta("a", "b"), Policy())  # 50 % is not more than 50 %
    with pytest.raises(RemovalRefused, match=r"3 of 4 .*75 %"):
        check_removals(old, meta("a"), Policy())
    check_removals(old, meta("a"), Policy(max_removals=80))
    with pytest.raises(RemovalRefused, match="all 4"):
        check_removals(old, meta(), Policy(max_removals=100))
    check_removals(old, meta(), Policy(allow_empty=True))
    check_removals(old, meta(), Policy(force=True))
    check_removals(Meta(), meta(), Policy())  # nothing known to remove (first run)


# The state file


def test_state_round_trip_and_counters_apart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    m = meta("a")
    m.table, m.fingerprint, m.failures, m.last_success = "svcrules", "f" * 32, 3, 12.5
    store.save("script\nwith lines\n", m)
    script, back = store.load()
    assert script == "script\nwith lines\n" and back.ports == {"a": "d"}
    assert (back.failures, back.last_success, back.table) == (3, 12.5, "svcrules")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counters.json", "details", "state"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b.replace(b"script", b"scrypt"),  # edited
        lambda b: b"",  # empty
        lambda b: b"\xff\xfe garbage",
    ],
)
def test_damaged_state_is_ignored_with_a_reason(tmp_path: Path, damage: object) -> None:
    store = StateStore(tmp_path)
    store.save("script\n", meta("a"))
    path = tmp_path / "state"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    script, back = store.load()
    assert script is None and back.ports == {} and store.damaged


def test_state_of_the_wrong_shape_is_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("x\n", meta("a"))
    import hashlib

    body = b'{"ports": [1, 2], "udp": 7}\nx\n'
    head = f"svcrules-state 2 {hashlib.sha256(body).hexdigest()}\n".encode()
    (tmp_path / "state").write_bytes(head + body)
    assert store.load()[0] is None and "damaged" in store.damaged


def test_legacy_state_names_the_table_but_forces_a_full_replacement(tmp_path: Path) -> None:
    (tmp_path / "last.json").write_text(
        json.dumps({"version": 1, "table": "old", "backend": "iptables", "failures": 4})
    )
    (tmp_path / "last.iptables").write_text("*nat\nCOMMIT\n")
    store = StateStore(tmp_path)
    script, m = store.load()
    assert script is None and (m.table, m.backend, m.failures) == ("old", "iptables", 4)
    store.save("new\n", meta("a"))
    assert not any((tmp_path / n).exists() for n in LEGACY_FILES)


def test_state_dir_problems_are_one_line_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(StateError, match="not a directory"):
        StateStore(a_file).check_dir()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StateError, match="dangling"):
        StateStore(dangling).check_dir()
    d = tmp_path / "d"
    (d / "state").mkdir(parents=True)
    with pytest.raises(StateError, match="is a directory"):
        StateStore(d).check_dir()


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StateError, match="disk full"):
        store.save("x\n", meta("a"))
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead, young = tmp_path / ".state.12345.tmp", tmp_path / ".counters.json.12346.tmp"
    dead.write_text("half")
    young.write_text("being written by a run without the lock")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    StateStore(tmp_path).save("x\n", meta("a"))
    assert not dead.exists() and young.exists()


def test_kill_during_save_keeps_old_or_new_state(tmp_path: Path) -> None:
    """SIGKILL at random moments of many saves: every load gives one whole state."""
    code = (
        "import sys\n"
        "from svcrules.kernel.state import Meta, StateStore\n"
        "s = StateStore(sys.argv[1])\n"
        "for i in range(10**6):\n"
        "    s.save(f'script {i}\\n' * 20000, Meta(fingerprint=str(i), ports={str(i): 'd'}))\n"
    )
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        store = StateStore(tmp_path)
        script, m = store.load()
        if script is None:
            assert not store.damaged, store.damaged
            continue
        assert script == f"script {m.fingerprint}\n" * 20000 and m.ports == {m.fingerprint: "d"}


# Locks


def test_lock_timeout_is_an_error(tmp_path: Path) -> None:
    with (
        exclusive(tmp_path / "lock"),
        pytest.raises(LockTimeout, match="gave up"),
        exclusive(tmp_path / "lock", True, 0.2),
    ):
        pass


# Failure reporting


def _inputs(tmp_path: Path) -> Path:
    f = tmp_path / "in.yaml"
    f.write_text(dump([node_config(), service("web", "203.0.113.10")]))
    return f


@pytest.fixture
def as_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the kernel commands past the capability check (their failures come later)."""
    monkeypatch.setattr(cli_run, "net_admin_problem", lambda: None)


def test_missing_input_fails_visibly_in_json_logs_and_metrics(
    tmp_path: Path, as_admin: None
) -> None:
    prom = tmp_path / "m.prom"
    args = ["sync", str(tmp_path / "missing.yaml"), "--state-dir", str(tmp_path / "st")]
    args += ["--log-format", "json", "--metrics-file", str(prom)]
    for n in (1, 2):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and res.stdout == ""
        lines = [json.loads(ln) for ln in res.stderr.splitlines()]
        assert lines and all(ln["level"] == "error" and ln["event"] == "failed" for ln in lines)
        assert "missing.yaml: cannot read" in lines[0]["msg"]
        text = prom.read_text()
        assert 'svcrules_last_sync_success{table="svcrules"} 0' in text
        assert f'svcrules_sync_failures_total{{table="svcrules"}} {n}' in text


def test_state_dir_that_is_a_file_is_counted_in_the_metrics_file(
    tmp_path: Path, as_admin: None
) -> None:
    st = tmp_path / "st"
    st.write_text("")
    prom = tmp_path / "m.prom"
    for n in (1, 2):
        args = ["sync", str(_inputs(tmp_path)), "--state-dir", str(st)]
        res = runner.invoke(app, [*args, "--metrics-file", str(prom)])
        assert res.exit_code == 2 and "Traceback" not in res.stderr
        assert "exists and is not a directory" in res.stderr
        assert previous_failures(prom) == n


def test_metrics_file_problems_are_failures(tmp_path: Path, as_admin: None) -> None:
    args = ["sync", str(tmp_path / "missing.yaml"), "--state-dir", str(tmp_path / "st")]
    res = runner.invoke(app, [*args, "--metrics-file", str(tmp_path / "no" / "dir" / "m.prom")])
    assert res.exit_code == 2 and "cannot write metrics file" in res.stderr
    res = runner.invoke(app, [*args, "--metrics-file", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.stderr
    assert StateStore(tmp_path / "st").load()[1].failures == 2


def test_text_logs_carry_a_timestamp(tmp_path: Path, as_admin: None) -> None:
    res = runner.invoke(app, ["sync", str(tmp_path / "x.yaml"), "--state-dir", str(tmp_path)])
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.match(rf"^{stamp} svcrules: error: ", res.stderr), res.stderr


def test_without_net_admin_kernel_commands_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_run, "net_admin_problem", lambda: "needs root or CAP_NET_ADMIN")
    for verb in ("diff", "apply", "sync"):
        res = runner.invoke(app, [verb, str(_inputs(tmp_path)), "--state-dir", str(tmp_path)])
        assert res.exit_code == 2 and "CAP_NET_ADMIN" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["cleanup", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "CAP_NET_ADMIN" in res.stderr


def test_unexpected_errors_are_one_line(
    tmp_path: Path, as_admin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("svcrules.compiler.prepare", boom)  # imported where used
    res = runner.invoke(app, ["sync", str(_inputs(tmp_path)), "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "internal error: RuntimeError: boom" in res.stderr
    assert "Traceback" not in res.stderr


# OS tools


def test_tools_are_found_under_crons_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("SVCRULES_TOOL_PATH", raising=False)
    for name in ("nft", "conntrack", "iptables-restore"):
        installed = [d for d in ("/usr/sbin", "/sbin") if Path(d, name).exists()]
        if installed:
            assert find_tool(name) is not None, name
    monkeypatch.setenv("SVCRULES_TOOL_PATH", "/nonexistent")
    assert find_tool("sh") is None


def test_lock_that_is_a_directory_is_a_one_line_error(tmp_path: Path, as_admin: None) -> None:
    (tmp_path / "st" / "lock").mkdir(parents=True)
    res = runner.invoke(app, ["sync", str(_inputs(tmp_path)), "--state-dir", str(tmp_path / "st")])
    assert res.exit_code == 2 and "cannot open the lock file" in res.stderr
    assert "Traceback" not in res.stderr
