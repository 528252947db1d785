"""The command line end to end: outputs of `metarep run quick`, `show`, `keys`, bad input
(exit 2, one line naming the field, nothing written), divergence (exit 3, results kept),
`--resume`, and one step on a given pool and initialisation against plain numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from metarep.cli import EXIT_BAD_INPUT, EXIT_DIVERGED
from metarep.run import atomic, experiment
from metarep.run.loop import RecordSchedule
from metarep.run.schema import from_dict, key_table, load_config

pytestmark = pytest.mark.slow  # end to end: the full tier (README, Tests)

MEASURES = ["step", "train_loss", "perp_norm", "perp_norm_fro", "subspace_dist", "span_outside",
            "span_missed", "lambda_err", "head_norm"]
EVAL_COLUMNS = ["method", "shots", "excess_risk", "stderr", "n_tasks", "theory"]




# ----------------------------------------------------------------------------- run quick


@pytest.fixture(scope="module")
def quick_run(cli, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("quick") / "run"
    result = cli("run", "quick", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out, result


def test_quick_run_reports_done(quick_run):
    out, result = quick_run
    assert result.stdout.startswith(f"done: {out}")
    assert "subspace_dist" in result.stdout and result.stderr == ""


def test_quick_run_writes_every_output_and_no_leftovers(quick_run):
    out, _ = quick_run
    names = {path.name for path in out.iterdir()}
    assert {"config.yaml", "metrics.csv", "eval.csv", "summary.json", "params.npz",
            "training.png", "eval.png"} <= names
    assert "checkpoint.npz" not in names
    assert not [name for name in names if name.startswith(".") or name.endswith(".tmp")]
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == atomic.FILE_MODE, path


def test_quick_config_yaml_is_the_resolved_config(quick_run):
    out, _ = quick_run
    written = from_dict(yaml.safe_load((out / "config.yaml").read_text()), name="quick")
    assert written == load_config("quick")


def test_quick_metrics_csv(quick_run):
    out, _ = quick_run
    config = load_config("quick")
    metrics = pd.read_csv(out / "metrics.csv")
    r = min(config.problem.d, config.model.width)
    assert list(metrics.columns) == MEASURES + [f"sv_{i}" for i in range(1, r + 1)]
    assert metrics["step"].tolist() == list(RecordSchedule(config.train.steps,
                                                           config.train.record_every).steps())
    assert np.isfinite(metrics.to_numpy()).all()
    for name in ("subspace_dist", "span_outside", "span_missed"):
        assert (metrics[name].between(0, 1)).all(), name
    np.testing.assert_allclose(metrics["subspace_dist"],  # k' >= k: the same angle
                               np.maximum(metrics["span_outside"], metrics["span_missed"]),
                               atol=1e-12)
    singular = metrics[[f"sv_{i}" for i in range(1, r + 1)]].to_numpy()
    assert (np.diff(singular, axis=1) <= 1e-12).all()  # decreasing


def test_a_narrow_model_is_not_reported_closer_to_span_B_star(cli, quick_run, tmp_path):
    """model.width = 1 < k = 3 used to report subspace_dist ~0.116, below width 20's ~0.21:
    now it is 1 (span_missed = 1: one direction cannot cover a 3-dim span), and span_outside
    tells how much of its one direction lies outside span(B_star)."""
    out = tmp_path / "narrow"
    result = cli("run", "quick", "--set", "model.width=1", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    narrow = pd.read_csv(out / "metrics.csv").iloc[-1]
    wide = pd.read_csv(quick_run[0] / "metrics.csv").iloc[-1]
    assert narrow["subspace_dist"] == narrow["span_missed"] == 1.0
    assert narrow["span_outside"] < 0.5
    assert wide["subspace_dist"] < narrow["subspace_dist"]


def test_quick_eval_csv(quick_run):
    out, _ = quick_run
    config = load_config("quick")
    frame = pd.read_csv(out / "eval.csv")
    assert list(frame.columns) == EVAL_COLUMNS
    shots = list(config.eval.shots)
    k, d, s2 = config.problem.k, config.problem.d, config.problem.noise_var
    expected = [(name, m) for m in shots for name in
                ["fo-anil", "bayes-oracle", *(["oracle-lsq"] if m >= k + 2 else []), "ridge",
                 *(["regression-lsq"] if m >= d + 2 else [])]]
    assert list(zip(frame["method"], frame["shots"], strict=True)) == expected
    assert (frame["n_tasks"] == config.eval.n_tasks).all()
    assert (frame["excess_risk"] > 0).all()
    least_squares = frame["method"].str.endswith("-lsq")
    assert (frame.loc[~least_squares, "stderr"] > 0).all()
    for row in frame[least_squares].itertuples():
        dim = k if row.method == "oracle-lsq" else d
        assert row.theory == pytest.approx(s2 * dim / (row.shots - dim - 1))
        assert np.isnan(row.stderr) == (row.shots < dim + 4)


def test_quick_summary_json(quick_run):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert {"status", "error", "config", "step", "seconds", "final", "theory",
            "B_star_BBt_B_star"} <= set(summary)
    assert summary["status"] == "done" and summary["error"] is None
    assert summary["config"] == "quick"
    config = load_config("quick")
    assert summary["step"] == config.train.steps
    last = pd.read_csv(out / "metrics.csv").iloc[-1]
    for key, value in summary["final"].items():
        assert value == pytest.approx(last[key], rel=1e-12), key
    k = config.problem.k
    assert np.array(summary["theory"]["lambda_star"]).shape == (k, k)
    assert np.array(summary["B_star_BBt_B_star"]).shape == (k, k)


def test_quick_params_npz_and_its_consistency_with_the_measures(quick_run):
    out, _ = quick_run
    config = load_config("quick")
    d, k, width = config.problem.d, config.problem.k, config.model.width
    with np.load(out / "params.npz") as data:
        arrays = {name: data[name] for name in data.files}
    assert {"B", "w", "B_star", "Sigma_star"} <= set(arrays)
    assert arrays["B"].shape == (d, width) and arrays["w"].shape == (width,)
    assert arrays["B_star"].shape == (d, k) and arrays["Sigma_star"].shape == (k, k)
    B_star = arrays["B_star"]
    np.testing.assert_allclose(B_star.T @ B_star, np.eye(k), atol=1e-12)
    outside = arrays["B"] - B_star @ (B_star.T @ arrays["B"])
    final = pd.read_csv(out / "metrics.csv").iloc[-1]
    assert np.linalg.norm(outside, 2) == pytest.approx(final["perp_norm"], rel=1e-10)
    assert np.linalg.norm(arrays["w"]) == pytest.approx(final["head_norm"], rel=1e-10)


def test_quick_figures_are_png(quick_run):
    out, _ = quick_run
    for name in ("training.png", "eval.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


# ----------------------------------------------------------------------------- show, keys


def test_show_prints_the_resolved_config(cli):
    result = cli("show", "quick", "--set", "problem.d=30", "-s", "eval.shots=[7]")
    assert result.exit_code == 0
    config = from_dict(yaml.safe_load(result.stdout), name="quick")
    assert config.problem.d == 30 and config.eval.shots == (7,)


def test_show_bad_input(cli, error_line):
    result = cli("show", "quick", "--set", "problem.d=0")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "problem.d" in error_line(result)


def test_keys_prints_the_key_table(cli):
    result = cli("keys")
    assert result.exit_code == 0
    assert result.stdout.strip() == key_table().strip()


# ----------------------------------------------------------------------------- bad input


def pool_file(tmp_path: Path, n=12, m=8, d=6, k=2, **changes) -> Path:
    rng = np.random.default_rng(0)
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0]
    arrays = {"X": rng.standard_normal((n, m, d)), "y": rng.standard_normal((n, m)),
              "B_star": B_star, "heads": rng.standard_normal((n, k))}
    arrays.update(changes)
    path = tmp_path / "pool.npz"
    np.savez(path, **{name: a for name, a in arrays.items() if a is not None})
    return path


def init_file(tmp_path: Path, d=6, width=4, **changes) -> Path:
    rng = np.random.default_rng(1)
    arrays = {"B": rng.standard_normal((d, width)) * 0.3, "w": rng.standard_normal(width) * 0.3}
    arrays.update(changes)
    path = tmp_path / "init.npz"
    np.savez(path, **{name: a for name, a in arrays.items() if a is not None})
    return path


POOL = ["--set", "tasks.m_in=5", "--set", "tasks.m_out=3"]

BAD_INPUTS = {
    "unknown-key": (lambda tmp: ["--set", "problem.dimension=5"], "problem.dimension"),
    "unknown-section": (lambda tmp: ["--set", "optimizer.lr=5"], "optimizer.lr"),
    "wrong-type": (lambda tmp: ["--set", "problem.d=fifty"], "problem.d"),
    "wrong-type-list": (lambda tmp: ["--set", "eval.shots=[5, x]"], "eval.shots[1]"),
    "wrong-type-choice": (lambda tmp: ["--set", "train.dtype=float16"], "train.dtype"),
    "malformed-list": (lambda tmp: ["--set", "problem.head_cov=[1, 2"], "problem.head_cov"),
    "nan": (lambda tmp: ["--set", "method.inner_lr=nan"], "method.inner_lr"),
    "yaml-nan": (lambda tmp: ["--set", "problem.noise_var=.nan"], "problem.noise_var"),
    "inf": (lambda tmp: ["--set", "method.outer_lr=inf"], "method.outer_lr"),
    "k>d": (lambda tmp: ["--set", "problem.k=21", "--set", "problem.d=20"], "problem.k"),
    "m_in<1": (lambda tmp: ["--set", "tasks.m_in=0"], "tasks.m_in"),
    "m_out<1": (lambda tmp: ["--set", "tasks.m_out=-2"], "tasks.m_out"),
    "width<1": (lambda tmp: ["--set", "model.width=0"], "model.width"),
    "negative-inner-lr": (lambda tmp: ["--set", "method.inner_lr=-0.1"], "method.inner_lr"),
    "negative-outer-lr": (lambda tmp: ["--set", "method.outer_lr=-1"], "method.outer_lr"),
    "zero-steps-per-record": (lambda tmp: ["--set", "train.record_every=0"],
                              "train.record_every"),
    "record-every-word": (lambda tmp: ["--set", "train.record_every=loga"],
                          "train.record_every"),
    "head-cov-length": (lambda tmp: ["--set", "problem.head_cov=[1, 2]"], "problem.head_cov"),
    "no-equals": (lambda tmp: ["--set", "problem.d"], "--set"),
    "missing-pool": (lambda tmp: ["--set", f"tasks.from={tmp / 'none.npz'}"], "tasks.from"),
    "missing-init": (lambda tmp: ["--set", f"model.init_from={tmp / 'none.npz'}"],
                     "model.init_from"),
    "pool-y-shape": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp, y=np.zeros((12, 7)))}",
                                  *POOL], "tasks.from"),
    "pool-B_star-shape": (lambda tmp: ["--set",
                                       f"tasks.from={pool_file(tmp, B_star=np.eye(5)[:, :2])}",
                                       *POOL], "tasks.from"),
    "pool-heads-shape": (lambda tmp: ["--set",
                                      f"tasks.from={pool_file(tmp, heads=np.zeros((11, 2)))}",
                                      *POOL], "tasks.from"),
    "pool-not-finite": (lambda tmp: ["--set",
                                     f"tasks.from={pool_file(tmp, y=np.full((12, 8), np.nan))}",
                                     *POOL], "tasks.from"),
    "pool-noise-negative": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp, noise_var=-1.0)}",
                                         *POOL], "tasks.from"),
    "pool-Sigma-not-diagonal": (lambda tmp: [
        "--set", f"tasks.from={pool_file(tmp, Sigma_star=np.ones((2, 2)))}", *POOL],
        "tasks.from"),
    "pool-Sigma-shape": (lambda tmp: ["--set",
                                      f"tasks.from={pool_file(tmp, Sigma_star=np.eye(3))}",
                                      *POOL], "tasks.from"),
    "pool-noise-contradicted": (lambda tmp: ["--set",
                                             f"tasks.from={pool_file(tmp, noise_var=0.25)}",
                                             *POOL, "--set", "problem.noise_var=1.0"],
                                "problem.noise_var"),
    "pool-Sigma-contradicted": (lambda tmp: ["--set",
                                             f"tasks.from={pool_file(tmp, Sigma_star=np.eye(2))}",
                                             *POOL, "--set", "problem.head_cov=[1, 3]"],
                                "problem.head_cov"),
    "pool-split": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp)}", "--set",
                                "tasks.m_in=4", "--set", "tasks.m_out=3"], "tasks.m_in"),
    "pool-too-few-tasks": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp)}", *POOL,
                                        "--set", "train.tasks_per_step=13"],
                           "train.tasks_per_step"),
    "init-d": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp)}", *POOL, "--set",
                            f"model.init_from={init_file(tmp, B=np.zeros((5, 4)))}"],
               "model.init_from"),
    "init-w": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp)}", *POOL, "--set",
                            f"model.init_from={init_file(tmp, w=np.zeros(3))}"],
               "model.init_from"),
    "init-not-a-file": (lambda tmp: ["--set", f"model.init_from={tmp}"], "model.init_from"),
    "pool-complex": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp, y=np.ones((12, 8)) * 1j)}",
                                  *POOL], "tasks.from"),
    "pool-too-big-for-memory": (lambda tmp: ["--set", "tasks.n=10000000000"], "tasks.n"),
    "online-too-big-for-memory": (lambda tmp: ["--set", "tasks.n=online", "--set",
                                               "train.tasks_per_step=10000000000"],
                                  "train.tasks_per_step"),
    "d-too-big-for-memory": (lambda tmp: ["--set", "problem.d=100000000000000"], "problem.d"),
    "shots-too-big-for-memory": (lambda tmp: ["--set", "eval.shots=[5, 100000000000000]"],
                                 "eval.shots"),
    "width-too-big-for-memory": (lambda tmp: ["--set", "model.width=100000000000000"],
                                 "model.width"),
    "records-too-many-for-memory": (lambda tmp: ["--set", "train.steps=1e12", "--set",
                                                 "train.record_every=1"], "train.steps"),
    "steps-beyond-a-lifetime": (lambda tmp: ["--set", "train.steps=1e15", "--set",
                                             "train.record_every=log"], "train.steps"),
    "eval-tasks-too-many-for-memory": (lambda tmp: ["--set", "eval.n_tasks=1e12"],
                                       "eval.n_tasks"),
    "pool-npy": (lambda tmp: ["--set", f"tasks.from={npy_file(tmp)}"], "tasks.from"),
    "init-npy": (lambda tmp: ["--set", f"model.init_from={npy_file(tmp)}"], "model.init_from"),
    "pool-text-file": (lambda tmp: ["--set", f"tasks.from={text_file(tmp)}"], "tasks.from"),
    "pool-objects": (lambda tmp: ["--set", f"tasks.from={object_file(tmp)}"], "tasks.from"),
    "pool-truncated": (lambda tmp: ["--set", f"tasks.from={truncated(pool_file(tmp))}", *POOL],
                       "tasks.from"),
    "init-zero-fixed-point": (lambda tmp: ["--set", f"tasks.from={pool_file(tmp)}", *POOL,
                                           "--set", "model.init_from=" + str(init_file(
                                               tmp, B=np.zeros((6, 4)), w=np.zeros(4)))],
                              "model.init_from"),
    "set-without-key": (lambda tmp: ["--set", "=3"], "--set"),
    "integer-as-huge-float": (lambda tmp: ["--set", "tasks.m_in=1e30"], "tasks.m_in"),
    "unknown-option": (lambda tmp: ["--bogus"], "--bogus"),
    "option-of-wrong-type": (lambda tmp: ["--progress=maybe"], "--progress"),
}


def npy_file(tmp_path: Path) -> Path:
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((3, 4)))
    return path


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.npz"
    path.write_text("X, y\n1, 2\n")
    return path


def object_file(tmp_path: Path) -> Path:
    path = tmp_path / "objects.npz"
    np.savez(path, X=np.array([{"a": 1}], dtype=object), y=np.zeros(2))
    return path


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line_naming_the_field_nothing_written(cli, error_line, tmp_path,
                                                                   case):
    make_args, key = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = cli("run", "quick", *make_args(tmp_path), "--out", out, "--no-progress")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    line = error_line(result)
    assert line.startswith(f"error: {key}") or f" {key}" in line or f"'{key}'" in line, line
    assert result.stdout == ""
    assert not out.exists()


def test_output_path_that_is_a_file(cli, error_line, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    result = cli("run", "quick", "--out", target)
    assert result.exit_code == EXIT_BAD_INPUT
    assert error_line(result).startswith("error: --out")
    assert target.read_text() == "mine"


def test_missing_config_file_and_bad_yaml(cli, error_line, tmp_path):
    result = cli("run", tmp_path / "none.yaml", "--out", tmp_path / "out")
    assert result.exit_code == EXIT_BAD_INPUT
    assert error_line(result).startswith("error: config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem: {d: 10, k: 2}\nmodel: {width: -3}\n")
    result = cli("run", bad, "--out", tmp_path / "out")
    assert result.exit_code == EXIT_BAD_INPUT
    assert error_line(result).startswith("error: model.width")
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_console_script(tmp_path):
    """The real entry point in a fresh interpreter: exit code 2, one line on stderr."""
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-c", "from metarep.cli import main; main()", "run", "quick",
         "--set", "model.width=0", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == EXIT_BAD_INPUT
    assert completed.stderr.splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith("error: model.width")
    assert completed.stdout == "" and not out.exists()


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_divergence_exit_3_names_step_sizes_and_keeps_results(cli, error_line, tmp_path, dtype):
    out = tmp_path / "out"
    result = cli("run", "quick", "--set", "method.outer_lr=1e6", "--set",
                    f"train.dtype={dtype}", "--out", out, "--no-progress")
    assert result.exit_code == EXIT_DIVERGED, result.output
    line = error_line(result)
    assert "diverged" in line and "method.outer_lr" in line and str(out) in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "method.outer_lr" in summary["error"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) >= 1 and metrics["step"].iloc[0] == 0
    assert (out / "params.npz").is_file() and (out / "config.yaml").is_file()
    assert not (out / "checkpoint.npz").exists()


def test_divergence_through_the_console_script(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-c", "from metarep.cli import main; main()", "run", "quick",
         "--set", "method.outer_lr=1e6", "--set", "train.dtype=float32", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == EXIT_DIVERGED
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "method.outer_lr" in completed.stderr
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file()


# ----------------------------------------------------------------------------- resume


SHORT = ["--set", "train.steps=60", "--set", "train.record_every=7", "--set", "eval.n_tasks=50",
         "--no-progress"]


class RunHooks:
    """The public hooks of :func:`metarep.run.experiment.run_experiment` for the runs of
    ``metarep run`` (whose command line cannot pass them): a checkpoint at every record
    (``checkpoint_seconds=0``), and an ``on_record`` that logs each record's step in ``steps``
    and interrupts the run (``KeyboardInterrupt``) at the first record at or after
    ``stop_at``."""

    def __init__(self, monkeypatch):
        self.stop_at: int | None = None
        self.steps: list[int] = []
        real = experiment.run_experiment

        def run(config, out_dir, on_record=None, **options):  # the CLI's own hook goes on
            def both(trajectory) -> None:
                if on_record is not None:
                    on_record(trajectory)
                self.on_record(trajectory)

            return real(config, out_dir, **options, on_record=both, checkpoint_seconds=0.0)

        monkeypatch.setattr(experiment, "run_experiment", run)  # the CLI imports it when it runs

    def on_record(self, trajectory) -> None:
        self.steps.append(trajectory.step)
        if self.stop_at is not None and trajectory.step >= self.stop_at:
            raise KeyboardInterrupt


def test_resume_continues_an_interrupted_run_to_the_same_result(cli, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert cli("run", "quick", *SHORT, "--out", reference).exit_code == 0

    hooks = RunHooks(monkeypatch)
    hooks.stop_at = 42
    out = tmp_path / "run"
    result = cli("run", "quick", *SHORT, "--out", out)
    assert result.exit_code != 0 and hooks.steps == [0, 7, 14, 21, 28, 35, 42]
    assert (out / "checkpoint.npz").is_file() and not (out / "summary.json").exists()
    with np.load(out / "checkpoint.npz") as data:
        assert int(data["step"]) == 42  # the record at the interruption

    hooks.steps.clear()
    hooks.stop_at = None
    result = cli("run", "quick", *SHORT, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert hooks.steps == [49, 56, 60]  # continued after step 42, not restarted
    with np.load(out / "params.npz") as resumed, np.load(reference / "params.npz") as straight:
        np.testing.assert_array_equal(resumed["B"], straight["B"])
        np.testing.assert_array_equal(resumed["w"], straight["w"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"),
                                  pd.read_csv(reference / "metrics.csv"))
    assert not (out / "checkpoint.npz").exists()
    assert json.loads((out / "summary.json").read_text())["provenance"]["resumed_at_step"] == 42


def test_log_record_grid_end_to_end(cli, tmp_path):
    """``train.record_every=log``: metrics.csv has one row per step of the geometric schedule
    (step 0, 1 .. 11, ~20 per decade, and T = 300), and config.yaml keeps the word."""
    out = tmp_path / "run"
    result = cli("run", "quick", "--set", "train.record_every=log", "--set", "train.steps=300",
                 "--set", "eval.n_tasks=50", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    steps = pd.read_csv(out / "metrics.csv")["step"].tolist()
    assert steps == list(RecordSchedule(300, "log").steps())
    assert steps[:12] == list(range(12)) and steps[-1] == 300
    assert sum(10 <= t < 100 for t in steps) >= 15 and sum(100 <= t < 300 for t in steps) >= 9
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["record_every"] == "log"


def test_resume_on_the_log_grid_equals_an_uninterrupted_run(tmp_path):
    """Interrupted (``KeyboardInterrupt`` from ``on_record``) after the record and checkpoint
    of step 126 of the geometric grid, then resumed: the records go on at the grid's next
    steps and the outputs equal those of an uninterrupted run."""
    config = load_config("quick", ["train.record_every=log", "train.steps=300",
                                   "eval.n_tasks=50"])
    schedule = list(RecordSchedule(300, "log").steps())
    straight = experiment.run_experiment(config, tmp_path / "straight", progress=False)
    seen: list[int] = []

    def interrupt(trajectory) -> None:
        seen.append(trajectory.step)
        if trajectory.step == 126:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, out, progress=False, on_record=interrupt,
                                  checkpoint_seconds=0.0)
    assert seen == schedule[:schedule.index(126) + 1]
    with np.load(out / "checkpoint.npz") as data:
        assert int(data["step"]) == 126
    seen.clear()
    resumed = experiment.run_experiment(config, out, progress=False, resume=True,
                                        on_record=lambda trajectory: seen.append(
                                            trajectory.step))
    assert seen == schedule[schedule.index(126) + 1:]
    pd.testing.assert_frame_equal(resumed.metrics, straight.metrics)
    assert resumed.metrics["step"].tolist() == schedule
    with np.load(out / "params.npz") as a, np.load(tmp_path / "straight" / "params.npz") as b:
        np.testing.assert_array_equal(a["B"], b["B"])
        np.testing.assert_array_equal(a["w"], b["w"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"),
                                  pd.read_csv(tmp_path / "straight" / "metrics.csv"))
    assert not (out / "checkpoint.npz").exists()


def test_resume_refuses_a_different_config(cli, error_line, tmp_path, monkeypatch):
    hooks = RunHooks(monkeypatch)
    hooks.stop_at = 20
    out = tmp_path / "run"
    cli("run", "quick", *SHORT, "--out", out)
    assert (out / "checkpoint.npz").is_file()
    hooks.stop_at = None
    result = cli("run", "quick", *SHORT, "--set", "method.outer_lr=0.01", "--out", out,
                    "--resume")
    assert result.exit_code == EXIT_BAD_INPUT
    assert error_line(result).startswith("error: --resume")


# ----------------------------------------------------------------------------- one given step


def numpy_fo_anil_step(B, w, X, y, m_in, alpha, beta, steps):
    """FO-ANIL (specification §3) on tasks (X_i, y_i) split at m_in, one task at a time."""
    n = X.shape[0]
    grad_B, grad_w = np.zeros_like(B), np.zeros_like(w)
    for i in range(n):
        X_in, y_in, X_out, y_out = X[i, :m_in], y[i, :m_in], X[i, m_in:], y[i, m_in:]
        w_i = w.copy()
        for _ in range(steps):
            w_i = w_i - alpha * B.T @ X_in.T @ (X_in @ B @ w_i - y_in) / m_in
        v = X_out.T @ (X_out @ B @ w_i - y_out) / len(y_out)
        grad_B += np.outer(v, w_i)
        grad_w += B.T @ v
    return B - beta * grad_B / n, w - beta * grad_w / n


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("with_truth", [True, False])
def test_one_step_on_a_given_pool_and_init_matches_numpy(cli, tmp_path, inner_steps, with_truth):
    pool = pool_file(tmp_path, n=30, m=8, d=6, **({} if with_truth else {"B_star": None,
                                                                         "heads": None}))
    init = init_file(tmp_path, d=6, width=4)
    out = tmp_path / "out"
    result = cli("run", "quick", "--set", f"tasks.from={pool}", "--set",
                    f"model.init_from={init}", *POOL, "--set", "train.steps=1", "--set",
                    "method.inner_lr=0.3", "--set", "method.outer_lr=0.7", "--set",
                    f"method.inner_steps={inner_steps}", "--set", "eval.n_tasks=20",
                    "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    with np.load(pool) as p, np.load(init) as i:
        expected_B, expected_w = numpy_fo_anil_step(i["B"], i["w"], p["X"], p["y"], 5, 0.3, 0.7,
                                                    inner_steps)
    with np.load(out / "params.npz") as params:
        np.testing.assert_allclose(params["B"], expected_B, rtol=0, atol=1e-10)
        np.testing.assert_allclose(params["w"], expected_w, rtol=0, atol=1e-10)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["problem"]["d"] == 6 and resolved["tasks"]["n"] == 30
    assert resolved["model"]["width"] == 4
    if with_truth:
        assert resolved["problem"]["k"] == 2
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [0, 1]
    assert metrics["perp_norm"].notna().all() == with_truth
    assert (out / "eval.csv").is_file() == with_truth
    with np.load(out / "params.npz") as params:
        assert ("B_star" in params.files) == with_truth


def test_a_run_without_evaluation_leaves_no_stale_eval_files(cli, tmp_path):
    """A run that replaces another (--overwrite) leaves none of the old run's files."""
    out = tmp_path / "out"
    args = ["run", "quick", *POOL, "--set", "train.steps=1", "--set", "eval.n_tasks=20",
            "--out", out, "--no-progress"]
    assert cli(*args).exit_code == 0
    assert (out / "eval.csv").is_file() and (out / "eval.png").is_file()
    pool = pool_file(tmp_path, n=30, m=8, d=6, B_star=None, heads=None)
    result = cli(*args, "--set", f"tasks.from={pool}", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "eval.csv").exists() and not (out / "eval.png").exists()


