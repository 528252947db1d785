"""The run configuration: one typed, validated, documented schema.

A configuration is a tree of frozen dataclasses (``Config.problem``, ``Config.tasks``, ...).
Every leaf is declared once with :func:`param`, which carries its default, its one-line
documentation (rendered into README's key table by :func:`key_table`) and its checker. The
checker turns a raw value (from YAML or from ``--set key=value``) into the typed value or
raises :class:`ConfigError` naming the dotted key and the allowed range.

Symbols follow ``docs/specification.md``: ``d``, ``k``, ``k'`` (= ``model.width``), ``m_in``,
``m_out``, ``alpha`` (= ``method.inner_lr``), ``beta`` (= ``method.outer_lr``), ``sigma^2``
(= ``problem.noise_var``) and ``Sigma_star`` (= ``problem.head_cov``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metarep.core.expected_steps import MAX_INNER_STEPS
from metarep.core.methods import METHOD_NAMES
from metarep.engine import DEVICES
from metarep.errors import ConfigError

Checker = Callable[[str, Any], Any]

BUILTIN_CONFIGS = ("paper", "quick")
DTYPES = ("float64", "float32")
LINEAR_BACKENDS = ("numpy", "torch")  # where linear runs compute (metarep.run.backends.linear)
TASK_SAMPLERS = ("numpy", "torch")  # how drawn tasks are sampled (metarep.run.backends.sources)
MODEL_KINDS = ("linear", "relu")
SINK_NAMES = ("tensorboard", "wandb", "mlflow")  # logging sinks (metarep.run.sinks)
HEAD_COV_NAMES = ("isotropic", "linear")


# ----------------------------------------------------------------------------- checkers


LARGEST_NUMBER = 2**63 - 1
"""No config value may exceed this in size (int64): larger integers fit no array index, step
count or seed, and do not convert to a float."""


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(value, int) and abs(value) > LARGEST_NUMBER:
        raise ConfigError(key, f"must be at most 2^63 - 1 in size, got a number of "
                          f"{len(str(abs(value)))} digits")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    if not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {value!r}")
    return value


def integer(lo: int | None = None, hi: int | None = None) -> Checker:
    """Checker for an integer in ``[lo, hi]`` (either bound optional)."""

    def check(key: str, value: Any) -> int:
        number = _number(key, value)
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        number = int(number)
        if abs(number) > LARGEST_NUMBER:  # a float such as 1e30
            raise ConfigError(key, f"must be at most 2^63 - 1 in size, got {value!r}")
        _check_bounds(key, number, lo, hi, "an integer")
        return number

    return check


def real(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Checker:
    """Checker for a finite real in ``[lo, hi]`` (``(lo, hi]`` when ``open_lo``)."""

    def check(key: str, value: Any) -> float:
        number = float(_number(key, value))
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        if open_lo and lo is not None and number <= lo:
            raise ConfigError(key, f"must be > {lo}, got {value!r}")
        _check_bounds(key, number, lo, hi, "a number")
        return number

    return check


def _check_bounds(key: str, number: float, lo: float | None, hi: float | None, kind: str) -> None:
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        raise ConfigError(key, f"must be {kind} in [{low}, {high}], got {number!r}")


def choice(options: Iterable[str]) -> Checker:
    """Checker for one of a fixed set of strings."""
    allowed = tuple(options)

    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a pasted 400-digit number stays one
    readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_of(*checkers: Checker, describe: str) -> Checker:
    """Checker accepting whatever the first successful checker accepts."""

    def check(key: str, value: Any) -> Any:
        for checker in checkers:
            try:
                return checker(key, value)
            except ConfigError:
                continue
        raise ConfigError(key, f"must be {describe}; got {_shown(value)}")

    return check


def literal(*words: str) -> Checker:
    """Checker for a literal keyword such as ``online``."""

    def check(key: str, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in words:
            return value.lower()
        raise ConfigError(key, f"must be one of {', '.join(words)}; got {value!r}")

    return check


def boolean(key: str, value: Any) -> bool:
    """Checker for a switch: YAML ``true`` / ``false``."""
    if isinstance(value, bool):
        return value
    raise ConfigError(key, f"must be true or false; got {_shown(value)}")


INFINITY_WORDS = ("inf", ".inf", "infinity", "infinite")


def infinity(key: str, value: Any) -> float:
    """Checker for an infinite sample count: YAML ``.inf``, or the words inf / infinity."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return math.inf
    if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
        return math.inf
    raise ConfigError(key, f"must be inf; got {value!r}")


