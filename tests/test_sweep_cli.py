"""``metarep sweep`` from the command line: ``--plan`` (the runs, their directories and what a
directory already holds, with nothing written), a sweep given as a base config with
``--grid``/``--set``/``--seeds`` (the same sweep as the equivalent sweep file: the same run
names and ``sweep.json`` spec), the one-line refusals of bad options, and shell completion."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarep.run.rundir import RunDirectory
from metarep.sweeps.driver import workdir
from metarep.sweeps.manifest import MANIFEST, build_manifest, write_manifest
from metarep.sweeps.spec import (
    command_line_fields,
    load_sweep,
    plan_runs,
    split_values,
    sweep_of,
)

METAREP = str(Path(sys.executable).with_name("metarep"))
TINY = {"train.steps": 5, "train.record_every": 5, "eval.n_tasks": 20, "eval.shots": [5]}
TINY_SET = [arg for key, value in TINY.items()
            for arg in ("--set", f"{key}={json.dumps(value)}")]
INLINE = ["quick", *TINY_SET, "--grid", "model.width=2,3", "--grid",
          "method.name=fo-anil,anil", "--seeds", "0,1"]
"""A sweep of 8 tiny runs, and its sweep file (:func:`sweep_file`)."""


def sweep_file(folder: Path, name: str = "tiny.yaml") -> Path:
    """The sweep file of :data:`INLINE`."""
    path = folder / name
    path.write_text(yaml.safe_dump({
        "base": "quick", "set": TINY,
        "grid": {"model.width": [2, 3], "method.name": ["fo-anil", "anil"]},
        "seeds": [0, 1]}, sort_keys=False))
    return path


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (``None`` for a directory)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def plan_rows(stdout: str) -> tuple[list[list[str]], str]:
    """The run lines of ``--plan`` (split on blanks) and its summary line."""
    lines = stdout.splitlines()
    return [line.split() for line in lines[:-1]], lines[-1]


# ----------------------------------------------------------------------------- --plan


def test_plan_lists_the_planned_runs_and_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = sweep_file(tmp_path)
    before = tree(tmp_path)
    plans = plan_runs(load_sweep(file))
    for args, out in (([file], Path("runs") / "tiny"), (INLINE, Path("runs") / "sweep-quick"),
                      ([file, "--out", tmp_path / "new" / "dir"], tmp_path / "new" / "dir")):
        result = cli("sweep", *args, "--plan")
        assert result.exit_code == 0, result.output
        rows, summary = plan_rows(result.stdout)
        assert [row[0] for row in rows] == [plan.name for plan in plans]
        assert [row[1] for row in rows] == [str(out / plan.name) for plan in plans]
        width, name = {2: "model.width=2", 3: "model.width=3"}, "method.name="
        for row, plan in zip(rows, plans, strict=True):
            assert row[2:] == [width[plan.varied["model.width"]],
                               name + plan.varied["method.name"], f"seed={plan.seed}"]
        assert summary == f"8 runs in {out}: 0 finished, 0 failed, 8 to run"
        assert tree(tmp_path) == before  # no runs/, no --out, nothing else


def test_plan_of_a_single_run_and_of_a_config_file_base(cli, tmp_path, monkeypatch):
    """A config YAML as the base: default directory runs/sweep-STEM; a list-valued key
    given with ';'; one value varies nothing and names the run ``run``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.yaml").write_text("problem: {d: 6, k: 2}\nmodel: {width: 4}\n")
    result = cli("sweep", "small.yaml", "--grid", "eval.shots=[5,10];[20]", "--plan")
    rows, summary = plan_rows(result.stdout)
    assert result.exit_code == 0 and len(rows) == 2 and summary.startswith("2 runs in ")
    assert [row[2] for row in rows] == ["eval.shots=[5,10]", "eval.shots=[20]"]
    assert all(row[1].startswith("runs/sweep-small/shots=") for row in rows)
    one = cli("sweep", "small.yaml", "--set", "model.width=3", "--plan")
    assert one.stdout.splitlines() == ["run  runs/sweep-small/run",
                                       "1 runs in runs/sweep-small: 0 finished, 0 failed, "
                                       "1 to run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yaml"]


