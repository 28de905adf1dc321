"""rlhf/config.py: defaults, YAML + dotted overrides, one-line errors that name the key, derived sizes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from rlhf.config import (
    RANGES,
    ConfigError,
    PipelineConfig,
    PPOConfig,
    in_range,
    load_config,
    parse_override,
    ppo_sizes,
    save_config,
)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# loading


def test_defaults_load():
    cfg = load_config(None)
    assert cfg == PipelineConfig()
    assert cfg.ppo.kl_coef == 0.05
    assert cfg.tracking.wandb == "auto"
    assert cfg.prefs.noise.flip_rate == 0.0
    assert cfg.eval.best_of_n == [1, 2, 4, 8, 16]
    assert load_config(None, ["eval.best_of_n=[]"]).eval.best_of_n == []  # off
    assert load_config(None, ["eval.best_of_n=[4, 32]"]).eval.best_of_n == [4, 32]  # n = 1 is added by eval


def test_default_yaml_loads(default_yaml):
    cfg = load_config(default_yaml)
    raw = yaml.safe_load(default_yaml.read_text())
    assert raw, "configs/default.yaml is empty"

    def check(node, obj, prefix):  # every value in the file reached the dataclasses unchanged
        for key, value in node.items():
            got = getattr(obj, key)
            if isinstance(value, dict):
                check(value, got, f"{prefix}{key}.")
            elif isinstance(value, float):
                assert got == pytest.approx(value), prefix + key
            else:
                assert got == value, prefix + key

    check(raw, cfg, "")
    # keys not in the file keep their defaults
    if "cliprange" not in raw.get("ppo", {}):
        assert cfg.ppo.cliprange == PPOConfig().cliprange


def test_empty_yaml_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == PipelineConfig()


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  kl_coef: 0.2\n  batch_size: 64\nprefs:\n  noise:\n    bt_temperature: 0.5\n")
    cfg = load_config(path, [
        "ppo.kl_coef=0.1",
        "prefs.noise.flip_rate=0.1",
        "ppo.stop_tokens=[a, '!']",
        "reward.backbone=null",
        "ppo.score_clip=null",
        "reward.center_rewards_coefficient=0.01",
        "run.output_dir=runs/try",
        "model.system_prompt=Be brief.",
    ])
    assert cfg.ppo.kl_coef == 0.1  # override wins over the file
    assert cfg.ppo.batch_size == 64  # file value kept
    assert cfg.prefs.noise.flip_rate == 0.1  # nested override
    assert cfg.prefs.noise.bt_temperature == 0.5  # sibling of a nested override kept
    assert cfg.ppo.stop_tokens == ["a", "!"]
    assert cfg.reward.backbone is None
    assert cfg.ppo.score_clip is None
    assert cfg.reward.center_rewards_coefficient == 0.01
    assert cfg.run.output_dir == "runs/try"
    assert cfg.model.system_prompt == "Be brief."


def test_override_creates_section_missing_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 3\n")
    cfg = load_config(path, ["eval.greedy=true", "prefs.noise.flip_rate=0.2"])
    assert cfg.run.seed == 3 and cfg.eval.greedy is True and cfg.prefs.noise.flip_rate == 0.2


def test_override_value_types():
    cfg = load_config(None, ["ppo.kl_coef=1", "ppo.adaptive_kl=true", "ppo.stop_tokens=[]", "run.name="])
    assert cfg.ppo.kl_coef == 1.0 and isinstance(cfg.ppo.kl_coef, float)  # int -> float
    assert cfg.ppo.adaptive_kl is True
    assert cfg.ppo.stop_tokens == []
    assert cfg.run.name == ""


@pytest.mark.parametrize("text, value", [("1e-5", 1e-5), ("3.0e-5", 3e-5), ("1.5E5", 1.5e5), ("2e+3", 2e3)])
def test_exponent_floats_without_dot_or_sign(text, value):
    # YAML 1.1 (PyYAML) reads `1e-5` as a string; a float field must still accept it.
    cfg = load_config(None, [f"ppo.learning_rate={text}"])
    assert cfg.ppo.learning_rate == pytest.approx(value)


def test_exponent_float_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  learning_rate: 1e-5\n")
    assert load_config(path).reward.learning_rate == pytest.approx(1e-5)


def test_exponent_like_string_stays_a_string():
    assert load_config(None, ["run.name=1e5"]).run.name == "1e5"


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Off", "n", "y"])
def test_yaml_1_1_booleans_stay_strings(word):
    _, value = parse_override(f"tracking.wandb={word}")
    assert value == word


def test_wandb_off_stays_string_in_override_and_file(tmp_path):
    assert load_config(None, ["tracking.wandb=off"]).tracking.wandb == "off"
    path = tmp_path / "c.yaml"
    path.write_text("tracking:\n  wandb: off\n")
    assert load_config(path).tracking.wandb == "off"


def test_true_false_are_booleans():
    for text, value in [("true", True), ("False", False), ("TRUE", True)]:
        assert load_config(None, [f"ppo.lora={text}"]).ppo.lora is value


def test_loader_does_not_change_pyyaml_globally():
    assert yaml.safe_load("a: off") == {"a": False}


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_key_names_key_and_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.kl_cof=0.1"])
    msg = one_line(e)
    assert "ppo.kl_cof" in msg and "ppo.kl_coef" in msg


def test_unknown_nested_key_names_full_path():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["prefs.noise.flip_rte=0.1"])
    msg = one_line(e)
    assert "prefs.noise.flip_rte" in msg and "prefs.noise.flip_rate" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  epoch: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = one_line(e)
    assert "reward.epoch" in msg and "reward.epochs" in msg


def test_unknown_section_names_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppoo.kl_coef=0.1"])
    msg = one_line(e)
    assert "ppoo" in msg and "'ppo'" in msg


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.zzzzzz=1"])
    assert "ppo.zzzzzz" in one_line(e) and "did you mean" not in str(e.value)


@pytest.mark.parametrize("override, key, expected, got", [
    ("ppo.batch_size=abc", "ppo.batch_size", "int", "'abc'"),
    ("ppo.lora=3", "ppo.lora", "bool", "3"),
    ("ppo.kl_coef=high", "ppo.kl_coef", "float", "'high'"),
    ("ppo.batch_size=2.5", "ppo.batch_size", "int", "2.5"),
    ("ppo.batch_size=true", "ppo.batch_size", "int", "True"),
    ("ppo.stop_tokens=x", "ppo.stop_tokens", "list[str]", "'x'"),
    ("reward.backbone=[1]", "reward.backbone", "str | null", "[1]"),
])
def test_wrong_type_names_key_type_and_value(override, key, expected, got):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = one_line(e)
    assert msg.startswith(key + ":")
    assert f"expected {expected}" in msg
    assert got in msg


def test_wrong_list_item_type_names_index():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.stop_tokens=[a, 3]"])
    assert "ppo.stop_tokens[1]" in one_line(e)


def test_section_given_a_scalar():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo=3"])
    assert "ppo" in one_line(e) and "mapping" in str(e.value)


def test_non_finite_float_rejected():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.kl_coef=.nan"])
    assert "ppo.kl_coef" in one_line(e) and "finite" in str(e.value)


@pytest.mark.parametrize("override, key, suggestion", [
    ("run.device=cuad", "run.device", "cuda"),
    ("ppo.kl_estimator=k2", "ppo.kl_estimator", None),
    ("tracking.wandb=ofline", "tracking.wandb", "offline"),
    ("prefs.source=simulated", "prefs.source", "simulate"),
])
def test_bad_literal_lists_choices_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = one_line(e)
    assert msg.startswith(key + ":") and "expected one of" in msg
    if suggestion:
        assert f"did you mean {suggestion!r}" in msg


def test_missing_required_dataset_for_load():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["prefs.source=load"])
    msg = one_line(e)
    assert "prefs.dataset" in msg and "load" in msg
    assert load_config(None, ["prefs.source=load", "prefs.dataset=pairs.jsonl"]).prefs.dataset == "pairs.jsonl"


@pytest.mark.parametrize("override, key", [
    ("ppo.num_updates=0", "ppo.num_updates"),
    ("ppo.temperature=0", "ppo.temperature"),
    ("prefs.responses_per_prompt=1", "prefs.responses_per_prompt"),
    ("prefs.test_fraction=1.0", "prefs.test_fraction"),
    ("prefs.noise.flip_rate=0.7", "prefs.noise.flip_rate"),
    ("prefs.noise.bt_temperature=-1", "prefs.noise.bt_temperature"),
    ("ppo.lam=1.5", "ppo.lam"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef"),
    ("ppo.critic_warmup_updates=40", "ppo.critic_warmup_updates"),
    ("ppo.min_new_tokens=49", "ppo.min_new_tokens"),
    ("eval.best_of_n=[4, 2]", "eval.best_of_n"),
    ("eval.best_of_n=[1, 2, 2]", "eval.best_of_n"),
    ("eval.best_of_n=[0, 4]", "eval.best_of_n"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in one_line(e)


@pytest.mark.parametrize("text", ["ppo.kl_coef", "=3", "ppo..kl_coef=1", ".x=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError) as e:
        load_config(None, [text])
    assert text in one_line(e)


def test_override_into_scalar_is_not_a_section():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.kl_coef=0.1", "ppo.kl_coef.x=1"])
    assert "not a section" in one_line(e)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: 1\nppo:\n  kl_coef: [0.1\n  batch_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = one_line(e)
    assert str(path) in msg and "invalid YAML" in msg
    assert "line " in msg


def test_invalid_yaml_line_number(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: 1\n  name: a: b\n")  # "mapping values are not allowed here" on line 3
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "line 3" in one_line(e)


def test_yaml_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "mapping" in one_line(e)


def test_config_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    msg = one_line(e)
    assert "not found" in msg and str(missing) in msg


def test_non_utf8_config_file_is_one_line(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"ppo:\n  kl_coef: 0.1  # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in one_line(e) and "not UTF-8" in one_line(e)


def test_output_dir_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, ["run.output_dir=~/runs/x"]).run.output_dir == str(tmp_path / "runs" / "x")


# ---------------------------------------------------------------------------------------------
# ranges


def numeric_fields(cls=PipelineConfig, prefix=""):
    """Dotted names of every int or float field (optional ones included) of the schema."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, key + ".")
        elif typing.get_origin(tp) is not list and {int, float} & set(typing.get_args(tp) or (tp,)):  # lists: own checks
            yield key


