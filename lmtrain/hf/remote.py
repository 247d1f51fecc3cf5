"""Any lmtrain model as a transformers model (`trust_remote_code=True`, lmtrain installed).

An export without a native family (adaptive span, ACT, kernelized, reversible, sparse, ...)
writes `configuration_lmtrain.py` and `modeling_lmtrain.py`, two lines each that import the
classes below, and names them in config.json's `auto_map`. The model is lmtrain's own
decoder, rebuilt from the training config kept in config.json (`lmtrain`), so transformers
computes exactly what lmtrain computes: `generate()`, scoring and lm-evaluation-harness work
for every model lmtrain trains.

Padding: rows may be right-padded (a causal model never reads the padding of later
positions); left padding would shift every position, so it is refused with the fix.
Generation re-reads the whole prefix at each step (no transformers cache).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmtrain.hf.export import MODEL_TYPE


class LmtrainConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, lmtrain: Optional[dict] = None, **kwargs):
        self.lmtrain = lmtrain or {}
        kwargs.setdefault("tie_word_embeddings", False)  # lmtrain ties inside its decoder; both tensors are stored
        super().__init__(**kwargs)

    def lmtrain_config(self):
        from lmtrain.config import from_dict

        if not self.lmtrain:
            raise ValueError("config.json has no 'lmtrain' section: not an lmtrain export")
        return from_dict(self.lmtrain)


def check_right_padding(attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is None or bool(attention_mask.all()):
        return
    m = attention_mask.to(torch.int64)
    if not torch.equal(m, m.cummin(dim=-1).values):
        raise ValueError("lmtrain models take right-padded batches only (left padding moves every position); "
                         "set tokenizer.padding_side='right' or pass one sequence at a time")


class LmtrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LmtrainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: LmtrainConfig):
        super().__init__(config)
        from lmtrain.model import build_model

        self.model = build_model(config.lmtrain_config())
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from the checkpoint. transformers builds the model on the meta
        device and gives non-persistent buffers (ALiBi's slopes) empty storage: recompute them."""
        reset = getattr(module, "reset_buffers", None)
        if callable(reset) and isinstance(module, torch.nn.Module) and module is not self:
            reset()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, **kwargs) -> CausalLMOutputWithPast:
        check_right_padding(attention_mask)
        logits = self.model(input_ids).logits_BLV
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

