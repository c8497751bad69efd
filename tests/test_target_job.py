"""`select --target` and `evaluate --target-group` end to end with the tiny model: locally, on
Ray, with a target on moto's S3 and in another format than the corpus, and bad targets."""

import csv
import json
import re

import numpy as np
import pytest

from fishersft_ray.cli import main
from fishersft_ray.config import SelectSettings
from fishersft_ray.run.job import run_select

from test_groups import write_mixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _target_txt(path, domain="cod", n=4, seed=3):
    """The target as plain-text speeches (another format than the jsonl corpus)."""
    rng = np.random.default_rng(seed)
    words = [f"{domain}{k}" for k in range(30)]
    path.write_text("\n\n".join(" ".join(rng.choice(words, size=8)) for _ in range(n)) + "\n")
    return str(path)


def _select(tmp_path, name, mix, target, *extra, model):
    out = tmp_path / name
    code = main(["select", "--input", mix, "--format", "alpaca", "--output", str(out), "--model", str(model),
                 "--features", str(tmp_path / "features"), *(["--target", target] if target else []), *extra])
    return code, out


@pytest.mark.parametrize("method", ["targeted", "targeted_vopt", "rds"])
def test_select_target_locally_from_another_format_records_the_target(tmp_path, tiny_llama_dir, method):
    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 30, "code": 8, "math": 8})
    target = _target_txt(tmp_path / "target.txt")
    code, out = _select(tmp_path, method, mix, target, "--method", method, "--budget", "6", "--executor", "local",
                        "--group-field", "domain", "--target-format", "text", model=tiny_llama_dir)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    account = manifest["target"]
    assert account["format"] == "text" and account["kept"] == 4 and account["examples_with_targets"] == 4
    assert account["target_tokens"] > 0 and len(account["fingerprint"]) >= 16
    selection = manifest["selection"]
    assert selection["method"] == method and selection["selected"] == 6
    assert (selection["upper_bound"] is not None) == (method == "targeted")
    assert selection["certificate"].startswith("none") == (method != "targeted")


def test_select_target_on_ray_with_an_s3_target_and_a_token_budget(ray_local, tiny_llama_dir, tmp_path, s3_server):
    client, options = s3_server["client"], s3_server["storage_options"]
    client.create_bucket(Bucket="targets")
    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 30, "code": 8})
    rows = [{"instruction": f"code task {i}", "input": "", "output": f"cod{i} cod{i + 1} cod{i + 2}"} for i in range(3)]
    client.put_object(Bucket="targets", Key="t/target.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    result = run_select(SelectSettings.build(
        input=mix, output=str(tmp_path / "ray"), target="s3://targets/t/target.jsonl", method="targeted",
        budget=60, budget_unit="tokens", model=str(tiny_llama_dir), storage_options=options, num_actors=1,
        batch_size=8, format="alpaca"))
    assert result.manifest["target"]["examples_with_targets"] == 3
    assert 0 < result.manifest["selection"]["selected_target_tokens"] <= 60
    # The target's shards are in the feature cache: a rerun reuses them.
    again = run_select(SelectSettings.build(
        input=mix, output=str(tmp_path / "ray2"), target="s3://targets/t/target.jsonl", method="targeted",
        budget=60, budget_unit="tokens", model=str(tiny_llama_dir), storage_options=options, num_actors=1,
        batch_size=8, format="alpaca", features=str(tmp_path / "ray" / "features")))
    assert again.manifest["target"]["features_reused"] is True
    np.testing.assert_array_equal(again.selection.indices, result.selection.indices)


def test_bad_targets_stop_with_one_line_errors(tmp_path, tiny_llama_dir, capsys):
    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 20, "code": 6})
    cases = {
        "missing": (str(tmp_path / "nope.jsonl"), "--target .*nope.jsonl does not exist"),
        "empty": (str(tmp_path / "empty.txt"), "0 usable rows in .*empty.txt.*check --target"),
        "no_method": (_target_txt(tmp_path / "t.txt"), "--target is read by --method rds, targeted"),
    }
    (tmp_path / "empty.txt").write_text("\n\n")
    for name, (target, message) in cases.items():
        extra = [] if name == "no_method" else ["--method", "targeted"]
        code, _ = _select(tmp_path, name, mix, target, "--budget", "3", "--executor", "local",
                          "--target-format", "text", *extra, model=tiny_llama_dir)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
        assert re.search(message, err), (name, err)
    code, _ = _select(tmp_path, "none", mix, None, "--method", "rds", "--budget", "3", model=tiny_llama_dir)
    assert code == 2 and "pass --target PATH" in capsys.readouterr().err


def test_a_target_whose_rows_lose_every_target_token_is_an_error(tmp_path, tiny_llama_dir, capsys):
    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 20, "code": 6})
    long_prompt = [{"instruction": "word " * 400, "input": "", "output": "cod1 cod2"}]
    target = tmp_path / "long.jsonl"
    target.write_text(json.dumps(long_prompt[0]) + "\n")
    code, _ = _select(tmp_path, "long", mix, str(target), "--method", "targeted", "--budget", "3", "--max-length",
                      "64", "--executor", "local", "--format", "alpaca", model=tiny_llama_dir)
    err = capsys.readouterr().err
    assert code == 2 and "no target tokens" in err, err


def test_evaluate_target_group_scores_the_targeted_methods(tmp_path, tiny_llama_dir, capsys):
    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 40, "code": 12, "math": 12})
    out = tmp_path / "eval"
    argv = ["evaluate", "--input", mix, "--format", "alpaca", "--group-field", "domain", "--test-per-group", "4",
            "--validation-per-group", "3", "--target-group", "code", "--budgets", "6", "--seeds", "2",
            "--methods", "targeted_tokens,rds_tokens,tokenod_tokens,uniform", "--output", str(out),
            "--model", str(tiny_llama_dir), "--recipe-lrs", "1e-3", "--recipe-epochs", "1"]
    assert main(argv) == 0
    with open(out / "summary.csv") as handle:
        summary = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(summary) == {"targeted_tokens", "rds_tokens", "tokenod_tokens", "uniform"}
    for row in summary.values():
        assert float(row["nll_code_mean"]) > 0 and "nll_code_std" in row
    settings = json.loads((out / "settings.json").read_text())
    assert settings["target"] == {"group": "code", "part": "validation", "examples": 3,
                                  "target_tokens": settings["target"]["target_tokens"]}
    # RDS+ leans on the target's group: more code picks than uniform's share.
    assert float(summary["rds_tokens"]["picks_code_mean"]) >= float(summary["uniform"]["picks_code_mean"])
    bad = list(argv)
    bad[bad.index("--target-group") + 1] = "poetry"
    bad[bad.index("--output") + 1] = str(tmp_path / "bad")
    assert main(bad) == 2 and "--target-group 'poetry' is not a group" in capsys.readouterr().err
