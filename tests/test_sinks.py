"""Logging sinks (``log.sinks``): each read back with its own library equals ``metrics.csv``.

Every sink is read back as its tool would: the TensorBoard event file with TensorBoard's
event accumulator, the offline W&B run from its ``.wandb`` file (its LevelDB-style log of
W&B's own protobuf records, parsed with ``wandb.proto``: wandb 0.31 ships no Python reader),
the MLflow store with ``MlflowClient``. Each logged value must equal the one in
``metrics.csv`` exactly (float64 everywhere: TensorBoard scalars are written as float64
tensors), each step once; the hyperparameters must be the resolved config and the summary
that of ``summary.json``. A sink whose library is not installed is skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sweep_files
import yaml

from metarep.errors import ConfigError
from metarep.run import experiment
from metarep.run.loop import Diverged
from metarep.run.schema import (
    SINK_NAMES,
    dump_yaml,
    flatten,
    from_dict,
    load_config,
    sink_list,
)
from metarep.run.sinks import RunIdentity, Sinks
from metarep.sweeps.driver import SweepOptions, run_sweep

Triple = tuple[int, str, float]
"""One logged value: (step, measure, value)."""

INSTALLED = [name for name in SINK_NAMES if importlib.util.find_spec(name) is not None]
BASE = {**sweep_files.BASE, "train": {"steps": 30, "record_every": 5}}


def config_of(sinks: list[str], **overrides: Any):
    return from_dict(BASE, {"log.sinks": sinks, **overrides}, name="tiny")


def needs(name: str) -> None:
    """Skip unless sink ``name``'s library is installed."""
    pytest.importorskip(name)


# ----------------------------------------------------------------------------- reading back


def csv_triples(run_dir: Path) -> list[Triple]:
    """Every value of ``metrics.csv``, read exactly (an empty field is nan)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(int(row["step"]), name, math.nan if text == "" else float(text))
            for row in rows for name, text in row.items() if name != "step"]


def mismatches(logged: list[Triple], truth: list[Triple]) -> list[str]:
    """What tells ``logged`` from ``truth``: a (step, measure) logged twice, missing, extra,
    or with another value (nan equals nan; otherwise exact)."""
    found: dict[tuple[int, str], float] = {}
    problems = []
    for step, name, value in logged:
        if (step, name) in found:
            problems.append(f"{name} at step {step} logged twice")
        found[step, name] = value
    wanted = {(step, name): value for step, name, value in truth}
    for key in sorted(wanted.keys() - found.keys()):
        problems.append(f"{key[1]} at step {key[0]} missing")
    for key in sorted(found.keys() - wanted.keys()):
        problems.append(f"{key[1]} at step {key[0]} not in metrics.csv")
    for key in sorted(wanted.keys() & found.keys()):
        a, b = found[key], wanted[key]
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{key[1]} at step {key[0]}: logged {a!r}, metrics.csv {b!r}")
    return problems


def text(value: Any) -> str:
    """A value as MLflow's params and tags hold it: a string as it is, else its JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def json_leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """The leaves of a JSON value with their dotted paths (list items by index)."""
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items()
                for leaf in json_leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list) and value:
        return [leaf for i, item in enumerate(value) for leaf in json_leaves(item, f"{path}.{i}")]
    return [(path, value)]


def resolved(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``), flat."""
    return flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def tensorboard_run(run_dir: Path) -> dict[str, Any]:
    """The event file in ``run_dir/tb``, by TensorBoard's event accumulator: ``triples``
    (the scalars), ``hparams`` (``{key: value}``) and ``summaries`` (the text summaries,
    with their steps)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    files = list((run_dir / "tb").iterdir())
    assert len(files) == 1, files
    accumulator = pea.EventAccumulator(str(run_dir / "tb"), size_guidance={pea.TENSORS: 0})
    accumulator.Reload()
    triples = [(event.step, tag, tensor_util.make_ndarray(event.tensor_proto).item())
               for tag in accumulator.PluginTagToContent("scalars")
               for event in accumulator.Tensors(tag)]
    assert all(tensor_util.make_ndarray(event.tensor_proto).dtype == "float64"
               for tag in accumulator.PluginTagToContent("scalars")
               for event in accumulator.Tensors(tag))
    [content] = accumulator.PluginTagToContent("hparams").values()
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = {key: getattr(value, value.WhichOneof("kind"))
               for key, value in data.session_start_info.hparams.items()}
    texts = accumulator.Tensors("summary") if "summary" in accumulator.Tags()["tensors"] else []
    summaries = [(json.loads(tensor_util.make_ndarray(text.tensor_proto).item()), text.step)
                 for text in texts]
    return {"triples": triples, "hparams": hparams, "summaries": summaries}


