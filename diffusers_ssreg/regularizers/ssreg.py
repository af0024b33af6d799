"""StateSpaceRegularizer: the structured state-space regularization (arXiv 2604.11089) of a diffusers AutoencoderKL.

Data flow of one `forward(pixel_values)` (eqs. 22-24, Fig. 2, A.5; docs/method.md):

    plan            k = floor(alpha B + u) samples, a uniformly random subset, take the regularization
                    branch (each sample with probability alpha); the rest plain reconstruction
    encoder input   [blur(x_reg, tau1), x_plain]                          (one fused encoder pass)
    z               = posterior sample of E(encoder input)                 (gradients flow)
    z2              = posterior mean of E_ema(blur(x_reg, tau2))           (no gradients, A.5; k samples only)
    decoder input   [mean(z_reg) + Ā C(z_reg), z_plain]                    (one fused decoder pass)
    target          [blur(x_reg, tau2), x_plain]
    loss_i (plain)  = λ_MAE |x - D(z)|_1 + λ_LPIPS LPIPS + w_KL KL
    loss_i (reg.)   = λ_z MSE(C(z2), Ā C(z)) + λ_I [λ_MAE |x_τ2 - D(z_hat)|_1 + λ_LPIPS LPIPS]
    loss            = mean over the batch of loss_i

The plan is drawn on the host, so shapes are known without a device sync and stay static for a given
k. Every rank of a multi-GPU run reduces the same parameters whatever its draw (A and Δ join the
graph with zero gradient when no sample was drawn), so the regularizer is the module to hand to
`accelerator.prepare`.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from diffusers.training_utils import EMAModel

from ..basis import default_grid, discretize, transition_mask, transition_matrix, validate_grid
from ..blur import gaussian_blur, resolution_scale, sample_tau_pairs
from ..config import SSRegConfig
from ..losses import per_sample_l1, per_sample_lpips, per_sample_mse
from .base import LatentRegularizer, RegularizerOutput, TargetEncoder, host_generator, stochastic_subset


WEIGHTS_NAME = "ssreg_state.safetensors"
REGULARIZER_SUBFOLDER = "ssreg"
# What shapes A and its discretization: recorded in the state file, checked when it is loaded.
STRUCTURE_FIELDS = ("basis", "grid", "discretization", "latent_channels")


@dataclass
class SSRegOutput(RegularizerOutput):
    """
    Output of `StateSpaceRegularizer.forward`. `loss` carries gradients; every other field is a
    detached 0-dim float32 tensor for logging (a mean over the samples of its branch, 0 when the
    branch got no sample).

    Args:
        loss (`torch.Tensor`): the total loss, mean over the batch.
        rec_mae (`torch.Tensor`): pixel L1 of plain reconstructions.
        rec_lpips (`torch.Tensor`): LPIPS of plain reconstructions (0 without LPIPS).
        kl (`torch.Tensor`): KL divergence of the posterior (summed over latent dims) of plain samples.
        latent_mse (`torch.Tensor`): MSE(C(z2), Ā C(z1)) of regularized samples.
        reg_mae (`torch.Tensor`): pixel L1 between I_τ2 and D(ẑ2) of regularized samples.
        reg_lpips (`torch.Tensor`): LPIPS between I_τ2 and D(ẑ2) of regularized samples.
        reg_fraction (`torch.Tensor`): fraction of the batch that went to the regularization branch.
        delta (`torch.Tensor`): the current step size Δ.
        reconstruction (`torch.Tensor`, *optional*): the decoded batch `(batch_size, 3, height, width)`,
            when asked for with `return_reconstruction=True`.
    """

    latent_mse: torch.Tensor = None
    reg_mae: torch.Tensor = None
    reg_lpips: torch.Tensor = None
    reg_fraction: torch.Tensor = None
    delta: torch.Tensor = None
    reconstruction: Optional[torch.Tensor] = None


@dataclass
class BranchPlan:
    """
    Which samples of a batch the regularization branch takes, with their blur variances.

    Args:
        regularized (`torch.LongTensor` of shape `(k,)`): batch indices of the regularized samples.
        plain (`torch.LongTensor` of shape `(batch_size - k,)`): batch indices of the plain samples.
        tau1 (`torch.Tensor` of shape `(k,)`): encoder-input blur variance (pixels²).
        tau2 (`torch.Tensor` of shape `(k,)`): target blur variance, tau1 + Δ_I.
    """

    regularized: torch.Tensor
    plain: torch.Tensor
    tau1: torch.Tensor
    tau2: torch.Tensor


def spatial_mean(z: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean `(B, C, 1, 1)` of latents `(B, C, h, w)`."""
    return z.mean(dim=(2, 3), keepdim=True)