def test_plan_reports_a_half_finished_sweep_directory(cli, tmp_path):
    """A finished run, a failed one and an interrupted one (its .NAME.tmp holds a
    checkpoint), made by hand; the directory is left as it was."""
    file = sweep_file(tmp_path)
    spec = load_sweep(file)
    plans = plan_runs(spec)
    out = tmp_path / "out"
    out.mkdir()
    write_manifest(out, build_manifest(spec, plans))
    done, failed, interrupted, damaged = (plan.name for plan in plans[:4])
    (out / done).mkdir()
    (out / done / "summary.json").write_text('{"status": "done", "final": {}}')
    (out / failed).mkdir()
    (out / failed / "error.json").write_text('{"error": "boom", "kind": "Diverged"}')
    temp = RunDirectory(workdir(out, interrupted))
    temp.create()
    temp.write_metrics([{"step": 0, "loss": 1.0}, {"step": 5, "loss": 0.5}])
    temp.write_checkpoint({"B": np.zeros((2, 2))}, step=5, n_records=2)
    broken = workdir(out, damaged)  # a checkpoint that cannot be resumed is started again
    broken.mkdir()
    (broken / "checkpoint.npz").write_bytes(b"not an archive")
    before = tree(out)

    result = cli("sweep", file, "--out", out, "--plan")
    assert result.exit_code == 0, result.output
    rows, summary = plan_rows(result.stdout)
    states = {row[0]: " ".join(row[5:]) for row in rows}
    assert states == {done: "[finished]", failed: "[failed]",
                      interrupted: "[interrupted (resumes at step 5)]",
                      **{plan.name: "" for plan in plans[3:]}}
    assert summary == f"8 runs in {out}: 1 finished, 1 failed, 6 to run (1 interrupted)"
    retry = cli("sweep", file, "--out", out, "--plan", "--retry-failed").stdout
    assert retry.splitlines()[-1] == (f"8 runs in {out}: 1 finished, 1 failed, 7 to run "
                                      "(1 interrupted; 1 failed, redone with --retry-failed)")
    assert tree(out) == before


