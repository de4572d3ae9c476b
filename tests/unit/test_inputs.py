"""Inputs that are wrong or hostile: strict NodeConfig, bounded reading, strict integers.

Every refusal is an InputError whose lines name the file (and document), never a
traceback, and reading stays bounded in time and memory.
"""

from __future__ import annotations

import io
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from svcrules.errors import InputError
from svcrules.inputs.load import load_paths
from svcrules.inputs.parse import ALIAS_NODES, MAX_DEPTH, documents
from svcrules.inputs.read import Limits, read_sources
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def _errors(paths: list[str], stdin: Any = None) -> list[str]:
    with pytest.raises(InputError) as exc:
        load_paths(paths, stdin=stdin)
    lines = str(exc.value).splitlines()
    assert lines and all(line.strip() for line in lines)
    assert len(lines) == len(exc.value.problems)  # one line per problem
    return lines


# --- NodeConfig is strict (issue 9.3) ---------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "closest"),
    [
        ({"clusterCIDR": ["10.0.0.0/8"]}, "spec.clusterCIDR", "clusterCIDRs"),
        ({"masqueradeALL": True}, "spec.masqueradeALL", "masqueradeAll"),
        ({"nodeIP": ["192.0.2.9"]}, "spec.nodeIP", "nodeIPs"),
        ({"tablename": "x"}, "spec.tablename", "tableName"),
    ],
)
def test_node_config_unknown_field_names_the_closest(
    tmp_path: Path, spec: dict[str, Any], field: str, closest: str
) -> None:
    path = _write(tmp_path, "node.yaml", dump([node_config(**spec)]))
    (line,) = _errors([path])
    assert line == (
        f"{path}: document 1 (NodeConfig node-a): {field}: unknown field (did you mean {closest}?)"
    )


def test_node_config_unknown_fields_everywhere(tmp_path: Path) -> None:
    nc = node_config()
    nc["metadata"]["nmae"] = "x"
    nc["status"] = {}
    nc["spec"]["somethingElse"] = 1
    lines = _errors([_write(tmp_path, "n.yaml", dump([nc]))])
    assert any(line.endswith("metadata.nmae: unknown field (did you mean name?)") for line in lines)
    assert any(line.endswith("status: unknown field") for line in lines)
    assert any(line.endswith("spec.somethingElse: unknown field") for line in lines)


def test_node_config_labels_and_annotations_are_accepted() -> None:
    nc = node_config()
    nc["metadata"].update(labels={"a": "b"}, annotations={"c": "d"})
    got = load_paths(["-"], stdin=io.StringIO(dump([nc])))
    assert got.node_configs[0].metadata.name == "node-a"


def test_node_config_from_config_file_is_strict_too(tmp_path: Path) -> None:
    from svcrules.compiler import compile_paths

    cfg = _write(tmp_path, "node.yaml", dump([node_config(zones="a")]))
    svc = _write(tmp_path, "svc.yaml", dump([service("a", "203.0.113.1")]))
    with pytest.raises(InputError, match=r"spec\.zones: unknown field \(did you mean zone\?\)"):
        compile_paths([svc], config=cfg)


@pytest.mark.parametrize(
    ("api", "kind", "message"),
    [
        (
            "svcrules.io/v1alpha1",
            "NodeConfg",
            "kind: 'NodeConfg' is not a svcrules kind (did you mean NodeConfig?)",
        ),
        (
            "svcrules.io/v1alpha",
            "NodeConfig",
            "apiVersion: 'svcrules.io/v1alpha' is not the apiVersion of NodeConfig "
            "(did you mean svcrules.io/v1alpha1?)",
        ),
        (
            "svcrules.io/v1",
            "NodeConfig",
            "apiVersion: 'svcrules.io/v1' is not the apiVersion of NodeConfig",
        ),
        ("v1", "NodeConfig", "apiVersion: 'v1' is not the apiVersion of NodeConfig"),
        (None, "NodeConfig", "apiVersion: None is not the apiVersion of NodeConfig"),
        (None, "Nodeconfig", "kind: 'Nodeconfig' is not a svcrules kind"),
        ("svcrules.io/v1alpha1", "Node", "kind: 'Node' is not a svcrules kind"),
    ],
)
def test_near_misses_of_own_kinds_are_errors(
    tmp_path: Path, api: str | None, kind: str, message: str
) -> None:
    nc = node_config()
    nc["kind"] = kind
    if api is None:
        del nc["apiVersion"]
    else:
        nc["apiVersion"] = api
    path = _write(tmp_path, "n.yaml", dump([nc]))
    (line,) = _errors([path])
    assert line.startswith(f"{path}: document 1 ({kind} node-a): ")
    assert message in line


