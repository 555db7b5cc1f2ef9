"""Common CLI mistakes end in ONE ``error:`` line naming what was expected and what came, exit code 2, and leave
nothing behind (no output folder, no ``mlflow.db``), before any model loads. In-process (``main``), one interpreter
for all cases."""

import pytest

from easyanimate.cli import main


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert info.value.code == 2, (info.value.code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_generate_mistakes_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "x.mp4"
    line = _refused(capsys, ["generate", "--model", str(tmp_path / "missing"), "--out", str(out)])
    assert "--model" in line and "pipeline folder" in line and "missing (does not exist)" in line
    line = _refused(capsys, ["generate", "--model", "tiny", "--frames", "10", "--out", str(out)])
    assert "--frames" in line and "1 or a multiple of 9" in line and "got 10" in line
    line = _refused(capsys, ["generate", "--model", "tiny", "--width", "70", "--out", str(out)])
    assert "--width" in line and "multiple of 16" in line and "got 70" in line
    line = _refused(capsys, ["generate", "--model", "tiny", "--no-such-option"])
    assert "No such option: --no-such-option" in line
    assert list(tmp_path.iterdir()) == []  # no output folder, no store


def test_serve_models_uri_without_tracking_creates_no_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = _refused(capsys, ["serve", "--model", "models:/easyanimate@champion"])
    assert "--tracking-uri" in line and "MLFLOW_TRACKING_URI" in line and "models:/easyanimate@champion" in line
    line = _refused(capsys, ["serve", "--model", str(tmp_path / "nope")])
    assert "pipeline folder" in line and "nope (does not exist)" in line
    assert list(tmp_path.iterdir()) == []  # in particular no ./mlflow.db


def test_config_values_are_range_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, ["config", "--set", "train.max_steps=-3"])
    assert "train.max_steps: expected a value >=1, got -3" in line
    line = _refused(capsys, ["config", "--set", "data.caption_dropout=1.5"])
    assert "data.caption_dropout: expected a value in [0, 1], got 1.5" in line


def test_training_without_its_data_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("train-dit", "train-vae"):
        line = _refused(capsys, [command, "--data", str(tmp_path / "meta.json"), "--output", str(tmp_path / "run")])
        assert "meta.json" in line, line
        line = _refused(capsys, [command, "--output", str(tmp_path / "run")])
        assert "Missing option '--data'" in line
        (tmp_path / "bad.json").write_text("not json")
        line = _refused(capsys, [command, "--data", str(tmp_path / "bad.json"), "--output", str(tmp_path / "run")])
        assert "bad.json: not valid JSON" in line
        (tmp_path / "bad.json").unlink()
    assert list(tmp_path.iterdir()) == []


def test_mlflow_on_a_busy_port_is_refused(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = _refused(capsys, ["mlflow", "--port", str(port), "--root", str(tmp_path / "store")])
    assert f"127.0.0.1:{port}" in line and "--port" in line
    assert list(tmp_path.iterdir()) == []
