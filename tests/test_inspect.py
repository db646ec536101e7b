"""expertflow-inspect: summary from the manifest and graph, the dump views, and bad input."""

from __future__ import annotations

import json
from collections import Counter
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from expertflow.ir import graph_view as gv
from expertflow.runtime.store.digest import file_digest
from expertflow.runtime.store.manifest import digest_of
from expertflow.tools.cli import inspector as ins

PROG_ERROR = "expertflow-inspect: error: "


@pytest.fixture(scope="module")
def mixtral(compiled_dir) -> Path:
    return compiled_dir("tiny-mixtral")


@pytest.fixture
def copy_of(mixtral, tmp_path):
    """A tamperable copy of the compiled dir without the weights (inspect never reads them)."""
    def make(dumps: bool = True) -> Path:
        out = tmp_path / "copy"
        out.mkdir()
        for name in ("manifest.json", "graph.json"):
            shutil.copy(mixtral / name, out / name)
        if dumps:
            shutil.copytree(mixtral / "dumps", out / "dumps")
        else:  # as compiled with --no-dumps: the manifest lists no dumps either
            manifest = json.loads((out / "manifest.json").read_text())
            manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("dumps/")}
            (out / "manifest.json").write_text(json.dumps(dict(manifest, digest=digest_of(manifest))))
        return out
    return make


def _resign(d: Path) -> None:
    """Re-signs graph.json, so the checks after the checksum's are what a damaged graph meets."""
    manifest = json.loads((d / "manifest.json").read_text())
    if (d / "graph.json").is_file():
        manifest["files"]["graph.json"] = file_digest(d / "graph.json")
    (d / "manifest.json").write_text(json.dumps(dict(manifest, digest=digest_of(manifest))))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = ins.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_schema_constants_agree_with_the_writers():
    from expertflow.ir.serialize import SCHEMA
    from expertflow.runtime.store.manifest import SCHEMA_VERSION

    assert (ins.GRAPH_SCHEMA, ins.MANIFEST_SCHEMA) == (SCHEMA, SCHEMA_VERSION)


def test_summary_shows_manifest_numbers_and_graph_analysis(capsys, mixtral):
    rc, out, err = _run(capsys, mixtral)
    assert rc == 0 and err == ""
    manifest = json.loads((mixtral / "manifest.json").read_text())
    plan = manifest["memory_plan"]
    assert "MixtralForCausalLM (mixtral), dtype float32" in out
    assert f"source        {manifest['source']}" in out
    assert f"dense weights   {plan['dense_bytes']:,} B" in out
    assert f"expert blob     {plan['expert_blob_bytes']:,} B" in out
    assert f"experts         {plan['all_resident_slots']} in {plan['moe_layers']} MoE layers" in out
    assert f"cache slots     min {plan['min_slots']}," in out
    assert "lookahead 1, predictor cross_layer_gate" in out
    g = gv.to_networkx(json.loads((mixtral / "graph.json").read_text()))
    summary = gv.stream_summary(g)
    for p in summary.prefetches:
        # layer, experts, blob ("98,304 B"), prefetch -> wait, overlap nodes, overlap cost
        rows = [line.split() for line in out.splitlines() if line.split()[:1] == [str(p.layer)]]
        row = next(r for r in rows if r[4:7] == [p.prefetch, "->", p.wait])
        assert row[0] == str(p.layer) and row[7] == str(p.compute_nodes)
    assert f"nodes           {g.number_of_nodes()} ({g.number_of_edges()} edges)" in out
    streams = _streams(mixtral)
    assert (f"per stream      compute {streams['compute']}, copy {streams['copy']}, demand {streams['demand']}" in out
            and streams["copy"] == streams["demand"] == 4)
    assert "ExpertFlow ops  predict 4, prefetch 4, route 4, wait 4, permute 4, expert_compute 4, unpermute 4" in out
    assert f"critical path   {gv.critical_path(g)[0]:g} compute nodes" in out
    assert _run(capsys, mixtral, "--summary")[1] == out


def _streams(compiled: Path) -> dict[str, int]:
    """Nodes per stream, counted from graph.json's own annotations."""
    nodes = json.loads((compiled / "graph.json").read_text())["nodes"]
    return dict(Counter(n["meta"]["ef.stream"] for n in nodes if "ef.stream" in n["meta"]))


