"""Model cards for exports: the Hub's YAML front matter (base_model, library_name, tags, pipeline_tag), written
with huggingface_hub's ModelCard, and the base model named by its Hub id wherever it came from the Hub.

A base is recorded at training time as a Hub id or an absolute local folder. A folder inside the Hugging Face cache
is that Hub model, so it is named by its id again (`model_files.hub_id`); any other local folder has no id, and its
absolute path (a detail of one machine) is left out of the card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qmor.model.files import hub_id


def base_name(base: str | None) -> str:
    """How a card names the base: its Hub id, else the local folder's name (not its machine path)."""
    found = hub_id(base)
    if found:
        return f"[{found}](https://huggingface.co/{found})"
    return f"local folder `{Path(base).name}`" if base else "not recorded"


@dataclass
class Card:
    """A model card as data: the export fills in its fields (each format its own rows and sections), `text()` writes
    README.md: front matter for the Hub, a title, a table of what was exported, and the sections below it."""

    title: str
    base: str | None  # the base the adapter records: a Hub id, or a local folder (named, never by its path)
    library: str  # the Hub's library_name: transformers, peft
    tags: list[str]
    rows: dict[str, str]  # the table: what -> value, in order
    sections: list[str] = field(default_factory=list)  # markdown under the table (notes, how to use it)

    def text(self) -> str:
        from huggingface_hub import ModelCard, ModelCardData  # the Hub's card machinery, needed only when writing

        data = ModelCardData(base_model=hub_id(self.base), library_name=self.library, pipeline_tag="text-generation",
                             tags=["qmor", *dict.fromkeys(self.tags)])
        table = "\n".join(f"| {k} | {v} |" for k, v in self.rows.items())
        body = f"# {self.title}\n\n| | |\n|---|---|\n{table}\n" + "".join(f"\n{s}\n" for s in self.sections)
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
