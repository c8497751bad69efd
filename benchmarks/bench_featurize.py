"""Featurizer speed on tinyshakespeare with the offline SmolLM2-135M (or --model).

Default: three timings over the SAME length-sorted micro-batches:
  featurize  the whole Featurizer call (tokenise + masks + forward + gather + factors)
  bare       the base model's forward alone on the pre-padded micro-batches
  naive      AutoModelForCausalLM(..., output_hidden_states=True): the full LM head too
Tokens/s counts real (unpadded) tokens. Ends with
`featurize_vs_bare: <ratio> featurize_vs_naive: <ratio> padding: <fraction>`.

--actor-overhead: seconds per 1,000 rows the featurize stage spends outside the model's forward
pass, in the featurizer actor and in the CPU tokenise stage, on the tests' tiny Llama (d = 32)
and on SmolLM2 (d = 576), side by side in one run:
  before       the featurizer of commit --before (issue 30's starting point), in the actor:
               tokenising, padding with the tokenizer, the storage rule example by example,
               the Arrow table from per-row arrays
  after/local  this tree's featurizer handed raw rows (as featurize_local does): tokenising
               in the actor, the rest as below
  after        this tree's pipeline: the Tokenize stage (a CPU worker), then the actor on its
               table: numpy padding, the storage rule one stack per length, one buffer per column
Each mode runs in its own process (the old tree from `git archive`), modes interleaved for
--rounds rounds; each keeps its best of --repeats calls after a warm-up. Times are CPU seconds
of the process (one thread: the work done, however loaded the box; wall seconds on a shared
box count the waits for a core too), the featurizer's phases timed the same way; "outside the
forward" is the call's less its forward phase. Ends with one line per model, SmolLM2's last:
`actor_overhead before_s=<a> after_s=<b>` (CPU seconds per 1,000 rows).
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BEFORE = "eb78c4b"  # main before issue 30's featurize stage work
OVERHEAD_MODES = {"before": "raw", "after/local": "raw", "after": "stage"}


def best_times(runs: dict, repeats: int) -> dict:
    """Best of `repeats` wall times per path; paths are interleaved so load drift hits all alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def throughput(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fishersft_ray.config import FeaturizeConfig
    from fishersft_ray.featurize.featurizer import Featurizer
    from fishersft_ray.io.corpus import read_corpus

    examples = read_corpus(args.corpus).examples.slice(0, args.limit)
    featurizer = Featurizer(FeaturizeConfig(model=args.model, device=args.device,
                                            micro_batch_tokens=args.micro_batch_tokens))
    device = featurizer.device
    micro_batches = featurizer.padded_batches(featurizer.encoded(examples)[0])
    padded = [tuple(torch.from_numpy(a).to(device) for a in (batch.input_ids, batch.attention_mask,
                                                            batch.position_ids)) for batch in micro_batches]
    real_tokens = sum(int(mask.sum()) for _, mask, _ in padded)
    naive_model = AutoModelForCausalLM.from_pretrained(
        featurizer.model_ref.local_path(), dtype=featurizer.model.dtype, attn_implementation="sdpa").to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_featurizer():
        featurizer(examples)
        sync()

    @torch.inference_mode()
    def run_bare():
        for input_ids, attention_mask, position_ids in padded:
            featurizer.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False)
        sync()

    @torch.inference_mode()
    def run_naive():
        for input_ids, attention_mask, position_ids in padded:
            naive_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, output_hidden_states=True)
        sync()

    featurizer(examples.slice(0, 16))  # warm-up (allocator, kernels)
    featurizer.real_tokens = featurizer.padded_tokens = 0
    seconds = best_times({"featurize": run_featurizer, "bare": run_bare, "naive": run_naive}, args.repeats)
    tokens_per_second = {name: real_tokens / s for name, s in seconds.items()}
    print(f"model {featurizer.model_ref.name} ({featurizer.model_ref.fingerprint}) d={featurizer.dim} "
          f"device={device} threads={args.threads} examples={examples.num_rows} tokens={real_tokens} "
          f"micro_batches={len(micro_batches)} micro_batch_tokens={args.micro_batch_tokens}")
    for name in seconds:
        print(f"{name:>10}: {seconds[name]:8.2f} s  {tokens_per_second[name]:10.0f} tokens/s")
    print(f"featurize_vs_bare: {tokens_per_second['featurize'] / tokens_per_second['bare']:.3f} "
          f"featurize_vs_naive: {tokens_per_second['featurize'] / tokens_per_second['naive']:.3f} "
          f"padding: {featurizer.padding_fraction:.4f}")


