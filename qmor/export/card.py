"""Model cards for exports: the Hub's YAML front matter (base_model, library_name, tags, pipeline_tag), written
with huggingface_hub's ModelCard, and the base model named by its Hub id wherever it came from the Hub.

A base is recorded at training time as a Hub id or an absolute local folder. A folder inside the Hugging Face cache
is that Hub model, so it is named by its id again (`model_files.hub_id`); any other local folder has no id, and its
absolute path (a detail of one machine) is left out of the card.
"""

from __future__ import annotations

from pathlib import Path

from qmor.model.files import hub_id


def base_name(base: str | None) -> str:
    """How a card names the base: its Hub id, else the local folder's name (not its machine path)."""
    found = hub_id(base)
    if found:
        return f"[{found}](https://huggingface.co/{found})"
    return f"local folder `{Path(base).name}`" if base else "not recorded"


def card(title: str, rows: list[tuple[str, str]], base: str | None, library: str, tags: list[str],
         notes: str = "") -> str:
    """README.md text: front matter for the Hub, a title, a table of what was exported, and notes."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=hub_id(base), library_name=library, pipeline_tag="text-generation",
                         tags=["qmor", *dict.fromkeys(tags)])
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"# {title}\n\n| | |\n|---|---|\n{table}\n" + (f"\n{notes}\n" if notes else "")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