def test_a_pool_with_its_own_noise_and_head_covariance_is_judged_by_them(cli, tmp_path):
    """The file's sigma^2 and Sigma_star replace the base config's (and are recorded in
    config.yaml), so the references are those of the file's tasks: least squares on X B_star
    has the expected risk sigma^2 k / (m - k - 1) of the file's sigma^2."""
    rng = np.random.default_rng(3)
    d, k, n, m, noise = 8, 2, 300, 12, 0.25
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0]
    Sigma = np.diag([1.0, 3.0])
    heads = rng.standard_normal((n, k)) @ np.sqrt(Sigma)
    X = rng.standard_normal((n, m, d))
    y = np.einsum("nmd,nd->nm", X, heads @ B_star.T) + np.sqrt(noise) * rng.standard_normal((n, m))
    pool = tmp_path / "pool.npz"
    np.savez(pool, X=X, y=y, B_star=B_star, heads=heads, noise_var=noise, Sigma_star=Sigma)
    out = tmp_path / "out"
    result = cli("run", "quick", "--set", f"tasks.from={pool}", "--set", "tasks.m_in=6",
                 "--set", "tasks.m_out=6", "--set", "train.steps=2", "--set", "eval.shots=[8]",
                 "--set", "eval.n_tasks=4000", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())["problem"]
    assert resolved["noise_var"] == noise and resolved["head_cov"] == [1.0, 3.0]
    rows = pd.read_csv(out / "eval.csv").set_index("method")
    assert rows.loc["oracle-lsq", "theory"] == pytest.approx(noise * k / (8 - k - 1))
    z = (rows.loc["oracle-lsq", "excess_risk"] - rows.loc["oracle-lsq", "theory"]) / rows.loc[
        "oracle-lsq", "stderr"]
    assert abs(z) < 4


