"""KFP component: plan the preprocess fan-out — one item per shard, each carrying the input data's version."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_shards(source: str, num_shards: int) -> list:
    """``num_shards`` ≥ 1 → ``[{"shard": "i/n", "data_version": v}, …]``: a file's shard depends only on its relative
    name; ``v`` versions the input folder (its DVC md5, else a digest of every file's name, size and mtime). The
    preprocess shards take ``v`` as an input, so KFP's cache can only reuse a shard of unchanged data. (One list
    output: ``kfp.local`` iterates over a task's single ``Output`` only.)"""
    from components.glue import data

    return data.shard_plan(source, num_shards)