def wandb_records(file: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks (CRC-32 of the chunk's type and data, length, type: full,
    first, middle, last) whose data are ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = file.read_bytes()
    assert data[:4] == b":W&B"
    block, header, position, pending = 32768, 7, 7, b""
    while position + header <= len(data):
        room = block - position % block
        if room < header:  # the block's tail, too short for a chunk: padding
            position += room
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        if (checksum, length, kind) == (0, 0, 0):
            position += room
            continue
        chunk = data[position + header:position + header + length]
        assert checksum == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), "corrupt chunk"
        position += header + length
        pending += chunk
        if kind in (1, 4):  # full, last
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """The offline W&B run in ``run_dir/wandb``: ``triples`` (history, ``_step`` the step),
    ``config`` (nested), ``summary`` (its final state), ``id``, ``name``, ``group``,
    ``exit_code``."""
    [file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run: dict[str, Any] = {"triples": [], "config": {}, "summary": {}}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name,
                       group=record.run.run_group)
            run["config"].update({item.key: json.loads(item.value_json)
                                  for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json)
                                  for item in record.config.update})
        elif kind == "history":
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            run["triples"] += [(items["_step"], key, float(value))
                               for key, value in items.items() if not key.startswith("_")]
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or ".".join(item.nested_key)] = \
                    json.loads(item.value_json)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def mlflow_run(run_dir: Path) -> dict[str, Any]:
    """The one run of the MLflow store ``run_dir/mlruns``, by ``MlflowClient``:
    ``triples``, ``params``, ``tags``, ``status``, ``experiment`` (its name), ``summary``
    (its ``summary.*`` tags, by path) and ``name``."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    [experiment_] = experiments
    [run] = client.search_runs([experiment_.experiment_id])
    triples = [(metric.step, metric.key, metric.value) for key in run.data.metrics
               for metric in client.get_metric_history(run.info.run_id, key)]
    summary = {key.removeprefix("summary."): value for key, value in run.data.tags.items()
               if key.startswith("summary.")}
    return {"triples": triples, "params": run.data.params, "tags": run.data.tags,
            "status": run.info.status, "experiment": experiment_.name, "summary": summary,
            "name": run.info.run_name}


READERS = {"tensorboard": tensorboard_run, "wandb": wandb_run, "mlflow": mlflow_run}


def assert_reads_back(run_dir: Path, sinks: list[str]) -> None:
    """Every sink of ``sinks`` in ``run_dir`` holds exactly ``metrics.csv``."""
    truth = csv_triples(run_dir)
    assert truth
    for name in sinks:
        assert mismatches(READERS[name](run_dir)["triples"], truth) == [], name


# ----------------------------------------------------------------------------- the config


def test_sinks_parse_from_yaml_lists_and_inline_forms_in_canonical_order():
    assert from_dict({}).log.sinks == ()
    assert from_dict({"log": {"sinks": ["mlflow", "tensorboard"]}}).log.sinks == \
        ("tensorboard", "mlflow")
    config = load_config("quick", ["log.sinks=[wandb,tensorboard]"])
    assert config.log.sinks == ("tensorboard", "wandb")
    assert sink_list("log.sinks", "mlflow") == ("mlflow",)
    assert sink_list("log.sinks", "[tensorboard, mlflow]") == ("tensorboard", "mlflow")
    assert sink_list("log.sinks", None) == sink_list("log.sinks", "[]") == ()


@pytest.mark.parametrize(("value", "why"), [
    (["tensorboard", "comet"], "unknown sink 'comet'"),
    (["wandb", "wandb"], "lists wandb twice"),
    ("[mlflow, mlflow]", "lists mlflow twice"),
    (3, "must be a list of sinks"),
])
def test_unknown_or_repeated_sinks_are_refused_naming_log_sinks(value, why):
    with pytest.raises(ConfigError) as info:
        from_dict({"log": {"sinks": value}})
    assert info.value.key == "log.sinks"
    assert why in str(info.value) and "\n" not in str(info.value)


def test_a_config_without_a_log_section_loads_with_no_sinks(tmp_path):
    old = {section: values for section, values in
           yaml.safe_load(dump_yaml(from_dict(BASE))).items() if section != "log"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "config.yaml").log.sinks == ()


def test_a_sink_whose_library_is_missing_is_refused_before_anything_is_written(
        monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        experiment.run_experiment(config_of(["wandb"]), tmp_path / "run", progress=False)
    assert info.value.key == "log.sinks"
    assert "pip install 'metarep[wandb]'" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_no_sinks_open_nothing(tmp_path):
    sinks = Sinks.open(config_of([]), tmp_path, RunIdentity("run"), [{"step": 0, "x": 1.0}])
    sinks.close(None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- one run


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run of ``metarep run`` with every installed sink, in a fresh process."""
    if not INSTALLED:
        pytest.skip("no sink library installed")
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    out = folder / "run"
    process = subprocess.run(
        [sys.executable, "-m", "metarep", "run", str(folder / "tiny.yaml"), "--out", str(out),
         "--no-progress", "--set", f"log.sinks=[{','.join(INSTALLED)}]"],
        capture_output=True, text=True, cwd=folder, timeout=300)
    assert process.returncode == 0, process.stderr
    return out, process