def overhead_worker(args) -> None:
    """One mode in this process (the package imported from --code): JSON with its best call."""
    sys.path.insert(0, args.code)
    import torch

    from fishersft_ray.config import FeaturizeConfig
    from fishersft_ray.featurize.featurizer import Featurizer
    from fishersft_ray.io.corpus import read_corpus
    from fishersft_ray.run.feature_cache import plan_forward_units

    torch.set_num_threads(args.threads)
    examples = plan_forward_units(read_corpus(args.corpus).examples.slice(0, args.limit), 16)
    featurizer = Featurizer(FeaturizeConfig(model=args.model, device="cpu"))
    stage = featurizer.tokenize if OVERHEAD_MODES[args.worker] == "stage" else None

    @contextlib.contextmanager
    def cpu_timed(phase: str):  # the featurizer's phases in CPU seconds (both trees call self.timed)
        started = time.process_time()
        try:
            yield
        finally:
            featurizer.seconds[phase] += time.process_time() - started

    featurizer.timed = cpu_timed

    def call(batch) -> dict:
        featurizer.seconds = dict.fromkeys(featurizer.seconds, 0.0)
        started = time.process_time()
        batch = stage(batch) if stage else batch
        stage_s = time.process_time() - started
        started = time.process_time()
        featurizer(batch)
        return {"stage_s": stage_s, "actor_s": time.process_time() - started - featurizer.seconds["forward"],
                "phases": dict(featurizer.seconds)}

    call(examples.slice(0, 16))  # warm-up
    best = min((call(examples) for _ in range(args.repeats)), key=lambda run: run["actor_s"])
    print(json.dumps({"rows": examples.num_rows, "dim": featurizer.dim, **best,
                      "package": str(pathlib.Path(sys.modules["fishersft_ray"].__file__).parent)}))


def actor_overhead(args) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_cluster import tiny_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="fsr-bench-featurize-"))
    before = work / "before"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "fishersft_ray"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(before, filter="data")
    code = {"before": str(before), "after/local": str(REPO), "after": str(REPO)}
    models = {"tiny": (tiny_model(work), args.tiny_rows), "smollm2": ("", args.smollm2_rows)}
    # BLAS threads as a Ray actor gets them (OMP_NUM_THREADS = its CPUs; a GPU actor has one).
    env = {**os.environ, "PYTHONPATH": "", **{name: str(args.threads) for name in
                                               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    runs: dict = {}
    for model, (path, rows) in models.items():
        for _ in range(args.rounds):
            for mode in OVERHEAD_MODES:
                command = [sys.executable, __file__, "--worker", mode, "--code", code[mode], "--corpus", args.corpus,
                           "--limit", str(rows), "--threads", str(args.threads), "--repeats", str(args.repeats)]
                done = subprocess.run(command + (["--model", path] if path else []), env=env, cwd=work,
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{model} {mode} failed:\n{done.stderr[-3000:]}")
                runs.setdefault((model, mode), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {key: min(results, key=lambda result: result["actor_s"]) | {
        "stage_s": min(result["stage_s"] for result in results)} for key, results in runs.items()}
    print(f"threads={args.threads} rounds={args.rounds} repeats={args.repeats} before={args.before}; CPU seconds "
          "per 1,000 rows outside the forward")
    print(f"{'model':<8} {'mode':<12} {'rows':>5} {'CPU stage':>10} {'actor':>8}   actor phases")
    lines = []
    for model in models:
        per_1000 = {}
        for mode in OVERHEAD_MODES:
            result = best[(model, mode)]
            scale = 1000 / result["rows"]
            per_1000[mode] = result["actor_s"] * scale
            phases = " ".join(f"{name}={seconds * scale:.3f}" for name, seconds in result["phases"].items()
                              if name != "forward")
            print(f"{model:<8} {mode:<12} {result['rows']:>5} {result['stage_s'] * scale:>10.3f} "
                  f"{per_1000[mode]:>8.3f}   {phases} (d={result['dim']})")
        lines.append(f"actor_overhead[{model}] before_s={per_1000['before']:.3f} after_s={per_1000['after']:.3f} "
                     f"ratio={per_1000['before'] / per_1000['after']:.2f}")
    print("\n".join(lines))
    smollm2 = best[("smollm2", "before")], best[("smollm2", "after")]
    print(f"actor_overhead before_s={smollm2[0]['actor_s'] * 1000 / smollm2[0]['rows']:.3f} "
          f"after_s={smollm2[1]['actor_s'] * 1000 / smollm2[1]['rows']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default: offline SmolLM2)")
    parser.add_argument("--limit", type=int, default=1000, help="examples (speeches) to featurize")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per path")
    parser.add_argument("--actor-overhead", action="store_true", help="time the work outside the forward, "
                                                                      "before and after (see above)")
    parser.add_argument("--before", default=BEFORE, help="the commit whose featurizer is 'before'")
    parser.add_argument("--rounds", type=int, default=2, help="--actor-overhead: interleaved rounds of the modes")
    parser.add_argument("--tiny-rows", type=int, default=1000)
    parser.add_argument("--smollm2-rows", type=int, default=128)
    parser.add_argument("--worker", choices=OVERHEAD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        overhead_worker(args)
    elif args.actor_overhead:
        actor_overhead(args)
    else:
        import torch

        torch.set_num_threads(args.threads)
        throughput(args)


if __name__ == "__main__":
    main()