def test_other_kinds_and_unknown_kubernetes_fields_still_pass() -> None:
    svc = service("a", "203.0.113.1", someFutureField={"x": 1})
    svc["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    svc["spec"]["ports"][0]["appProtocol"] = "http"
    others = [
        {"apiVersion": "example.com/v1", "kind": "NodeConfg", "metadata": {"name": "x"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}},
    ]
    got = load_paths(["-"], stdin=io.StringIO(dump([svc, *others])))
    assert [s.metadata.name for s in got.services] == ["a"]


# --- integers are strict where the API has integers --------------------------------------


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (service("a", "203.0.113.1", ports=[{"port": True}]), "spec.ports[0].port"),
        (
            service("a", "203.0.113.1", type="NodePort", ports=[{"port": 80, "nodePort": True}]),
            "spec.ports[0].nodePort",
        ),
        (service("a", "203.0.113.1", ports=[{"port": 80, "targetPort": True}]), "targetPort"),
        (
            endpoint_slice("a", [endpoint("198.51.100.1")], ports=[{"port": True}]),
            "ports[0].port",
        ),
        (node_config(masqueradeBit=True), "spec.masqueradeBit"),
        (node_config(masqueradeAll="yes"), "spec.masqueradeAll"),
        (service("a", "203.0.113.1", ports=[{"port": 80.0}]), "spec.ports[0].port"),
    ],
)
def test_booleans_are_not_ports(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_paths(["-"], stdin=io.StringIO(dump([obj])))


# --- bounded reading (issue 10.7) --------------------------------------------------------


def _alias_bomb(levels: int = 30) -> str:
    """Nested Lists, each item list naming the previous level nine times: ~3 KB that
    stand for 9**30 Services."""
    svc = "{apiVersion: v1, kind: Service, metadata: {name: x}, spec: {clusterIP: 10.0.0.1}}"
    lines = ["apiVersion: v1", "kind: List", "items:", f"- &l0 {{kind: List, items: [{svc}]}}"]
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        lines.append(f"- &l{i} {{apiVersion: v1, kind: List, items: [{refs}]}}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "bomb.yaml", _alias_bomb())
    (line,) = _errors([path])
    assert line.startswith(f"{path}: document 1: refused: line ")
    assert f"aliases stand for more than {ALIAS_NODES} nodes" in line


def test_anchors_aliases_and_merge_keys_within_budget_still_work() -> None:
    text = """
apiVersion: v1
kind: List
items:
- &web
  apiVersion: v1
  kind: Service
  metadata: &meta {name: web, namespace: shop, labels: {app: web}}
  spec: {clusterIP: 203.0.113.1, ports: [{name: http, port: 80}]}
- <<: *web
  metadata:
    <<: *meta
    name: web2
  spec: {clusterIP: 203.0.113.2, ports: [{name: http, port: 80}]}
"""
    got = load_paths(["-"], stdin=io.StringIO(text))
    assert [(s.metadata.namespace, s.metadata.name) for s in got.services] == [
        ("shop", "web"),
        ("shop", "web2"),
    ]
    assert got.services[1].metadata.labels == {"app": "web"}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 30_000 + "]" * 30_000,  # JSON: orjson refuses, the YAML fallback must not recurse
        '{"a": ' * 30_000 + "1" + "}" * 30_000,
        "- " * 30_000 + "x\n",  # YAML block sequences, 2 bytes a level
        "a: [" * 2_000 + "]" * 2_000 + "\n",
    ],
    ids=["json-lists", "json-maps", "yaml-block", "yaml-flow"],
)
def test_deep_nesting_is_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "deep.yaml", text)
    (line,) = _errors([path])
    assert line.startswith(f"{path}: document ")
    assert "nest" in line  # ours, or libyaml's own "maximum nesting depth"


def test_nesting_up_to_the_limit_is_read() -> None:
    for text in ("[" * MAX_DEPTH + "]" * MAX_DEPTH, "- " * (MAX_DEPTH - 50) + "x\n"):
        (doc,) = documents(text)
        depth = 0
        while isinstance(doc, list):
            depth, doc = depth + 1, doc[0] if doc else None
        assert depth >= MAX_DEPTH - 50


