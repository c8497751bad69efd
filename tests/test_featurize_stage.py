"""The featurize stage split in two (issue 30): the CPU tokenise stage (featurize/tokenize.py)
and the featurizer actor on its table. Tiny random models (conftest.py), real tokenizers."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.featurize.featurizer import Featurizer
from fishersft_ray.featurize.tokenize import TOKEN_IDS, WINDOWS, EncodedRows, Tokenize
from fishersft_ray.io.corpus import MESSAGES_TYPE
from fishersft_ray.run.feature_cache import plan_forward_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEECHES = [f"SPEAKER {i}:\n" + " ".join(f"word{(i * 7 + k) % 53}" for k in range(2 + (i * 5) % 45)) for i in range(40)]


def planned_examples(texts: list[str], rows_per_unit: int = 4) -> pa.Table:
    """Documents as io/corpus.py gives them, planned into forward units as the feature cache does."""
    messages = [[{"role": "document", "content": text, "train": True}] for text in texts]
    examples = pa.table({"row_index": pa.array(range(len(texts)), pa.int64()),
                         "id": [f"r{i}" for i in range(len(texts))], "messages": pa.array(messages, MESSAGES_TYPE)})
    return plan_forward_units(examples, rows_per_unit)


@pytest.mark.parametrize("overlong", ["truncate", "split"])
@pytest.mark.parametrize("token_weights", ["none", "loss"])
def test_the_actor_on_the_stages_table_writes_the_shard_it_writes_from_raw_rows(tiny_models, overlong, token_weights):
    """Tokenised on a CPU worker or in the actor: the same shard, bit for bit."""
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", max_length=24, overlong=overlong,
                             micro_batch_tokens=96, token_weights=token_weights, keep_states=True)
    examples = planned_examples(SPEECHES)
    featurizer = Featurizer(config)
    encoded = Tokenize(config)(examples)  # loads its own tokenizer, as on a CPU worker
    assert "messages" not in encoded.column_names and {TOKEN_IDS, WINDOWS} <= set(encoded.column_names)
    from_stage, from_raw = featurizer(encoded), featurizer(examples)
    assert from_stage.equals(from_raw) and from_stage.schema.equals(from_raw.schema, check_metadata=True)
    assert any(from_raw.column("truncated").to_pylist()) == (overlong == "truncate")


def test_the_plan_and_the_shards_do_not_depend_on_the_block_a_unit_arrives_in(tiny_models):
    """A unit's micro-batches, and so its examples' bits, are the same in a block of all units,
    a block of a few, or a block alone (any actor count, any arrival order)."""
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", micro_batch_tokens=80, max_padding=0.2)
    examples = planned_examples(SPEECHES)
    featurizer = Featurizer(config)
    whole = featurizer(examples)
    units = examples.column("unit").to_numpy()
    for block_units in ([0, 1, 2], [7], [9, 3]):  # whole units, in any order
        block = examples.filter(pa.array(np.isin(units, block_units)))
        part = featurizer(block)
        rows = {r: i for i, r in enumerate(whole.column("row_index").to_pylist())}
        same = whole.take(pa.array([rows[r] for r in part.column("row_index").to_pylist()]))
        assert part.equals(same)


def test_micro_batches_are_cut_per_unit_in_run_order(tiny_models):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", micro_batch_tokens=400, max_padding=0.5)
    examples = planned_examples(SPEECHES)
    units = np.arange(examples.num_rows) % 3 * 10 + 5  # units of every length, given in an order of their own
    encoded = Tokenize(config)(examples.set_column(examples.column_names.index("unit"), "unit", pa.array(units)))
    batch_of = [[w["micro_batch"] for w in row] for row in encoded.column(WINDOWS).to_pylist()]
    for unit in np.unique(units):
        mine = {b for row, u in zip(batch_of, units) if u == unit for b in row}
        theirs = {b for row, u in zip(batch_of, units) if u != unit for b in row}
        assert len(mine) > 1 and not mine & theirs  # no micro-batch mixes units
    first = [min(b for row, u in zip(batch_of, units) if u == unit for b in row) for unit in dict.fromkeys(units)]
    assert first == sorted(first)  # numbered in the order the units come


@pytest.mark.parametrize("side", ["right", "left"])
def test_numpy_padding_is_the_tokenizers_padding(tiny_models, side):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", micro_batch_tokens=200, max_padding=0.5)
    featurizer = Featurizer(config)
    featurizer.tokenizer.padding_side = side
    examples = planned_examples(SPEECHES[:12])
    rows = EncodedRows(Tokenize(config)(examples))
    ids = examples.column("row_index").to_numpy()
    token_ids = [rows.ids[a:b] for a, b in zip(rows.token_offsets[:-1], rows.token_offsets[1:])]
    seen = []
    for batch in featurizer.padded_batches(rows):
        # The pieces in the batch, by the flat positions of their first tokens.
        starts = rows.piece_start[rows.batch_bounds[len(seen)]:rows.batch_bounds[len(seen) + 1]]
        members = np.searchsorted(rows.token_offsets, starts, side="right") - 1
        expected = featurizer.tokenizer.pad({"input_ids": [token_ids[e].tolist() for e in members]},
                                            return_tensors="pt")
        assert np.all(np.diff(batch.attention_mask.sum(1)) <= 0)  # longest first, as micro_batches cut them
        np.testing.assert_array_equal(batch.input_ids, expected["input_ids"].numpy())
        np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"].numpy())
        np.testing.assert_array_equal(batch.position_ids,
                                      (expected["attention_mask"].cumsum(-1) - 1).clamp(min=0).numpy())
        # Each predictor slot holds the token before a target; its state goes to that target's row.
        predicted = batch.input_ids.reshape(-1)[batch.predictors + 1]
        np.testing.assert_array_equal(predicted, rows.target_ids()[batch.destination])
        seen.append(ids[members])
    assert sorted(np.concatenate(seen).tolist()) == sorted(ids.tolist())


def test_rows_the_template_rejects_and_rows_with_one_token_pass_through_the_stage(tiny_models):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu")
    stage = Tokenize(config)
    chats = [[{"role": "user", "content": "hello", "train": False},
              {"role": "assistant", "content": "four", "train": True}],
             [{"role": "document", "content": "a", "train": True}]]
    examples = pa.table({"row_index": pa.array([0, 1], pa.int64()), "id": ["chat", "one"],
                         "messages": pa.array(chats, MESSAGES_TYPE)})
    stage.tokenizer.chat_template = "{{ raise_exception('no chats here') }}"
    encoded = stage(examples)
    assert encoded.column("skip_reason").to_pylist() == ["chat_template: no chats here", None]
    assert encoded.column(TOKEN_IDS).to_pylist()[0] == [] and encoded.column(WINDOWS).to_pylist()[0] == []
    table = Featurizer(config)(encoded)
    assert table.column("num_targets").to_pylist() == [0, 0]
    assert table.column("skip_reason").to_pylist() == ["chat_template: no chats here", None]
    assert table.column("factor").to_pylist() == [[], []]


def test_projection_runs_before_the_host_copy_and_the_table_holds_its_width(tiny_models):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", project_dim=8)
    examples = planned_examples(SPEECHES[:10])
    table = Featurizer(config)(Tokenize(config)(examples))
    full = Featurizer(replace(config, project_dim=None))(examples)
    basis = Featurizer(config).projection
    for row in range(examples.num_rows):
        small = np.asarray(table.column("factor")[row].as_py(), np.float32).reshape(-1, 8)
        wide = np.asarray(full.column("factor")[row].as_py(), np.float32).reshape(-1, 32)
        np.testing.assert_allclose(small.T @ small, basis.T @ (wide.T @ wide) @ basis, rtol=1e-4, atol=1e-4)
