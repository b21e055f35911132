"""DeeBERT: a BERT/RoBERTa encoder with an off-ramp after every layer, and early-exit inference.

Reads top to bottom like the paper: embeddings → layer i → off-ramp i → exit? The last off-ramp is the
final classifier. Layers are numbered 1..n in everything this module returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertModel, PreTrainedModel, RobertaModel
from transformers.masking_utils import create_bidirectional_mask

from model import exit_rule
from model.config import DeeBertConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BACKBONES: dict[str, type[PreTrainedModel]] = {"bert": BertModel, "roberta": RobertaModel}


class OffRamp(nn.Module):
    """Pooling of a layer's output, then dense + tanh, dropout, linear (the paper's off-ramp)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, pooling: str) -> None:
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(hidden_size, hidden_size)
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
            features = torch.tanh(F.linear(pooled, self.dense.weight, self.dense.bias))
            features = F.dropout(features, self.dropout.p, self.training)
            return F.linear(features, self.classifier.weight, self.classifier.bias)
        weights = self._inference_weights()
        features = torch.addmm(weights.dense_bias, pooled, weights.dense).tanh_()
        return torch.addmm(weights.classifier_bias, features, weights.classifier)

    def _inference_weights(self) -> _InferenceWeights:
        """Both weights transposed into their own contiguous [in, out] tensors, rebuilt whenever a weight
        changes (its storage, version counter, dtype or device: an optimizer step, load_state_dict, `.to`).

        At batch 1 the off-ramp is a matrix-vector product bound by reading the dense weight, which each
        encoder layer has just pushed out of cache; x @ W read this way took 40 µs against 56 µs for
        `F.linear`'s x @ Wᵀ on the 2-core CPU here (384×384, fp32; `python -m loadtest.off_ramp_profile`).
        Measured in the exit loop at batch 1 (same run, interleaved; entropy and exit decision then still
        tensor operations), an off-ramp cost 90 µs this way against 99 µs through the submodules.
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
class LayerExits:
    """The rows that left the batch at one layer (1-based), with their answers."""

    layer: int
    rows: list[int]
    labels: list[int]
    entropies: list[float]
    probabilities: torch.Tensor
    rows_run: int


@dataclass
class ExitResult:
    """Per-row early-exit answers for a whole batch, in input order."""

    exit_layer: list[int]
    entropy: list[float]
    label: list[int]
    probabilities: torch.Tensor
    rows_per_layer: list[int] = field(default_factory=list)

    @property
    def layers_executed(self) -> int:
        """Row-layers actually computed (what compaction saves)."""
        return sum(self.rows_per_layer)


@dataclass
class _Running:
    """State of the rows still going through the encoder (compacted as rows leave)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor | None
    pool_weights: torch.Tensor
    rows: torch.Tensor
    thresholds: torch.Tensor
    done: torch.Tensor
    criterion_state: exit_rule.State


def _only(thresholds: Sequence[float] | torch.Tensor) -> float:
    """The threshold of a batch of one row."""
    values = thresholds.reshape(-1).tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
    if len(values) != 1:
        raise ValueError(f"a batch of 1 row needs 1 threshold, got {len(values)}")
    return float(values[0])


