"""Settings of both commands as typed, frozen dataclasses, built once from argparse.

A field that users may set carries its command-line help in its metadata (``option``):
the parser is generated from the dataclasses (``add_options``) and the parsed values go
back into them by name (``from_args``), so no field list is written twice. A command's
settings nest one group per stage (corpus options, featurizer config, resources, selection
rules); each stage is handed its group or plain values, never the whole command's settings.
Every check of a value lives in its group's ``__post_init__``, with an error naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BUDGET_UNITS = ("examples", "tokens")
TOKEN_WEIGHTS = ("none", "loss")
EXECUTORS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")
FACTOR_DTYPES = ("float32", "float16")  # the keys of features.FACTOR_TYPES


def option(default: Any = dataclasses.MISSING, *, help: str, parse=None, choices=None,
           metavar: str | None = None, default_factory=dataclasses.MISSING, flag: str | None = None) -> Any:
    """A dataclass field exposed as ``--field-name``, or as ``flag`` when given (required
    when it has no default)."""
    metadata = {"help": help, "parse": parse, "choices": choices, "metavar": metavar, "flag": flag}
    return field(default=default, default_factory=default_factory, metadata={"cli": metadata})


def numbers(kind):
    """Parser of a comma-separated list of numbers (``--budgets 100,250``)."""
    def parse(text: str) -> list:
        try:
            return [kind(value) for value in text.split(",") if value.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")
    parse.__name__ = f"{kind.__name__} list"
    return parse


def count_or(*words: str):
    """Parser of a flag that takes one of ``words`` ("none" parses to None) or an integer >= 1."""
    def parse(text):
        if text in words:
            return None if text == "none" else text
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected {', '.join(words)} or an integer >= 1, got {text!r}")
        return value
    parse.__name__ = " or ".join(words) + " or count"
    return parse


def names(text: str) -> list[str]:
    return [value.strip() for value in text.split(",") if value.strip()]


def shares(text: str) -> dict:
    """Parser of ``--pool-shares g1=0.9,g2=0.1`` → {"g1": 0.9, "g2": 0.1}."""
    values = {}
    for item in names(text):
        group, _, share = item.rpartition("=")
        try:
            values[group.strip()] = float(share)
        except ValueError:
            group = ""
        if not group.strip():
            raise argparse.ArgumentTypeError(f"expected GROUP=SHARE pairs, e.g. web=0.9,code=0.1, got {item!r}")
    return values


def storage_options(text: str) -> dict:
    """The ``--storage-options`` JSON object (fsspec/s3fs keyword arguments)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc}); pass an object such as "
            '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'') from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": false}'")
    return options


def _groups(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def add_options(parser: argparse.ArgumentParser, cls, skip=()) -> dict[str, argparse.Action]:
    """Add a flag for every ``option`` field of ``cls`` and of its nested groups, but those
    named in ``skip``: the command's own fields in a "job" section of the help, each stage's
    in a section of its own, titled by its field name and described by its docstring.
    Returns the flags by field name."""
    flags = _add_fields(parser.add_argument_group("job"), cls, skip)
    for name, group in _groups(cls).items():
        flags |= _add_fields(parser.add_argument_group(name, _first_sentence(group.__doc__)), group, skip)
    return flags


def _first_sentence(doc: str) -> str:
    return re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]


def _add_fields(parser, cls, skip) -> dict[str, argparse.Action]:
    """Flags for the ``option`` fields of ``cls`` itself (not of its nested groups)."""
    groups = _groups(cls)
    flags = {}
    for item in dataclasses.fields(cls):
        cli = item.metadata.get("cli")
        if item.name in groups or cli is None or item.name in skip:
            continue
        flag = cli["flag"] or "--" + item.name.replace("_", "-")
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if item.default is False and cli["parse"] is None:
            flags[item.name] = parser.add_argument(flag, dest=item.name, action="store_true", help=cli["help"])
            continue
        default = None if required or item.default is dataclasses.MISSING else item.default
        kind = cli["parse"] or _scalar_type(typing.get_type_hints(cls)[item.name])
        flags[item.name] = parser.add_argument(
            flag, dest=item.name, required=required, default=default, type=kind, choices=cli["choices"],
            metavar=cli["metavar"], help=cli["help"] + ("" if required or default is None else f" (default: {default})"))
    return flags


