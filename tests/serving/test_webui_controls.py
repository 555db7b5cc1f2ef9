"""The web UI's controls a newcomer expects: example prompts (the sample clips' captions, what `make demo` trained on),
a cancel button wired to the generation, a video that loops. Built against an address nobody serves (no browser)."""

from serving.mlflow_local import free_port
from serving.webui import build_ui, example_prompts


def test_examples_cancel_and_looping_video(tmp_path):
    demo = build_ui(f"http://127.0.0.1:{free_port()}", samples_dir=tmp_path / "samples", lora_dir=tmp_path)
    config = demo.get_config_file()
    by_elem = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
    assert by_elem["result-video"]["props"]["loop"] is True
    prompts = example_prompts()
    assert len(prompts) == 6 and all(p.startswith("In this video") for p in prompts)
    dataset = next(c for c in config["components"] if c["type"] == "dataset")
    assert [s[0] for s in dataset["props"]["samples"]] == prompts  # clicking one fills the prompt box
    cancel_id, generate_id = by_elem["cancel"]["id"], by_elem["generate"]["id"]
    def on_click(elem):
        return [d for d in config["dependencies"] if [elem, "click"] in [list(t) for t in d["targets"]]]

    (generate,) = on_click(generate_id)
    assert any(generate["id"] in d["cancels"] for d in on_click(cancel_id)), "Cancel must cancel the generation"
