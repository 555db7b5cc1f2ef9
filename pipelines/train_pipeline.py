"""The EasyAnimate training pipeline (KFP v2): preprocess → [train VAE] → train DiT → evaluate → register.

```
start_tracking ─ plan_shards ─ ParallelFor(shard i/n: preprocess) ─ merge (dsl.Collected)
                                                                      │
                  ┌── If train_vae:  train_vae ── train_dit(vae) ── evaluate ── register
                  └── Else:                       train_dit ────── evaluate ── register
                                        (register moves `champion` only when the evaluation gates pass)
finish_tracking: the exit handler; closes the parent MLflow run FINISHED/FAILED whatever happened
```

Every step's MLflow run nests under one parent run per pipeline run (``start_tracking`` opens it, the exit handler
closes it). Data moves as KFP artifacts (Dataset, Model, Metrics, Markdown/HTML reports). On a cluster the raw data
is read from the data PVC (mounted at ``/data``) and trainers keep checkpoints on the work PVC (``/mnt/work``), so a
retried (preempted) pod resumes; both mounts, GPU/CPU/memory requests, tolerations and timeouts are in the compiled
YAML and ignored by ``kfp.local``.
"""

import os

from kfp import dsl, kubernetes

from components import BASE_IMAGE
from components.evaluate import evaluate as evaluate_op
from components.finish_tracking import finish_tracking as finish_tracking_op
from components.merge import merge as merge_op
from components.plan_shards import plan_shards as plan_shards_op
from components.preprocess import preprocess as preprocess_op
from components.register import register as register_op
from components.start_tracking import start_tracking as start_tracking_op
from components.train_dit import train_dit as train_dit_op
from components.train_vae import train_vae as train_vae_op

PIPELINE_NAME = "easyanimate-train"
DEFAULT_TRACKING_URI = "http://mlflow.easyanimate.svc.cluster.local:5000"  # infra/k8s/mlflow.yaml
DATA_MOUNT = "/data"  # the data PVC (raw videos) on preprocess tasks
WORK_MOUNT = "/mnt/work"  # the work PVC (checkpoints, TrainJob exchange); see components/glue/artifacts.py
GPU = "nvidia.com/gpu"
# MLflow credentials of the pipeline's user (infra/k8s/mlflow.yaml runs MLflow with basic auth); optional, so a
# cluster with an open MLflow (or the platform's auth in front) runs without the Secret
MLFLOW_AUTH_SECRET = "easyanimate-mlflow-auth"
MLFLOW_AUTH_ENV = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
# The MLflow UI address people open (e.g. https://mlflow.example.org), for the links in the Kubeflow reports: the
# in-cluster tracking URI does not open in a laptop's browser. Read when compiling; unset = links use tracking_uri.
MLFLOW_UI_ENV = "EASYANIMATE_MLFLOW_UI_URL"
MLFLOW_UI_URL = os.environ.get(MLFLOW_UI_ENV, "")

# Requests per step (V2 512px DiT on one 80 GB GPU; a cluster admin tunes these). Training requests one GPU; the
# multi-node case goes through dit_launcher="trainjob" (infra/k8s/trainjob.yaml).
RESOURCES = {
    "preprocess": {"cpu": "8", "memory": "16G"},
    "merge": {"cpu": "2", "memory": "4G"},
    "train_vae": {"cpu": "8", "memory": "64G", "gpus": 1},
    "train_dit": {"cpu": "8", "memory": "96G", "gpus": 1},
    "evaluate": {"cpu": "8", "memory": "32G", "gpus": 1},
    "register": {"cpu": "2", "memory": "8G"},
}
# Preemptible steps retry (trainers resume from the work PVC); register does not (a retry would add a version).
RETRIES = {"preprocess": 2, "train_vae": 3, "train_dit": 3, "evaluate": 2}
TIMEOUTS_S = {"train_vae": 3 * 24 * 3600, "train_dit": 7 * 24 * 3600}
# Caching: a preprocess shard is a pure function of (source, data version, shard, preset, overrides) and logs
# nothing, so KFP may reuse it (plan_shards computes the data version, which never caches); every other step writes
# MLflow runs or registry versions and must run each time.
CACHING = {"preprocess": True}


def _configure(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    """Resources, accelerator, retries, timeout and caching of one step (from the tables above)."""
    res = RESOURCES.get(step, {})
    if "cpu" in res:
        task.set_cpu_request(res["cpu"])
    if "memory" in res:
        task.set_memory_request(res["memory"]).set_memory_limit(res["memory"])
    if res.get("gpus"):
        task.set_accelerator_type(GPU).set_accelerator_limit(res["gpus"])
        kubernetes.add_toleration(task, key=GPU, operator="Exists", effect="NoSchedule")
    if step in RETRIES:
        task.set_retry(num_retries=RETRIES[step], backoff_duration="60s", backoff_factor=2.0,
                       backoff_max_duration="3600s")
    if step in TIMEOUTS_S:
        kubernetes.set_timeout(task, TIMEOUTS_S[step])
    task.set_caching_options(enable_caching=CACHING.get(step, False))
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_AUTH_SECRET, secret_key_to_env=MLFLOW_AUTH_ENV,
                                 optional=True)
    if MLFLOW_UI_URL:  # report links a browser outside the cluster can open
        task.set_env_variable(MLFLOW_UI_ENV, MLFLOW_UI_URL)
    return task.set_display_name(step.replace("_", "-"))