def optional(checker: Checker) -> Checker:
    """Checker accepting ``null`` (YAML null, or the words null/none/all) or a checked value."""

    def check(key: str, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "all")):
            return None
        return checker(key, value)

    return check


def optional_path(key: str, value: Any) -> str | None:
    """Checker for an optional file path (existence is checked when the file is loaded)."""
    if value is None or value == "" or value == "null":
        return None
    if not isinstance(value, str | Path):
        raise ConfigError(key, f"expected a file path, got {value!r}")
    return str(value)


def _inline_list(key: str, text: str) -> Any:
    """Parse a YAML flow list written as a string (``"[1, 2]"``), e.g. from ``--set``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(key, f"expected a list such as [1, 2], got {text!r}") from None


def head_covariance(key: str, value: Any) -> str | tuple[float, ...]:
    """Checker for ``problem.head_cov``: a name or a list of positive eigenvalues."""
    if isinstance(value, str) and value.startswith("["):
        value = _inline_list(key, value)
    if isinstance(value, str):
        return choice(HEAD_COV_NAMES)(key, value)
    if isinstance(value, list | tuple) and value:
        check = real(0.0, open_lo=True)
        return tuple(check(f"{key}[{i}]", v) for i, v in enumerate(value))
    raise ConfigError(
        key, f"must be one of {', '.join(HEAD_COV_NAMES)} or a list of k positive numbers; "
        f"got {value!r}"
    )


def _listed(key: str, value: Any) -> Any:
    """A list-valued key's ``value`` as a list where it is the inline text of ``--set``
    (``[5, 10]``, or ``5``) or one integer; any other value as it is."""
    if isinstance(value, str):
        return _inline_list(key, value if value.startswith("[") else f"[{value}]")
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return value


def shot_list(key: str, value: Any) -> tuple[int, ...]:
    """Checker for ``eval.shots``: a non-empty list of sample counts >= 1."""
    value = _listed(key, value)
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(key, f"must be a non-empty list of integers >= 1; got {value!r}")
    check = integer(1)
    return tuple(check(f"{key}[{i}]", v) for i, v in enumerate(value))


def step_list(key: str, value: Any) -> tuple[int, ...]:
    """Checker for ``eval.at_steps``: training steps >= 1 (a list, the inline ``[400, 800]``
    of ``--set``, one step, or null / ``[]`` for none), increasing, each once."""
    value = [] if value is None else _listed(key, value)
    if not isinstance(value, list | tuple):
        raise ConfigError(key, f"must be a list of training steps >= 1; got {_shown(value)}")
    check = integer(1)
    steps = tuple(check(f"{key}[{i}]", v) for i, v in enumerate(value))
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        raise ConfigError(key, f"must be increasing, each step once; got {list(steps)}")
    return steps


def sink_list(key: str, value: Any) -> tuple[str, ...]:
    """Checker for ``log.sinks``: distinct names of :data:`SINK_NAMES` (a list, the inline
    ``[tensorboard, mlflow]`` of ``--set``, one name, or null / ``[]`` for none), in the
    order of :data:`SINK_NAMES`."""
    if isinstance(value, str):
        value = _inline_list(key, value if value.startswith("[") else f"[{value}]")
    if value is None:
        value = []
    allowed = ", ".join(SINK_NAMES)
    if not isinstance(value, list | tuple):
        raise ConfigError(key, f"must be a list of sinks ({allowed}); got {_shown(value)}")
    for i, name in enumerate(value):
        if name not in SINK_NAMES:
            raise ConfigError(key, f"unknown sink {_shown(name)}; choose from {allowed}")
        if name in value[:i]:
            raise ConfigError(key, f"lists {name} twice; list each sink once")
    return tuple(name for name in SINK_NAMES if name in value)


def param(default: Any, doc: str, check: Checker, name: str | None = None) -> Any:
    """Declare one configuration leaf: its default, documentation and checker.

    ``name`` overrides the key when the attribute name cannot be used (``tasks.from``).
    """
    metadata = {"doc": doc, "check": check, "name": name}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ProblemConfig:
    """The task distribution (specification §1)."""

    d: int = param(50, "ambient dimension d", integer(1))
    k: int = param(5, "latent dimension k of B_star (1 <= k <= d)", integer(1))
    noise_var: float = param(4.0, "label noise variance sigma^2 (>= 0)", real(0.0))
    head_cov: str | tuple[float, ...] = param(
        "linear",
        "Sigma_star: `isotropic` (I_k), `linear` (diag(1..k) scaled to trace k) or a list "
        "of k positive eigenvalues (used as given)",
        head_covariance,
    )
    seed: int = param(0, "seed of B_star", integer(0))


@dataclass(frozen=True)
class TasksConfig:
    """The training tasks: a finite pool, fresh tasks every step, or the exact limit."""

    n: int | str = param(
        5000,
        "number N of tasks in the pool (>= 1), `online` (fresh tasks every step) or `infinite` "
        "(exact expected dynamics of fo-anil (1-3 inner steps), anil (1-2), fo-maml and maml "
        "(1), see docs/infinite_tasks.md)",
        one_of(integer(1), literal("online", "infinite"),
               describe="an integer >= 1, online or infinite"),
    )
    m_in: int | float = param(
        20,
        "inner (support) samples per task m_in (>= 1); `inf` (infinitely many, YAML `.inf`) "
        "only with tasks.n: infinite",
        one_of(integer(1), infinity,
               describe="an integer in [1, inf] (inf only with tasks.n: infinite)"),
    )
    m_out: int = param(10, "outer (query) samples per task m_out (>= 1)", integer(1))
    seed: int = param(1, "seed of the task pool / online task stream", integer(0))
    from_: str | None = param(
        None,
        "`.npz` file with `X` (N, m, d) and `y` (N, m), optional `B_star` (d, k), `heads` "
        "(N, k), `noise_var` and a diagonal `Sigma_star` (k, k); its N, d, k, noise_var and "
        "Sigma_star replace tasks.n, problem.d, problem.k, problem.noise_var and "
        "problem.head_cov (an explicit --set that contradicts them is refused); without "
        "noise_var or Sigma_star, the heads estimate them unless set (README: Bring your own "
        "tasks)",
        optional_path,
        name="from",
    )
    test_from: str | None = param(
        None,
        "`.npz` file of held-out tasks `X` (N', m', d), `y` (N', m') for a tasks.from pool "
        "(with or without `B_star`): the method adapts on the first m_test rows of each and is "
        "scored by its squared error on the others, next to least squares and the zero "
        "predictor (heldout.csv)",
        optional_path,
    )
    test_split: int = param(
        0,
        "hold out the last test_split tasks of the tasks.from pool (0: none; else 2 to N - 1) "
        "and evaluate on them as on tasks.test_from's; the first N - test_split are trained on "
        "(tasks.n)",
        integer(0),
    )
    sampler: str = param(
        "numpy",
        "how drawn tasks (a pool or online ones) are sampled: `numpy` (numpy's PCG64 stream, "
        "the same tasks on every backend) or `torch` (torch's CPU generator, inputs drawn "
        "directly in train.dtype: the same distribution, another stream, 2-3 times faster in "
        "float32 and slower in float64; needs `pip install metarep[torch]`)",
        choice(TASK_SAMPLERS),
    )


@dataclass(frozen=True)
class ModelConfig:
    """The network: two-layer linear x -> x^T B w, or a ReLU body with a linear head
    (specification §2; see :mod:`metarep.engine.networks`)."""

    width: int = param(50, "width k' of the representation B (d x k'), >= 1", integer(1))
    init_scale: float = param(
        1.0,
        "B_0 has i.i.d. N(0, init_scale^2 / d) entries, so each column has norm ~ init_scale. "
        "relu: the same for the first layer W1; W2 has N(0, 2 / hidden_width) entries",
        real(0.0),
    )
    head_scale: float = param(
        0.0,
        "w_0 has i.i.d. N(0, head_scale^2 / k') entries, drawn after B_0 (norm ~ head_scale); "
        "0: w_0 = 0, the paper's setting (linear model only)",
        real(0.0),
    )
    init_from: str | None = param(
        None, "`.npz` file with `B` (d, k') and `w` (k'); its k' replaces model.width. relu: "
        "`W1` (d, h), `W2` (h, k') when hidden_layers = 2, and `w` (k')",
        optional_path,
    )
    seed: int = param(2, "seed of the initialisation B_0", integer(0))
    kind: str = param(
        "linear",
        "`linear` (x^T B w, numpy or torch fast path: train.backend) or `relu` (ReLU body, "
        "linear head; trained with the torch engine, needs `pip install metarep[torch]`)",
        choice(MODEL_KINDS),
    )
    hidden_layers: int = param(
        1, "relu: hidden layers, 1 (relu(x^T W1) w, W1 d x k') or 2 "
        "(relu(relu(x^T W1) W2) w, W1 d x hidden_width, W2 hidden_width x k')", integer(1, 2),
    )
    hidden_width: int = param(
        50, "relu with hidden_layers = 2: width h of the first hidden layer (>= 1)", integer(1)
    )


@dataclass(frozen=True)
class MethodConfig:
    """The meta-learning algorithm and its step sizes (specification §3)."""

    name: str = param(
        "fo-anil",
        "algorithm: " + ", ".join(METHOD_NAMES) + " (see README, Methods)",
        choice(METHOD_NAMES),
    )
    inner_lr: float = param(
        0.5,
        "inner step size alpha (> 0); also the test-time head step size (mtl: only there)",
        real(0.0, open_lo=True),
    )
    outer_lr: float = param(0.2, "outer step size beta (> 0)", real(0.0, open_lo=True))
    inner_steps: int = param(1, "inner gradient steps per task (>= 1)", integer(1, 1000))


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop."""

    steps: int = param(5000, "number of outer steps T (>= 0)", integer(0))
    record_every: int | str = param(
        50,
        "record the measures every this many steps (>= 1), or `log`: on a geometric grid, the "
        "steps round(10^(j/20)) for j = 0, 1, 2, ... (every step up to 11, then ~20 per "
        "decade, for log axes); step 0 and T always",
        one_of(integer(1), literal("log"), describe="an integer in [1, inf] or log"),
    )
    dtype: str = param("float64", "floating point type: float64 or float32", choice(DTYPES))
    device: str = param(
        "cpu",
        "device of the torch engine (model.kind: relu) and of torch-backend linear runs: cpu, "
        "cuda (an error when absent) or auto (cuda when present); a linear run on cuda (or "
        "auto with a GPU) computes with torch whatever train.backend says",
        choice(DEVICES),
    )
    backend: str = param(
        "numpy",
        "linear runs (model.kind: linear): compute with numpy or torch (on train.device; needs "
        "`pip install metarep[torch]`; the same formulas and tasks, equal to numpy's to "
        "rounding)",
        choice(LINEAR_BACKENDS),
    )
    tasks_per_step: int | None = param(
        None,
        "tasks sampled (without replacement) per step; null = the whole pool. Required for "
        "tasks.n: online",
        optional(integer(1)),
    )
    task_chunk: int | None = param(
        None,
        "torch engine (model.kind: relu): compute each step on at most this many tasks at a "
        "time (>= 1), summing their gradients, to bound memory (same results up to rounding); "
        "null = all tasks at once",
        optional(integer(1)),
    )
    deterministic: bool = param(
        False,
        "torch computations (the engine, model.kind: relu, and torch-backend linear runs): "
        "compute with torch.use_deterministic_algorithms(True) (and "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set), so a GPU run repeats bit for bit; the "
        "previous settings are restored afterwards. numpy runs are deterministic anyway",
        boolean,
    )


