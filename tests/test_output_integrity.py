"""Output integrity (issue 28): one run per output, every check before the output is touched,
outputs that say what they hold, no leftovers, clean exits."""

import base64
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.cli import main
from fishersft_ray.io.storage import Location, StorageError

CLI = str(pathlib.Path(sys.executable).with_name("fishersft-ray"))
LOCK_MESSAGE = "another fishersft-ray run holds"


def _corpus(path: pathlib.Path, n: int = 36) -> pathlib.Path:
    rows = [{"text": f"line {i}: " + " ".join(f"w{(i * 13 + k) % 47}" for k in range(4 + (i * 5) % 33))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _select(corpus, output, model, *flags) -> list[str]:
    return ["select", "--input", str(corpus), "--output", str(output), "--model", str(model),
            "--executor", "local", *map(str, flags)]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "rror" in line]
    assert len(lines) == 1 and lines[0].startswith("fishersft-ray: error:"), lines  # one line, no traceback
    return lines[0]


def _assert_manifest_matches_files(out: pathlib.Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (out / entry["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), entry["name"]
    subset = pq.read_table(out / manifest["files"][0]["name"])
    assert manifest["selection"]["selected"] == subset.num_rows
    return manifest


def test_concurrent_runs_into_one_output_never_mix_their_files(tiny_llama_dir, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl")
    features = tmp_path / "features"
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        runs = [subprocess.Popen([CLI, *_select(corpus, out, tiny_llama_dir, "--budget", budget,
                                                "--features", features)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for budget in (5, 6)]
        results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
        codes = sorted(code for code, _ in results)
        assert codes in ([0, 0], [0, 2]), results
        if codes == [0, 2]:  # the loser stopped at the lock, before touching anything
            loser = next(err for code, err in results if code == 2)
            assert LOCK_MESSAGE in loser and "wait for it or choose another --output" in loser, loser
        _assert_manifest_matches_files(out)
        assert not (out / ".fishersft-lock").exists()


def test_a_locked_output_fails_at_once_naming_the_holder(tiny_llama_dir, tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    with Location.of(str(out)).exclusive():
        assert main(_select(corpus, out, tiny_llama_dir, "--budget", 3)) == 2
        error = _error_line(capsys)
        assert LOCK_MESSAGE in error and f"pid {os.getpid()}, started" in error
        with pytest.raises(StorageError, match=LOCK_MESSAGE):
            with Location.of(str(out)).exclusive():
                pass
    assert not list(out.iterdir())  # released and removed; the failed run wrote nothing


def test_a_rerun_failing_its_checks_keeps_the_previous_complete_output(tiny_llama_dir, tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 4)) == 0
    before = _assert_manifest_matches_files(out)
    capsys.readouterr()
    # Checks after the model is resolved, and after featurizing: none may cost the old manifest.
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 4, "--project-dim", 64)) == 2
    assert "--project-dim 64" in (error := _error_line(capsys)) and "hidden size 32" in error
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 3, "--budget-unit", "tokens")) == 2
    assert "--budget 3" in (error := _error_line(capsys)) and "smallest eligible example's" in error
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 4, "--lam", "1e300")) == 2
    assert "--lam 1e+300" in (error := _error_line(capsys)) and "--lam-relative" in error
    assert _assert_manifest_matches_files(out) == before


@pytest.mark.parametrize("flags, flag", [
    (["--budget", "0"], "--budget"),
    (["--budget", "3", "--seed", "-1"], "--seed"),
    (["--budget", "3", "--checkpoint-seconds", "-1"], "--checkpoint-seconds"),
    (["--budget", "3", "--checkpoint-seconds", "nan"], "--checkpoint-seconds"),
    (["--budget", "3", "--lam", "2", "--lam-relative", "0.5"], "--lam-relative"),
])
def test_flag_values_that_cannot_work_are_one_line_errors_before_any_work(tmp_path, capsys, flags, flag):
    corpus = _corpus(tmp_path / "c.jsonl")
    code = main(["select", "--input", str(corpus), "--output", str(tmp_path / "o"), *flags])
    assert code == 2 and flag in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_lam_defaults_to_one_and_relative_lam_alone_is_taken():
    from fishersft_ray.config import Rules

    assert Rules().lam == 1.0 and Rules(lam=3.0).lam == 3.0
    assert Rules(lam_relative=0.5).lam_relative == 0.5


@pytest.mark.parametrize("layout", ["same", "output_inside_input", "input_inside_output"])
def test_an_output_overlapping_the_input_is_refused_naming_both(tiny_llama_dir, tmp_path, capsys, layout):
    data = tmp_path / "data"
    data.mkdir()
    corpus = _corpus(data / "c.jsonl")
    source, out = {"same": (data, data), "output_inside_input": (data, data / "run"),
                   "input_inside_output": (corpus, tmp_path)}[layout]
    assert main(_select(source, out, tiny_llama_dir, "--budget", 3)) == 2
    error = _error_line(capsys)
    assert "--output" in error and "--input" in error and "overlap" in error
    assert sorted(p.name for p in data.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("flag", ["--features", "--spill-dir"])
def test_an_unwritable_features_or_spill_dir_is_named_before_any_work(tiny_llama_dir, tmp_path, capsys, flag):
    corpus = _corpus(tmp_path / "c.jsonl")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(_select(corpus, tmp_path / "o", tiny_llama_dir, "--budget", 3, flag, blocker / "sub")) == 2
    error = _error_line(capsys)
    assert f"cannot write to {flag} {blocker / 'sub'}" in error


def test_ctrl_c_is_one_line_and_exit_130(tiny_llama_dir, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", n=300)
    # The process interrupts itself after its second featurizer batch (faults.py): a Ctrl-C
    # mid-featurize however loaded the machine is (a signal sent on reading a log line may
    # arrive after a fast run has already finished).
    # It starts as a terminal's foreground job does, with SIGINT at its default: a shell starts
    # background jobs (and so a backgrounded test run's children) with SIGINT ignored.
    run = subprocess.run([CLI, *_select(corpus, tmp_path / "o", tiny_llama_dir, "--budget", 3, "--batch-size", 16)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FISHERSFT_FAULT": "featurize:2:SIGINT"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = run.stderr
    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("fishersft-ray: interrupted; rerun the same command to resume "
                                               "(features and the selection checkpoint are kept)")


def test_write_failures_leave_no_temporary_files_and_runs_leave_no_checkpoint_dir(tiny_llama_dir, tmp_path):
    place = Location.of(str(tmp_path / "w"))
    (tmp_path / "w" / "taken" / "inner").mkdir(parents=True)  # the rename onto it must fail
    with pytest.raises(OSError):
        place.write_bytes("taken", b"data")
    assert not list((tmp_path / "w").glob("*.tmp-*"))

    # Temporaries of a dead writer, in the output and the feature cache, go when a run starts.
    corpus = _corpus(tmp_path / "c.jsonl")
    out, features = tmp_path / "out", tmp_path / "features"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (out / f"subset.parquet.tmp-{dead.pid}-1", features / "k" / f"part-0.parquet.tmp-{dead.pid}-2"):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"half a file")
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 3, "--features", features)) == 0
    assert not list(out.rglob("*.tmp-*")) and not list(features.rglob("*.tmp-*"))
    assert not (out / "_checkpoint").exists()


def test_a_full_disk_leaves_no_temporary_files_and_the_rerun_completes(tiny_llama_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        corpus = _corpus(tmp_path / "c.jsonl")
        features = tmp_path / "features"
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (256 * 1024 - 24 * 1024))  # room for a few small files, not the report
        flags = _select(corpus, disk / "out", tiny_llama_dir, "--budget", 3, "--features", features)
        assert main(flags) == 2
        assert not list(disk.rglob("*.tmp-*"))
        filler.unlink()
        assert main(flags) == 0
        assert not list(disk.rglob("*.tmp-*"))
        _assert_manifest_matches_files(disk / "out")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_jsonl_subset_is_strict_json(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.parquet"
    n = 12
    pq.write_table(pa.table({
        "text": [f"row {i} " + "word " * (3 + i) for i in range(n)],
        "score": pa.array([float("nan") if i % 2 else i / 2 for i in range(n)], pa.float64()),
        "blob": pa.array([bytes([i, 255, 0]) for i in range(n)], pa.binary()),
        "when": pa.array([np.datetime64("2026-01-02T03:04:05") + np.timedelta64(i, "s") for i in range(n)],
                         pa.timestamp("s")),
    }), corpus)
    out = tmp_path / "out"
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", n, "--output-format", "jsonl")) == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in (out / "subset.jsonl").read_text().splitlines()]
    assert len(rows) == n
    for row in rows:
        i = int(row["text"].split()[1])
        assert row["score"] == (None if i % 2 else i / 2)
        assert base64.b64decode(row["blob"]) == bytes([i, 255, 0])
        assert row["when"] == f"2026-01-02T03:04:{5 + i:02d}"


def test_an_empty_selection_keeps_the_corpus_columns(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i} " + "word " * 9, "source": "s"}) + "\n"
                              for i in range(6)))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="exceeds"):
        assert main(_select(corpus, out, tiny_llama_dir, "--budget", 3, "--length-cap", 1)) == 0
    subset = pq.read_table(out / "subset.parquet")
    assert subset.num_rows == 0 and {"text", "source", "fishersft_rank"} <= set(subset.column_names)


