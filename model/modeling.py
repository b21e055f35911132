"""DeeBERT: an encoder (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2/v3) with an off-ramp after every
layer, and early-exit inference.

Reads top to bottom like the paper: embeddings → layer i → off-ramp i → exit? The last off-ramp is the
final classifier. Layers are numbered 1..n in everything this module returns. Saving and loading a
checkpoint directory is `model.checkpoint`'s job (`save_model`, `load_model`): it builds on this module,
never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertModel,
    DebertaV2Model,
    DistilBertModel,
    ElectraModel,
    ModernBertModel,
    PreTrainedModel,
    RobertaModel,
    XLMRobertaModel,
)
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from model.config import DeeBertConfig
from model.device import dtype_name
from model.early_exit import EarlyExitModel, ExitResult, LayerExits, Tokens  # noqa: F401 (re-exported)

# Encoders whose layers the exit loop drives (embeddings → layer(hidden, mask) → ...), by transformers model_type.
BACKBONES: dict[str, type[PreTrainedModel]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "xlm-roberta": XLMRobertaModel,
    "electra": ElectraModel,
    "distilbert": DistilBertModel,
    "deberta-v2": DebertaV2Model,  # DeBERTa-v2 and v3 (v3 is a v2 config)
    "modernbert": ModernBertModel,
}
# Backbones without token type embeddings: their embeddings take the token ids alone.
WITHOUT_TOKEN_TYPES = frozenset({"distilbert", "modernbert"})
# Those built without a pooler (the off-ramps pool): the others have no pooler to leave out.
WITH_OPTIONAL_POOLER = frozenset({"bert", "roberta", "xlm-roberta"})
# Backbones whose layers read relative positions (DeBERTa's disentangled attention) and a [batch, 1, t, t] mask.
WITH_RELATIVE_POSITIONS = frozenset({"deberta-v2"})
# Backbones with rotary positions and two kinds of layers (global and sliding-window attention): ModernBERT. Its
# final norm (after the last layer) runs as part of layer n, which only the final off-ramp reads.
WITH_ROTARY_POSITIONS = frozenset({"modernbert"})


def build_backbone(model_type: str, config: Any) -> Any:
    """The encoder of `model_type` from its transformers config, without a pooler."""
    backbone_class = BACKBONES[model_type]
    if model_type in WITH_OPTIONAL_POOLER:
        return backbone_class(config, add_pooling_layer=False)
    return backbone_class(config)


class OffRamp(nn.Module):
    """Pooling of a layer's output, then dense + activation, dropout, linear: the paper's off-ramp (tanh), and
    the classification heads of BERT (pooler + classifier), RoBERTa / XLM-R (tanh), ELECTRA (gelu) and
    DistilBERT (relu) as they are, so a converted classifier's own head is its final off-ramp."""

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float,
        pooling: str,
        activation: str = "tanh",
        norm: tuple[float, bool] | None = None,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.activation = activation
        self._act = torch.tanh if activation == "tanh" else ACT2FN[activation]
        self.dense = nn.Linear(hidden_size, hidden_size)
        # ModernBERT's head: a LayerNorm (epsilon, bias or not) after the activation.
        self.norm = nn.LayerNorm(hidden_size, eps=norm[0], bias=norm[1]) if norm is not None else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        # The weights laid out [in, out] for inference (not parameters, not saved): see `_inference_weights`.
        self._inference: _InferenceWeights | None = None

    def pool(self, hidden: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] → [batch, hidden]: the first token, or the mean over real tokens.

        `pool_weights` ([batch, 1, tokens], see `DeeBert.pool_weights`) makes the masked mean one bmm.
        """
        if self.pooling == "first":
            return hidden[:, 0]
        return torch.bmm(pool_weights, hidden).squeeze(1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (stage 2 trains this on cached features).

        Training and gradient passes call the submodules' math (dense, tanh, dropout, linear). Gradient-free
        evaluation passes — the evaluation sweep and the serving loop alike, so they compute the same numbers
        — run the same math as two fused bias + matrix products with a tanh in place between them, on the
        weights laid out [in, out] (`_inference_weights`); dropout is the identity there.
        """
        if self.training or torch.is_grad_enabled():
            features = self._act(F.linear(pooled, self.dense.weight, self.dense.bias))
            if self.norm is not None:
                features = self.norm(features)
            features = F.dropout(features, self.dropout.p, self.training)
            return F.linear(features, self.classifier.weight, self.classifier.bias)
        weights = self._inference_weights()
        features = torch.addmm(weights.dense_bias, pooled, weights.dense)
        features = features.tanh_() if self.activation == "tanh" else self._act(features)
        if self.norm is not None:
            features = self.norm(features)
        return torch.addmm(weights.classifier_bias, features, weights.classifier)

    def train(self, mode: bool = True) -> OffRamp:
        """Switching modes (`train()` before training, `eval()` after) drops the inference copy of the weights:
        a fused optimizer step updates them without bumping their version counters."""
        self._inference = None
        return super().train(mode)

    def _inference_weights(self) -> _InferenceWeights:
        """Both weights transposed into their own contiguous [in, out] tensors, rebuilt whenever a weight
        changes (its storage, version counter, dtype or device: load_state_dict, `.to`, an unfused optimizer
        step; a fused one bumps no counter, hence `train`).

        Why: at batch 1 the off-ramp is a matrix-vector product bound by reading the dense weight, and x @ W
        reads it faster than `F.linear`'s x @ Wᵀ (`python -m benchmarks.off_ramp_profile` measures both).
        """
        dense, classifier = self.dense.weight, self.classifier.weight
        key = (dense.data_ptr(), dense._version, classifier.data_ptr(), classifier._version, dense.dtype, dense.device)
        cached = self._inference
        if cached is None or cached.key != key:
            cached = self._inference = _InferenceWeights(
                key=key,
                dense=dense.detach().t().contiguous(),
                dense_bias=self.dense.bias,
                classifier=classifier.detach().t().contiguous(),
                classifier_bias=self.classifier.bias,
            )
        return cached

    def forward(self, hidden: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(hidden, pool_weights))