@dataclass(frozen=True)
class EvalConfig:
    """Test-time adaptation on fresh tasks."""

    shots: tuple[int, ...] = param(
        (5, 10, 20, 40, 80, 160), "test sample counts m_test (list of integers >= 1)", shot_list
    )
    n_tasks: int = param(2000, "fresh test tasks per m_test (>= 2)", integer(2))
    adapt_steps: int = param(1, "head gradient steps at test time (>= 0)", integer(0, 1000))
    seed: int = param(3, "seed of the test tasks", integer(0))
    at_steps: tuple[int, ...] = param(
        (), "training steps (each < train.steps) at which the model is also evaluated, as at "
        "the end, into eval_steps.csv (one row set per step)", step_list)


@dataclass(frozen=True)
class LogConfig:
    """Where a run's records are logged besides ``metrics.csv`` (:mod:`metarep.run.sinks`)."""

    sinks: tuple[str, ...] = param(
        (),
        "logging sinks, any subset of [tensorboard, wandb, mlflow] (each needs `pip install "
        "metarep[NAME]`): every recorded measure at its step, the config and the summary, "
        "into the run directory's `tb/`, offline `wandb/` run and `mlruns/` store (README: "
        "Watching runs)",
        sink_list,
    )


@dataclass(frozen=True)
class Config:
    """A complete, validated run configuration. ``explicit`` holds the dotted keys the user set
    on top of the base config (``--set``, a sweep's cell): a value read from a file (a task
    pool's ``noise_var``, say) may replace a base value, but contradicting an explicit one is
    an error."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "custom"
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def replace(self, **dotted: Any) -> Config:
        """Return a copy with dotted keys replaced, e.g. ``cfg.replace(**{"problem.d": 10})``
        (the replaced keys do not become explicit)."""
        return from_dict(to_dict(self), dotted, name=self.name, explicit=self.explicit)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("name", "explicit")
}


def _key(section_field: dataclasses.Field) -> str:
    return section_field.metadata.get("name") or section_field.name


def iter_keys() -> Iterable[tuple[str, dataclasses.Field]]:
    """All dotted keys of the schema with their dataclass fields, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{_key(f)}", f


