"""components/glue/reports.py: the Markdown and self-contained HTML reports the Kubeflow UI renders."""

import base64

from components.glue import reports


class FakeArtifact:
    def __init__(self, path):
        self.path, self.metadata = str(path), {}


def test_markdown_report_has_the_table_links_and_notes(tmp_path):
    art = FakeArtifact(tmp_path / "r" / "report.md")
    reports.markdown_report(art, "DiT training", {"loss": 0.123456789, "tag": "a|b"},
                            links={"MLflow run": "http://m/r"}, notes=["val_loss 2.1 > 2.0"])
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.startswith("# DiT training\n")
    assert "| loss | 0.123457 |" in text and "| tag | a/b |" in text  # a pipe in a value does not break the table
    assert "- [MLflow run](http://m/r)" in text and "- val_loss 2.1 > 2.0" in text


def test_html_report_is_self_contained_and_escaped(tmp_path):
    png = tmp_path / "sheet.png"
    png.write_bytes(b"\x89PNG fake")
    art = FakeArtifact(tmp_path / "report.html")
    reports.html_report(art, "Evaluation <1>", {"psnr": 24.5}, {"sample": "http://m/a?x=1&y=2"}, png, notes=["<b>"])
    page = (tmp_path / "report.html").read_text()
    assert "<h1>Evaluation &lt;1&gt;</h1>" in page and "<li>&lt;b&gt;</li>" in page
    assert 'href="http://m/a?x=1&amp;y=2"' in page
    assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in page  # inline, no external file
