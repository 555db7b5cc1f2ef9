"""KFP component (the pipeline's exit handler): close the parent MLflow run with the pipeline's final state."""

from kfp import dsl
from kfp.dsl import PipelineTaskFinalStatus

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finish_tracking(tracking_uri: str, experiment: str, kfp_run_id: str, status: PipelineTaskFinalStatus) -> str:
    """Runs after every other task, whatever happened: FINISHED when the pipeline succeeded, FAILED/KILLED
    otherwise. An exit task may not consume task outputs, so the parent run is found by its ``kfp_run_id`` tag.
    Returns the MLflow status written."""
    from components.glue import tracking

    final = {"state": status.state, "error": {"message": status.error_message}}
    return tracking.end_pipeline_run(tracking_uri, experiment, kfp_run_id, final)