def test_plan_refuses_what_the_sweep_refuses(cli, error_line, tmp_path):
    """A bad sweep file, and an --out holding a different sweep (or other files), are
    refused with --plan exactly as without it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: quick\ngrid: {model.widht: [2, 3]}\n")
    out = tmp_path / "out"
    lines = []
    for extra in ([], ["--plan"]):
        result = cli("sweep", bad, "--out", out, *extra)
        assert result.exit_code == 2
        lines.append(error_line(result))
        assert not out.exists()
    assert lines[0] == lines[1]
    assert lines[0].startswith("error: grid.model.widht: unknown config key")

    file = sweep_file(tmp_path)
    out.mkdir()
    other = load_sweep(file)
    write_manifest(out, build_manifest(other, plan_runs(other)))
    before = tree(out)
    for args in ([*INLINE[:-2], "--seeds", "0,1,2"], [file, "--set", "model.width=4"]):
        result = cli("sweep", *args, "--out", out, "--plan")
        assert result.exit_code == 2
        assert error_line(result).startswith("error: --out: ") and "different sweep" in \
            result.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine\n")
    result = cli("sweep", file, "--out", plain, "--plan")
    assert result.exit_code == 2 and "not a sweep directory" in error_line(result)
    assert tree(out) == before


# ----------------------------------------------------------------------------- inline sweeps


def test_an_inline_sweep_is_the_sweep_of_the_equivalent_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inline, inline_plans, inline_out = sweep_of("quick", command_line_fields(
        ["model.width=2,3", "method.name=fo-anil,anil"],
        [f"{key}={json.dumps(value)}" for key, value in TINY.items()], "0,1"))
    file = sweep_file(tmp_path)
    spec, plans, out = sweep_of(str(file))
    assert (inline_out, out) == (Path("runs/sweep-quick"), Path("runs/tiny"))
    assert [asdict(plan) for plan in inline_plans] == [asdict(plan) for plan in plans]
    assert build_manifest(inline, inline_plans)["spec"] == build_manifest(spec, plans)["spec"]
    assert asdict(spec) == asdict(load_sweep(file))


def test_options_override_a_sweep_files_fields(tmp_path):
    """--set replaces a grid key of the file, --grid a set or zip key, --seeds the seeds."""
    file = tmp_path / "s.yaml"
    file.write_text("base: quick\nset: {train.steps: 5, model.seed: 4}\n"
                    "grid: {model.width: [2, 3]}\nzip: {problem.d: [6, 8], problem.k: [2, 3]}\n"
                    "seeds: [0, 1]\nseed_keys: [tasks.seed]\n")
    spec, plans, out = sweep_of(str(file), command_line_fields(
        ["train.steps=5,10", "problem.d=6,7"], ["model.width=4"], "2"))
    assert out == Path("runs") / "s"
    assert spec.fixed == {"model.seed": 4, "model.width": 4}
    assert spec.grid == {"train.steps": [5, 10], "problem.d": [6, 7]}
    assert spec.zip == {"problem.k": [2, 3]} and spec.seeds == [2]
    assert spec.seed_keys == ["tasks.seed"] and len(plans) == 8


def test_grid_values_are_read_as_yaml_and_split_outside_brackets():
    assert split_values("2, 4,8") == ["2", "4", "8"]
    assert split_values("[5,10],[20]") == split_values("[5,10];[20]") == ["[5,10]", "[20]"]
    assert split_values("'a,b',\"c;d\",{x: 1, y: 2}") == ["'a,b'", '"c;d"', "{x: 1, y: 2}"]
    assert split_values("a;b,c") == ["a", "b,c"]
    fields = command_line_fields(["model.width=2,4,8", "method.name=fo-anil,anil",
                                  "eval.shots=[5,10];[20]", "problem.noise_var=0.01,null"])
    assert fields == {"grid": {"model.width": [2, 4, 8], "method.name": ["fo-anil", "anil"],
                               "eval.shots": [[5, 10], [20]],
                               "problem.noise_var": [0.01, None]}}
    assert command_line_fields(seeds="0, 1", seed_keys="tasks.seed,model.seed") == {
        "seeds": [0, 1], "seed_keys": ["tasks.seed", "model.seed"]}


@pytest.mark.parametrize(("args", "start"), [
    (["--grid", "model.widht=2,3"], "error: --grid model.widht: unknown config key"),
    (["--grid", "model.width"], "error: --grid: expected KEY=a,b (no '=')"),
    (["--grid", "=2,3"], "error: --grid: expected KEY=a,b (no key)"),
    (["--grid", "model.width="], "error: --grid model.width: no values"),
    (["--grid", "model.width=2,,3"], "error: --grid model.width: empty value"),
    (["--grid", "model.width=2,3,2"], "error: --grid model.width: lists 2 twice"),
    (["--grid", "model.width=2,2.0"], "error: --grid model.width: values 2 and 2.0 give"),
    (["--grid", "eval.shots=[5,10"], "error: --grid eval.shots: '[5,10' is not a YAML value"),
    (["--grid", "model.width=2,3", "--grid", "model.width=4"],
     "error: --grid model.width: given twice"),
    (["--set", "model.width=3", "--grid", "model.width=2,4"],
     "error: --grid model.width: also given with --set"),
    (["--set", "model.width"], "error: --set: expected key=value"),
    (["--set", "model.widht=3"], "error: --set model.widht: unknown config key"),
    (["--set", "model.width=0"], "error: --set model.width: must be"),
    (["--seeds", "0,-1"], "error: --seeds: must be an integer >= 0, got -1"),
    (["--seeds", "0,a"], "error: --seeds: must be an integer >= 0, got 'a'"),
    (["--seeds", "1,1"], "error: --seeds: lists 1 twice"),
    (["--seeds", ""], "error: --seeds: no values"),
    (["--seeds", "0,,1"], "error: --seeds: empty value"),
    (["--seeds", "0,1", "--set", "model.seed=1"], "error: --seeds: sets model.seed"),
    (["--seed-keys", "model.seed"], "error: --seed-keys: needs --seeds"),
    (["--seeds", "0,1", "--seed-keys", "model.sed"], "error: --seed-keys: model.sed: unknown"),
])
def test_bad_options_are_one_line_naming_the_option_and_nothing_is_written(
        cli, error_line, tmp_path, monkeypatch, args, start):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--plan"], ["--out", tmp_path / "out"]):
        result = cli("sweep", "quick", *TINY_SET[:2], *args, "--no-progress", *extra)
        assert result.exit_code == 2, result.output
        assert error_line(result).startswith(start)
    assert list(tmp_path.iterdir()) == []


def test_a_config_alone_and_a_missing_base_are_refused(cli, error_line, tmp_path):
    result = cli("sweep", "quick", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "quick is a config, not a sweep file" in error_line(result)
    assert "--grid" in result.stderr
    result = cli("sweep", tmp_path / "nope.yaml", "--grid", "model.width=2,3")
    assert result.exit_code == 2 and error_line(result).startswith("error: base: no such file")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_inline_sweep_is_continued_by_its_sweep_file(cli, tmp_path):
    """The inline sweep runs; its sweep.json spec and run names are those of the equivalent
    file, which, run afterwards into the same --out, finds every run finished."""
    out = tmp_path / "out"
    inline = ["quick", *TINY_SET, "--grid", "model.width=2,3"]
    ran = cli("sweep", *inline, "--workers", "1", "--no-progress", "--out", out)
    assert ran.exit_code == 0, ran.output
    assert ran.stdout.startswith(f"sweep {out}: 2 runs, 2 done, 0 failed (2 ran now)")
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({"base": "quick", "set": TINY,
                                    "grid": {"model.width": [2, 3]}}))
    spec = load_sweep(file)
    plans = plan_runs(spec)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["spec"] == build_manifest(spec, plans)["spec"]
    assert [run["name"] for run in manifest["runs"]] == [plan.name for plan in plans]
    planned = cli("sweep", file, "--out", out, "--plan")
    assert planned.stdout.splitlines()[-1] == f"2 runs in {out}: 2 finished, 0 failed, 0 to run"
    again = cli("sweep", file, "--workers", "1", "--no-progress", "--out", out)
    assert again.exit_code == 0
    assert again.stdout.startswith(f"sweep {out}: 2 runs, 2 done, 0 failed (0 ran now)")


# ----------------------------------------------------------------------------- completion


def test_help_and_shell_completion(cli):
    help_text = cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    sweep_help = cli("sweep", "--help").stdout
    assert all(option in sweep_help for option in ("--grid", "--set", "--seeds", "--plan"))
    script = subprocess.run([METAREP, "--show-completion", "bash"], capture_output=True,
                            text=True, timeout=60)
    assert script.returncode == 0 and "_METAREP_COMPLETE" in script.stdout
    env = {"_METAREP_COMPLETE": "complete_bash", "COMP_WORDS": "metarep sweep quick --pl",
           "COMP_CWORD": "3"}
    completed = subprocess.run([METAREP], capture_output=True, text=True, timeout=60,
                               env={**env, "PATH": str(Path(sys.executable).parent)})
    assert completed.stdout.split() == ["--plan"]
