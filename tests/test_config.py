import pytest

from tirl.config import Config, config_to_toml, load_config
from tirl.types import TirlError


def test_defaults_and_recipe_load():
    cfg = load_config("demo")
    assert cfg.recipe == "demo" and cfg.model.name == "smollm2-135m-instruct"
    assert cfg.rollout.max_tool_calls == 1


def test_overrides_are_typed():
    cfg = load_config("demo", ["train.steps=3", "rollout.temperature=0.5", "prompt.style=raw", "model.name=/x/y"])
    assert cfg.train.steps == 3 and cfg.rollout.temperature == 0.5 and cfg.prompt.style == "raw"
    assert cfg.model.name == "/x/y"


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(TirlError) as e:
        load_config("demo", ["rollout.max_tool_cals=2"])
    msg = str(e.value)
    assert "rollout.max_tool_cals" in msg and "max_tool_calls" in msg


def test_bad_value_and_bad_override_form():
    with pytest.raises(TirlError, match="rollout.group_size"):
        load_config(None, ["rollout.group_size=0"])
    with pytest.raises(TirlError, match="key.sub=value"):
        load_config(None, ["rollout.group_size"])
    with pytest.raises(TirlError, match="max_tokens_per_turn"):
        load_config(None, ["rollout.max_tokens_per_turn=600", "rollout.max_response_tokens=500"])

    with pytest.raises(TirlError, match="engine_per.*lock step.*Fix: rollout.mode"):
        load_config(None, ["rollout.engine_per=node", "rollout.mode=async"])
    assert load_config(None, ["rollout.engine_per=node"]).rollout.mode == "auto"


def test_unknown_recipe_lists_known():
    with pytest.raises(TirlError, match="demo"):
        load_config("no-such-recipe")


def test_config_roundtrip_through_toml(tmp_path):
    cfg = load_config("demo", ["train.steps=2", "optim.betas=[0.8, 0.9]"])
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(cfg))
    again = load_config(str(p))
    assert again == cfg
    assert Config() == load_config(None)