@pytest.mark.slow
def test_the_libraries_print_nothing(cli_run):
    _, process = cli_run
    assert process.stdout.startswith("done: ") and process.stdout.count("\n") == 1
    assert process.stderr == ""


@pytest.mark.slow
def test_tensorboard_reads_back_metrics_config_and_summary(cli_run):
    needs("tensorboard")
    run_dir, _ = cli_run
    logged = tensorboard_run(run_dir)
    assert mismatches(logged["triples"], csv_triples(run_dir)) == []
    assert logged["hparams"] == {  # numbers as float64, lists and null as JSON text
        key: value if isinstance(value, bool | str) else float(value)
        if isinstance(value, int | float) else json.dumps(value)
        for key, value in resolved(run_dir).items()}
    assert logged["summaries"] == [(summary_of(run_dir), BASE["train"]["steps"])]


@pytest.mark.slow
def test_wandb_offline_run_reads_back_metrics_config_and_summary(cli_run):
    needs("wandb")
    run_dir, _ = cli_run
    logged = wandb_run(run_dir)
    assert mismatches(logged["triples"], csv_triples(run_dir)) == []
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {key: value for key, value in logged["config"].items() if key != "_wandb"} == config
    summary = summary_of(run_dir)
    assert {key: logged["summary"][key] for key in summary} == summary
    assert (logged["name"], logged["group"], logged["exit_code"]) == ("run", "", 0)


@pytest.mark.slow
def test_mlflow_store_reads_back_metrics_config_and_summary(cli_run):
    needs("mlflow")
    run_dir, _ = cli_run
    logged = mlflow_run(run_dir)
    assert mismatches(logged["triples"], csv_triples(run_dir)) == []
    assert logged["params"] == {key: text(value) for key, value in resolved(run_dir).items()}
    assert logged["summary"] == {path: text(value)
                                 for path, value in json_leaves(summary_of(run_dir))}
    assert logged["summary"]["status"] == "done"
    assert float(logged["summary"]["final.perp_norm"]) == summary_of(run_dir)["final"][
        "perp_norm"]
    assert (logged["status"], logged["name"], logged["experiment"]) == ("FINISHED", "run",
                                                                         "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name", SINK_NAMES)
def test_the_comparison_detects_a_changed_a_doubled_and_a_missing_value(cli_run, name):
    needs(name)
    run_dir, _ = cli_run
    logged, truth = READERS[name](run_dir)["triples"], csv_triples(run_dir)
    step, measure, value = logged[3]
    changed = [*logged[:3], (step, measure, math.nextafter(value, math.inf)), *logged[4:]]
    assert mismatches(changed, truth) == [f"{measure} at step {step}: logged "
                                          f"{math.nextafter(value, math.inf)!r}, metrics.csv "
                                          f"{value!r}"]
    assert mismatches([*logged, logged[0]], truth) == [
        f"{logged[0][1]} at step {logged[0][0]} logged twice"]
    assert mismatches(logged[1:], truth) == [f"{logged[0][1]} at step {logged[0][0]} missing"]


@pytest.mark.parametrize("name", SINK_NAMES)
def test_nan_infinite_and_extreme_values_read_back_exactly(tmp_path, name):
    needs(name)
    records = [{"step": 0, "a": math.nan, "b": math.inf, "c": 5e-324},
               {"step": 7, "a": -math.inf, "b": 1.7976931348623157e308, "c": 0.1 + 0.2}]
    sinks = Sinks.open(config_of([name]), tmp_path, RunIdentity("values"), records)
    sinks.close(None)
    truth = [(r["step"], key, value) for r in records for key, value in r.items()
             if key != "step"]
    assert mismatches(READERS[name](tmp_path)["triples"], truth) == []


# ----------------------------------------------------------------------------- resumed


def stop_at(step: int):
    def hook(trajectory) -> None:
        if trajectory.step == step:
            raise KeyboardInterrupt
    return hook