def apply_transition(A_bar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode-1 product (footnote 2): channel k of the result is sum_n Ā[k, n] z[:, n]."""
    return torch.einsum("kn,bnhw->bkhw", A_bar.to(z.dtype), z)


class StateSpaceRegularizer(LatentRegularizer):
    r"""
    Structured state-space regularization (arXiv 2604.11089) attached to a diffusers `AutoencoderKL`.

    The module holds a reference to the VAE (its parameters stay the VAE's own), the learnable
    masked transition matrix A and positive step Δ, the EMA target encoder and LPIPS. The VAE is
    never modified beyond `requires_grad` flags of frozen blocks, which `unload()` restores.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to regularize (any latent channel count, with or
            without quant convs).
        config (`SSRegConfig`, *optional*): hyperparameters; defaults to the paper's Flux setting.
    """

    name = "ssreg"
    config_class = SSRegConfig
    subfolder = REGULARIZER_SUBFOLDER
    weights_name = WEIGHTS_NAME

    def setup(self) -> None:
        config, vae = self.config, self.vae
        latent_channels = vae.config.latent_channels
        self.grid = validate_grid(config.grid, latent_channels) if config.grid else default_grid(latent_channels)

        # --- A (eq. 40) with its fixed sparsity pattern (A.5): only the nonzero entries are parameters ---
        A = transition_matrix(config.basis, self.grid, normalize=True, seed=config.random_seed)
        mask = transition_mask(config.basis, self.grid)
        self.register_buffer("transition_index", mask.nonzero().t().contiguous(), persistent=True)
        self.transition_values = nn.Parameter(A[mask].clone())
        self.log_delta = nn.Parameter(torch.tensor(math.log(config.delta_init)))
        self._diagonal = config.basis == "fourier"
        if config.alpha == 0:  # plain reconstruction: A and Δ unused, kept out of DDP's bookkeeping
            self.transition_values.requires_grad_(False)
            self.log_delta.requires_grad_(False)

        # --- EMA target encoder (A.5) ---
        self.target_encoder = TargetEncoder(vae)
        # diffusers' EMAModel supplies the update rule; the target module owns the storage (see update_ema).
        # min_decay = decay keeps the decay constant after EMAModel's first update (which copies).
        self._ema = EMAModel(
            self.target_encoder.parameters(), decay=config.ema_decay, min_decay=config.ema_decay, foreach=True
        )
        self._ema.shadow_params = []  # no second copy of the weights: update_ema points it at the module
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long), persistent=True)

    # ----------------------------------------------------------------------------------------
    # Parameters
    # ----------------------------------------------------------------------------------------

    @property
    def delta(self) -> torch.Tensor:
        """The step size Δ = exp(log Δ) > 0."""
        return self.log_delta.exp()

    def transition_matrix(self) -> torch.Tensor:
        """The current continuous A `(N, N)`: zero outside its fixed pattern."""
        size = self.grid[0] * self.grid[1]
        A = self.transition_values.new_zeros(size, size)
        return A.index_put((self.transition_index[0], self.transition_index[1]), self.transition_values)

    def discrete_transition(self) -> torch.Tensor:
        """Ā = exp(A Δ) (ZOH) or I + A Δ (Euler), eqs. 18-20."""
        return discretize(self.transition_matrix(), self.delta, self.config.discretization, diagonal=self._diagonal)

    def extra_parameter_groups(self, base_lr: float) -> List[dict]:
        """A and Δ at `ssm_lr_scale * base_lr` (A.5), without weight decay."""
        ssm = [p for p in (self.transition_values, self.log_delta) if p.requires_grad]
        if not ssm:
            return []
        # A and Δ are structural: no weight decay pulls them towards 0.
        return [{"params": ssm, "lr": base_lr * self.config.ssm_lr_scale, "name": "ssm", "weight_decay": 0.0}]

    def _online_encoder_parameters(self) -> List[nn.Parameter]:
        params = list(self.vae.encoder.parameters())
        if self.vae.quant_conv is not None:
            params += list(self.vae.quant_conv.parameters())
        return params

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step of the target encoder towards the online encoder; call after every optimizer step."""
        # EMAModel updates `shadow_params` in place: pointing them at the target module's tensors
        # makes the module itself the average (valid after any `.to()`, which replaces tensors).
        self._ema.shadow_params = [p.data for p in self.target_encoder.parameters()]
        self._ema.optimization_step = int(self.ema_step)
        self._ema.step(self._online_encoder_parameters())
        self._ema.shadow_params = []
        self.ema_step += 1

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------

    def draw_plan(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> BranchPlan:
        """
        Draws which samples of a batch go to the regularization branch, and their (τ1, τ2).

        The count is αB stochastically rounded (floor(αB + u), u ~ U(0, 1)) and the samples are a
        uniformly random subset, so each sample is regularized with probability exactly α while
        the count, known on the host, keeps tensor shapes static and needs no device sync. Drawn
        with a CPU generator (`generator` if it is one, else torch's global CPU RNG).
        """
        cfg = self.config
        generator = host_generator(generator)
        if cfg.alpha == 0:  # plain reconstruction: no draw at all, the batch in its own order
            empty = torch.zeros(0)
            return BranchPlan(torch.zeros(0, dtype=torch.long), torch.arange(batch_size), empty, empty)
        # Each branch keeps the batch's order (alpha = 1 or 0 leaves the batch as it is).
        regularized, plain = stochastic_subset(batch_size, cfg.alpha, generator)
        scale = resolution_scale(height, width, cfg.reference_resolution)
        tau1, tau2 = sample_tau_pairs(regularized.numel(), cfg.tau_max, cfg.delta_tau, scale, generator)
        return BranchPlan(regularized, plain, tau1, tau2)

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_reconstruction: bool = False,
        plan: Optional[BranchPlan] = None,
    ) -> SSRegOutput:
        r"""
        Runs the VAE on a batch and returns the training loss with its components.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            generator (`torch.Generator`, *optional*): drives the branch and τ draws (when a CPU generator) and
                the posterior sample.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also return the decoded batch
                (in the input's order).
            plan (`BranchPlan`, *optional*): which samples to regularize and their τ pair; drawn with
                `draw_plan` when not given.
        """
        if self.validate_inputs:
            self.check_pixel_values(pixel_values)
        cfg = self.config
        batch, _, height, width = pixel_values.shape
        device = pixel_values.device
        if plan is None:
            plan = self.draw_plan(batch, height, width, generator)
        count = int(plan.regularized.numel())
        if count + plan.plain.numel() != batch:
            raise ValueError(f"`plan` covers {count + plan.plain.numel()} samples but the batch has {batch}.")
        self.check_lpips_size(height, width)
        scale = resolution_scale(height, width, cfg.reference_resolution)
        if count and plan.tau2.device.type == "cpu" and float(plan.tau2.max()) > cfg.tau_max * scale * (1 + 1e-6):
            # (a host-side plan costs no device sync to check; the kernels are sized for τ_max)
            raise ValueError(
                f"`plan.tau2` reaches {float(plan.tau2.max()):.4g} pixels² but tau_max at this resolution is "
                f"{cfg.tau_max * scale:.4g}: raise `tau_max` in the config or draw smaller variances."
            )

        # Regularized samples first, then plain ones: one encoder pass and one decoder pass serve both branches.
        regularized = plan.regularized.to(device, non_blocking=True)
        plain = plan.plain.to(device, non_blocking=True)
        plain_pixels = pixel_values.index_select(0, plain)
        if count:
            reg_pixels = pixel_values.index_select(0, regularized)
            # A half-width fixed by τ_max keeps kernel shapes static (torch.compile) and needs no host sync.
            half_width = int(math.ceil(3 * math.sqrt(cfg.tau_max * scale)))
            blurred_1 = gaussian_blur(reg_pixels, plan.tau1.to(device), max_half_width=half_width)
            blurred_2 = gaussian_blur(reg_pixels, plan.tau2.to(device), max_half_width=half_width)
            encoder_input = torch.cat([blurred_1, plain_pixels])
            target = torch.cat([blurred_2, plain_pixels])
        else:
            encoder_input = target = plain_pixels

        _, z, kl = self.encode(encoder_input, generator)

        decoder_input = z
        latent_mse = z.new_zeros(0, dtype=torch.float32)
        keep_in_graph = None
        if cfg.alpha > 0:
            A_bar = self.discrete_transition()
            if count:
                z1 = z[:count]
                with torch.no_grad():
                    z2 = self.target_encoder(blurred_2)  # A.5: stop-gradient EMA target, posterior mean
                if cfg.mean_centering:  # eq. 24: only the centred part follows the update
                    z1_mean = spatial_mean(z1)
                    predicted = apply_transition(A_bar, z1 - z1_mean)
                    z_hat = z1_mean + predicted
                    z2 = z2 - spatial_mean(z2)
                else:
                    predicted = z_hat = apply_transition(A_bar, z1)
                latent_mse = per_sample_mse(predicted, z2)
                decoder_input = torch.cat([z_hat.to(z.dtype), z[count:]])
            else:
                # No sample drawn this time: A and Δ still join the graph (with zero gradient), so
                # every rank of a DDP run reduces the same parameters.
                keep_in_graph = 0.0 * A_bar.sum()

        decoded = self.vae.decode(decoder_input).sample
        # The shared rule with the distance functions named in this module (looked up at every step).
        pixel, mae, lp = self.pixel_terms(decoded, target, per_sample_l1, per_sample_lpips)

        reg_loss = cfg.lambda_z * latent_mse + cfg.lambda_image * pixel[:count]
        plain_loss = pixel[count:] + cfg.kl_weight * kl[count:]
        loss = (reg_loss.sum() + plain_loss.sum()) / batch
        if keep_in_graph is not None:
            loss = loss + keep_in_graph

        reconstruction = None
        if return_reconstruction:
            order = torch.cat([regularized, plain])
            reconstruction = torch.empty_like(decoded).index_copy_(0, order, decoded)
        n_reg, n_plain = max(count, 1), max(batch - count, 1)
        return SSRegOutput(
            loss=loss,
            rec_mae=(mae[count:].sum() / n_plain).detach(),
            rec_lpips=(lp[count:].sum() / n_plain).detach(),
            kl=(kl[count:].sum() / n_plain).detach(),
            latent_mse=(latent_mse.sum() / n_reg).detach(),
            reg_mae=(mae[:count].sum() / n_reg).detach(),
            reg_lpips=(lp[:count].sum() / n_reg).detach(),
            reg_fraction=torch.tensor(count / batch, device=device),
            delta=self.delta.detach().float(),
            reconstruction=reconstruction,
        )

    # ----------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------

    def config_to_save(self) -> SSRegConfig:
        """The config with the resolved grid (the default grid is written out, not left as None)."""
        return SSRegConfig.from_dict({**self.config.to_dict(), "grid": list(self.grid)})

    def regularizer_state_dict(self) -> Dict[str, torch.Tensor]:
        """The regularizer's own state: A's values and pattern, log Δ, the EMA step and the EMA target encoder."""
        state = {
            "transition_values": self.transition_values,
            "transition_index": self.transition_index,
            "log_delta": self.log_delta,
            "ema_step": self.ema_step,
        }
        state.update({f"target_encoder.{k}": v for k, v in self.target_encoder.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def structure(self) -> Dict[str, str]:
        """What shapes A and its discretization, as strings: basis, grid `"H,W"`, discretization, latent_channels."""
        return {
            "basis": self.config.basis,
            "grid": f"{self.grid[0]},{self.grid[1]}",
            "discretization": self.config.discretization,
            "latent_channels": str(self.vae.config.latent_channels),
        }

    def state_metadata(self) -> Dict[str, str]:
        """The base metadata plus `structure()`, so a state file says what A it holds whatever its config file says."""
        return {**super().state_metadata(), **self.structure()}

    def check_saved_config(self, saved: SSRegConfig, directory: str) -> None:
        """The saved config must agree on basis, grid and discretization (a pattern alone can't tell Legendre from Chebyshev)."""
        for name, mine in (("basis", self.config.basis), ("grid", self.grid), ("discretization", self.config.discretization)):
            theirs = tuple(saved.grid or ()) if name == "grid" else getattr(saved, name)
            if name == "grid" and not theirs:
                continue
            if theirs != mine:
                raise ValueError(f"{directory!r} holds a regularizer with {name}={theirs!r}, this one has {name}={mine!r}.")

    def load_state(self, state: Dict[str, torch.Tensor], metadata: Dict[str, str], path: str) -> None:
        """Checks the pattern of A and the recorded structure, then copies A, Δ, the EMA step and the target encoder."""
        mine, differences = self.structure(), []
        for name in STRUCTURE_FIELDS:  # files written before the structure was recorded carry none of it
            if name in metadata and metadata[name] != mine[name]:
                theirs, ours = metadata[name], mine[name]
                if name == "grid":
                    theirs, ours = tuple(int(v) for v in theirs.split(",")), self.grid
                elif name == "latent_channels":
                    theirs, ours = int(theirs), int(ours)
                differences.append(f"{name}={theirs!r}, this regularizer has {name}={ours!r}")
        saved_with = f"it was saved with {'; '.join(differences)}" if differences else ""
        if not torch.equal(state.pop("transition_index"), self.transition_index.cpu()):
            raise ValueError(
                f"the transition-matrix pattern in {path} does not match basis {self.config.basis!r} on grid "
                f"{self.grid}" + (f": {saved_with}." if saved_with else ".")
            )
        if differences:
            raise ValueError(
                f"{path!r} holds a state trained for another transition matrix: {saved_with}. Use the values it was "
                f"saved with (the config file beside it, or the flags that built this regularizer, disagree with them)."
            )
        with torch.no_grad():
            self.transition_values.copy_(state.pop("transition_values"))
            self.log_delta.copy_(state.pop("log_delta"))
            self.ema_step.copy_(state.pop("ema_step"))
        target = {k[len("target_encoder.") :]: v for k, v in state.items() if k.startswith("target_encoder.")}
        unexpected = sorted(k for k in state if not k.startswith("target_encoder."))
        if unexpected:
            raise ValueError(f"unexpected keys {unexpected} in {path}.")
        self.target_encoder.load_state_dict(target, strict=True)
