"""Model cards and Hub uploads, through huggingface_hub's `ModelCard`, `create_repo` and `upload_folder`.

A training run that pushes checks the Hub before its first step, as diffusers' example scripts do:
offline mode is refused at once and the repository is created (`exist_ok=True`) at the start, so a
missing token or an unreachable Hub fails before any work. Every Hub error says how to push the saved
folder later.
"""

import os
import sys
from typing import Iterable, List, Optional

import huggingface_hub
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


def push_later_command(folder: str, repo_id: Optional[str]) -> str:
    """The shell command that uploads `folder` as this package does (checkpoints, logs and temporary files left out)."""
    excludes = " ".join(f"--exclude '{pattern}'" for pattern in UPLOAD_IGNORE_PATTERNS)
    return f"hf upload {repo_id or '<your-name>/<repo>'} {folder} . {excludes}"


def check_not_offline(flag: str = "--push_to_hub", folder: str = "<output_dir>", repo_id=None) -> None:
    """Raises a ValueError when huggingface_hub is in offline mode (`HF_HUB_OFFLINE`): nothing could be pushed."""
    if huggingface_hub.constants.is_offline_mode():
        raise ValueError(
            f"{flag} needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE is set). Unset "
            f"HF_HUB_OFFLINE, or train without {flag} and upload the saved folder later with "
            f"`{push_later_command(folder, repo_id)}`."
        )


def create_hub_repo(repo_id: str, token: Optional[str] = None, private: bool = False, folder: str = "<output_dir>") -> str:
    """
    `create_repo(repo_id, exist_ok=True)` before training, as diffusers' scripts do, so that a missing
    token, a repo id the token can't write or an unreachable Hub fail before the first step. Returns the
    full repo id; raises a RuntimeError saying how to push later.
    """
    check_not_offline(folder=folder, repo_id=repo_id)
    try:
        return create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    except Exception as error:  # HTTP, auth and connection errors all end the same way: nothing was trained yet
        raise RuntimeError(
            f"--push_to_hub: could not create or reach the Hub repository {repo_id!r} ({type(error).__name__}: "
            f"{error}). Log in with `hf auth login` (or pass --hub_token), check --hub_model_id, or train without "
            f"--push_to_hub and upload later with `{push_later_command(folder, repo_id)}`."
        ) from error


def push_folder(
    folder: str,
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload with diffusers-ssreg",
    ignore_patterns: Optional[List[str]] = None,
    create: bool = True,
) -> str:
    """
    `create_repo(exist_ok=True)` (unless `create=False`: the repo was made before training) then
    `upload_folder`, leaving checkpoints and logs out; returns the repo id. An upload error is re-raised
    as a RuntimeError that says the folder is saved and how to push it later.
    """
    try:
        if create:
            repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns if ignore_patterns is not None else UPLOAD_IGNORE_PATTERNS,
            token=token,
        )
    except Exception as error:
        raise RuntimeError(
            f"Uploading {folder!r} to {repo_id!r} failed ({type(error).__name__}: {error}). The model is saved "
            f"in {folder!r}: push it later with `{push_later_command(folder, repo_id)}`."
        ) from error
    return repo_id