def test_every_numeric_field_has_a_range():
    fields = set(numeric_fields())
    assert len(fields) > 50
    assert fields - set(RANGES) == set()
    assert set(RANGES) - fields == set()  # no stale entries


def test_defaults_are_in_range():
    cfg = PipelineConfig()
    for key, spec in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value is None or in_range(value, spec), key


@pytest.mark.parametrize("value, spec, inside", [
    (0, "> 0", False), (1e-9, "> 0", True), (0, ">= 0", True), (-1, ">= 0", False), (1, ">= 2", False),
    (0.5, "[0, 0.5]", True), (0.51, "[0, 0.5]", False), (0, "(0, 1)", False), (1, "(0, 1)", False),
    (0.99, "(0, 1)", True), (1, "[0, 1]", True),
])
def test_in_range(value, spec, inside):
    assert in_range(value, spec) is inside


# Each value a careful user might try that would otherwise train silently wrong or fail late: the key is named.
@pytest.mark.parametrize("override", [
    "ppo.max_grad_norm=-1", "ppo.max_grad_norm=0", "ppo.cliprange=0", "ppo.cliprange=1.5", "ppo.cliprange_value=0",
    "ppo.vf_coef=-0.1", "ppo.target_kl=0", "ppo.kl_horizon=0", "eval.bootstrap_samples=0", "ppo.learning_rate=0",
    "ppo.stop_kl=0", "ppo.learning_rate=-3e-5", "reward.learning_rate=-1", "ppo.warmup_steps=-1", "ppo.score_clip=0",
    "ppo.missing_eos_penalty=-1", "ppo.lora_alpha=0", "reward.num_layers=-1", "reward.normalize_samples=0",
    "reward.center_rewards_coefficient=-0.1", "run.seed=-1", "run.threads=-2", "data.max_train_prompts=-5",
    "eval.num_prompts=-1", "prefs.min_gold_gap=-0.5", "prefs.max_pairs=-1", "prefs.noise.bt_temperature=-0.001",
    "prefs.test_fraction=0", "ppo.gamma=-0.1", "ppo.critic_warmup_updates=-1", "ppo.keep_checkpoints=0",
])
def test_range_table_rejects(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = one_line(e)
    assert msg.startswith(key + " must be") and RANGES[key].split()[-1] in msg


@pytest.mark.parametrize("override", ["prefs.noise.bt_temperature=0.001", "ppo.vf_coef=0", "ppo.kl_coef=0",
                                      "prefs.noise.flip_rate=0.5", "ppo.gamma=1", "ppo.missing_eos_penalty=0",
                                      "ppo.learning_rate=1e30", "eval.num_prompts=0", "ppo.cliprange_value=10"])
def test_range_table_accepts_the_edges(override):
    load_config(None, [override])


@pytest.mark.parametrize("override, words", [
    (["run.output_dir="], "run.output_dir must not be empty"),
    (["model.policy=' '"], "model.policy must not be empty"),
    (["ppo.reward="], "ppo.reward must not be empty"),
    (["ppo.stop_tokens=['']"], "ppo.stop_tokens[0] is empty"),
    (["eval.prompts="], "eval.prompts must not be empty"),
    (["prefs.judge="], "prefs.judge is required"),
    (["reward.use_margin=true"], "reward.use_margin needs pairs with a margin"),
    (["ppo.value_model=none"], "set ppo.samples_per_prompt >= 2 (got 1)"),
    (["ppo.value_model=none", "ppo.samples_per_prompt=4", "ppo.critic_warmup_updates=2"],
     "ppo.critic_warmup_updates=2 warms up a value function that ppo.value_model=none does not have"),
    (["ppo.samples_per_prompt=3"], "ppo.batch_size=32 must be a multiple of ppo.samples_per_prompt=3"),
    (["ppo.stop_kl_brake=true"], "set ppo.stop_kl too"),
])
def test_cross_field_and_empty_values(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert words in one_line(e)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# derived sizes


def test_ppo_sizes_two_processes():
    ppo = PPOConfig(num_updates=10, batch_size=32, mini_batch_size=16, gradient_accumulation_steps=2, ppo_epochs=2)
    sizes = ppo_sizes(ppo, num_processes=2)
    assert sizes.num_processes == 2
    assert sizes.local_batch_size == 16
    assert sizes.local_mini_batch_size == 8
    assert sizes.micro_batch_size == 4
    assert sizes.num_mini_batches == 2
    assert sizes.optimizer_steps == 10 * 2 * 2


def test_ppo_sizes_one_process():
    sizes = ppo_sizes(PPOConfig(batch_size=32, mini_batch_size=16, gradient_accumulation_steps=2))
    assert (sizes.local_batch_size, sizes.local_mini_batch_size, sizes.micro_batch_size) == (32, 16, 8)


def test_batch_not_multiple_of_mini_batch():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.batch_size=30", "ppo.mini_batch_size=16"])
    msg = one_line(e)
    assert "ppo.batch_size" in msg and "ppo.mini_batch_size" in msg


def test_mini_batch_not_divisible_by_accumulation():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.gradient_accumulation_steps=3"])
    msg = one_line(e)
    assert "ppo.mini_batch_size" in msg and "ppo.gradient_accumulation_steps" in msg


def test_batch_not_divisible_by_processes():
    with pytest.raises(ConfigError) as e:
        ppo_sizes(PPOConfig(batch_size=32, mini_batch_size=16), num_processes=3)
    msg = one_line(e)
    assert "ppo.batch_size" in msg and "processes" in msg and "3" in msg


def test_mini_batch_not_divisible_by_processes():
    with pytest.raises(ConfigError) as e:
        ppo_sizes(PPOConfig(batch_size=32, mini_batch_size=2), num_processes=4)
    assert "ppo.mini_batch_size" in one_line(e)


def test_accumulation_checked_per_process():
    # 16 / 16 divides on one process, but each of 2 processes holds 8 rollouts: 8 / 16 does not
    assert ppo_sizes(PPOConfig(batch_size=32, mini_batch_size=16, gradient_accumulation_steps=16)).micro_batch_size == 1
    with pytest.raises(ConfigError) as e:
        ppo_sizes(PPOConfig(batch_size=32, mini_batch_size=16, gradient_accumulation_steps=16), num_processes=2)
    assert "ppo.gradient_accumulation_steps" in one_line(e)


# ---------------------------------------------------------------------------------------------
# saving


def test_save_config_round_trip(tmp_path, default_yaml):
    cfg = load_config(default_yaml, [
        "tracking.wandb=off", "ppo.stop_tokens=['!', 'yes']", "model.system_prompt=no", "run.name=1e5",
        "reward.center_rewards_coefficient=0.01", "ppo.learning_rate=1e-5", "prefs.noise.flip_rate=0.1",
    ])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.tracking.wandb == "off" and again.model.system_prompt == "no" and again.run.name == "1e5"


def test_save_config_of_defaults_round_trip(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(PipelineConfig(), path)
    assert load_config(path) == PipelineConfig()
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(PipelineConfig)}


def test_land_kl_needs_a_merged_policy_and_a_positive_kl():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.land_kl=5.8", "ppo.lora=true", "ppo.merge_lora=false"])
    assert "ppo.land_kl" in one_line(e) and "ppo.merge_lora" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.land_kl=0"])
    assert "ppo.land_kl" in one_line(e)
    assert load_config(None, ["ppo.land_kl=5.8", "ppo.lora=false", "ppo.merge_lora=false"]).ppo.land_kl == 5.8
    assert load_config(None, ["ppo.land_kl=5.8", "ppo.lora=true"]).ppo.land_kl == 5.8
