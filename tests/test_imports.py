import subprocess
import sys


def test_library_does_not_import_the_mlops_stack():
    code = (
        "import sys, easyanimate, easyanimate.pipeline, easyanimate.cli, easyanimate.models.lora, easyanimate.video\n"
        "bad = [m for m in ('kfp', 'mlflow', 'tritonclient', 'dvc', 'triton_python_backend_utils') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"easyanimate imported {out.stdout.strip()}"


def test_import_easyanimate_is_light():
    code = "import sys, easyanimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
