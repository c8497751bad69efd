"""`--config FILE`: a command's settings from YAML or JSON, the command line winning."""

import json
import pathlib

import pytest
import yaml

from fishersft_ray.cli import main, parse_args
from fishersft_ray.config import EvaluateSettings, SelectSettings, from_args

REPO = pathlib.Path(__file__).resolve().parents[1]


def _speeches(path: pathlib.Path, n: int) -> str:
    path.write_text("\n\n".join(f"SPEAKER {i}:\n" + " ".join(f"word{(i * 7 + k) % 53}" for k in range(5 + i % 30))
                                for i in range(n)) + "\n")
    return str(path)


def _config(path: pathlib.Path, values: dict) -> str:
    path.write_text(json.dumps(values) if path.suffix == ".json" else yaml.safe_dump(values))
    return str(path)


def test_select_reads_a_config_file_and_a_flag_wins(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path / "run.yaml", {
        "input": _speeches(tmp_path / "speeches.txt", 24), "output": str(out), "budget": 6,
        "model": str(tiny_llama_dir), "executor": "local", "budget-unit": "examples", "lam_relative": 0.5,
        "keep_states": True, "storage_options": {}})
    assert main(["select", "--config", config, "--budget", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    settings = manifest["settings"]
    assert manifest["selection"]["selected"] == 3 and settings["budget"] == 3  # the flag won
    assert settings["config_file"] == config
    assert (settings["executor"], settings["lam_relative"], settings["keep_states"]) == ("local", 0.5, True)


def test_an_unknown_key_is_an_error_naming_it_and_the_nearest_key(tmp_path, capsys):
    config = _config(tmp_path / "run.yaml", {"input": "c.txt", "output": "o", "budgt": 3})
    with pytest.raises(SystemExit) as exited:
        main(["select", "--config", config])
    assert exited.value.code == 2
    assert "unknown key 'budgt' (did you mean 'budget'?)" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", [
    ("budget", "many", "budget: invalid int value: 'many'"),
    ("budget", 2.5, "budget: invalid int value: 2.5"),
    ("keep_states", "yes please", "keep_states: expected true or false"),
    ("on_bad_row", "ignore", "on_bad_row: expected one of error, skip, got 'ignore'"),
    ("partitions", 0, "partitions: expected auto or an integer >= 1"),
    ("text_field", ["a", "b"], "text_field: expected one str value"),
])
def test_a_value_is_checked_as_its_flag_and_the_error_names_the_key(tmp_path, capsys, key, value, message):
    config = _config(tmp_path / "run.yaml", {"input": "c.txt", "output": "o", "budget": 3} | {key: value})
    with pytest.raises(SystemExit) as exited:
        parse_args(["select", "--config", config])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_example_job_config_is_valid():
    settings = from_args(SelectSettings, parse_args(["select", "--config", str(REPO / "jobs" / "select_config.yaml")]))
    assert settings.budget == 20000 and settings.corpus.format == "alpaca" and settings.rules.length_cap == "p95"


def test_evaluate_reads_a_json_config_and_a_flag_wins(tiny_llama_dir, tmp_path):
    out = tmp_path / "eval"
    config = _config(tmp_path / "eval.json", {
        "input": _speeches(tmp_path / "speeches.txt", 60), "output": str(out), "model": str(tiny_llama_dir),
        "budgets": [4], "seeds": 3, "validation_size": 8, "max-pool": 20, "max_test": 10, "recipe_lrs": [3e-4],
        "recipe_epochs": [1], "methods": ["tokenod", "uniform"]})
    with pytest.raises(SystemExit):  # a flag evaluate fixes is no key of its file either
        parse_args(["evaluate", "--config", _config(tmp_path / "bad.json", {"keep_states": True})])
    settings = from_args(EvaluateSettings, parse_args(["evaluate", "--config", config, "--seeds", "1"]))
    assert settings.protocol.seeds == 1 and settings.protocol.methods == ["tokenod", "uniform"]
    assert settings.split.max_pool == 20 and settings.protocol.recipe_lrs == [3e-4]
    assert main(["evaluate", "--config", config, "--seeds", "1"]) == 0
    recorded = json.loads((out / "settings.json").read_text())["command_settings"]
    assert recorded["config_file"] == config and recorded["seeds"] == 1 and recorded["budgets"] == [4]
