"""SSRegConfig: the paper's Flux defaults, JSON round trip, version field and validation."""

import dataclasses
import json

import pytest

import diffusers_ssreg
from diffusers_ssreg import SSRegConfig
from diffusers_ssreg.config import CONFIG_NAME


def test_defaults_are_the_paper_flux_setting():
    """Tables 2-3 and A.5 (Flux VAE); docs/method.md."""
    cfg = SSRegConfig()
    expected = {
        "basis": "fourier",
        "grid": None,
        "discretization": "zoh",
        "delta_init": 0.1,
        "mean_centering": True,
        "tau_max": 10.0,
        "delta_tau": 4.0,
        "reference_resolution": 256,
        "alpha": 0.25,
        "lambda_z": 0.25,
        "lambda_image": 1.0,
        "lambda_mae": 1.0,
        "lambda_lpips": 0.1,
        "kl_weight": 1e-6,
        "ema_decay": 0.999,
        "ssm_lr_scale": 0.1,
        "freeze_encoder_blocks": 2,
        "freeze_decoder_blocks": 2,
        "lpips_pretrained_backbone": True,
    }
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


def _custom():
    return SSRegConfig(
        basis="legendre",
        grid=(2, 3),
        discretization="euler",
        delta_init=0.05,
        tau_max=6.0,
        delta_tau=2.0,
        reference_resolution=None,
        alpha=0.5,
        lambda_z=5.0,
        lambda_lpips=0.0,
        lpips_net="alex",
        mean_centering=False,
        ema_decay=0.99,
        freeze_encoder_blocks=1,
        freeze_decoder_blocks=0,
    )


def test_json_round_trip(tmp_path):
    cfg = _custom()
    path = cfg.save_pretrained(str(tmp_path))
    assert path == str(tmp_path / CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)  # plain JSON: grid is a list
    assert data["grid"] == [2, 3] and data["basis"] == "legendre" and data["reference_resolution"] is None
    loaded = SSRegConfig.from_pretrained(str(tmp_path))
    assert loaded == cfg
    assert loaded.grid == (2, 3)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert SSRegConfig.from_dict(cfg.to_dict()) == cfg
    assert SSRegConfig.from_dict(SSRegConfig().to_dict()) == SSRegConfig()


def test_version_fields():
    data = SSRegConfig().to_dict()
    assert data["_ssreg_config_version"] == 1
    assert data["_diffusers_ssreg_version"] == diffusers_ssreg.__version__
    data["_ssreg_config_version"] = 2
    with pytest.raises(ValueError, match="version 2"):
        SSRegConfig.from_dict(data)
    # a config without version fields (hand-written) is read as the current format
    plain = {f.name: getattr(SSRegConfig(), f.name) for f in dataclasses.fields(SSRegConfig)}
    assert SSRegConfig.from_dict(plain) == SSRegConfig()


def test_unknown_key_in_json_raises(tmp_path):
    data = SSRegConfig().to_dict()
    data["lambda_gan"] = 0.5
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lambda_gan"):
        SSRegConfig.from_pretrained(str(tmp_path))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        SSRegConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"tau_max": -1.0}, r"`tau_max`.*-1\.0"),
        ({"delta_tau": -1.0}, r"`delta_tau`.*-1\.0"),
        ({"delta_tau": 0.0}, r"`delta_tau`.*0\.0"),
        ({"tau_max": 2.0, "delta_tau": 4.0}, r"`tau_max` \(2\.0\).*`delta_tau` \(4\.0\)"),
        ({"alpha": 1.5}, r"`alpha`.*1\.5"),
        ({"alpha": -0.25}, r"`alpha`.*-0\.25"),
        ({"alpha": float("nan")}, r"`alpha`.*nan"),
        ({"basis": "wavelet"}, r"`basis`.*'wavelet'"),
        ({"discretization": "rk4"}, r"`discretization`.*'rk4'"),
        ({"grid": (0, 4)}, r"`grid`.*\(0, 4\)"),
        ({"grid": (4,)}, r"`grid`.*\(4,\)"),
        ({"grid": (2.0, 2)}, r"`grid`.*\(2\.0, 2\)"),
        ({"grid": "4x4"}, r"`grid`.*'4x4'"),
        ({"delta_init": 0.0}, r"`delta_init`.*0\.0"),
        ({"delta_init": "0.1"}, r"`delta_init`.*'0\.1'"),
        ({"ema_decay": 1.5}, r"`ema_decay`.*1\.5"),
        ({"lambda_z": -1.0}, r"`lambda_z`.*-1\.0"),
        ({"lambda_lpips": -0.1}, r"`lambda_lpips`.*-0\.1"),
        ({"kl_weight": -1e-6}, r"`kl_weight`"),
        ({"ssm_lr_scale": -0.1}, r"`ssm_lr_scale`.*-0\.1"),
        ({"lpips_net": "resnet"}, r"`lpips_net`.*'resnet'"),
        ({"reference_resolution": 0}, r"`reference_resolution`.*0"),
        ({"reference_resolution": 256.0}, r"`reference_resolution`.*256\.0"),
        ({"freeze_encoder_blocks": -1}, r"`freeze_encoder_blocks`.*-1"),
        ({"freeze_decoder_blocks": 1.5}, r"`freeze_decoder_blocks`.*1\.5"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SSRegConfig(**kwargs)


def test_invalid_bool_fields_raise_type_error():
    with pytest.raises(TypeError, match=r"`mean_centering`.*'yes'"):
        SSRegConfig(mean_centering="yes")
    with pytest.raises(TypeError, match=r"`lpips_pretrained_backbone`.*1"):
        SSRegConfig(lpips_pretrained_backbone=1)


def test_invalid_values_in_json_raise(tmp_path):
    data = SSRegConfig().to_dict()
    data["alpha"] = 2.0
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"`alpha`.*2\.0"):
        SSRegConfig.from_pretrained(str(tmp_path))


def test_grid_list_is_normalized_to_tuple():
    assert SSRegConfig(grid=[4, 8]).grid == (4, 8)