def test_a_pool_without_ground_truth_is_judged_on_its_own_held_out_tasks(cli, tmp_path):
    rng = np.random.default_rng(4)
    d, k, m = 6, 2, 8
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0]

    def tasks(n: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        X = rng.standard_normal((n, rows, d))
        heads = rng.standard_normal((n, k))
        return X, np.einsum("nmd,nd->nm", X, heads @ B_star.T) + 0.3 * rng.standard_normal(
            (n, rows))

    X, y = tasks(200, m)
    Xt, yt = tasks(100, 20)
    pool, held = tmp_path / "pool.npz", tmp_path / "held.npz"
    np.savez(pool, X=X, y=y)
    np.savez(held, X=Xt, y=yt)
    out = tmp_path / "out"
    base = ["run", "quick", "--set", f"tasks.from={pool}", "--set", "tasks.m_in=4", "--set",
            "tasks.m_out=4", "--set", "train.steps=50", "--set", "eval.shots=[3,10]"]
    result = cli(*base, "--set", f"tasks.test_from={held}", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert not (out / "eval.csv").exists()  # no synthetic tasks from config defaults
    rows = pd.read_csv(out / "heldout.csv")
    assert list(rows.columns) == ["method", "shots", "risk", "stderr", "n_tasks"]
    assert set(rows["method"]) == {"fo-anil", "regression-lsq", "zero"}
    assert (rows["n_tasks"] == 100).all()
    bad = cli(*base, "--set", f"tasks.test_from={held}", "--set", "eval.shots=[20]",
              "--out", tmp_path / "bad", "--no-progress")
    assert bad.exit_code == 2 and "eval.shots" in bad.stderr
    assert not (tmp_path / "bad").exists()
    alone = cli("run", "quick", "--set", f"tasks.test_from={held}", "--out", tmp_path / "x")
    assert alone.exit_code == 2 and "tasks.test_from" in alone.stderr


def _pool_with_truth(rng: np.random.Generator, n: int, m: int, d: int, Sigma: np.ndarray,
                     noise: float) -> dict[str, np.ndarray]:
    k = Sigma.shape[0]
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0]
    heads = rng.standard_normal((n, k)) @ np.linalg.cholesky(Sigma).T
    X = rng.standard_normal((n, m, d))
    y = np.einsum("nmd,nd->nm", X, heads @ B_star.T) + np.sqrt(noise) * rng.standard_normal((n, m))
    return {"X": X, "y": y, "B_star": B_star, "heads": heads}


def test_a_pool_with_heads_but_no_stated_noise_or_covariance_is_judged_by_their_estimates(
        cli, tmp_path):
    """Without noise_var and Sigma_star in the file, the heads give both: sigma^2 as the mean
    squared residual and Sigma_star (not diagonal here) as the heads' second moment, written in
    its eigenframe; summary.json says where each came from. The oracle least-squares risk then
    matches sigma^2 k / (m - k - 1) of the file's true sigma^2, not the config's."""
    rng = np.random.default_rng(8)
    noise, Sigma = 0.25, np.array([[2.0, 0.9, 0.0], [0.9, 1.0, 0.3], [0.0, 0.3, 0.5]])
    arrays = _pool_with_truth(rng, 2000, 12, 8, Sigma, noise)
    pool = tmp_path / "pool.npz"
    np.savez(pool, **arrays)
    out = tmp_path / "out"
    base = ["run", "quick", "--set", f"tasks.from={pool}", "--set", "tasks.m_in=6", "--set",
            "tasks.m_out=6", "--set", "train.steps=2", "--set", "eval.shots=[8]", "--set",
            "eval.n_tasks=3000", "--set", "model.width=8", "--no-progress"]
    result = cli(*base, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    estimated = "estimated from the heads of tasks.from"
    assert summary["ground_truth"] == {"B_star": "tasks.from", "problem.head_cov": estimated,
                                       "problem.noise_var": estimated}
    resolved = yaml.safe_load((out / "config.yaml").read_text())["problem"]
    assert resolved["noise_var"] == pytest.approx(noise, rel=4 * np.sqrt(2 / (2000 * 12)))
    heads = arrays["heads"]
    assert resolved["head_cov"] == pytest.approx(
        sorted(np.linalg.eigvalsh(heads.T @ heads / 2000), reverse=True))
    params = np.load(out / "params.npz")
    B_star = params["B_star"]  # the file's span, in the heads' eigenframe
    assert np.allclose(B_star @ B_star.T, arrays["B_star"] @ arrays["B_star"].T)
    assert np.allclose(params["Sigma_star"], np.diag(resolved["head_cov"]))
    rows = pd.read_csv(out / "eval.csv").set_index("method")
    lsq = rows.loc["oracle-lsq"]
    assert abs(lsq["excess_risk"] - noise * 3 / (8 - 3 - 1)) < 4 * lsq["stderr"]
    # A value the user sets wins over the estimate and is said to be the config's.
    out_set = tmp_path / "set"
    result = cli(*base, "--set", "problem.noise_var=0.5", "--out", out_set)
    assert result.exit_code == 0, result.output
    summary = json.loads((out_set / "summary.json").read_text())
    assert summary["ground_truth"]["problem.noise_var"] == "set in the config"
    assert yaml.safe_load((out_set / "config.yaml").read_text())["problem"]["noise_var"] == 0.5
    # B_star alone: the config's values, and the summary says so.
    np.savez(pool, X=arrays["X"], y=arrays["y"], B_star=arrays["B_star"])
    out_bare = tmp_path / "bare"
    assert cli(*base, "--out", out_bare).exit_code == 0
    sources = json.loads((out_bare / "summary.json").read_text())["ground_truth"]
    assert sources["problem.noise_var"].startswith("config default")


def test_pool_files_whose_heads_cannot_be_used_are_refused(cli, tmp_path):
    rng = np.random.default_rng(9)
    arrays = _pool_with_truth(rng, 50, 12, 6, np.eye(2), 0.1)
    base = ["run", "quick", "--set", "tasks.m_in=6", "--set", "tasks.m_out=6", "--set",
            "eval.shots=[3]", "--no-progress"]
    no_truth = tmp_path / "heads_only.npz"
    np.savez(no_truth, X=arrays["X"], y=arrays["y"], heads=arrays["heads"])
    result = cli(*base, "--set", f"tasks.from={no_truth}", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "tasks.from" in result.stderr and "B_star" in result.stderr
    flat = tmp_path / "flat.npz"
    np.savez(flat, **{**arrays, "heads": np.outer(np.ones(50), [1.0, 0.0])})
    result = cli(*base, "--set", f"tasks.from={flat}", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "problem.head_cov" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_test_split_holds_out_the_last_tasks_of_the_pool(cli, tmp_path):
    """The last tasks.test_split tasks are evaluated on as held-out tasks (heldout.csv) and are
    not trained on: the run equals one on the first N - test_split tasks with those last
    tasks as tasks.test_from."""
    rng = np.random.default_rng(10)
    arrays = _pool_with_truth(rng, 60, 12, 6, np.eye(2), 0.1)
    X, y = arrays["X"], arrays["y"]
    whole, first, last = tmp_path / "whole.npz", tmp_path / "first.npz", tmp_path / "last.npz"
    np.savez(whole, X=X, y=y)
    np.savez(first, X=X[:45], y=y[:45])
    np.savez(last, X=X[45:], y=y[45:])
    base = ["run", "quick", "--set", "tasks.m_in=6", "--set", "tasks.m_out=6", "--set",
            "train.steps=20", "--set", "eval.shots=[3,8]", "--set", "model.width=4",
            "--no-progress"]
    split, apart = tmp_path / "split", tmp_path / "apart"
    assert cli(*base, "--set", f"tasks.from={whole}", "--set", "tasks.test_split=15",
               "--out", split).exit_code == 0
    assert cli(*base, "--set", f"tasks.from={first}", "--set", f"tasks.test_from={last}",
               "--out", apart).exit_code == 0
    assert yaml.safe_load((split / "config.yaml").read_text())["tasks"]["n"] == 45
    pd.testing.assert_frame_equal(pd.read_csv(split / "heldout.csv"),
                                  pd.read_csv(apart / "heldout.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(split / "metrics.csv"),
                                  pd.read_csv(apart / "metrics.csv"))
    for value, key in (("60", "tasks.test_split"), ("1", "tasks.test_split")):
        bad = cli(*base, "--set", f"tasks.from={whole}", "--set", f"tasks.test_split={value}",
                  "--out", tmp_path / "bad")
        assert bad.exit_code == 2 and key in bad.stderr
    both = cli(*base, "--set", f"tasks.from={first}", "--set", f"tasks.test_from={last}",
               "--set", "tasks.test_split=5", "--out", tmp_path / "bad")
    assert both.exit_code == 2 and "tasks.test_split" in both.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("command", "default"), [("run", "runs/NAME"), ("sweep", "runs/STEM"),
                                                  ("reproduce", "runs/reproduce-SCALE")])
def test_help_keeps_the_defaults_written_in_brackets(cli, command, default):
    """Rich would read ``[default: ...]`` as markup and drop it; the help escapes it."""
    result = cli(command, "--help")
    assert result.exit_code == 0 and default in result.stdout and "CPUs" in cli(
        "sweep", "--help").stdout


def test_finished_work_is_never_replaced_by_accident(cli, error_line, tmp_path, monkeypatch):
    """A finished run is refused as --out (also with --resume) unless --force (alias
    --overwrite), which the refusal names; an interrupted one needs --resume or --force and
    is named with its step; a directory of other files is refused; each refusal is exit 2
    naming --out, with the files untouched."""
    out = tmp_path / "run"
    assert cli("run", "quick", *SHORT, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--resume"], ["--set", "model.width=5"]):
        result = cli("run", "quick", *SHORT, *extra, "--out", out)
        assert result.exit_code == 2 and "error: --out:" in error_line(result)
        assert "finished run" in result.stderr and "--force" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli("run", "quick", *SHORT, "--set", "model.width=5", "--out", out,
               "--force").exit_code == 0
    assert "width: 5" in (out / "config.yaml").read_text()

    hooks = RunHooks(monkeypatch)
    hooks.stop_at = 21
    interrupted = tmp_path / "interrupted"
    assert cli("run", "quick", *SHORT, "--out", interrupted).exit_code != 0
    result = cli("run", "quick", *SHORT, "--out", interrupted)
    message = error_line(result)
    assert result.exit_code == 2 and message.startswith("error: --out:")
    assert "step 21" in message and "--resume" in message and "--force" in message
    hooks.stop_at = None
    assert cli("run", "quick", *SHORT, "--out", interrupted, "--overwrite").exit_code == 0
    assert hooks.steps[-4:] == [42, 49, 56, 60] and hooks.steps[-10] == 0  # started again

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "draft.txt").write_text("mine\n")
    result = cli("run", "quick", *SHORT, "--out", foreign, "--overwrite")
    assert result.exit_code == 2 and "not a run's" in error_line(result)
    assert result.stderr.startswith("error: --out:")
    assert [p.name for p in foreign.iterdir()] == ["draft.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".summary.json.x1.tmp").write_text("")  # left by a killed atomic write
    assert cli("run", "quick", *SHORT, "--out", empty).exit_code == 0


@pytest.mark.parametrize("command", ["run", "sweep", "reproduce"])
def test_output_paths_are_checked_before_any_work(cli, error_line, tmp_path, command):
    """An empty --out, one below a regular file and one that is a file are refused with exit
    2 naming --out, before anything runs or is written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: quick\nset: {train.steps: 2}\ngrid: {model.width: [2]}\n")
    head = {"run": ["run", "quick"], "sweep": ["sweep", sweep],
            "reproduce": ["reproduce", "--scale", "quick"]}[command]
    for out, reason in (("", "must not be empty"), (blocker / "below", "not a directory"),
                        (blocker, "not a directory")):
        result = cli(*head, "--out", out, "--no-progress")
        assert result.exit_code == 2, (out, result.output)
        line = error_line(result)
        assert line.startswith("error: --out:") and reason in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "s.yaml"]


def test_an_unwritable_output_directory_is_refused(error_line, cli, tmp_path, monkeypatch):
    """(As root every directory is writable to os.access, so the check is driven through it.)"""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and Path(
        path) != locked)
    result = cli("run", "quick", "--out", locked / "run", "--no-progress")
    assert result.exit_code == 2 and "not writable" in error_line(result)
    assert not (locked / "run").exists()


def test_a_run_logged_to_a_file_prints_a_heartbeat(cli, tmp_path, monkeypatch):
    """stderr not a terminal (a log file, CliRunner): the run prints where it is, at records,
    at most every HEARTBEAT_SECONDS (0 here: at every record); --no-progress keeps quiet."""
    from metarep import cli as cli_module

    monkeypatch.setattr(cli_module, "HEARTBEAT_SECONDS", 0.0)
    result = cli("run", "quick", *SHORT[:-1], "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("[run] step ") for line in lines)
    assert lines[-1].startswith("[run] step 60/60 (100%), train_loss = ")
    quiet = cli("run", "quick", *SHORT, "--out", tmp_path / "quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
