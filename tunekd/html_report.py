"""`report.html`: the study's report as one self-contained HTML file.

It renders `report.md` (whatever sections the report writes: tables, verdicts, warnings, trials not
compared) with Python-Markdown, puts the study's description (the MLflow parent run's) and its study
file after the title, and inlines every plot the Markdown names as a base64 PNG. Raw HTML in the
inputs is shown as text, links become plain text: the file loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_STUDY_FILE = "TUNEKD-STUDY-FILE"
_LINK = re.compile(r"<a\b[^>]*>(.*?)</a>", re.S)
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; display: block; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
code { background: #f3f3f3; padding: 0 .2em; }
strong.warning { color: #8a1c1c; }
""".strip()


def inline_images(markdown_text: str, folder: Path) -> str:
    """Every `![title](name.png)` of a file in `folder` becomes a data URI; an image that is not there is an
    error (the report names only what it wrote)."""
    def data_uri(m: re.Match) -> str:
        path = folder / m.group(2)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return _IMAGE.sub(data_uri, markdown_text)


def _with_study(markdown_text: str, description: str | None, study_yaml: str | None) -> str:
    """The study's description and study file as a section right after the report's header lines."""
    extra = []
    if description:
        extra += ["## The study", "", "As described on its MLflow parent run:", "", description.strip(), ""]
    if study_yaml:
        extra += [_STUDY_FILE, ""]  # a folded <details> block, put in after the Markdown is rendered
    if not extra:
        return markdown_text
    head, sep, rest = markdown_text.partition("\n## ")
    return head.rstrip() + "\n\n" + "\n".join(extra) + ("\n## " + rest if sep else "")


def render(markdown_text: str, folder: Path, *, title: str, description: str | None = None,
           study_yaml: str | None = None) -> str:
    """The HTML document of the report `markdown_text` whose plots lie in `folder`."""
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code", "nl2br"])  # a line of report.md is a line here
    md.preprocessors.deregister("html_block")  # raw HTML stays text
    md.inlinePatterns.deregister("html")
    body = md.convert(inline_images(_with_study(markdown_text, description, study_yaml), folder))
    if study_yaml:
        body = body.replace(f"<p>{_STUDY_FILE}</p>", "<details><summary>Study file (resolved; click to unfold)</summary>"
                            f"<pre>{html.escape(study_yaml.rstrip())}</pre></details>")
    body = _LINK.sub(r"\1", body)  # automatic links to plain text: nothing to follow out of the file
    body = body.replace("<strong>Warning", '<strong class="warning">Warning')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write(path: Path, markdown_text: str, *, title: str, description: str | None = None,
          study_yaml: str | None = None) -> Path:
    path.write_text(render(markdown_text, path.parent, title=title, description=description, study_yaml=study_yaml),
                    encoding="utf-8")
    return path