def test_json_summary_is_machine_readable(capsys, mixtral):
    rc, out, _ = _run(capsys, mixtral, "--json")
    data = json.loads(out)
    manifest = json.loads((mixtral / "manifest.json").read_text())
    assert rc == 0 and data["memory_plan"] == manifest["memory_plan"]
    assert [r["layer"] for r in data["moe_layers"]] == [0, 1, 2, 3]
    assert all(r["overlap_nodes"] > 0 and r["wait"] for r in data["moe_layers"])
    assert data["graph"]["by_stream"] == _streams(mixtral)
    unit = data["critical_path"]["unit"]
    assert unit["path"][0] == "input_ids" and unit["path"][-1] == "output"


@pytest.mark.parametrize("flag, name", [("--table", "nodes.txt"), ("--code", "graph.py"), ("--dot", "graph.dot")])
def test_views_print_the_dump_files(capsys, mixtral, flag, name):
    rc, out, _ = _run(capsys, mixtral, flag)
    assert rc == 0 and out == (mixtral / "dumps" / name).read_text()


def test_without_dumps_table_and_dot_come_from_graph_json(capsys, mixtral, copy_of):
    bare = copy_of(dumps=False)
    assert _run(capsys, bare, "--table")[1] == (mixtral / "dumps" / "nodes.txt").read_text()
    assert _run(capsys, bare, "--dot")[1] == (mixtral / "dumps" / "graph.dot").read_text()
    rc, out, err = _run(capsys, bare, "--code")
    assert rc == 2 and out == "" and err.startswith(PROG_ERROR) and "dumps/graph.py" in err
    rc, _, err = _run(capsys, bare, "--onnx")
    assert rc == 2 and "add --out PATH" in err


def test_onnx_prints_the_stored_path_or_writes_a_new_file(capsys, mixtral, tmp_path):
    assert _run(capsys, mixtral, "--onnx") == (0, f"{mixtral / 'dumps' / 'graph.onnx'}\n", "")
    out_file = tmp_path / "view.onnx"
    rc, out, _ = _run(capsys, mixtral, "--onnx", "--out", out_file)
    assert rc == 0 and out.strip() == str(out_file)
    model = onnx.load(str(out_file))
    onnx.checker.check_model(model)
    assert sum(n.op_type == "expert_compute" for n in model.graph.node) == 4