def _scalar_type(hint) -> Any:
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0] if options[0] in (int, float, str) else str


def from_args(cls, args: argparse.Namespace):
    """``cls`` (and its nested groups) from parsed arguments; unset optional fields keep their
    dataclass defaults."""
    groups = _groups(cls)
    values = {}
    for item in dataclasses.fields(cls):
        if item.name in groups:
            values[item.name] = from_args(groups[item.name], args)
        elif item.metadata.get("cli") is not None and getattr(args, item.name, None) is not None:
            values[item.name] = getattr(args, item.name)
    return cls(**values)


def build(cls, **flat):
    """``cls`` from flat keyword arguments (each goes to the group that has that field):
    ``SelectSettings.build(input=…, output=…, budget=8, num_actors=2)`` for code and tests."""
    groups = _groups(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    values = {name: flat.pop(name) for name in list(flat) if name in own and name not in groups}
    for name, group in groups.items():
        wanted = {f.name for f in dataclasses.fields(group)} | set(_groups(group))
        values[name] = build(group, **{key: flat.pop(key) for key in list(flat) if key in wanted})
    if flat:
        raise TypeError(f"{cls.__name__} has no setting(s) {sorted(flat)}")
    return cls(**values)


def flat_dict(settings) -> dict:
    """All settings as one flat dict (nested groups merged), for manifests and settings.json;
    storage options are reduced to their keys (they may hold secrets)."""
    out = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_dict(value))
        elif isinstance(value, np.ndarray):
            out[item.name] = f"array{list(value.shape)}"
        elif item.name == "storage_options":
            out[item.name] = sorted(value)
        elif item.name == "model" and hasattr(value, "name"):
            out[item.name] = value.name
        else:
            out[item.name] = value
    return out