@pytest.mark.slow
def test_a_resumed_run_reads_back_equal_with_each_step_once(tmp_path):
    """Stopped at step 10, resumed and stopped at 20, then set back to its step-10
    checkpoint (its sinks and metrics.csv hold steps beyond it) and resumed to the end:
    every sink holds metrics.csv, each step once, and W&B keeps the run's id."""
    if not INSTALLED:
        pytest.skip("no sink library installed")
    config, out = config_of(INSTALLED), tmp_path / "run"
    for step in (10, 20):
        with pytest.raises(KeyboardInterrupt):
            experiment.run_experiment(config, out, progress=False, resume=True,
                                      on_record=stop_at(step), checkpoint_seconds=0.0)
        if step == 10:
            shutil.copy(out / "checkpoint.npz", tmp_path / "at10.npz")
            assert_reads_back(out, INSTALLED)
            first_id = wandb_run(out)["id"] if "wandb" in INSTALLED else None
    shutil.copy(tmp_path / "at10.npz", out / "checkpoint.npz")
    experiment.run_experiment(config, out, progress=False, resume=True)
    assert max(step for step, _, _ in csv_triples(out)) == BASE["train"]["steps"]
    assert_reads_back(out, INSTALLED)
    if "wandb" in INSTALLED:
        assert wandb_run(out)["id"] == first_id
    if "mlflow" in INSTALLED:
        assert mlflow_run(out)["status"] == "FINISHED"


@pytest.mark.slow
def test_an_interrupted_run_is_marked_so_in_its_sinks(tmp_path):
    if not {"wandb", "mlflow"} & set(INSTALLED):
        pytest.skip("needs wandb or mlflow")
    sinks = [name for name in INSTALLED if name != "tensorboard"]
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config_of(sinks), tmp_path / "run", progress=False,
                                  on_record=stop_at(10))
    assert_reads_back(tmp_path / "run", sinks)
    if "mlflow" in sinks:
        assert mlflow_run(tmp_path / "run")["status"] == "KILLED"
    if "wandb" in sinks:
        assert wandb_run(tmp_path / "run")["exit_code"] == 1


@pytest.mark.slow
def test_a_diverged_run_logs_what_it_recorded_and_fails_in_its_sinks(tmp_path):
    if not INSTALLED:
        pytest.skip("no sink library installed")
    out = tmp_path / "run"
    with pytest.raises(Diverged):
        experiment.run_experiment(config_of(INSTALLED, **{"method.outer_lr": 1e3}), out,
                                  progress=False)
    assert_reads_back(out, INSTALLED)
    assert summary_of(out)["status"] == "diverged"
    if "tensorboard" in INSTALLED:
        assert tensorboard_run(out)["summaries"][0][0] == summary_of(out)
    if "mlflow" in INSTALLED:
        assert mlflow_run(out)["status"] == "FAILED"
    if "wandb" in INSTALLED:
        assert wandb_run(out)["exit_code"] == 1


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_each_run_of_a_sweep_is_a_logged_run_grouped_by_the_sweeps_name(tmp_path):
    """Two infinite-task runs (batched into one computation) of the sweep ``grid2``."""
    if not INSTALLED:
        pytest.skip("no sink library installed")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {**BASE, "tasks": {"n": "infinite", "m_in": 5, "m_out": 5, "seed": 1}}))
    sweep = tmp_path / "grid2.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "set": {"log.sinks": INSTALLED},
                                     "grid": {"method.outer_lr": [0.1, 0.2]}}))
    out = tmp_path / "grid2"
    report = run_sweep(sweep, out, SweepOptions(workers=1, progress=False))
    assert (report.done, report.failed) == (2, 0)
    names = ["outer_lr=0.1", "outer_lr=0.2"]
    for name in names:  # moved into place when complete: the summaries are found there
        assert_reads_back(out / name, INSTALLED)
        summary = summary_of(out / name)
        assert summary["status"] == "done"
        if "tensorboard" in INSTALLED:
            assert tensorboard_run(out / name)["summaries"][0][0] == summary
        if "wandb" in INSTALLED:
            assert wandb_run(out / name)["summary"]["final"] == summary["final"]
        if "mlflow" in INSTALLED:
            assert mlflow_run(out / name)["summary"]["status"] == "done"
    if "wandb" in INSTALLED:
        runs = [wandb_run(out / name) for name in names]
        assert [(run["name"], run["group"]) for run in runs] == [(n, "grid2") for n in names]
        assert runs[0]["id"] != runs[1]["id"]
    if "mlflow" in INSTALLED:
        runs = [mlflow_run(out / name) for name in names]
        assert [(run["name"], run["experiment"], run["tags"]["metarep.sweep"])
                for run in runs] == [(n, "grid2", "grid2") for n in names]
    if "tensorboard" in INSTALLED:
        runs = [tensorboard_run(out / name) for name in names]
        assert [run["hparams"]["method.outer_lr"] for run in runs] == [0.1, 0.2]
