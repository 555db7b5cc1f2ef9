"""Derive trainjob-<version>.schema.json (the Kubeflow Trainer TrainJob CRD's structural schema) from the Trainer's
own Python API models, the ``kubeflow-trainer-api`` wheel of the pinned Trainer release (generated from the same
OpenAPI spec as the CRD). Offline tests validate infra/k8s/trainjob.yaml against the file; re-derive it when the
pinned Trainer version (infra/README.md) moves:

    pip download --no-deps -d /tmp/w kubeflow-trainer-api==2.2.0
    python infra/k8s/schemas/derive_trainjob_schema.py /tmp/w/kubeflow_trainer_api-2.2.0-py3-none-any.whl

Needs pydantic 2 (and python-dateutil, which the models import). What the derivation changes, and why:
- every object with declared properties gets ``additionalProperties: false`` (the API server's strict field
  validation, ``kubectl apply --validate=strict``: an unknown field such as ``podTemplateOverrides`` is an error);
- ``resource.Quantity`` and ``IntOrString`` (objects in the generated models) become int-or-string, as in the CRD.
"""

import json
import re
import sys
import zipfile
from pathlib import Path


def derive(wheel: Path) -> dict:
    sys.path.insert(0, str(wheel))  # a pure-Python wheel imports from its zip
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    version = re.search(r"kubeflow_trainer_api-([^-]+)-", wheel.name).group(1)
    with zipfile.ZipFile(wheel) as z:
        assert any(n.endswith("trainer_v1alpha1_train_job.py") for n in z.namelist())
    schema = TrainerV1alpha1TrainJob.model_json_schema(by_alias=True, mode="validation")
    int_or_string = {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]}
    for name in list(schema.get("$defs", {})):
        if name.endswith(("ResourceQuantity", "IntstrIntOrString")):
            schema["$defs"][name] = dict(int_or_string)

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    schema["$comment"] = (f"Derived by infra/k8s/schemas/derive_trainjob_schema.py from kubeflow-trainer-api=={version} "
                          f"(Kubeflow Trainer v{version}, trainer.kubeflow.org/v1alpha1 TrainJob)")
    schema["x-trainer-version"] = version
    return schema


if __name__ == "__main__":
    wheel = Path(sys.argv[1])
    schema = derive(wheel)
    out = Path(__file__).with_name(f"trainjob-v{schema['x-trainer-version']}.schema.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    print(out)