def _train_dit_evaluate_register(dit: dsl.PipelineTask, *, dataset, model_name, work_pvc, tracked: dict) -> None:
    """train_dit → evaluate → register inside one branch of the train_vae condition.

    Each branch carries its own chain instead of joining the branches with ``dsl.OneOf``: ``kfp.local`` cannot
    resolve a OneOf of artifacts (it runs parameters only), and the chain must run locally too. Pipeline outputs
    cannot leave the ExitHandler either: ``pipelines.cli.run_local`` reads the register task's outputs instead."""
    _configure(dit, "train_dit")
    kubernetes.mount_pvc(dit, pvc_name=work_pvc, mount_path=WORK_MOUNT)
    model = dit.outputs["pipeline"]
    ev = _configure(evaluate_op(model=model, dataset=dataset, **tracked), "evaluate")
    _configure(register_op(model=model, metrics=ev.outputs["metrics"], dataset=dataset, model_name=model_name,
                           **tracked), "register")


@dsl.pipeline(name=PIPELINE_NAME, description="EasyAnimate V2: preprocess → [VAE] → DiT/LoRA → evaluate → register")
def train_pipeline(
    data: str = f"{DATA_MOUNT}/raw",
    preset: str = "v2_512",
    overrides: list[str] = [],  # noqa: B006 (kfp reads the default; the function is never called directly)
    num_shards: int = 4,
    train_vae: bool = False,
    lora: bool = False,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment: str = "easyanimate",
    model_name: str = "easyanimate",
    dit_launcher: str = "local",
    trainjob_nodes: int = 2,
    trainjob_gpus_per_node: int = 8,
    data_pvc: str = "easyanimate-data",
    work_pvc: str = "easyanimate-work",
):
    """Train EasyAnimate on a folder of captioned videos and register the result in MLflow (champion if it passes).

    Args:
        data: Folder (or list file) of raw videos/images with their captions, under the data PVC (/data).
        preset: Config preset (tiny, tiny_slice, v2_512, v2_768, v3_slice_512) or a YAML path inside the image;
            its model.vae decides the VAE layout (V2 9-frame chunks, or the slice VAE's 1 + 8k).
        overrides: List of "section.key=value" settings applied to the preset in every step,
            e.g. ["train.max_steps=2000", "evaluate.steps=25"]; empty = the preset as it is.
        num_shards: How many preprocess tasks run side by side (the fan-out width).
        train_vae: Train the VAE first, then the DiT on it.
        lora: Train a LoRA instead of the DiT's trainable modules (the registered model has it merged).
        tracking_uri: MLflow tracking server the steps log to (reachable from the pods).
        experiment: MLflow experiment of the pipeline's parent run.
        model_name: Registered model name in the MLflow registry.
        dit_launcher: "local" trains in the step's pod; "trainjob" runs a multi-node Kubeflow Trainer job and waits.
        trainjob_nodes: Nodes of the TrainJob (dit_launcher=trainjob).
        trainjob_gpus_per_node: GPUs per TrainJob node (dit_launcher=trainjob).
        data_pvc: PVC with the raw data, mounted at /data.
        work_pvc: PVC for checkpoints, mounted at /mnt/work (ReadWriteMany for trainjob); a retried step resumes.
    """
    start = start_tracking_op(tracking_uri=tracking_uri, experiment=experiment,
                              run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              preset=preset, overrides=overrides, data=data, num_shards=num_shards,
                              train_vae=train_vae, lora=lora, model_name=model_name)
    _configure(start, "start_tracking")
    tracked = {"preset": preset, "overrides": overrides, "tracking_uri": tracking_uri, "parent_run_id": start.output}
    finish = _configure(finish_tracking_op(tracking_uri=tracking_uri, experiment=experiment,
                                           kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "finish_tracking")

    with dsl.ExitHandler(finish, name="tracked-steps"):
        plan = _configure(plan_shards_op(source=data, num_shards=num_shards), "plan_shards")
        kubernetes.mount_pvc(plan, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        with dsl.ParallelFor(plan.output, name="preprocess-shards") as item:
            pre = _configure(preprocess_op(source=data, data_version=item.data_version, shard=item.shard,
                                           preset=preset, overrides=overrides), "preprocess")
            kubernetes.mount_pvc(pre, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        merged = _configure(merge_op(shards=dsl.Collected(pre.outputs["shard_data"]), **tracked), "merge")
        dataset = merged.outputs["dataset"]
        dit_args = {"dataset": dataset, "lora": lora, "launcher": dit_launcher, "trainjob_nodes": trainjob_nodes,
                    "trainjob_gpus_per_node": trainjob_gpus_per_node, "trainjob_image": BASE_IMAGE, **tracked}
        downstream = {"dataset": dataset, "model_name": model_name, "work_pvc": work_pvc, "tracked": tracked}

        with dsl.If(train_vae == True, name="with-vae"):  # noqa: E712 (a pipeline condition, not a Python bool)
            vae = _configure(train_vae_op(dataset=dataset, **tracked), "train_vae")
            kubernetes.mount_pvc(vae, pvc_name=work_pvc, mount_path=WORK_MOUNT)
            _train_dit_evaluate_register(train_dit_op(vae=vae.outputs["vae"], **dit_args), **downstream)
        with dsl.Else(name="without-vae"):
            _train_dit_evaluate_register(train_dit_op(**dit_args), **downstream)
