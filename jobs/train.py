"""Entrypoint for ``ray job submit``: train from a store and publish a version.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py \
        --store s3://traces/vllm --out s3://models/rece --date-from 2026-11-19 --date-to 2026-11-25

Arguments are those of ``rece train``; Ray is joined through ``RAY_ADDRESS`` (set by the job
submission). All logic lives in the ``rece_dist`` library; this file only forwards.
"""

import sys

from rece_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
