"""Config loading: types, unknown keys, overrides, round trip."""

import pytest
from conftest import REPO

from fedtune.config import ConfigError, Experiment, default_experiment


def write(tmp_path, text):
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_loads_sections_and_types(tmp_path):
    p = write(tmp_path, 'name = "x"\n[federation]\nrounds = 3\n[train]\nlr = 1\n[model.lora]\nr = 4\n')
    exp = Experiment.from_toml(p)
    assert exp.name == "x" and exp.federation.rounds == 3
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)
    assert exp.model.lora.r == 4


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "[federation]\nroundz = 3\n")
    with pytest.raises(ConfigError) as err:
        Experiment.from_toml(p)
    assert "federation.roundz" in str(err.value) and str(p) in str(err.value)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "[fedaration]\nrounds = 3\n")
    with pytest.raises(ConfigError, match="fedaration"):
        Experiment.from_toml(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, '[federation]\nrounds = "three"\n')
    with pytest.raises(ConfigError, match=r"federation\.rounds.*integer"):
        Experiment.from_toml(p)


def test_bool_is_not_an_int(tmp_path):
    p = write(tmp_path, "[train]\nbatch_size = true\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        Experiment.from_toml(p)


def test_literal_choices(tmp_path):
    p = write(tmp_path, '[strategy]\nname = "fedmagic"\n')
    with pytest.raises(ConfigError, match="fedmagic.*fedavg"):
        Experiment.from_toml(p)


def test_invalid_value_in_post_init(tmp_path):
    p = write(tmp_path, "[partition]\nalpha = -1.0\n")
    with pytest.raises(ConfigError, match="partition.alpha"):
        Experiment.from_toml(p)


def test_malformed_toml_names_file(tmp_path):
    p = write(tmp_path, "[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Experiment.from_toml(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        Experiment.from_toml("/nonexistent/exp.toml")


def test_overrides_apply_with_same_checks(tmp_path):
    p = write(tmp_path, "[federation]\nrounds = 3\n")
    exp = Experiment.from_toml(p, ["federation.rounds=7", "strategy.name=fedprox", "strategy.mu=0.1"])
    assert exp.federation.rounds == 7 and exp.strategy.name == "fedprox" and exp.strategy.mu == 0.1
    with pytest.raises(ConfigError, match="federation.roundz"):
        Experiment.from_toml(p, ["federation.roundz=7"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        Experiment.from_overrides(["rounds"])


def test_list_override():
    exp = Experiment.from_overrides(['model.lora.target_modules=["query", "key"]'])
    assert exp.model.lora.target_modules == ["query", "key"]


def test_toml_round_trip(tmp_path):
    exp = Experiment.from_overrides(["federation.rounds=4", "model.mode=partial"])
    p = write(tmp_path, exp.to_toml())
    assert Experiment.from_toml(p) == exp


def test_shipped_default_experiment_equals_defaults():
    path = REPO / "experiments" / "default.toml"
    assert Experiment.from_toml(path) == default_experiment()


def test_shipped_experiments_load():
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert len(files) >= 2
    for f in files:
        Experiment.from_toml(f)


@pytest.mark.parametrize("override, message", [
    ("train.weight_decay=-0.01", "train.weight_decay must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.max_steps=-3", "train.max_steps must be >= 0"),
])
def test_negative_values_that_would_silently_mean_off_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.from_overrides([override])


def test_toml_with_a_byte_order_mark_loads_and_non_utf8_names_the_file(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfname = \"with-bom\"\n")
    assert Experiment.from_toml(bom).name == "with-bom"
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.toml: not UTF-8 text \(byte offset 11: b.\\xe9."):
        Experiment.from_toml(latin)


def test_an_empty_experiment_file_is_refused_with_what_to_do(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.toml is empty \(no keys\): `fedtune run` without a file runs"):
        Experiment.from_toml(empty)
