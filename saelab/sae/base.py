"""The shared base of every SAE variant: pre-activations → selection → decode.

A variant overrides only `select` (which latents fire, with which values) and what else differs:
GBA how its encoder bias moves, the penalised variants their `penalty`, transcoders the space they
decode into (`output_norm`, `input_bias`, `skip`). Inputs are in the model's units; inside, each
token x is mapped into the SAE's space by a `TokenNorm`, x' = (x − μ)·c, and the reconstruction is
mapped back, so callers never see the normalised space:

    input_norm none:        μ = 0,           c = s = `input_scale` (set by the trainer so that E‖x·s‖² = d_in)
    input_norm layer_norm:  μ = mean_j x_j,  c = 1 / (std_j x_j + ε)    (per token; SAELens's "layer_norm")

    u  = (x' − b_dec) W_enc + b_enc             pre-activations   [batch, d_sae]
    z  = select(u)                              sparse latents    [batch, d_sae]
    x̂  = (z W_dec + b_dec) / c + μ              reconstruction    [batch, d_in]

With layer_norm, `input_scale` is 1 / the mean std of the training sample: the scale at which
token-free code (a latent's decoder direction in model units, `W_dec / s`) reads the decoder.

`forward` materialises u and z densely: it is the plain reference, and what inference callers use.
Training uses `sparse_forward`, the same maths through `saelab.kernels`: the variant's
`selection_rule` picks (token, latent) pairs from u tile by tile, and the backward touches only them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from saelab.kernels import RowTopK, sparse_decode, sparse_encode
from saelab.kernels.encode import SelectionRule, TileObserver, Workspace
from saelab.kernels.row_constraints import normalize_rows_, remove_parallel_
from saelab.sae.config import SAEConfig

if TYPE_CHECKING:
    from saelab.distributed import DataParallel

LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in
# Parameters that hold one scalar per latent and set whether it fires (`parameter_groups`).
PER_LATENT_SCALARS = ("b_enc", "threshold", "r_mag", "b_mag")


def encoder_layout(W_enc: torch.Tensor) -> torch.Tensor:
    """W_enc [d_in, d_sae] with the memory layout of its device (`SparseAutoencoder._lay_out_encoder`):
    column-major on CUDA, row-major elsewhere; itself when it has it already."""
    return W_enc.T.contiguous().T if W_enc.is_cuda else W_enc.contiguous()


@dataclass
class TokenNorm:
    """How tokens map into an SAE's space: x' = (x − shift)·scale; `shift`, `scale` are [batch, 1] or scalars."""

    shift: torch.Tensor | float
    scale: torch.Tensor

    def into(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale

    def out_of(self, y: torch.Tensor) -> torch.Tensor:
        """A point of the SAE's space (a reconstruction) back in model units."""
        return y / self.scale + self.shift

    def direction(self, v: torch.Tensor) -> torch.Tensor:
        """A difference of points (decoder rows times activations) in model units: no shift."""
        return v / self.scale


@dataclass
class SAEOutput:
    reconstruction: torch.Tensor  # [batch, d_in], model units
    latents: torch.Tensor  # [batch, d_sae], zero where a latent did not fire
    pre_activations: torch.Tensor  # [batch, d_sae]


@dataclass
class SparseOutput:
    reconstruction: torch.Tensor  # [batch, d_out], model units (d_out = d_in but for transcoders)
    indices: torch.Tensor  # [batch, k'] the latents kept per token
    values: torch.Tensor  # [batch, k'] their activations (≥ 0; 0 at padded slots)
    aux_reconstruction: torch.Tensor | None  # [batch, d_out] the AuxK latents' decoding (no b_dec), model units
    pre_activations: torch.Tensor | None = None  # [batch, k'] u at the kept pairs (differentiable; 0 at padding)
    valid: torch.Tensor | None = None  # [batch, k'] bool, False at padded slots; None: every slot is real
    inputs: torch.Tensor | None = None  # [batch, d_in] x', the tokens in the SAE's space, detached (Gated's aux loss)
    nested: list[torch.Tensor] | None = None  # Matryoshka: the inner prefixes' reconstructions, model units


