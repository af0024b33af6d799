"""Model cards and Hub uploads, through huggingface_hub's `ModelCard` and `upload_folder`."""

import os
import sys
from typing import Iterable, List, Optional

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder


# The card templates live in `model_cards/` at the repository root (found there by a source checkout
# or an editable install); a regular install places them under <prefix>/share/diffusers-ssreg/ (setup.cfg).
TEMPLATE_DIRS = (
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards"),
    os.path.join(sys.prefix, "share", "diffusers-ssreg", "model_cards"),
)
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/*", "logs/**", "*.tmp", "*.tmp/**"]


def template_path(name: str) -> str:
    """Path of a card template by file name (e.g. `"vae_card.md"`)."""
    for directory in TEMPLATE_DIRS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"model card template {name!r} not found in {TEMPLATE_DIRS}.")


def render_model_card(
    template: str,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    tags: Iterable[str] = (),
    datasets: Optional[List[str]] = None,
    **fields,
) -> ModelCard:
    """Renders `model_cards/<template>` with `ModelCardData(library_name="diffusers", ...)` and `fields`."""
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        base_model=base_model,
        tags=sorted(set(["diffusers", "diffusers-ssreg", *tags])),
        datasets=datasets,
    )
    return ModelCard.from_template(card_data, template_path=template_path(template), **fields)


def push_folder(
    folder: str,
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload with diffusers-ssreg",
    ignore_patterns: Optional[List[str]] = None,
) -> str:
    """`create_repo(exist_ok=True)` then `upload_folder`, leaving checkpoints and logs out; returns the repo id."""
    repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=ignore_patterns if ignore_patterns is not None else UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    return repo_id