def key_table() -> str:
    """A Markdown table of every key, its default and its documentation (for README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, f in iter_keys():
        default = f.default if not isinstance(f.default, tuple) else list(f.default)
        shown = "null" if default is None else default
        if isinstance(default, bool):  # as YAML spells it
            shown = "true" if default else "false"
        rows.append(f"| `{key}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- building


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of a config (YAML-ready: tuples become lists)."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = getattr(config, section)
        out[section] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            out[section][_key(f)] = list(value) if isinstance(value, tuple) else value
    return out


def flatten(tree: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A nested config tree as ``{dotted key: value}`` (``{"model": {"width": 3}}`` gives
    ``{"model.width": 3}``)."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{where}.{name}" if where else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, key))
        else:
            flat[key] = value
    return flat


def _example_key(section: str) -> str:
    return _key(dataclasses.fields(SECTIONS[section])[0])


def from_dict(
    tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *, name: str = "custom",
    explicit: frozenset[str] | None = None,
) -> Config:
    """Build a validated :class:`Config` from a nested dict plus dotted overrides.

    ``explicit`` (default: the keys of ``overrides``) records which keys the user set.
    Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`.
    """
    if not isinstance(tree, Mapping):
        raise ConfigError("config", f"expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if section in SECTIONS and not isinstance(values, Mapping):
            raise ConfigError(str(section), f"must be a mapping of keys (e.g. {section}: "
                              f"{{{_example_key(section)}: ...}}), got {values!r}")
    flat = flatten(tree)
    flat.update(overrides or {})
    known = dict(iter_keys())
    for key in flat:
        if key not in known:
            section = key.split(".")[0]
            hint = (
                f"allowed keys in {section}: "
                + ", ".join(k for k in known if k.startswith(section + "."))
                if section in SECTIONS
                else f"allowed sections: {', '.join(SECTIONS)}"
            )
            raise ConfigError(key, f"unknown key; {hint}")
    sections = {}
    for section, cls in SECTIONS.items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{_key(f)}"
            if key in flat:
                kwargs[f.name] = f.metadata["check"](key, flat[key])
        sections[section] = cls(**kwargs)
    config = Config(**sections, name=name,
                    explicit=frozenset(overrides or {}) if explicit is None else explicit)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that single-field checkers cannot make."""
    p, t, m, tr = config.problem, config.tasks, config.model, config.train
    if p.k > p.d:
        raise ConfigError("problem.k", f"must be <= problem.d = {p.d}, got {p.k}")
    if isinstance(p.head_cov, tuple) and len(p.head_cov) != p.k:
        raise ConfigError(
            "problem.head_cov", f"needs exactly k = {p.k} eigenvalues, got {len(p.head_cov)}"
        )
    if tr.tasks_per_step is None:
        if t.n == "online":
            raise ConfigError("train.tasks_per_step", "must be set (>= 1) when tasks.n is online")
    elif isinstance(t.n, int) and tr.tasks_per_step > t.n and t.from_ is None:
        raise ConfigError(
            "train.tasks_per_step", f"must be <= tasks.n = {t.n}, got {tr.tasks_per_step}"
        )
    if config.eval.at_steps and config.eval.at_steps[-1] >= tr.steps:
        raise ConfigError("eval.at_steps", f"must be < train.steps = {tr.steps} (the end is "
                          f"evaluated anyway); got {config.eval.at_steps[-1]}")
    if config.method.name == "mtl" and t.n == "online":
        raise ConfigError("tasks.n", "must be an integer >= 1 (a task pool) for method.name: mtl, "
                          "which keeps one head per pool task; got online")
    if t.from_ is not None and not isinstance(t.n, int):
        raise ConfigError("tasks.from", f"cannot be combined with tasks.n: {t.n}")
    if t.sampler != "numpy" and (t.from_ is not None or t.n == "infinite"):
        raise ConfigError("tasks.sampler", f"{t.sampler} draws tasks: it needs tasks.n an "
                          "integer or online and no tasks.from; use numpy")
    if t.test_from is not None and (t.from_ is None or m.kind != "linear"):
        raise ConfigError("tasks.test_from", "needs tasks.from (a pool file) and model.kind: "
                          "linear")
    if t.test_split and (t.from_ is None or m.kind != "linear" or t.test_from is not None):
        raise ConfigError("tasks.test_split", "needs tasks.from (a pool file), model.kind: "
                          "linear and no tasks.test_from")
    _validate_infinite(config)
    if m.init_scale == 0.0 and m.init_from is None:
        raise ConfigError("model.init_scale", "must be > 0 (B_0 = 0 is a fixed point)")
    if m.head_scale > 0 and (m.kind != "linear" or m.init_from is not None):
        raise ConfigError("model.head_scale", "must be 0 with model.kind: relu or "
                          "model.init_from (which give their own head)")
    if m.kind == "linear" and tr.task_chunk is not None:
        raise ConfigError("train.task_chunk", "is for the torch engine (model.kind: relu); "
                          "linear runs step every task at once: use null")
    if m.kind == "relu" and not (isinstance(t.n, int) or t.n == "online"):
        raise ConfigError("tasks.n", f"model.kind: relu trains on a task pool (an integer >= 1) "
                          f"or online tasks; got {t.n}")


def _validate_infinite(config: Config) -> None:
    """``tasks.n: infinite`` runs the exact expected dynamics (:mod:`metarep.core.infinite`),
    which exist for the inner-loop methods with the inner steps of
    :data:`metarep.core.expected_steps.MAX_INNER_STEPS`; ``tasks.m_in: inf`` only makes sense
    there."""
    t, tr, method = config.tasks, config.train, config.method
    if t.n != "infinite":
        if math.isinf(t.m_in):
            raise ConfigError("tasks.m_in", f"inf needs tasks.n: infinite (got tasks.n: {t.n}); "
                              "use an integer >= 1")
        return
    if method.name not in MAX_INNER_STEPS:
        raise ConfigError("method.name", f"tasks.n: infinite has exact dynamics for "
                          f"{', '.join(MAX_INNER_STEPS)} only (mtl keeps a head per task); "
                          f"got {method.name}")
    most = MAX_INNER_STEPS[method.name]
    if method.inner_steps > most:
        raise ConfigError("method.inner_steps", f"must be in [1, {most}] for {method.name} with "
                          f"tasks.n: infinite (the exact expectation is built up to {most}); "
                          f"got {method.inner_steps}")
    if tr.tasks_per_step is not None:
        raise ConfigError("train.tasks_per_step", f"must be null with tasks.n: infinite (every "
                          f"step averages over all tasks); got {tr.tasks_per_step}")
    closed_form = method.name == "fo-anil" and method.inner_steps == 1
    if not closed_form and (tr.backend == "torch" or tr.device == "cuda"):
        key = "train.backend" if tr.backend == "torch" else "train.device"
        raise ConfigError(key, f"the exact infinite-task steps of {method.name} with "
                          f"{method.inner_steps} inner step(s) compute in numpy on the cpu; "
                          "torch and cuda are for one-step fo-anil")


# ----------------------------------------------------------------------------- loading


MAX_YAML_NODES = 100_000
"""The most nodes a config or sweep file may expand to, aliases counted at every use: a
hand-written file has a few hundred; a YAML alias bomb (a few lines that expand
exponentially) is refused before anything walks it."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """The number of nodes of ``node`` with every alias expanded (counted once per use), or
    ``limit + 1`` as soon as it exceeds ``limit`` (or the graph has a cycle)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:  # a recursive alias: infinite when expanded
            return limit + 1
        open_nodes.add(key)
        if isinstance(current, yaml.MappingNode):
            children = [child for pair in current.value for child in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        else:
            children = []
        total = 1
        for child in children:
            total = min(limit + 1, total + size(child))
            if total > limit:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def load_yaml(data: bytes, source: str, key: str) -> Any:
    """Parse the bytes of a config or sweep file: UTF-8 only, no key twice in a mapping, at
    most :data:`MAX_YAML_NODES` nodes once aliases are expanded. Raises :class:`ConfigError`
    naming ``key`` with a one-line reason (and the line and column where there is one)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(key, f"{source} is not UTF-8 text (byte {error.start} is "
                          f"{data[error.start]:#04x})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(key, f"{source} expands to more than {MAX_YAML_NODES} YAML nodes "
                              "(aliases counted at each use); write its values out")
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(key, f"{source} is not valid YAML: {_yaml_problem(error)}") from None
    finally:
        loader.dispose()


def builtin_path(name: str) -> Path:
    """Path of a built-in config shipped with the package."""
    return Path(str(resources.files("metarep") / "configs" / f"{name}.yaml"))


def read_yaml(source: str | Path) -> tuple[dict[str, Any], str]:
    """Read a config tree from a built-in name or a YAML path; returns (tree, name)."""
    text_source = str(source)
    if text_source in BUILTIN_CONFIGS:
        path, name = builtin_path(text_source), text_source
    else:
        path, name = Path(text_source), Path(text_source).stem
        if not path.is_file():
            raise ConfigError(
                "config",
                f"no such file {text_source!r}; give a YAML path or one of "
                f"{', '.join(BUILTIN_CONFIGS)}",
            )
    tree = load_yaml(path.read_bytes(), str(path), "config") or {}
    if not isinstance(tree, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections")
    return tree, name


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` (the value is read as YAML, e.g. ``[1, 2]``, ``null``, ``0.5``)."""
    if "=" not in text:
        raise ConfigError("--set", f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError("--set", f"expected key=value, got {text!r} (no key)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    source: str | Path = "paper", overrides: Mapping[str, Any] | Iterable[str] | None = None
) -> Config:
    """Load a built-in name or YAML path, apply overrides (dict or ``key=value`` strings)."""
    tree, name = read_yaml(source)
    if overrides is None:
        flat: dict[str, Any] = {}
    elif isinstance(overrides, Mapping):
        flat = dict(overrides)
    else:
        flat = dict(parse_override(item) for item in overrides)
    return from_dict(tree, flat, name=name)


YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter where PyYAML has it (the same text as the pure-Python one, three times
faster: a sweep writes one config per run)."""


def dump_yaml(config: Config) -> str:
    """The fully resolved config as YAML text."""
    return yaml.dump(to_dict(config), Dumper=YAML_DUMPER, sort_keys=False)


def written_as(text: str, config: Config) -> bool:
    """Whether ``text`` (a ``config.yaml`` that :func:`dump_yaml` wrote, perhaps by an earlier
    version of metarep) holds ``config``: the same values for every key, a key the text lacks
    taking its default (a key added since then does not make an old run another config). Text
    that is not a valid config holds no config."""
    try:
        tree = yaml.safe_load(text)
        return isinstance(tree, dict) and dump_yaml(from_dict(tree)) == dump_yaml(config)
    except (yaml.YAMLError, ConfigError):
        return False