class SparseAutoencoder(nn.Module):
    """Encoder/decoder weights in SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_out] (d_out = d_in
    but for transcoders).

    A variant is one subclass in its own module, registered by name (`registry.register`); it declares
    what makes it different here, as class attributes and the methods below, so that the trainer, the
    step, evaluation, the CLI, the SAELens format and the dashboard ask it instead of its name
    (docs/own-variant.md):
    - `architecture`: its name in configs, run folders and saved SAEs; `config_keys`: the SAEConfig keys
      it reads beyond `config.COMMON_KEYS` (any other variant's key in its YAML is an error);
    - `unit_norm_decoder` (the trainer keeps decoder rows at unit norm; penalised variants weigh the
      norms instead), `decoder_init_norm` and `fast_per_latent` (`parameter_groups`);
    - `revives_with_auxk` (dead latents get AuxK's loss), `trains_on_gradients` (the trainer reads the
      loss gradient from the store), `transcoder` (reads `hook_name`, predicts `hook_name_out`),
      `normalises_input_by_default` (`input_norm` unset means layer_norm); a penalty is the `penalty`
      method, warmed up over `penalty_warmup` when the variant lists that key;
    - `saelens_architecture` (what SAELens loads it as), `loads_saelens` (the SAELens architectures that
      load as this class), `saelens_note` and `saelens_renames` (its tensors' SAELens names);
    - `option_defaults`: settings of its own that SAEConfig has no field for, given under `options`.
    """

    architecture: ClassVar[str] = ""
    config_keys: ClassVar[tuple[str, ...]] = ()
    unit_norm_decoder: ClassVar[bool] = True
    decoder_init_norm = 1.0  # a property where the config sets it (JumpReLU)
    fast_per_latent: ClassVar[bool] = False
    revives_with_auxk: ClassVar[bool] = False
    trains_on_gradients: ClassVar[bool] = False
    transcoder: ClassVar[bool] = False
    normalises_input_by_default: ClassVar[bool] = False
    saelens_architecture: ClassVar[str] = ""
    loads_saelens: ClassVar[tuple[str, ...]] = ()
    saelens_note: ClassVar[str] = ""
    saelens_renames: ClassVar[dict[str, str]] = {}  # saelab tensor name → its name in SAELens's file
    option_defaults: ClassVar[dict[str, float]] = {}  # its own numeric settings (`option`), by name

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        decoder = torch.randn(cfg.d_sae, cfg.output_width, generator=generator)
        decoder *= self.decoder_init_norm / decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(self._initial_encoder(decoder, generator))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.output_width), requires_grad=cfg.train_b_dec)
        self.register_buffer("input_scale", torch.ones(()))
        self.workspace = Workspace()  # scratch for sparse_forward's pre-activations; not state
        self._lay_out_encoder()  # built on a GPU (a default-device context): CUDA's layout from the start

    def _initial_encoder(self, decoder: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """W_enc's start, [d_in, d_sae]: the decoder's transpose (Gao et al.; Anthropic's April 2024 update)."""
        return decoder.T.contiguous()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """`nn.Module._apply` (what `.to(device)` and the like run), then W_enc in its device's layout."""
        module = super()._apply(fn, recurse)
        self._lay_out_encoder()
        return module

    @torch.no_grad()
    def _lay_out_encoder(self) -> None:
        """Store W_enc (and its gradient) in the memory layout its device trains fastest in.

        - CPU: row-major [d_in, d_sae]. The CPU's fused Adam copies a non-contiguous parameter (and its
          gradient) to a contiguous one and back every step.
        - CUDA: column-major, i.e. as W_encᵀ [d_sae, d_in] row-major. The sparse products read and
          write W_enc by latent rows: the bf16 path's recomputed values gather rows of W_encᵀ, and
          ∂W_enc comes out of the sparse backward as rows of latents, so row-major would cost two
          transposing copies of [d_in, d_sae] a step; fused Adam on CUDA takes any dense layout that
          its parameter, gradient and moments share.
        A tied encoder (GBA's, a view of W_dec) is left as it is."""
        W_enc = self._parameters.get("W_enc")
        if W_enc is None:
            return
        for tensor in (W_enc, W_enc.grad):
            if tensor is not None and tensor.stride() != (laid_out := encoder_layout(tensor)).stride():
                tensor.data = laid_out

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters as optimiser groups; each group's `lr_scale` multiplies the run's lr.

        With `fast_per_latent`, the per-latent scalars (`PER_LATENT_SCALARS`) train at √d_in × the lr: Adam
        moves every parameter by about lr a step, a weight entry is ~1/√d_in of the pre-activations' scale
        and a bias or threshold is of that scale, so at one lr the sparsity-setting scalars move √d_in
        times slower, relative to their size, than the weights (GBA's a_i, same argument). Measured on
        SmolLM2 (150 steps): at one lr the penalised SAEs still kept ~1,700–2,100 of 4,608 latents a token
        after 15 steps with their penalty warmed up."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        fast = [p for name, p in trainable if self.fast_per_latent and name in PER_LATENT_SCALARS]
        rest = [p for name, p in trainable if not (self.fast_per_latent and name in PER_LATENT_SCALARS)]
        groups = [{"params": rest, "lr_scale": 1.0}]
        return groups + ([{"params": fast, "lr_scale": self.cfg.d_in**0.5}] if fast else [])

    def token_norm(self, x: torch.Tensor) -> TokenNorm:
        """The map of the tokens x: [batch, d_in] into this SAE's space (`input_norm`, module docstring)."""
        if self.cfg.input_norm == "layer_norm":
            shift = x.mean(-1, keepdim=True)
            return TokenNorm(shift, 1 / ((x - shift).std(-1, keepdim=True) + LAYER_NORM_EPS))
        return self.scale_norm()

    def scale_norm(self) -> TokenNorm:
        """The map with no tokens at hand, x·s: exact for input_norm none, the typical token's for layer_norm."""
        return TokenNorm(0.0, self.input_scale)

    def output_norm(self, norm: TokenNorm) -> TokenNorm:
        """The map of the reconstructed side, given the input's: the same one, but for transcoders."""
        return norm

    def input_bias(self) -> torch.Tensor:
        """What the encoder subtracts from x' first: b_dec (SAELens's apply_b_dec_to_input), [d_in]."""
        return self.b_dec

    def skip(self, x: torch.Tensor, norm: TokenNorm) -> torch.Tensor | None:
        """A linear term of the tokens x (mapped by `norm`) added to the decoding, in the SAE's output space
        (skip transcoders); None for the others, which then map nothing."""
        return None

    def decoder_directions(self) -> torch.Tensor:
        """W_dec [d_sae, d_out] in model units: what one unit of each latent adds to the output, detached."""
        return self.output_norm(self.scale_norm()).direction(self.W_dec).detach()

    def pre_activations(self, x: torch.Tensor, norm: TokenNorm | None = None) -> torch.Tensor:
        """u = (x' − b_dec) W_enc + b_enc; x: [batch, d_in] → [batch, d_sae]. `norm`: x's `token_norm`, if
        the caller already has it."""
        return ((norm or self.token_norm(x)).into(x) - self.input_bias()) @ self.W_enc + self.b_enc

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        """The variant's rule: which latents fire and with which values; [batch, d_sae] → same."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, norm: TokenNorm | None = None) -> torch.Tensor:
        """x̂ = (z W_dec + b_dec) / c + μ; latents: [batch, d_sae] → [batch, d_out] in model units.

        `norm`: the tokens' `token_norm`; without it, `scale_norm`."""
        return self.output_norm(norm or self.scale_norm()).out_of(latents @ self.W_dec + self.b_dec)

    def encode(
        self, x: torch.Tensor, gradient: torch.Tensor | None = None, norm: TokenNorm | None = None
    ) -> torch.Tensor:
        """Sparse latents for x: [batch, d_in] (gradient: ∂L/∂x, same shape, for g-SAE; `norm`: x's
        `token_norm`, if the caller already has it)."""
        return self.select(self.pre_activations(x, norm), gradient)

    @torch.no_grad()
    def encode_rows(self, x: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
        """`encode` of rows `x: [n, d_in]` from any device or dtype, `chunk_rows` at a time, as float32 on the
        CPU: how evaluations and analyses hold the latents of many rows without a [n, d_sae] peak on the GPU."""
        if len(x) == 0:  # no rows: nothing to normalise (a token norm of none would warn)
            return torch.zeros(0, self.cfg.d_sae)
        weight = self.W_dec
        chunks = [self.encode(rows.to(weight.device, weight.dtype)).float().cpu() for rows in x.split(chunk_rows)]
        return torch.cat(chunks)

    def forward(self, x: torch.Tensor, gradient: torch.Tensor | None = None) -> SAEOutput:
        norm = self.token_norm(x)
        pre = self.pre_activations(x, norm)
        latents = self.select(pre, gradient)
        reconstruction = self.decode(latents, norm)
        skip = self.skip(x, norm)
        if skip is not None:
            reconstruction = reconstruction + self.output_norm(norm).direction(skip)
        return SAEOutput(reconstruction, latents, pre)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        """The kernels' form of `select` for this batch (training mode): a rule fed tiles of u."""
        raise NotImplementedError

    def tile_observer(self) -> TileObserver | None:
        """A callback that sees every tile of u during `sparse_forward` (GBA's statistics); None by default."""
        return None

    def kept_values(
        self, indices: torch.Tensor, pre_activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The activations of the kept latents from their u ([batch, k'] each; padded slots, False in
        `valid`, hold 0): relu(u)."""
        return pre_activations.relu()

    def penalty(self, out: SparseOutput, coefficient_scale: float = 1.0) -> torch.Tensor:
        """The variant's training terms beyond reconstruction (a sparsity penalty, Gated's auxiliary loss),
        summed over a token and averaged over the batch, in the SAE space's squared-error units (the
        trainer divides them by the batch's variance, as it does the squared error). `coefficient_scale`:
        the warm-up's fraction of the coefficient. None but for penalised variants."""
        return out.reconstruction.new_zeros(())

    @torch.no_grad()
    def calibrate(self, sample: torch.Tensor) -> None:
        """Set what selects latents from a sample of the data `[n, d_in]` before training (the trainer calls
        it once, after the input scale and b_dec are set): GBA's biases, JumpReLU's thresholds for a target L0.
        Nothing for the others."""

    def latent_groups(self) -> torch.Tensor | None:
        """[d_sae] long: the group of each latent, for a variant that trains its latents in groups (GBA's
        frequency groups), so that comparisons can report per group; None for the others."""
        return None

    def logged_metrics(self) -> dict[str, float]:
        """What a variant logs beside the losses, read when the trainer logs (GBA: each group's frequency)."""
        return {}

    def selected_(self, indices: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Called with the kept pairs after a sparse selection ([batch, k'] each; `valid`: see `SparseOutput`):
        BatchTopK moves its threshold, GBA counts firings."""

    def sparse_forward(
        self,
        x: torch.Tensor,
        gradient: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        k_aux: int = 0,
        tile: int | None = None,
        matmul_dtype: torch.dtype | None = None,
    ) -> SparseOutput:
        """`forward` through the sparse kernels, plus AuxK's selection when `dead` [d_sae] bool is given.

        AuxK (Gao et al. 2024): the `k_aux` dead latents with the largest u per token, decoded without
        b_dec, so that the trainer can ask them to explain the main reconstruction's residual. With no
        latent dead that decoding is zero (the host never asks the device whether any is: it would wait).
        """
        rules = [self.selection_rule(x, gradient)]
        if dead is not None and k_aux > 0:
            rules.append(RowTopK(min(k_aux, self.cfg.d_sae), allowed=dead))
        norm = self.token_norm(x)
        inputs = norm.into(x)
        encoded = sparse_encode(
            inputs,
            self.W_enc,
            self.b_enc,
            self.input_bias(),
            rules,
            tile,
            matmul_dtype,
            self.tile_observer(),
            self.workspace,
        )
        indices, pre, valid = encoded.indices[0], encoded.values[0], encoded.valid[0]
        values = self.kept_values(indices, pre, valid)
        self.selected_(indices, values.detach(), valid)
        decoded = sparse_decode(indices, values, self.W_dec) + self.b_dec
        skip = self.skip(x, norm)
        out_norm = self.output_norm(norm)
        reconstruction = out_norm.out_of(decoded if skip is None else decoded + skip)
        aux = None
        if len(rules) > 1:
            aux = out_norm.direction(sparse_decode(encoded.indices[1], encoded.values[1].relu(), self.W_dec))
        return SparseOutput(reconstruction, indices, values, aux, pre, valid, inputs.detach())

    # --- what a variant declares about its config and its runs (defaults: a plain TopK-like SAE) ---

    def option(self, name: str) -> float:
        """One of the variant's own settings (`option_defaults`): the config's `options`, else its default."""
        return self.cfg.options.get(name, self.option_defaults[name])

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Checks of the variant's own keys beyond `SAEConfig.validate`'s (raise `ConfigError`)."""

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        """What sets its sparsity, in a label (`topk-4608-k32`): k32 unless the variant says otherwise."""
        return f"k{cfg.k}"

    @classmethod
    def sparsity_in_words(cls, cfg: SAEConfig) -> str:
        """The same for people (the dashboard's runs table): `k 32` unless the variant says otherwise."""
        return f"k {cfg.k}"

    @classmethod
    def selects_with_gradient(cls, cfg: SAEConfig) -> bool:
        """Whether its choice of latents reads the loss gradient (evaluation then gives it one)."""
        return False

    @classmethod
    def config_notice(cls, cfg: SAEConfig) -> str | None:
        """A line `saelab train` prints about this config before training (GBA: its target ladder)."""
        return None

    @classmethod
    def upgrade_saved_config(cls, fields: dict[str, Any]) -> None:
        """Fill in, in place, what an SAE saved by an older saelab left unset and then meant otherwise."""

    @classmethod
    def keep_saved_form(cls, saved: SAEConfig, cfg: SAEConfig) -> None:
        """On resume: carry over from the run's saved config what `cfg` leaves unset but meant otherwise then."""

    @classmethod
    def saved_as(cls, cfg: SAEConfig) -> str:
        """The SAELens architecture this SAE is saved as (`saelens_architecture`, unless its config decides)."""
        return cls.saelens_architecture

    @classmethod
    def note(cls, cfg: SAEConfig) -> str:
        """What the saved folder's metadata says about reading it in SAELens."""
        return cls.saelens_note

    def form(self) -> str | None:
        """Its trained form in words, for `saelab train`'s closing lines (GBA: tied or not); None: nothing to say."""
        return None

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        """Add to or change, in place, the float64 tensors SAELens reads (W_enc, W_dec, b_enc, b_dec given,
        the scales folded in as `saelens_format` describes), under saelab's names."""

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        """Undo `to_saelens_`: copy the saved tensors (float64, saelab's names) into this SAE; W_dec, b_enc
        and b_dec are copied already."""
        self.W_enc.copy_(tensors["W_enc"] / fold_in)

    def use_data_parallel(self, parallel: DataParallel) -> None:
        """Told once that this SAE trains data-parallel (GBA sums its window statistics over ranks)."""

    def synchronize_(self, parallel: DataParallel) -> None:
        """After each data-parallel step: make state that every rank updated from its own slice agree."""

    def after_step(self) -> None:
        """After each optimiser step (GBA adapts the biases of the groups whose window is full)."""

    @torch.no_grad()
    def constrain_(self) -> None:
        """Restore the variant's constraints after an optimiser step: unit decoder rows where it keeps them."""
        if self.unit_norm_decoder:
            self.normalize_decoder_()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Give every decoder row unit norm (in the normalised space)."""
        normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_decoder_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row, which renormalisation would undo (a variant
        whose decoder rows are free keeps its whole gradient)."""
        if self.W_dec.grad is None or not self.unit_norm_decoder:
            return
        remove_parallel_(self.W_dec.grad, self.W_dec)  # g ← g − (g·w / ‖w‖²) w