def test_prior_rows_skipped_are_reported(tiny_llama_dir, tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.jsonl")
    prior = tmp_path / "prior.jsonl"
    prior.write_text(json.dumps({"text": "an earlier row"}) + "\n" + json.dumps({"text": 7}) + "\n"
                     + json.dumps({"text": "   "}) + "\n")
    out = tmp_path / "out"
    assert main(_select(corpus, out, tiny_llama_dir, "--budget", 3, "--prior", prior, "--on-bad-row", "skip")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prior"]["rows_read"] == 3 and manifest["prior"]["kept"] == 1
    assert manifest["prior"]["skipped"]["bad_type"] == 1 and manifest["prior"]["skipped"]["empty"] == 1
    assert "prior rows read / kept  3 / 1  (skipped: bad_type=1, empty=1)" in capsys.readouterr().out


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_parquet_row_error_exits_2_every_time_with_one_omp_thread(tiny_llama_dir, tmp_path, executor):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": [f"row {i} hello" for i in range(50)]}), corpus / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), corpus / "b.parquet")
    command = [CLI, *_select(corpus, tmp_path / "o", tiny_llama_dir, "--budget", 3)]
    command[command.index("local")] = executor
    for _ in range(3 if executor == "local" else 2):
        run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=180)
        assert run.returncode == 2, run.stderr[-3000:]
        assert "b.parquet: row 0: field 'text' must be a string" in run.stderr
        assert "terminate called" not in run.stderr