class DeeBert(nn.Module):
    """Encoder + one off-ramp per layer; `forward` trains, `iter_exits`/`infer` serve."""

    backbone: Any  # a transformers BertModel / RobertaModel (their submodules are untyped)
    off_ramps: nn.ModuleList

    def __init__(self, config: DeeBertConfig) -> None:
        super().__init__()
        self.config = config
        backbone_class = BACKBONES[config.backbone["model_type"]]
        self.backbone = backbone_class(config.backbone_config(), add_pooling_layer=False)
        self.off_ramps = nn.ModuleList(
            OffRamp(config.hidden_size, config.num_labels, config.off_ramp_dropout, config.pooling)
            for _ in range(config.num_layers)
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.backbone.encoder.layer)

    @property
    def final_classifier(self) -> OffRamp:
        return cast(OffRamp, self.off_ramps[-1])

    # --- building blocks -------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return cast(torch.Tensor, self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids))

    def attention_bias(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The mask the backbone itself builds (sdpa: bool, or None when nothing is padded)."""
        return create_bidirectional_mask(  # type: ignore[return-value]
            config=self.backbone.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

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
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.attention_bias(hidden, attention_mask)
        pool_weights = self.pool_weights(attention_mask, hidden.dtype)
        logits = []
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask)
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
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.attention_bias(hidden, attention_mask)
        pool_weights = self.pool_weights(attention_mask, hidden.dtype)
        pooled = []
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask)
            pooled.append(cast(OffRamp, self.off_ramps[index]).pool(hidden, pool_weights))
        return torch.stack(pooled)

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

    @torch.inference_mode()
    def iter_exits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> Iterator[LayerExits]:
        """Run layer by layer and yield the rows that leave at each layer, as soon as they leave.

        Each row has its own threshold of the exit criterion (default: the checkpoint's, DeeBERT's entropy).
        With `compact`, rows that left are removed from the batch, so later layers run only on the rows still
        going; without it they stay in the batch (masked) until every row has left, which is what a batch
        costs without compaction. Inputs must be right-padded, as `model.tokenization` pads them. Yields only
        layers where rows leave. A batch of one row takes `_exit_one`, the same computation with the exit
        decision on Python numbers.
        """
        rule = criterion or self.config.criterion
        batch_size = input_ids.shape[0]
        if batch_size == 1:
            yield self._exit_one(input_ids, attention_mask, token_type_ids, _only(thresholds), rule)
            return
        device = input_ids.device
        thresholds_t = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(batch_size)
        # One host sync up front decides whether any row can leave early at all: with every threshold at
        # full depth the intermediate off-ramps cannot change an answer and are skipped (plain cost).
        may_exit_early = rule.can_exit_early(thresholds_t, self.num_layers)
        hidden = self.embed(input_ids, token_type_ids)
        state = _Running(
            hidden=hidden,
            attention_mask=attention_mask,
            mask=self.attention_bias(hidden, attention_mask),
            pool_weights=self.pool_weights(attention_mask, hidden.dtype),
            rows=torch.arange(batch_size, device=device),
            thresholds=thresholds_t,
            done=torch.zeros(batch_size, dtype=torch.bool, device=device),
            criterion_state=None,
        )
        last = self.num_layers
        off_ramps = list(self.off_ramps)  # indexing a ModuleList costs a microsecond per layer
        for layer_number, layer in enumerate(self.layers, start=1):
            rows_run = state.hidden.shape[0]
            state.hidden = layer(state.hidden, state.mask)
            if layer_number < last and not may_exit_early:
                continue
            logits = off_ramps[layer_number - 1](state.hidden, state.pool_weights)
            probabilities, entropy = exit_rule.entropy_from_logits(logits)
            if layer_number == last:
                leaving = ~state.done
            else:
                leaving, state.criterion_state = rule.step(
                    probabilities, entropy, state.thresholds, state.criterion_state
                )
                if not compact:
                    leaving &= ~state.done
            # The one host sync per layer: which rows leave decides what runs next.
            leaving_index = leaving.nonzero().squeeze(1)
            num_leaving = leaving_index.numel()
            if num_leaving == 0:
                continue
            yield LayerExits(
                layer=layer_number,
                rows=state.rows[leaving_index].tolist(),
                labels=probabilities[leaving_index].argmax(dim=-1).tolist(),
                entropies=entropy[leaving_index].tolist(),
                probabilities=probabilities[leaving_index],
                rows_run=rows_run,
            )
            if compact:
                if num_leaving == rows_run:
                    return
                state = self._compact(state, ~leaving)
                # The rows left may all be full-depth ones: then their off-ramps cannot change an answer.
                may_exit_early = rule.can_exit_early(state.thresholds, self.num_layers)
            else:
                state.done |= leaving
                if bool(state.done.all()):
                    return

    def _exit_one(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        threshold: float,
        rule: exit_rule.ExitCriterion,
    ) -> LayerExits:
        """Where a batch of one row leaves, and its answer: the same layers and off-ramps as `iter_exits`, then
        the softmax, entropy and exit decision on the off-ramp's few logits as Python numbers
        (`exit_rule.entropy_of`, `rule.leaves`).

        At batch 1 the tensor version of those steps (log-softmax, exp, product, sum, comparison, nonzero,
        gathers, and the bookkeeping of which rows remain) is dozens of operator dispatches for a handful of
        numbers; reading the logits once (the host sync the decision needs anyway) and deciding in Python
        leaves the off-ramp's pooling and two matrix products as its cost.
        """
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.attention_bias(hidden, attention_mask)
        pool_weights = self.pool_weights(attention_mask, hidden.dtype)
        may_exit_early = not rule.never_exits_early_at(threshold, self.num_layers)
        last = self.num_layers
        off_ramps = [cast(OffRamp, ramp) for ramp in self.off_ramps]
        state: exit_rule.RowState = None
        for layer_number, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, mask)
            if layer_number < last and not may_exit_early:
                continue
            ramp = off_ramps[layer_number - 1]
            logits = ramp.classify(ramp.pool(hidden, pool_weights)).tolist()[0]
            probabilities, entropy = exit_rule.entropy_of(logits)
            if layer_number < last:
                leaving, state = rule.leaves(probabilities, entropy, threshold, state)
                if not leaving:
                    continue
            return LayerExits(
                layer=layer_number,
                rows=[0],
                labels=[exit_rule.argmax(probabilities)],
                entropies=[entropy],
                probabilities=torch.tensor([probabilities]),
                rows_run=1,
            )
        raise ValueError("a DeeBERT model needs at least one layer")

    def _compact(self, state: _Running, keep: torch.Tensor) -> _Running:
        """Drop the rows that left, and trailing padding no remaining row needs."""
        keep_index = keep.nonzero().squeeze(1)
        attention_mask = state.attention_mask[keep_index]
        longest = int(attention_mask.sum(dim=1).max())
        attention_mask = attention_mask[:, :longest]
        hidden = state.hidden[keep_index, :longest]
        criterion_state = state.criterion_state
        return _Running(
            hidden=hidden,
            attention_mask=attention_mask,
            mask=self.attention_bias(hidden, attention_mask),
            pool_weights=self.pool_weights(attention_mask, hidden.dtype),
            rows=state.rows[keep_index],
            thresholds=state.thresholds[keep_index],
            done=state.done[keep_index],
            criterion_state=None if criterion_state is None else criterion_state[..., keep_index],
        )

    def infer(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> ExitResult:
        """Early-exit answers for the whole batch (collects `iter_exits`)."""
        batch_size = input_ids.shape[0]
        if batch_size == 1:
            with torch.inference_mode():
                one = self._exit_one(
                    input_ids, attention_mask, token_type_ids, _only(thresholds), criterion or self.config.criterion
                )
            return ExitResult([one.layer], one.entropies, one.labels, one.probabilities, [1] * one.layer)
        exit_layer = [0] * batch_size
        entropy = [0.0] * batch_size
        label = [0] * batch_size
        probabilities = torch.zeros(batch_size, self.config.num_labels)
        rows_per_layer: list[int] = []
        for exits in self.iter_exits(input_ids, attention_mask, token_type_ids, thresholds, compact, criterion):
            rows_per_layer.extend([exits.rows_run] * (exits.layer - len(rows_per_layer)))
            for position, row in enumerate(exits.rows):
                exit_layer[row] = exits.layer
                entropy[row] = exits.entropies[position]
                label[row] = exits.labels[position]
            probabilities[exits.rows] = exits.probabilities.float().cpu()
        return ExitResult(exit_layer, entropy, label, probabilities, rows_per_layer)

    # --- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: torch.dtype = torch.float32, **fresh_settings: Any) -> DeeBert:
        """Load a DeeBERT checkpoint directory, or start fresh off-ramps on a plain BERT/RoBERTa one."""
        from model.checkpoint import load_model

        return load_model(source, dtype, **fresh_settings)

    def save_pretrained(
        self,
        directory: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Write config.json, model.safetensors (optionally cast, e.g. fp16) and the tokenizer files."""
        from model.checkpoint import save_model

        save_model(self, Path(directory), tokenizer=tokenizer, dtype=dtype)