def test_svg_without_graphviz_is_a_clear_error(capsys, mixtral, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no dot anywhere
    rc, out, err = _run(capsys, mixtral, "--svg", "--out", tmp_path / "g.svg")
    assert (rc, out) == (2, "")
    assert err == f"{PROG_ERROR}graphviz 'dot' not found; install graphviz or use --dot\n"
    assert not (tmp_path / "g.svg").exists()


@pytest.fixture
def fake_dot(tmp_path, monkeypatch):
    """A stand-in for Graphviz on PATH: writes its arguments, then stdin, to the -o file or stdout."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "args = sys.argv[1:]\n"
                    "out = open(args[args.index('-o') + 1], 'w') if '-o' in args else sys.stdout\n"
                    "out.write(' '.join(args) + '\\n' + sys.stdin.read())\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent))


def test_svg_feeds_the_dot_text_to_graphviz(capsys, mixtral, tmp_path, fake_dot):
    svg = tmp_path / "g.svg"
    rc, out, _ = _run(capsys, mixtral, "--svg", "--out", svg)
    assert rc == 0 and out.strip() == str(svg)
    args, _, body = svg.read_text().partition("\n")
    assert args.startswith("-Tsvg")
    assert body == (mixtral / "dumps" / "graph.dot").read_text()
    # Without --out the SVG is printed, like --dot prints DOT.
    rc, out, _ = _run(capsys, mixtral, "--svg")
    assert rc == 0 and out == f"-Tsvg\n{body}"


# The README writes options first (expertflow-inspect --onnx compiled/): no option may take COMPILED
# as its value, so every view reads the same either side of it.
@pytest.mark.parametrize("view", [[], ["--json"], ["--table"], ["--code"], ["--dot"], ["--svg"], ["--onnx"]])
def test_option_order_does_not_matter(capsys, mixtral, fake_dot, view):
    after = _run(capsys, mixtral, *view)
    before = _run(capsys, *view, mixtral)
    assert after == before and after[0] == 0 and after[1]
    if view == ["--onnx"]:
        assert after[1] == f"{mixtral / 'dumps' / 'graph.onnx'}\n"


@pytest.mark.parametrize("view", ["--onnx", "--svg", "--table", "--dot"])
def test_out_goes_anywhere_on_the_line(capsys, mixtral, tmp_path, fake_dot, view):
    for argv in ([mixtral, view, "--out", "a"], [view, mixtral, "-o", "b"], ["--out", "c", view, mixtral],
                 [view, "-o", "d", mixtral]):
        target = tmp_path / next(a for a in argv if a in ("a", "b", "c", "d"))
        rc, out, err = _run(capsys, *(target if a == target.name else a for a in argv))
        assert (rc, out, err) == (0, f"{target}\n", ""), argv
        if view == "--onnx":
            onnx.checker.check_model(onnx.load(str(target)))
        elif view == "--svg":
            assert target.read_text().startswith(f"-Tsvg -o {target}\n")
        else:
            stored = {"--table": "nodes.txt", "--dot": "graph.dot"}[view]
            assert target.read_text() == (mixtral / "dumps" / stored).read_text()


def test_out_unwritable_is_one_line(capsys, mixtral, tmp_path):
    rc, out, err = _run(capsys, mixtral, "--table", "--out", tmp_path)  # a directory
    assert (rc, out) == (2, "")
    assert err.startswith(f"{PROG_ERROR}cannot write {tmp_path}: ") and err.count("\n") == 1


def test_old_output_argument_says_to_use_out(capsys, mixtral, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ins.main([str(mixtral), "--svg", str(tmp_path / "g.svg")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines()[-1] == (f"{PROG_ERROR}unrecognized arguments: {tmp_path / 'g.svg'} "
                                    "(only --out takes a value, e.g. --svg --out PATH)")


def test_bad_directories_exit_2_with_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "missing": "does not exist", tmp_path / "file": "is not a directory",
             tmp_path / "empty": "has no manifest.json; it is not a compiled ExpertFlow directory"}
    for path, message in cases.items():
        rc, out, err = _run(capsys, path)
        assert (rc, out) == (2, ""), path
        assert err.startswith(PROG_ERROR) and message in err and err.count("\n") == 1


def _edit_graph(d: Path, edit) -> None:
    data = json.loads((d / "graph.json").read_text())
    edit(data["nodes"])
    (d / "graph.json").write_text(json.dumps(data))


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "is not an ExpertFlow manifest (not a JSON object)"),
    (lambda d: (d / "graph.json").unlink(), "graph.json is missing"),
    (lambda d: (d / "graph.json").write_text("{}"), "graph.json does not match its checksum"),
    (lambda d: ((d / "graph.json").write_text(json.dumps({"schema": 99, "nodes": []})), _resign(d)),
     "graph.json has schema 99"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"schema_version": 7})), "has schema version 7"),
    (lambda d: (_edit_graph(d, lambda nodes: nodes[3].pop("op")), _resign(d)), "node 3 lacks a name, op or target"),
    (lambda d: (_edit_graph(d, lambda nodes: nodes.reverse()), _resign(d)), "before it is defined"),
])
def test_damaged_compiled_dir_exits_2(capsys, copy_of, tamper, message):
    d = copy_of()
    tamper(d)
    rc, out, err = _run(capsys, d)
    assert (rc, out) == (2, "")
    assert err.startswith(PROG_ERROR) and message in err and err.count("\n") == 1


def test_a_planted_symlink_is_never_followed(capsys, copy_of):
    d = copy_of()
    (d / "dumps" / "graph.py").unlink()
    (d / "dumps" / "graph.py").symlink_to("/etc/hostname")  # would print a file outside the directory
    rc, out, err = _run(capsys, d, "--code")
    assert (rc, out) == (2, "") and "graph.py is a symlink" in err and err.count("\n") == 1


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        ins.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for option in ("--summary", "--json", "--table", "--code", "--dot", "--svg", "--onnx", "--out PATH", "COMPILED"):
        assert option in out
    # The colour key is the legend's: the same colour names, each with its meaning.
    from expertflow.tools.make.dumps import NODE_KINDS, PREFETCH_EDGE

    flat = " ".join(out.split())
    for colour, meaning in [*NODE_KINDS.values(), (f"{PREFETCH_EDGE} edge", "a prefetch to the wait")]:
        assert f"{colour} {meaning}" in flat
    assert "light blue" not in out


def test_options_are_mutually_exclusive(capsys, mixtral):
    with pytest.raises(SystemExit) as exc:
        ins.main([str(mixtral), "--table", "--dot"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_cli_runs_without_importing_torch(mixtral):
    # Inspect reads JSON only: importing torch would cost a second or more per call.
    code = ("import sys; from expertflow.tools.cli.inspector import main; rc = main([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(mixtral)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "critical path" in done.stdout


def test_console_script_error_exit_status(tmp_path):
    exe = shutil.which("expertflow-inspect")
    cmd = [exe] if exe else [sys.executable, "-m", "expertflow.tools.cli.inspector"]
    done = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"{PROG_ERROR}{tmp_path / 'nope'} does not exist\n"