@dataclass
class _InferenceWeights:
    """An off-ramp's weights laid out for gradient-free passes, and the state of the weights they copy."""

    key: tuple[int, int, int, int, torch.dtype, torch.device]
    dense: torch.Tensor  # [hidden, hidden], x @ dense
    dense_bias: torch.Tensor
    classifier: torch.Tensor  # [hidden, labels]
    classifier_bias: torch.Tensor


@dataclass
class LayerInputs:
    """What every layer of a batch reads besides the hidden states, built once per batch (and again after
    compaction): the attention mask in the form the backbone's layers take; for DeBERTa, also its relative
    positions, its (normalised) relative position embeddings, and the token mask its convolution after
    layer 1 reads."""

    mask: torch.Tensor | None
    relative_positions: torch.Tensor | None = None
    relative_embeddings: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    # ModernBERT: the mask and the rotary (cos, sin) of each kind of layer ("full_attention", "sliding_attention").
    masks_by_type: dict[str, torch.Tensor | None] | None = None
    rotary_by_type: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class _TorchState:
    """The rows still going through the encoder (compacted as rows leave)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    inputs: LayerInputs
    pool_weights: torch.Tensor


class _TorchSteps:
    """`early_exit.ExitSteps` on a PyTorch DeeBert: its embeddings, layers and off-ramps."""

    borrows_outputs = False

    def __init__(self, model: DeeBert) -> None:
        self.model = model
        self.layers = list(model.layers)  # indexing a ModuleList costs a microsecond per layer
        self.off_ramps = [cast(OffRamp, ramp) for ramp in model.off_ramps]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def start(self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None) -> _TorchState:
        ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
        types = None if token_type_ids is None else self._tensor(token_type_ids)
        return self._state(self.model.embed(ids, types, mask), mask)

    def _tensor(self, tokens: Tokens) -> torch.Tensor:
        """Token ids, mask or types as a tensor on the model's device: a lone row's numpy arrays
        (`EarlyExitModel.exit_lone_row`) are taken without a copy on the CPU; a batch's tensors are already there."""
        return tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(tokens).to(self.model.device)

    def _state(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> _TorchState:
        """The rows' hidden states with the layer inputs and pooling weights their mask implies."""
        return _TorchState(
            hidden=hidden,
            attention_mask=attention_mask,
            inputs=self.model.layer_inputs(hidden, attention_mask),
            pool_weights=self.model.pool_weights(attention_mask, hidden.dtype),
        )

    def run_layer(self, state: _TorchState, layer_number: int) -> _TorchState:
        if self.model.own_layer_calls:
            state.hidden = self.model.run_layer(layer_number, state.hidden, state.inputs)
        else:  # the common case without the call: a microsecond per layer at batch 1
            state.hidden = self.layers[layer_number - 1](state.hidden, state.inputs.mask)
        return state

    def off_ramp_logits(self, state: _TorchState, layer_number: int) -> torch.Tensor:
        ramp = self.off_ramps[layer_number - 1]
        return ramp.classify(ramp.pool(state.hidden, state.pool_weights))

    def full_depth_logits(self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None) -> None:
        """None: layer by layer without the intermediate off-ramps is already a plain forward here (it skips
        only `BertModel.forward`'s work around the layers)."""
        return None

    def keep_rows(self, state: _TorchState, keep_index: torch.Tensor) -> _TorchState:
        attention_mask = state.attention_mask[keep_index]
        longest = int(attention_mask.sum(dim=1).max())
        return self._state(state.hidden[keep_index, :longest], attention_mask[:, :longest])

    def join(self, parts: Sequence[tuple[_TorchState, torch.Tensor]]) -> _TorchState:
        masks = [state.attention_mask[index] for state, index in parts]
        tokens = max(int(mask.sum(dim=1).max()) for mask in masks)
        hidden, mask_parts = [], []
        for (state, index), mask in zip(parts, masks, strict=True):
            extra = max(0, tokens - mask.shape[1])
            hidden.append(F.pad(state.hidden[index, :tokens], (0, 0, 0, extra)))
            mask_parts.append(F.pad(mask[:, :tokens], (0, extra)))
        return self._state(torch.cat(hidden), torch.cat(mask_parts))


class DeeBert(nn.Module, EarlyExitModel):
    """Encoder + one off-ramp per layer; `forward` trains, `iter_exits`/`infer` serve (`model.checkpoint` saves
    and loads it)."""

    backbone: Any  # a transformers BertModel / RobertaModel (their submodules are untyped)
    off_ramps: nn.ModuleList

    def __init__(self, config: DeeBertConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone["model_type"], config.backbone_config())
        self.relative_positions = config.backbone["model_type"] in WITH_RELATIVE_POSITIONS
        self.rotary_positions = config.backbone["model_type"] in WITH_ROTARY_POSITIONS
        # Layers called with inputs of their own (not `layer(hidden, mask)`): see `run_layer`.
        self.own_layer_calls = self.relative_positions or self.rotary_positions
        self.off_ramps = nn.ModuleList(
            OffRamp(
                config.hidden_size,
                config.num_labels,
                config.off_ramp_dropout,
                config.pooling_of(layer),
                config.final_activation if layer == config.num_layers else "tanh",
                (config.final_norm_eps, config.final_norm_bias)
                if layer == config.num_layers and config.final_norm_eps is not None
                else None,
            )
            for layer in range(1, config.num_layers + 1)
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def layers(self) -> nn.ModuleList:
        # DistilBERT keeps its layers in `transformer`, ModernBERT in `layers`, the others in `encoder`.
        if self.rotary_positions:
            return cast(nn.ModuleList, self.backbone.layers)
        stack = self.backbone.transformer if hasattr(self.backbone, "transformer") else self.backbone.encoder
        return cast(nn.ModuleList, stack.layer)

    @property
    def final_classifier(self) -> OffRamp:
        return cast(OffRamp, self.off_ramps[-1])

    # --- building blocks -------------------------------------------------------------------------

    def embed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The embeddings layer's output: layer 1's input."""
        if self.config.backbone["model_type"] in WITHOUT_TOKEN_TYPES:
            return cast(torch.Tensor, self.backbone.embeddings(input_ids))
        if self.relative_positions:  # DeBERTa zeroes the padding's embeddings
            embeddings = self.backbone.embeddings(
                input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask
            )
            return cast(torch.Tensor, embeddings)
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        project = getattr(self.backbone, "embeddings_project", None)  # ELECTRA: embedding size → hidden size
        return cast(torch.Tensor, project(hidden) if project is not None else hidden)

    def layer_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, additive: bool = False) -> LayerInputs:
        """What the layers read besides the hidden states, as the backbone itself builds it: the sdpa mask
        (bool, or None when nothing is padded); for DeBERTa its [batch, 1, t, t] mask, relative positions and
        relative embeddings; for ModernBERT a mask and rotary positions per kind of layer: computed here once
        for every layer. `additive`: ModernBERT's masks as additive float masks (the ONNX export's attention)."""
        if self.rotary_positions:
            return self._rotary_inputs(hidden, attention_mask, additive)
        if self.relative_positions:
            encoder = self.backbone.encoder
            return LayerInputs(
                mask=encoder.get_attention_mask(attention_mask),
                relative_positions=encoder.get_rel_pos(hidden),
                relative_embeddings=encoder.get_rel_embedding(),
                token_mask=attention_mask,
            )
        mask = create_bidirectional_mask(
            config=self.backbone.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return LayerInputs(mask=cast(torch.Tensor | None, mask))

    def _rotary_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, additive: bool) -> LayerInputs:
        config = self.backbone.config
        if additive:
            length = hidden.shape[1]
            padding = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
            positions = torch.arange(length, device=hidden.device)
            outside = (positions[:, None] - positions[None, :]).abs() > config.sliding_window
            masks: dict[str, torch.Tensor | None] = {
                "full_attention": padding,
                "sliding_attention": padding + outside.to(hidden.dtype) * -10000.0,
            }
        else:
            kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": attention_mask}
            masks = {
                "full_attention": create_bidirectional_mask(**kwargs),
                "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs),
            }
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {kind: self.backbone.rotary_emb(hidden, position_ids, kind) for kind in set(config.layer_types)}
        return LayerInputs(mask=None, masks_by_type=masks, rotary_by_type=rotary)

    def run_layer(self, layer_number: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Layer `layer_number` (1..n) on `hidden`."""
        layer = self.layers[layer_number - 1]
        if not self.own_layer_calls:
            return cast(torch.Tensor, layer(hidden, inputs.mask))
        if self.rotary_positions:
            assert inputs.masks_by_type is not None and inputs.rotary_by_type is not None
            kind = str(layer.attention_type)
            output = layer(
                hidden, attention_mask=inputs.masks_by_type[kind], position_embeddings=inputs.rotary_by_type[kind]
            )
            if layer_number == self.num_layers:  # the backbone's final norm: only the final off-ramp reads it
                output = self.backbone.final_norm(output)
            return cast(torch.Tensor, output)
        output = layer(
            hidden,
            inputs.mask,
            relative_pos=inputs.relative_positions,
            rel_embeddings=inputs.relative_embeddings,
        )[0]
        convolution = self.backbone.encoder.conv  # DeBERTa-v2 (not v3): a convolution beside layer 1
        if layer_number == 1 and convolution is not None:
            output = convolution(hidden, output, inputs.token_mask)
        return cast(torch.Tensor, output)

    @staticmethod
    def pool_weights(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[batch, 1, tokens]: 1/count on real tokens, 0 on padding (mean pooling as one bmm)."""
        weights = attention_mask.unsqueeze(1).to(dtype)
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)

    # --- training --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        only_final: bool = False,
    ) -> torch.Tensor:
        """Logits of every off-ramp, [layers, batch, labels] (or [1, batch, labels] with `only_final`)."""
        logits = []
        for index, (hidden, pool_weights) in enumerate(self.layer_outputs(input_ids, attention_mask, token_type_ids)):
            if not only_final or index == self.num_layers - 1:
                logits.append(self.off_ramps[index](hidden, pool_weights))
        return torch.stack(logits)

    def pooled_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each layer's pooled output, [layers, batch, hidden]: the off-ramps' inputs (stage-2 cache)."""
        outputs = self.layer_outputs(input_ids, attention_mask, token_type_ids)
        ramps = [cast(OffRamp, ramp) for ramp in self.off_ramps]
        return torch.stack([ramp.pool(hidden, weights) for ramp, (hidden, weights) in zip(ramps, outputs, strict=True)])

    def layer_outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each encoder layer's output in turn, with the batch's mean-pooling weights: the embed → mask →
        layer loop of training and feature caching, written once (serving steps through `_TorchSteps`)."""
        hidden = self.embed(input_ids, token_type_ids, attention_mask)
        inputs = self.layer_inputs(hidden, attention_mask)
        pool_weights = self.pool_weights(attention_mask, hidden.dtype)
        for number in range(1, self.num_layers + 1):
            hidden = self.run_layer(number, hidden, inputs)
            yield hidden, pool_weights

    def plain_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A plain transformers full forward plus the final classifier: the baseline that exits cost against."""
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pool_weights = self.pool_weights(attention_mask, output.last_hidden_state.dtype)
        return cast(torch.Tensor, self.final_classifier(output.last_hidden_state, pool_weights))

    # --- early-exit inference --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the weights live (the inputs of `iter_exits` / `infer` go there too)."""
        return next(self.parameters()).device

    @property
    def backend(self) -> str:
        return "torch"

    @property
    def precision(self) -> str:
        """The compute dtype's name, e.g. `float32`."""
        return dtype_name(next(self.parameters()).dtype)

    @torch.inference_mode()
    def all_off_ramp_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Every off-ramp's logits, [layers, batch, labels], without gradients (evaluation sweeps)."""
        return self(input_ids, attention_mask, token_type_ids)

    def exit_steps(self) -> _TorchSteps:
        return _TorchSteps(self)