def _check_choice(value, choices, flag: str) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_positive(value, flag: str, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{flag} must be > 0, got {value!r}")


# --project-dim auto: widths up to AUTO_PROJECT_ABOVE are stored unprojected; wider models get a
# seeded orthonormal projection to AUTO_PROJECT_DIM. From bench_projection on SmolLM2 states
# (d = 576, GSM8K): a seeded k = 256 kept 1.0000 / 0.9999 of the full-width log-det of the picks
# (examples / tokens), k = 128 0.9998 / 0.9997; 512 is twice the largest k measured as lossless,
# and cuts a 4096-wide model's bytes per GSM8K row from 1.46 MB to 183 KB (README table).
AUTO_PROJECT_ABOVE = 1024
AUTO_PROJECT_DIM = 512


# ---------------------------------------------------------------- stage groups


class _CorpusFormats:
    """The ``--format`` choices: auto and the names in io/corpus.py's ``FORMATS``, read each
    time they are used (io/corpus.py imports this module, so not while it is imported)."""

    def _names(self) -> tuple[str, ...]:
        from fishersft_ray.io.corpus import FORMATS

        return ("auto", *FORMATS)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


CORPUS_FORMATS = _CorpusFormats()


@dataclass(frozen=True)
class CorpusOptions:
    """How corpus rows map to examples (io/corpus.py)."""

    format: str = option("auto", choices=CORPUS_FORMATS,
                         help="corpus format (auto: chat if --messages-field is present, alpaca if "
                              "--instruction-field and --output-field, text if --text-field)")
    text_field: str = option("text", help="text column of the text format")
    instruction_field: str = option("instruction", help="alpaca: the instruction column")
    input_field: str = option("input", help="alpaca: the optional input column (appended to the prompt)")
    output_field: str = option("output", help="alpaca: the response column")
    messages_field: str = option("messages", help="chat: the column of {role, content} turns")
    id_field: str | None = option(None, help="column holding a stable row id (default: the row's position)")
    on_bad_row: str = option("error", choices=("error", "skip"),
                             help="malformed rows: stop with an error naming the row, or skip and count them")

    def __post_init__(self):
        if self.format != "auto":  # io/corpus.py builds the default while it is being imported
            _check_choice(self.format, CORPUS_FORMATS, "--format")
        _check_choice(self.on_bad_row, ("error", "skip"), "--on-bad-row")


@dataclass(frozen=True)
class FeaturizeConfig:
    """What the featurizer computes and how (featurize/featurizer.py); every field but the
    model is part of the feature cache key."""

    model: Any = option(None, help="Hugging Face id, local directory or .gguf file "
                                   "(default: the offline SmolLM2-135M-Instruct when installed)")
    backend: str = "hf"                    # what loads the model: a name in featurize/backends.BACKENDS
    device: str = option("auto", choices=DEVICES, help="featurizer device (auto: GPU actors where the cluster has GPUs); the "
                                                        "selection runs on the driver's GPU too unless cpu or it has none")
    max_length: int | None = option(None, help="truncate examples to this many tokens "
                                               "(default: the model's maximum)")
    micro_batch_tokens: int = option(8192, help="padded tokens per forward pass on the featurizer")
    max_padding: float = 0.05              # start a new micro-batch rather than pad more than this
    project_dim: int | str | None = option("auto", parse=count_or("auto", "none"), metavar="auto|none|K",
                                           help="project embeddings to K dims on the actors (seeded "
                                                "orthonormal), before the products; auto: none up to "
                                                f"width {AUTO_PROJECT_ABOVE}, {AUTO_PROJECT_DIM} above")
    projection: str = "random"             # "random" (seeded orthonormal) | "pca"
    projection_seed: int = 0
    projection_matrix: np.ndarray | None = field(default=None, compare=False)  # fitted PCA basis (d, k)
    pca_sample_rows: int = 256
    max_rank: int | None = None            # keep the top eigenpairs only
    factor_dtype: str = option("float32", choices=FACTOR_DTYPES,
                               help="store the factors as float16: half the feature bytes (spectra "
                                    "recomputed from the rounded factors; picks measured unchanged, see README)")
    keep_states: bool = option(False, help="also store each target token's state and id in the feature "
                                           "shards, so `evaluate --features` can reuse them")
    rows_per_unit: int = 16                # rows per forward unit (run/feature_cache.plan_forward_units)
    overlong: str = "truncate"             # "truncate" | "split"
    token_weights: str = option("none", choices=TOKEN_WEIGHTS,
                                help="loss: weight each target token by ‖p − e_y‖² under the model "
                                     "(empirical Fisher; tokens the model already predicts count less)")

    def __post_init__(self):
        _check_choice(self.device, DEVICES, "--device")
        _check_choice(self.token_weights, TOKEN_WEIGHTS, "--token-weights")
        _check_choice(self.overlong, ("truncate", "split"), "overlong")
        _check_choice(self.factor_dtype, FACTOR_DTYPES, "--factor-dtype")
        _check_choice(self.projection, ("random", "pca"), "projection")
        for value, flag in ((None if self.project_dim == "auto" else self.project_dim, "--project-dim"),
                            (self.max_length, "--max-length"),
                            (self.micro_batch_tokens, "--micro-batch-tokens"), (self.max_rank, "max_rank"),
                            (self.rows_per_unit, "rows_per_unit")):
            _check_positive(value, flag)

    def for_width(self, dim: int | None) -> "FeaturizeConfig":
        """``project_dim="auto"`` resolved for a model of hidden size ``dim`` (unknown: none);
        a ``--project-dim`` wider than the model is an error."""
        if isinstance(self.project_dim, int) and dim is not None and self.project_dim > dim:
            raise ValueError(f"--project-dim {self.project_dim} is wider than the model's hidden size {dim}: "
                             f"pass at most {dim}, or none to keep the full width")
        if self.project_dim != "auto":
            return self
        wide = dim is not None and dim > AUTO_PROJECT_ABOVE
        return dataclasses.replace(self, project_dim=AUTO_PROJECT_DIM if wide else None)

    def cache_identity(self) -> dict:
        """The fields that decide the features' numbers: the cache key's settings part (the
        model enters by its fingerprint; a PCA basis is fitted from the corpus and model)."""
        identity = dataclasses.asdict(self) | {"model": None, "projection_matrix": None}
        if self.factor_dtype == "float32":  # float32 shards predate the option: their keys stay
            del identity["factor_dtype"]
        if self.backend == "hf":  # as do the shards of the one backend before the field
            del identity["backend"]
        return identity


def json_object(text: str) -> dict:
    """A JSON object flag (``--actor-resources '{"accelerator_type:A10G": 0.01}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


@dataclass(frozen=True)
class Resources:
    """Where the featurizer runs and what each actor asks for (run/executors.py). Sizes are
    per actor and come from what single nodes offer, never from cluster totals."""

    executor: str = option("ray", choices=EXECUTORS,
                           help="ray: a Ray Data actor pool (local Ray, or --ray-address); "
                                "local: in this process")
    ray_address: str | None = option(None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    num_actors: int | None = option(None, help="featurizer actors (default: as many as the nodes can host)")
    min_actors: int | None = option(None, help="autoscaling pool: start with this many actors (with --max-actors)")
    max_actors: int | None = option(None, help="autoscaling pool: grow up to this many actors while work is queued")
    num_gpus_per_actor: float | None = option(None, help="GPUs per actor; a fraction shares one GPU between "
                                                         "actors (default: 1 when featurizing on GPUs, else 0)")
    cpus_per_actor: float | None = option(None, help="CPUs per actor (default: 1 with a GPU, else up to 8, "
                                                     "never more than the largest node has)")
    actor_resources: dict = option(default_factory=dict, parse=json_object,
                                   help="custom resources each actor needs, as JSON, e.g. "
                                        "'{\"accelerator_type:A10G\": 0.001}' or a resource a node was started with")
    actor_start_timeout: float = option(300.0, help="when no node can host one featurizer actor: seconds to wait "
                                                    "for one (an autoscaler may add it) before failing with what "
                                                    "was asked and what the largest node has")
    batch_size: int = option(64, help="rows per featurizer call (whole forward units)")

    def __post_init__(self):
        _check_choice(self.executor, EXECUTORS, "--executor")
        for value, flag in ((self.num_actors, "--num-actors"), (self.min_actors, "--min-actors"),
                            (self.max_actors, "--max-actors"), (self.cpus_per_actor, "--cpus-per-actor"),
                            (self.actor_start_timeout, "--actor-start-timeout")):
            _check_positive(value, flag)
        _check_positive(self.batch_size, "--batch-size", allow_none=False)
        if self.num_gpus_per_actor is not None and not self.num_gpus_per_actor >= 0:
            raise ValueError(f"--num-gpus-per-actor must be ≥ 0, got {self.num_gpus_per_actor}")
        if self.num_gpus_per_actor and self.num_gpus_per_actor > 1 and not float(self.num_gpus_per_actor).is_integer():
            raise ValueError(f"--num-gpus-per-actor above 1 must be a whole number, got {self.num_gpus_per_actor}")
        if (self.min_actors or self.max_actors) and self.num_actors:
            raise ValueError("--num-actors is a fixed pool: drop it to use --min-actors/--max-actors")
        if self.min_actors and self.max_actors and self.min_actors > self.max_actors:
            raise ValueError(f"--min-actors {self.min_actors} > --max-actors {self.max_actors}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.actor_resources.values()):
            raise ValueError(f"--actor-resources values must be numbers ≥ 0, got {self.actor_resources}")


@dataclass(frozen=True)
class Rules:
    """Selection rules shared by every method (select/rules.py)."""

    lam: float | None = option(None, help="ridge λ in Σ_0 = λI (default: 1)")
    lam_relative: float | None = option(None, help="instead of --lam: λ = this × the corpus's mean ‖x‖² "
                                                   "per target token")
    length_cap: str | None = option(None, help="never select examples with more target tokens than this: "
                                               "a number (e.g. 256) or a percentile of the corpus's target "
                                               "lengths (p50 = median)")
    near_dup_cosine: float | None = option(None, help="near-duplicate guard: an example whose mean target-token "
                                                      "embedding has cosine >= this with an already-picked "
                                                      "example is not picked (e.g. 0.98; default: off)")

    def __post_init__(self):
        if self.lam is not None and self.lam_relative is not None:
            raise ValueError(f"--lam {self.lam:g} and --lam-relative {self.lam_relative:g} both set λ: pass one")
        if self.lam is None:  # the one place the default λ is decided
            object.__setattr__(self, "lam", 1.0)
        if not (isinstance(self.lam, (int, float)) and np.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"--lam must be a finite number > 0, got {self.lam}")
        _check_positive(self.lam_relative, "--lam-relative")
        if self.near_dup_cosine is not None and not 0 < self.near_dup_cosine <= 1:
            raise ValueError(f"--near-dup-cosine must be a cosine in (0, 1], got {self.near_dup_cosine}")
        if self.length_cap is not None:
            from fishersft_ray.select.rules import length_cap_tokens

            length_cap_tokens(self.length_cap, np.ones(1))  # the syntax, before any featurizing


@dataclass(frozen=True)
class GroupOptions:
    """Where each row's group (its source in a mixture) comes from (io/groups.py). Groups are
    reported (select's manifest, evaluate's per-group scores) and read by the label-aware
    methods (balanced) only: the other selection methods never see them."""

    group_field: str | None = option(None, help="corpus column holding each row's group (its source in a "
                                                "mixture): select reports each group's share of the picks, "
                                                "evaluate scores each group")
    group_by_file: bool = option(False, help="each input file is a group, named by its file name (several "
                                             "input files without a group column)")

    def __post_init__(self):
        if self.group_field is not None and not self.group_field.strip():
            raise ValueError("--group-field must name a column, got an empty name")
        if self.group_field is not None and self.group_by_file:
            raise ValueError("--group-field and --group-by-file both say where groups come from: pass one")

    @property
    def given(self) -> bool:
        return self.group_field is not None or self.group_by_file


# ---------------------------------------------------------------- the commands

CONFIG_HELP = ("YAML or JSON file of settings: a key per flag, e.g. `budget: 1000`; a flag on "
               "the command line wins over the file; the manifest records the file's name")


@dataclass(frozen=True)
class SelectSettings:
    """`fishersft-ray select` (and `ray job submit … jobs/select_subset.py`)."""

    input: str = option(help="corpus: file, directory or glob; local or s3://")
    output: str = option(help="output directory; local or s3://")
    budget: int = option(help="examples (or target tokens) to select")
    budget_unit: str = option("examples", choices=BUDGET_UNITS, help="what --budget counts")
    method: str = option("tokenod", help="selection method: tokenod (the default), or a baseline for an A/B "
                                         "run (vopt, sentence_od, uniform, longest_first, density; balanced "
                                         "needs --group-field or --group-by-file); for a target set "
                                         "(--target): targeted, targeted_vopt, rds")
    seed: int = option(0, help="seed of the random methods (uniform, density)")
    prior: str | None = option(None, help="corpus already trained on: its information conditions the "
                                          "selection (log-det methods)")
    target: str | None = option(None, help="examples of the task you fine-tune for (the formats, field flags and "
                                           "storage of --input): --method targeted, targeted_vopt or rds select "
                                           "for it")
    target_format: str | None = option(None, choices=CORPUS_FORMATS, help="format of --target (default: --format; "
                                                                          "the field flags are shared)")
    storage_options: dict = option(default_factory=dict, parse=storage_options,
                                   help='fsspec/s3fs options as JSON, e.g. \'{"client_kwargs": '
                                        '{"endpoint_url": "…"}}\'')
    output_format: str = option("parquet", choices=("parquet", "jsonl"), help="format of the subset file")
    features: str | None = option(None, help="feature-shard cache location (default: <output>/features)")
    checkpoint_seconds: float = option(30.0, help="save the selection state at most this often "
                                                  "(a rerun resumes from it)")
    driver_memory_gb: float | None = option(None, help="feature shards larger than this are memory-mapped from "
                                                       "local disk (--spill-dir) instead of loaded into RAM "
                                                       "(default: half the memory available at start; 0: always)")
    spill_dir: str | None = option(None, help="local directory for memory-mapped features "
                                              "(default: $FISHERSFT_CACHE/spill)")
    partitions: str | int = option("auto", parse=count_or("auto"), help="two-stage selection (RandGreeDi): split the examples "
                                                             "into this many random parts, select in each on the "
                                                             "cluster, then over their candidates on the driver "
                                                             "(auto: 1 part while the features fit the driver's "
                                                             "memory or spill disk, else enough parts that one "
                                                             "fits its memory budget)")
    part_oversample: float = option(1.0, help="two-stage: each part returns this many times --budget candidates")
    greedy_tolerance: float = option(0.0, help="log-det methods: lazy greedy takes a pick once its gain per cost "
                                               "is within 1 - this of every other candidate's bound (0: exact "
                                               "greedy; e.g. 0.3: fewer evaluations; the manifest states the "
                                               "guarantee)")
    stochastic_greedy: float = option(0.0, metavar="DELTA", help="log-det methods: each greedy step takes the best "
                                                                 "of a random sample of (n/k)·ln(1/DELTA) candidates "
                                                                 "(0: off; e.g. 0.05): work grows linearly with the "
                                                                 "corpus; the manifest states the guarantee")
    config_file: str | None = option(None, flag="--config", metavar="FILE", help=CONFIG_HELP)
    select_threads: int | None = None  # torch threads for the selection (None: torch's default)
    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    resources: Resources = field(default_factory=Resources)
    rules: Rules = field(default_factory=Rules)
    groups: GroupOptions = field(default_factory=GroupOptions)

    def __post_init__(self):
        from fishersft_ray.select.methods import CERTIFIED, METHODS, TARGETED

        if not (isinstance(self.budget, (int, np.integer)) and self.budget >= 1):
            raise ValueError(f"--budget must be an integer ≥ 1, got {self.budget!r}")
        if not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise ValueError(f"--seed must be an integer ≥ 0, got {self.seed!r}")
        if not self.checkpoint_seconds >= 0:  # also refuses NaN
            raise ValueError(f"--checkpoint-seconds must be a number ≥ 0, got {self.checkpoint_seconds!r}")
        _check_choice(self.budget_unit, BUDGET_UNITS, "--budget-unit")
        _check_choice(self.method, METHODS, "--method")
        if self.method == "balanced" and not self.groups.given:
            raise ValueError("--method balanced samples equal target tokens per group: pass --group-field NAME "
                             "or --group-by-file")
        if self.method in TARGETED and not self.target:
            raise ValueError(f"--method {self.method} selects for a target set: pass --target PATH (a few dozen "
                             "examples of the task you fine-tune for)")
        if self.target and self.method not in TARGETED:
            raise ValueError(f"--target is read by --method {', '.join(sorted(TARGETED))}, not by "
                             f"--method {self.method}")
        _check_choice(self.output_format, ("parquet", "jsonl"), "--output-format")
        if not (self.partitions == "auto" or (isinstance(self.partitions, (int, np.integer))
                                                and self.partitions >= 1)):
            raise ValueError(f"--partitions must be auto or an integer >= 1, got {self.partitions!r}")
        if not self.part_oversample >= 1:
            raise ValueError(f"--part-oversample must be >= 1, got {self.part_oversample}")
        if self.partitions not in ("auto", 1) and self.method not in CERTIFIED:
            raise ValueError(f"--partitions {self.partitions} runs a certified method "
                             f"({', '.join(sorted(CERTIFIED))}) only, not --method {self.method}")
        if self.driver_memory_gb is not None and not self.driver_memory_gb >= 0:
            raise ValueError(f"--driver-memory-gb must be >= 0, got {self.driver_memory_gb}")
        for flag, value in (("--greedy-tolerance", self.greedy_tolerance),
                            ("--stochastic-greedy", self.stochastic_greedy)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{flag} must be a number in [0, 1), got {value!r}")
            if value and self.method not in CERTIFIED:
                raise ValueError(f"{flag} applies to the log-det greedy methods ({', '.join(sorted(CERTIFIED))}), "
                                 f"not to --method {self.method}")

    build = classmethod(build)


@dataclass(frozen=True)
class EvaluateResources(Resources):
    """evaluate featurizes in this process unless told to use Ray."""

    executor: str = option("local", choices=EXECUTORS, help="local: featurize in this process; "
                                                            "ray: on a Ray Data actor pool")


@dataclass(frozen=True)
class EvaluateRules(Rules):
    """evaluate's length-capped methods need a cap: the median by default."""

    length_cap: str | None = option("p50", help="cap of the length-capped methods, as select's --length-cap")
    near_dup_cosine: float | None = option(0.98, help="cosine of the near-duplicate guard of the *_guard methods "
                                                      "(as select's --near-dup-cosine)")


@dataclass(frozen=True)
class Protocol:
    """The evaluation protocol (evaluate/protocol.py)."""

    budgets: list = option(default_factory=lambda: [100, 250, 500, 1000], parse=numbers(int),
                           help="example budgets, comma-separated (default: 100,250,500,1000)")
    seeds: int = option(3, help="seeds per random method")
    methods: list | None = option(None, parse=names, help="comma-separated evaluation methods "
                                                          "(default: all; see evaluate/methods.py)")
    recipe_lrs: list | None = option(None, parse=numbers(float),
                                     help="recipe candidates: learning rates (default by --mode: head "
                                          "3e-5,1e-4,3e-4,1e-3; full 1e-5,3e-5,1e-4; lora 1e-4,3e-4,1e-3)")
    recipe_epochs: list | None = option(None, parse=numbers(float),
                                        help="recipe candidates: epochs (default: head 1,3; full/lora 1)")
    batch_tokens: int = option(1024, help="tokens per optimizer step (head: target tokens; "
                                          "full/lora: input tokens)")
    train_seed: int = 0
    device: str = "cpu"  # of the selections: evaluate runs them where --device featurizes

    def __post_init__(self):
        if not self.budgets or any(n <= 0 for n in self.budgets):
            raise ValueError(f"--budgets must be positive integers, got {self.budgets}")
        _check_positive(self.seeds, "--seeds", allow_none=False)
        _check_positive(self.batch_tokens, "--batch-tokens", allow_none=False)


@dataclass(frozen=True)
class SplitOptions:
    """How evaluate splits the corpus, and the redundant-pool scenario (evaluate/data.py)."""

    test_fraction: float = option(1 / 6, help="share of the corpus held out as the test set")
    validation_size: int = option(300, help="validation rows carved from the non-test part")
    max_pool: int | None = option(None, help="subsample the pool to this many rows")
    max_test: int | None = option(None, help="subsample the test set to this many rows")
    split_seed: int = option(0, help="seed of the split")
    redundant_share: float = option(0.0, help="share of the pool replaced by copies of "
                                              "--redundant-sources rows")
    redundant_sources: int = option(60, help="rows the redundant share copies")
    near_copy_noise: float = option(0.0, help="> 0: copies become near-copies (relative Gaussian noise on "
                                              "their states; whole-model modes still train on the source "
                                              "rows' text)")
    test_per_group: int | None = option(None, help="with groups: test rows drawn from each group (instead of "
                                                   "--test-fraction)")
    validation_per_group: int | None = option(None, help="with groups: validation rows drawn from each group "
                                                         "(instead of --validation-size)")
    target_group: str | None = option(None, metavar="GROUP", help="with groups: this group's validation rows are "
                                                                  "the target set of the targeted methods "
                                                                  "(targeted, targeted_tokens, targeted_vopt_tokens, "
                                                                  "rds, rds_tokens); "
                                                                  "its test rows score them (nll_GROUP)")
    pool_shares: dict | None = option(None, parse=shares, metavar="GROUP=SHARE,...",
                                      help="with groups: subsample the pool to these shares of its rows (the "
                                           "largest pool with them; a group not named gets none), e.g. "
                                           "web=0.9,code=0.05,math=0.05 (default: the corpus's proportions)")

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.redundant_share < 1:
            raise ValueError(f"--redundant-share must be in [0, 1), got {self.redundant_share}")
        _check_positive(self.test_per_group, "--test-per-group")
        _check_positive(self.validation_per_group, "--validation-per-group")
        for group, share in (self.pool_shares or {}).items():
            if not 0 <= share <= 1:
                raise ValueError(f"--pool-shares: the share of {group!r} must be in [0, 1], got {share}")


@dataclass(frozen=True)
class EvaluateSettings:
    """`fishersft-ray evaluate`: fine-tune on subsets picked by several methods and compare."""

    input: str = option(help="corpus file/dir/glob (txt, jsonl, json, parquet); local or s3://")
    output: str = option(help="directory for tables, plot and settings.json; local or s3://")
    mode: str = option("head", choices=("head", "full", "lora"),
                       help="head: fine-tune the LM head on stored states; full: every parameter of the "
                            "model; lora: LoRA adapters (r=16) on all linear layers")
    train_device: str = option("auto", choices=DEVICES, help="full/lora fine-tuning device "
                                                             "(auto: cuda if available)")
    features: str | None = option(None, help="feature-shard cache, shared with `select --keep-states "
                                             "--features` (default: <output>/features)")
    storage_options: dict = option(default_factory=dict, parse=storage_options,
                                   help="fsspec/s3fs options as JSON (see select)")
    title: str | None = option(None, help="plot/table title (default: the input's name)")
    config_file: str | None = option(None, flag="--config", metavar="FILE", help=CONFIG_HELP)
    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    featurize: FeaturizeConfig = field(default_factory=lambda: FeaturizeConfig(keep_states=True))
    resources: EvaluateResources = field(default_factory=EvaluateResources)
    rules: EvaluateRules = field(default_factory=EvaluateRules)
    protocol: Protocol = field(default_factory=Protocol)
    split: SplitOptions = field(default_factory=SplitOptions)
    groups: GroupOptions = field(default_factory=GroupOptions)

    # The head is fine-tuned on the model's own states: evaluate stores them, unprojected and
    # unweighted (its loss-weighted methods weight them at selection time).
    FIXED_FEATURIZE = ("keep_states", "project_dim", "token_weights")

    def __post_init__(self):
        if self.featurize.project_dim == "auto":
            object.__setattr__(self, "featurize", dataclasses.replace(self.featurize, project_dim=None))
        if self.featurize.project_dim is not None or self.featurize.token_weights != "none":
            raise ValueError("evaluate featurizes unprojected, unweighted states (the head is fine-tuned "
                             "on them): drop --project-dim/--token-weights (loss-weighted TokenOD is "
                             "the method tokenod_loss)")
        if not self.featurize.keep_states:
            object.__setattr__(self, "featurize", dataclasses.replace(self.featurize, keep_states=True))
        self._check_groups()

    def _check_groups(self) -> None:
        """The per-group split and methods need groups; groups need the per-group split."""
        from fishersft_ray.evaluate.methods import check_methods

        split = self.split
        check_methods(self.protocol.methods or [], grouped=self.groups.given, targeted=split.target_group is not None)
        per_group = {"--test-per-group": split.test_per_group, "--validation-per-group": split.validation_per_group}
        if self.groups.given:
            missing = [f"{flag} K" for flag, value in per_group.items() if value is None]
            if missing:
                raise ValueError(f"with groups, test and validation rows are drawn per group: pass {' and '.join(missing)}")
            if split.max_test is not None:
                raise ValueError("--max-test does not apply with groups: --test-per-group sets the test set")
            if split.redundant_share > 0:
                raise ValueError("--redundant-share does not combine with groups: drop one of them")
            return
        needing = [flag for flag, value in (*per_group.items(), ("--pool-shares", split.pool_shares),
                                            ("--target-group", split.target_group)) if value is not None]
        if needing:
            raise ValueError(f"{', '.join(needing)} need groups: pass --group-field NAME or --group-by-file")

    build = classmethod(build)