def test_lists_nested_to_the_limit_load_without_recursion_errors() -> None:
    levels = MAX_DEPTH // 2 - 4  # a List and its items are two levels; a Service four
    text = '{"apiVersion": "v1", "kind": "List", "items": [' * levels
    text += json.dumps(service("a", "203.0.113.1")) + "]}" * levels
    got = load_paths(["-"], stdin=io.StringIO(text))
    assert [s.metadata.name for s in got.services] == ["a"]
    yaml_deep = "a:\n" + "".join(" " * i + "- \n" for i in range(1, 40))
    assert documents(yaml_deep) == [yaml.safe_load(yaml_deep)]


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_huge_integers_are_refused(tmp_path: Path, suffix: str) -> None:
    svc = service("a", "203.0.113.1", ports=[{"port": 12345}])
    text = json.dumps(svc) if suffix == "json" else dump([svc])
    path = _write(tmp_path, f"big.{suffix}", text.replace("12345", "9" * 5000))
    (line,) = _errors([path])
    assert line.startswith(f"{path}: document 1: refused: line ")
    assert "integer of 5000 characters" in line


def test_large_but_sane_integers_are_validation_errors() -> None:
    svc = service("a", "203.0.113.1", ports=[{"port": 2**63}])
    with pytest.raises(InputError, match=r"spec\.ports\[0\]\.port: .*less than or equal to 65535"):
        load_paths(["-"], stdin=io.StringIO(dump([svc])))


def test_only_regular_files_and_stdin_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        lines = _errors(["/dev/zero", str(fifo), str(sock_path)])
    finally:
        sock.close()
    assert lines == [
        "/dev/zero: refused: a character device; give regular files, directories or '-' for stdin",
        f"{fifo}: refused: a FIFO; give regular files, directories or '-' for stdin",
        f"{sock_path}: refused: a socket; give regular files, directories or '-' for stdin",
    ]


def test_directories_skip_what_is_not_a_regular_file(tmp_path: Path) -> None:
    _write(tmp_path, "svc.yaml", dump([service("a", "203.0.113.1")]))
    os.mkfifo(tmp_path / "pipe.yaml")
    got = load_paths([str(tmp_path)])
    assert [s.metadata.name for s in got.services] == ["a"]


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    data = b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff}\n"
    path = _write(tmp_path, "bad.yaml", data)
    assert _errors([path]) == [f"{path}: not UTF-8: byte 0xff at byte offset 46"]
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    assert _errors(["-"], stdin=stdin) == ["<stdin>: not UTF-8: byte 0xff at byte offset 46"]


def test_input_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _write(tmp_path, "a.yaml", dump([service("a", "203.0.113.1")]))
    b = _write(tmp_path, "b.yaml", dump([service("b", "203.0.113.2")]))
    size = os.path.getsize(a)
    assert len(read_sources([a, b], limits=Limits(max_input_bytes=2 * size))) == 2
    monkeypatch.setenv("SVCRULES_MAX_INPUT_BYTES", str(2 * size - 1))
    assert _errors([a, b]) == [
        f"{b}: refused: the inputs exceed {2 * size - 1} bytes (SVCRULES_MAX_INPUT_BYTES)"
    ]
    stdin = io.TextIOWrapper(io.BytesIO(b"\0" * (3 * size)), encoding="utf-8")
    assert _errors(["-"], stdin=stdin) == [
        f"<stdin>: refused: the inputs exceed {2 * size - 1} bytes (SVCRULES_MAX_INPUT_BYTES)"
    ]
    monkeypatch.setenv("SVCRULES_MAX_INPUT_BYTES", "lots")
    with pytest.raises(InputError, match="SVCRULES_MAX_INPUT_BYTES='lots': expected a positive"):
        load_paths([a])


def test_object_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [service(f"s{i}", f"203.0.113.{i + 1}") for i in range(5)]
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    monkeypatch.setenv("SVCRULES_MAX_OBJECTS", "6")  # the List and its five items
    assert len(load_paths(["-"], stdin=io.StringIO(text)).services) == 5
    monkeypatch.setenv("SVCRULES_MAX_OBJECTS", "5")
    assert _errors(["-"], stdin=io.StringIO(text)) == [
        "<stdin>: document 1: refused: more than 5 objects in all inputs (SVCRULES_MAX_OBJECTS)"
    ]


def test_yaml_syntax_errors_are_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.yaml", "a: [1\nb: }\n")
    (line,) = _errors([path])
    assert line.startswith(f"{path}: document 0: cannot parse: line 2 column 2: ")


