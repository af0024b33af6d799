"""Loading a saved regularizer: from a Hub repository (offline, from a folder laid out like the Hugging Face
cache) with subfolder and revision, and refusing a state trained for another transition matrix."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fast_config, make_tiny_vae, photo_crops
from diffusers_ssreg import SSRegConfig, StateSpaceRegularizer, load_regularizer
from diffusers_ssreg.config import CONFIG_NAME
from diffusers_ssreg.regularizer import STRUCTURE_FIELDS, WEIGHTS_NAME


REPO_ID = "someone/flux-vae-ssreg"
MAIN = "0123456789abcdef0123456789abcdef01234567"
V1 = "fedcba9876543210fedcba9876543210fedcba98"


def _trained(seed, latent_channels=8, basis="legendre"):
    """A regularizer whose A, Δ and EMA target differ from their initial values (one AdamW step)."""
    regularizer = StateSpaceRegularizer(make_tiny_vae(latent_channels=latent_channels), fast_config(basis=basis, alpha=1.0))
    optimizer = torch.optim.AdamW(regularizer.parameter_groups(1e-2))
    regularizer(photo_crops(2, 32), generator=torch.Generator().manual_seed(seed)).loss.backward()
    optimizer.step()
    regularizer.update_ema()
    return regularizer


@pytest.fixture
def hub_cache(tmp_path):
    """A Hugging Face cache holding `REPO_ID` at two commits: main (refs/main) and the tag v1 (refs/v1), each with an
    exported-VAE-style layout whose `ssreg/` subfolder holds a regularizer."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    saved = {}
    for commit, ref, seed in ((MAIN, "main", 0), (V1, "v1", 1)):
        regularizer = _trained(seed)
        regularizer.save_pretrained(str(repo / "snapshots" / commit / "ssreg"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        saved[ref] = regularizer.regularizer_state_dict()
    return cache, saved


def _assert_state(regularizer, expected):
    state = regularizer.regularizer_state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        assert torch.equal(state[key], expected[key]), key


@pytest.mark.parametrize("revision, ref", [(None, "main"), ("v1", "v1"), (V1, "v1"), (MAIN, "main")])
def test_from_pretrained_reads_a_hub_repository_with_subfolder_and_revision(hub_cache, revision, ref):
    cache, saved = hub_cache
    regularizer = StateSpaceRegularizer.from_pretrained(
        REPO_ID, make_tiny_vae(latent_channels=8), subfolder="ssreg", revision=revision, cache_dir=str(cache)
    )
    _assert_state(regularizer, saved[ref])
    config = SSRegConfig.from_pretrained(REPO_ID, subfolder="ssreg", revision=revision, cache_dir=str(cache))
    assert config == regularizer.config and config.basis == "legendre" and config.grid == (2, 4)
    # the loader that reads the method from the config file
    loaded = load_regularizer(
        REPO_ID, make_tiny_vae(latent_channels=8), subfolder="ssreg", revision=revision, cache_dir=str(cache)
    )
    assert isinstance(loaded, StateSpaceRegularizer)
    _assert_state(loaded, saved[ref])


def test_the_default_hub_cache_is_used(hub_cache, monkeypatch):
    """No `cache_dir`: huggingface_hub's own cache (HF_HUB_CACHE) is read."""
    import huggingface_hub.constants

    cache, saved = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    regularizer = StateSpaceRegularizer.from_pretrained(REPO_ID, make_tiny_vae(latent_channels=8), subfolder="ssreg")
    _assert_state(regularizer, saved["main"])


def test_missing_hub_files_name_the_file_the_repository_and_the_subfolder(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(FileNotFoundError, match=rf"{CONFIG_NAME}.*'{REPO_ID}'.*subfolder='vae'"):
        StateSpaceRegularizer.from_pretrained(REPO_ID, make_tiny_vae(latent_channels=8), subfolder="vae", cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match=rf"{CONFIG_NAME}.*'someone/other-repo'"):
        SSRegConfig.from_pretrained("someone/other-repo", subfolder="ssreg", cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match=r"regularizer config.*eqvae_config\.json"):
        load_regularizer(REPO_ID, make_tiny_vae(latent_channels=8), subfolder="vae", cache_dir=str(cache))


def test_a_local_folder_with_a_subfolder(tmp_path):
    regularizer = _trained(0)
    regularizer.save_pretrained(str(tmp_path / "ssreg"))
    loaded = StateSpaceRegularizer.from_pretrained(str(tmp_path), make_tiny_vae(latent_channels=8), subfolder="ssreg")
    _assert_state(loaded, regularizer.regularizer_state_dict())
    assert SSRegConfig.from_pretrained(str(tmp_path), subfolder="ssreg") == loaded.config


# --------------------------------------------------------------------------------------------
# The state records what shapes A and its discretization
# --------------------------------------------------------------------------------------------


def test_the_state_file_records_the_structure_of_A(tmp_path):
    _trained(0).save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    assert {k: metadata[k] for k in STRUCTURE_FIELDS} == {
        "basis": "legendre", "grid": "2,4", "discretization": "zoh", "latent_channels": "8",
    }  # fmt: skip
    assert metadata["regularizer"] == "ssreg"


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("discretization", "euler", r"discretization='zoh'.*discretization='euler'"),
        ("grid", [4, 2], r"grid=\(2, 4\).*grid=\(4, 2\)"),
        ("basis", "chebyshev", r"basis='legendre'.*basis='chebyshev'"),  # the same sparsity pattern on this grid
    ],
)
def test_an_edited_config_no_longer_loads_silently(tmp_path, field, value, pattern):
    """Editing ssreg_config.json builds a regularizer for another A: the state file's record refuses it."""
    _trained(0).save_pretrained(str(tmp_path))
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*{pattern}"):
        StateSpaceRegularizer.from_pretrained(str(tmp_path), make_tiny_vae(latent_channels=8))


def test_a_state_for_another_latent_channel_count_is_refused(tmp_path):
    _trained(0).save_pretrained(str(tmp_path))
    path = str(tmp_path / WEIGHTS_NAME)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(path), path, metadata={**metadata, "latent_channels": "32"})
    with pytest.raises(ValueError, match=r"latent_channels=32.*latent_channels=8"):
        StateSpaceRegularizer.from_pretrained(str(tmp_path), make_tiny_vae(latent_channels=8))


def test_a_state_of_another_method_is_refused(tmp_path):
    _trained(0).save_pretrained(str(tmp_path))
    path = str(tmp_path / WEIGHTS_NAME)
    save_file(load_file(path), path, metadata={"regularizer": "eqvae"})
    with pytest.raises(ValueError, match=r"state of regularizer 'eqvae', not 'ssreg'"):
        StateSpaceRegularizer.from_pretrained(str(tmp_path), make_tiny_vae(latent_channels=8))


def test_resuming_into_a_regularizer_built_for_another_A_is_refused(tmp_path):
    """A checkpoint's load hook calls load_regularizer_state on a regularizer built from flags: a changed flag is caught."""
    saved = tmp_path / "checkpoint"
    _trained(0).save_pretrained(str(saved))
    shutil.copytree(saved, tmp_path / "without_config")
    os.remove(tmp_path / "without_config" / CONFIG_NAME)  # even without the config file beside it
    config = fast_config(basis="legendre", alpha=1.0, discretization="euler")
    other = StateSpaceRegularizer(make_tiny_vae(latent_channels=8), config)
    for folder in (saved, tmp_path / "without_config"):
        with pytest.raises(ValueError, match=r"discretization='zoh'.*discretization='euler'"):
            other.load_regularizer_state(str(folder))
