"""`ray job submit` entrypoint: the same arguments as `fishersft-ray select`, `--config` too.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/select_subset.py --input s3://bucket/corpus.jsonl \
            --output s3://bucket/runs/2026-11-22 --budget 10000
    # or the settings from a file (jobs/select_config.yaml), a flag still winning over it:
        python jobs/select_subset.py --config jobs/select_config.yaml --output s3://bucket/runs/2026-11-22

Inside a Ray job, RAY_ADDRESS is set, so `ray.init()` joins the cluster; the driver runs the
corpus read and the selection, the featurizer actors run on the cluster's GPUs.
"""

import pathlib
import sys

# With --working-dir the repository root is the job's cwd; make the package importable
# even when it is not installed on the cluster's nodes.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fishersft_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