YAML_CASES = [
    "a: 1\nb: [x, 'y', \"z\", 1.5, true, null, ~, 0x1f, 0o17, 1_000, 2024-01-02]\n",
    "---\n---\nkind: A\n...\n---\n- 1\n",
    "t: 2024-01-02T03:04:05Z\nq: '2024-01-02T03:04:05Z'\nempty:\nn: .inf\nb: !!binary aGk=\n",
    "x: &x {a: 1}\ny: *x\nz: {<<: *x, b: 2}\nw: {<<: [*x, {a: 3, c: 4}], a: 5}\n",
    "? [1, 2]\n: tuple keys are refused by both\n",
    "s: !!str 123\ni: !!int '7'\nf: !!float '1'\nstr: !custom x\n",
]


@pytest.mark.parametrize("text", YAML_CASES)
def test_yaml_reader_reads_what_pyyaml_reads(text: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        want: Any = [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    except yaml.YAMLError:
        want = yaml.YAMLError
    try:
        got: Any = documents(text)
    except Exception as exc:  # ours says Refused where PyYAML says ConstructorError
        got = yaml.YAMLError if isinstance(exc, yaml.YAMLError) or "Refused" in repr(exc) else exc
    assert got == want


def test_fixtures_read_as_pyyaml_reads_them() -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted((ROOT / "fixtures").rglob("*.y*ml")):
        text = path.read_text()
        want = [d for d in yaml.load_all(text, Loader=loader) if d is not None]
        assert documents(text) == want, path


# --- memory stays bounded with hostile inputs --------------------------------------------

_MEASURE = """
import resource, sys
from svcrules.cli import main
sys.argv = ["svcrules", "compile", "--node-name", "n", "--node-ip", "192.0.2.1", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _run(args: list[str], stdin: bytes = b"") -> tuple[int, list[str], int]:
    """Exit code, stderr lines and peak RSS (KiB) of one compile in a fresh process,
    with a hard address-space limit so that a regression cannot take the machine."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        preexec_fn=limit,
        cwd=ROOT,
    )
    lines = proc.stderr.decode(errors="replace").splitlines()
    return proc.returncode, lines[:-1], int(lines[-1]) if lines and lines[-1].isdigit() else -1


def test_hostile_inputs_stay_within_memory(tmp_path: Path) -> None:
    ok = _write(tmp_path, "ok.yaml", dump([service("a", "203.0.113.1")]))
    code, lines, baseline = _run([ok])
    assert code == 0 and baseline > 0, lines
    big_int = dump([service("a", "203.0.113.1", ports=[{"port": 12345}])])
    cases: list[tuple[str, list[str], bytes, str]] = [
        ("alias bomb", [_write(tmp_path, "bomb.yaml", _alias_bomb())], b"", "aliases stand for"),
        (
            "deep JSON",
            [_write(tmp_path, "deep.json", "[" * 30_000 + "]" * 30_000)],
            b"",
            "nested deeper",
        ),
        ("deep YAML", [_write(tmp_path, "deep.yaml", "- " * 30_000 + "x\n")], b"", "nesting"),
        ("/dev/zero", ["/dev/zero"], b"", "a character device"),
        ("non-UTF-8 stdin", ["-"], b"kind: \xff\n", "not UTF-8: byte 0xff at byte offset 6"),
        (
            "5,000 digits",
            [_write(tmp_path, "int.yaml", big_int.replace("12345", "9" * 5000))],
            b"",
            "integer of 5000 characters",
        ),
        (
            "port: true",
            [_write(tmp_path, "bool.yaml", dump([service("a", "203.0.113.1")]))],
            b"",
            "spec.ports[0].port: True: input should be a valid integer",
        ),
    ]
    Path(cases[-1][1][0]).write_text(dump([service("a", "203.0.113.1", ports=[{"port": True}])]))
    for name, args, stdin, message in cases:
        size = sum(os.path.getsize(a) for a in args if a not in ("-", "/dev/zero")) + len(stdin)
        code, lines, peak = _run(args, stdin)
        assert code == 2, (name, lines)
        assert len(lines) == 1 and lines[0].startswith("svcrules: error: "), (name, lines)
        assert message in lines[0], (name, lines)
        # Peak memory: the baseline run's, plus twice the input, plus 8 MiB of slack.
        assert peak <= baseline + 2 * size // 1024 + 8 * 1024, (name, peak, baseline)
