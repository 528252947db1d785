"""metarep.run.schema: checkers, schema, cross-field checks, overrides and the built-in configs."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import yaml

from metarep.errors import ConfigError
from metarep.run import schema as cfg
from metarep.run.schema import Config, from_dict, load_config, read_yaml, to_dict


def raises_on(key: str, check, value) -> ConfigError:
    """Run ``check(key, value)`` expecting a ConfigError that names ``key``."""
    with pytest.raises(ConfigError) as info:
        check(key, value)
    assert info.value.key.startswith(key)
    assert str(info.value).startswith(info.value.key + ": ")
    return info.value


# ----------------------------------------------------------------------------- checkers


def test_integer_accepts_integral_values_and_numeric_strings():
    check = cfg.integer(1, 10)
    assert check("a.b", 3) == 3
    assert check("a.b", 3.0) == 3 and isinstance(check("a.b", 3.0), int)
    assert check("a.b", "7") == 7
    assert check("a.b", 1) == 1 and check("a.b", 10) == 10


@pytest.mark.parametrize("value", [0, 11, -3, 2.5, "2.5", "abc", True, None, [1], math.nan,
                                   math.inf, -math.inf, "nan", "inf"])
def test_integer_rejects(value):
    error = raises_on("a.b", cfg.integer(1, 10), value)
    assert "integer" in str(error) or "number" in str(error)


def test_integer_message_states_the_allowed_range():
    assert "[1, 10]" in str(raises_on("a.b", cfg.integer(1, 10), 11))
    assert "[0, inf]" in str(raises_on("a.b", cfg.integer(0), -1))


def test_real_bounds_and_open_lower_bound():
    check = cfg.real(0.0, open_lo=True)
    assert check("x", 1e-300) == 1e-300
    assert check("x", "0.5") == 0.5
    assert check("x", 2) == 2.0 and isinstance(check("x", 2), float)
    assert "> 0.0" in str(raises_on("x", check, 0.0))
    raises_on("x", check, -1.0)
    closed = cfg.real(0.0, 1.0)
    assert closed("x", 0.0) == 0.0 and closed("x", 1.0) == 1.0
    assert "[0.0, 1.0]" in str(raises_on("x", closed, 1.5))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", ".inf"])
def test_real_rejects_non_finite(value):
    raises_on("x", cfg.real(), value)


@pytest.mark.parametrize("value", ["abc", True, False, None, [1.0], {"a": 1}])
def test_real_rejects_non_numbers(value):
    assert "number" in str(raises_on("x", cfg.real(), value))


def test_choice_literal_one_of_optional():
    assert cfg.choice(("a", "b"))("k", "b") == "b"
    assert "a, b" in str(raises_on("k", cfg.choice(("a", "b")), "c"))
    raises_on("k", cfg.choice(("a", "b")), ["a"])
    assert cfg.literal("online")("k", "Online") == "online"
    raises_on("k", cfg.literal("online"), 3)
    either = cfg.one_of(cfg.integer(1), cfg.literal("online"), describe="an integer or online")
    assert either("k", 4) == 4 and either("k", "online") == "online"
    assert "an integer or online" in str(raises_on("k", either, "offline"))
    opt = cfg.optional(cfg.integer(1))
    assert opt("k", None) is None and opt("k", "null") is None and opt("k", "all") is None
    assert opt("k", 3) == 3
    raises_on("k", opt, 0)


def test_optional_path():
    assert cfg.optional_path("k", None) is None
    assert cfg.optional_path("k", "") is None
    assert cfg.optional_path("k", "a/b.npz") == "a/b.npz"
    raises_on("k", cfg.optional_path, 5)
    raises_on("k", cfg.optional_path, ["a"])


def test_head_covariance_checker():
    check = cfg.head_covariance
    assert check("h", "isotropic") == "isotropic"
    assert check("h", "linear") == "linear"
    assert check("h", [1, 2.5]) == (1.0, 2.5)
    assert check("h", "[1, 2]") == (1.0, 2.0)
    raises_on("h", check, "diagonal")
    raises_on("h", check, [])
    raises_on("h", check, {"a": 1})
    assert raises_on("h", check, [1.0, 0.0]).key == "h[1]"
    assert raises_on("h", check, [1.0, -2.0]).key == "h[1]"
    assert raises_on("h", check, [math.nan]).key == "h[0]"
    assert raises_on("h", check, ["a"]).key == "h[0]"


def test_shot_list_checker():
    check = cfg.shot_list
    assert check("s", [5, 10]) == (5, 10)
    assert check("s", 7) == (7,)
    assert check("s", "5, 10") == (5, 10)
    assert check("s", "[5, 10]") == (5, 10)
    raises_on("s", check, [])
    raises_on("s", check, True)
    raises_on("s", check, {"a": 1})
    assert raises_on("s", check, [5, 0]).key == "s[1]"
    assert raises_on("s", check, [2.5]).key == "s[0]"


@pytest.mark.parametrize("checker", [cfg.head_covariance, cfg.shot_list])
def test_malformed_inline_list_is_a_config_error(checker):
    assert "list" in str(raises_on("k", checker, "[1, 2"))


def test_param_rejects_mutable_defaults():
    with pytest.raises(TypeError):
        cfg.param([1, 2], "doc", cfg.shot_list)


# ----------------------------------------------------------------------------- schema


def test_every_key_has_doc_and_checker_and_its_default_passes_the_checker():
    keys = [key for key, _ in cfg.iter_keys()]
    assert len(keys) == len(set(keys))
    for key, field in cfg.iter_keys():
        assert field.metadata["doc"].strip(), key
        default = field.default
        checked = field.metadata["check"](key, list(default) if isinstance(default, tuple)
                                          else default)
        assert checked == default, key


def test_default_config_is_valid_and_round_trips():
    config = Config()
    cfg.validate(config)
    again = from_dict(to_dict(config))
    assert again == dataclasses.replace(config, name="custom")
    text = cfg.dump_yaml(config)
    assert from_dict(yaml.safe_load(text)) == again


def test_key_table_lists_every_key():
    table = cfg.key_table()
    for key, _ in cfg.iter_keys():
        assert f"| `{key}` |" in table
    assert "`tasks.from` | `null`" in table


@pytest.mark.parametrize("name", cfg.BUILTIN_CONFIGS)
def test_builtin_configs_load_and_round_trip(name):
    config = load_config(name)
    assert config.name == name
    assert load_config(name, {}) == config
    assert from_dict(yaml.safe_load(cfg.dump_yaml(config)), name=name) == config
    assert cfg.builtin_path(name).is_file()


def test_paper_config_is_the_papers_setting():
    config = load_config("paper")
    p, t = config.problem, config.tasks
    assert (p.d, p.k, p.noise_var, p.head_cov) == (50, 5, 4.0, "linear")
    assert (t.n, t.m_in + t.m_out, config.model.width) == (5000, 30, 50)


def test_builtin_yaml_files_declare_every_section_they_use():
    for name in cfg.BUILTIN_CONFIGS:
        tree, _ = cfg.read_yaml(name)
        assert set(tree) <= set(cfg.SECTIONS)


# ----------------------------------------------------------------------------- from_dict


def test_unknown_key_names_key_and_lists_allowed_keys():
    with pytest.raises(ConfigError) as info:
        from_dict({"problem": {"dd": 3}})
    assert info.value.key == "problem.dd"
    assert "problem.d" in str(info.value) and "unknown" in str(info.value)


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError) as info:
        from_dict({"optimizer": {"lr": 3}})
    assert info.value.key == "optimizer.lr"
    assert "allowed sections" in str(info.value) and "problem" in str(info.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError) as info:
        from_dict({}, {"model.depth": 3})
    assert info.value.key == "model.depth"


@pytest.mark.parametrize("tree", [{"problem": 5}, {"problem": None}, {"train": [1, 2]}])
def test_section_that_is_not_a_mapping(tree):
    with pytest.raises(ConfigError) as info:
        from_dict(tree)
    assert info.value.key == next(iter(tree))
    assert "mapping" in str(info.value)


def test_tree_that_is_not_a_mapping():
    with pytest.raises(ConfigError) as info:
        from_dict([1, 2])  # type: ignore[arg-type]
    assert info.value.key == "config"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("problem.d", "fifty"), ("problem.d", 2.5), ("problem.d", [50]), ("problem.k", True),
        ("problem.noise_var", "loud"), ("tasks.n", "many"), ("tasks.m_in", None),
        ("model.width", {"a": 1}), ("method.name", "sgd"), ("method.inner_lr", "fast"),
        ("train.dtype", "float16"), ("train.steps", 1.5), ("eval.shots", "a, b"),
        ("tasks.from", 3), ("model.init_from", [1]), ("problem.head_cov", "wide"),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        from_dict({}, {key: value})
    assert info.value.key.startswith(key)


@pytest.mark.parametrize(
    "key", ["problem.noise_var", "method.inner_lr", "method.outer_lr", "model.init_scale",
            "problem.d", "tasks.m_in", "train.steps"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_number_names_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        from_dict({}, {key: value})
    assert info.value.key == key


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        ({"problem.k": 6, "problem.d": 5}, "problem.k", "<= problem.d = 5"),
        ({"problem.d": 0}, "problem.d", "[1, inf]"),
        ({"problem.k": 0}, "problem.k", "[1, inf]"),
        ({"problem.noise_var": -1.0}, "problem.noise_var", "[0.0, inf]"),
        ({"tasks.n": 0}, "tasks.n", ">= 1"),
        ({"tasks.m_in": 0}, "tasks.m_in", "[1, inf]"),
        ({"tasks.m_out": 0}, "tasks.m_out", "[1, inf]"),
        ({"model.width": 0}, "model.width", "[1, inf]"),
        ({"model.init_scale": -0.1}, "model.init_scale", "[0.0, inf]"),
        ({"model.init_scale": 0.0}, "model.init_scale", "> 0"),
        ({"method.inner_lr": -0.1}, "method.inner_lr", "> 0"),
        ({"method.inner_lr": 0.0}, "method.inner_lr", "> 0"),
        ({"method.outer_lr": -1.0}, "method.outer_lr", "> 0"),
        ({"method.inner_steps": 0}, "method.inner_steps", "[1, 1000]"),
        ({"train.steps": -1}, "train.steps", "[0, inf]"),
        ({"train.record_every": 0}, "train.record_every", "[1, inf]"),
        ({"train.tasks_per_step": 0}, "train.tasks_per_step", "[1, inf]"),
        ({"tasks.n": 10, "train.tasks_per_step": 11}, "train.tasks_per_step", "<= tasks.n"),
        ({"tasks.n": "online"}, "train.tasks_per_step", "must be set"),
        ({"eval.shots": [5, 0]}, "eval.shots[1]", "[1, inf]"),
        ({"eval.n_tasks": 1}, "eval.n_tasks", "[2, inf]"),
        ({"eval.adapt_steps": -1}, "eval.adapt_steps", "[0, 1000]"),
        ({"eval.at_steps": [0]}, "eval.at_steps[0]", "[1, inf]"),
        ({"eval.at_steps": [20, 10]}, "eval.at_steps", "increasing"),
        ({"eval.at_steps": [10, 10]}, "eval.at_steps", "each step once"),
        ({"eval.at_steps": {"every": 10}}, "eval.at_steps", "list of training steps"),
        ({"train.steps": 100, "eval.at_steps": [50, 100]}, "eval.at_steps", "< train.steps"),
        ({"problem.k": 3, "problem.head_cov": [1.0, 2.0]}, "problem.head_cov", "k = 3"),
        ({"tasks.n": "online", "train.tasks_per_step": 5, "tasks.from": "x.npz"},
         "tasks.from", "tasks.n"),
        ({"tasks.sampler": "jax"}, "tasks.sampler", "numpy, torch"),
        ({"tasks.sampler": "torch", "tasks.n": "infinite"}, "tasks.sampler", "no tasks.from"),
        ({"tasks.sampler": "torch", "tasks.from": "x.npz"}, "tasks.sampler", "use numpy"),
    ],
)
def test_out_of_range_and_cross_field_checks(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        from_dict({}, overrides)
    assert info.value.key == key
    assert allowed in str(info.value)


def test_valid_edge_values_are_accepted():
    config = from_dict({}, {"problem.d": 3, "problem.k": 3, "problem.noise_var": 0.0,
                            "tasks.n": "online", "train.tasks_per_step": 4,
                            "train.steps": 0, "eval.adapt_steps": 0,
                            "model.init_scale": 0.0, "model.init_from": "init.npz"})
    assert config.problem.k == config.problem.d == 3
    assert config.tasks.n == "online" and config.train.tasks_per_step == 4


def test_replace_revalidates():
    config = Config()
    assert config.replace(**{"problem.d": 10}).problem.d == 10
    with pytest.raises(ConfigError) as info:
        config.replace(**{"problem.d": 2})
    assert info.value.key == "problem.k"


# ----------------------------------------------------------------------------- overrides, files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("problem.d=10", ("problem.d", 10)),
        ("method.inner_lr=0.5", ("method.inner_lr", 0.5)),
        (" eval.shots = [5, 10]", ("eval.shots", [5, 10])),
        ("tasks.from=null", ("tasks.from", None)),
        ("tasks.from=", ("tasks.from", "")),
        ("tasks.from=a=b.npz", ("tasks.from", "a=b.npz")),
        ("problem.head_cov=[1, 2", ("problem.head_cov", "[1, 2")),
        ("method.name=fo-anil", ("method.name", "fo-anil")),
    ],
)
def test_parse_override(text, expected):
    assert cfg.parse_override(text) == expected


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as info:
        cfg.parse_override("problem.d")
    assert info.value.key == "--set"


def test_load_config_applies_string_and_dict_overrides():
    config = load_config("quick", ["problem.d=12", "eval.shots=[3, 4]", "tasks.n=online",
                                   "train.tasks_per_step=8"])
    assert config.problem.d == 12 and config.eval.shots == (3, 4)
    assert config.tasks.n == "online"
    assert load_config("quick", {"problem.d": 12}).problem.d == 12
    with pytest.raises(ConfigError) as info:
        load_config("quick", ["problem.head_cov=[1, 2"])
    assert info.value.key == "problem.head_cov"


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("problem: {d: 8, k: 2}\ntasks: {n: 20}\n")
    config = load_config(path)
    assert config.name == "mine" and config.problem.d == 8 and config.tasks.n == 20
    assert config.model == Config().model


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.key == "config" and "paper" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem: {d: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.key == "config" and "YAML" in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(listing)
    assert info.value.key == "config"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).problem == Config().problem


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few lines that expand to width^(levels + 1) leaves (9^10 ~ 3.5e9)."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


HOSTILE_YAML = [
    (b"problem:\n  d: 5\n  d: 7\n", "duplicate key 'd'"),
    (b"problem: {d: 5}\n\xff\xfe\n", "not UTF-8"),
    (_alias_bomb().encode(), "expands to more than"),
    (b"a: &a [*a]\n", "expands to more than"),  # a recursive alias
    (b"problem:\n  d: [1, 2\n", "but got '<stream end>' (line"),
]


@pytest.mark.parametrize(("data", "reason"), HOSTILE_YAML)
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_hostile_yaml_is_refused_in_one_line_without_a_trace(cli, error_line, tmp_path, data,
                                                             reason, command):
    """Config and sweep files share one loader: UTF-8 only, no key twice, a bounded size once
    aliases are expanded; each refusal is exit 2, one line naming the file's field, nothing
    written."""
    path = tmp_path / "hostile.yaml"
    path.write_bytes(data if command == "run" else b"base: quick\n" + data)
    out = tmp_path / "out"
    started = time.monotonic()
    result = cli(command, path, "--out", out)
    assert time.monotonic() - started < 10
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {'config' if command == 'run' else 'sweep'}: ")
    assert reason in line and not out.exists()


def test_yaml_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("problem: &p {d: 6, k: 2}\nmodel: {width: 4}\n")
    tree, _ = read_yaml(path)
    assert tree["problem"] == {"d": 6, "k": 2}


@pytest.mark.parametrize("key", ["train.steps", "method.outer_lr", "tasks.n", "model.seed"])
def test_numbers_too_large_for_any_use_are_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as caught:
        load_config("quick", {key: 10**400})
    assert caught.value.key == key and len(str(caught.value)) < 300
