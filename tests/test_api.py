"""The Python API: `fishersft_ray.select_subset` on a corpus path and on a Ray Dataset."""

import json

import pyarrow as pa

import fishersft_ray

ROWS = [{"instruction": f"Question {i}: say something about love.",
         "output": " ".join(["war", "king", "crown", "night"][: 1 + i % 4] * (1 + i % 5))} for i in range(16)]


def test_select_subset_on_a_path_returns_the_tables_and_manifest_it_wrote(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    result = fishersft_ray.select_subset(str(corpus), budget=4, model=str(tiny_llama_dir), executor="local",
                                         budget_unit="examples")
    assert isinstance(result.subset, pa.Table) and result.subset.num_rows == 4
    assert result.subset.column("fishersft_rank").to_pylist() == [0, 1, 2, 3]
    assert result.ranking.column("row_index").to_pylist() == result.subset.column("row_index").to_pylist()
    assert result.manifest["selection"]["selected"] == 4
    assert result.manifest["settings"]["executor"] == "local"
    assert json.loads(open(f"{result.output}/manifest.json").read()) == result.manifest


def test_select_subset_on_a_ray_dataset_runs_on_that_ray(ray_local, tiny_llama_dir, tmp_path):
    dataset = ray_local.data.from_items(ROWS)
    out = tmp_path / "out"
    result = fishersft_ray.select_subset(dataset, budget=3, model=str(tiny_llama_dir), output=str(out),
                                         num_actors=1, batch_size=8)
    assert result.output == str(out) and result.subset.num_rows == 3
    assert result.manifest["corpus"]["rows_read"] == len(ROWS)
    assert result.manifest["settings"]["input"] == f"{out}-input"  # staged next to the output, not in it
    assert result.manifest["settings"]["executor"] == "ray"
    assert {row["instruction"] for row in result.subset.to_pylist()} <= {row["instruction"] for row in ROWS}
