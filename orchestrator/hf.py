"""Hugging Face ``transformers`` language models (``hf:NAME``): token ids in, the model's own loss out.

``NAME`` is an architecture of ``ARCHITECTURES`` (shapes copied from each model's
published ``config.json``), a local ``config.json`` (or a folder holding one), or a
hub id already in the local Hugging Face cache (nothing is downloaded). Models are
built with random weights: on the ``meta`` device for the simulator (an 8B model
costs no host memory), and directly on the device for a real run (``Built.real``).

One step feeds ``seq_len`` token ids per sample (padded to ``seq_len``: the worst
batch) with labels, and the loss is the model's own: causal LMs shift the labels and
take cross-entropy over the logits upcast to fp32 (``batch x seq_len x vocab``, alive
with the half-precision logits under autocast); encoders (``task = "classify"``)
classify the sequence into ``classes`` labels (default 2). ``use_cache`` is off.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import attention
from .errors import SpecError
from .models import Built
from .spec import Workload

ARCHITECTURES: dict[str, dict] = {
    # causal LMs: model_type, then the config.json fields that set the shapes
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True},
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "phi-3-mini": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                   "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # encoders, trained to classify sequences
    "bert-base": {"model_type": "bert", "task": "classify", "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
                  "max_position_embeddings": 512},
    "bert-large": {"model_type": "bert", "task": "classify", "hidden_size": 1024, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "intermediate_size": 4096, "vocab_size": 30522,
                   "max_position_embeddings": 512},
}
"""Named architectures: ``hf:gpt2`` (GPT-2 small, 124M), Llama 3.2 1B/3B and Llama 3.1 8B, Qwen2.5 0.5B/1.5B/7B,
Phi-3-mini (3.8B), BERT base/large. Only shapes: memory does not depend on the weights."""
ENCODER_TYPES = ("bert", "roberta", "deberta-v2", "distilbert", "electra", "modernbert")
"""Model types read from a config.json that train as sequence classifiers, not causal LMs."""


class _Step(nn.Module):
    """The model as the trainer calls it: ``model(input_ids=..., labels=..., use_cache=False).loss``."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if self.causal else {}
        return self.model(input_ids=input_ids, labels=labels, **extra).loss


def build(name: str, source: str, classes: int) -> Built:
    try:
        import transformers
    except ImportError as e:
        raise SpecError(f"model={source!r} needs transformers: pip install -e '.[hf]'") from e
    settings = _settings(name, source)
    for key in ("torch_dtype", "dtype"):  # the weights' dtype is the workload's precision, not the file's
        settings.pop(key, None)
    if not isinstance(settings.get("model_type"), str):
        raise SpecError(f"model={source!r}: its config has no model_type (e.g. \"llama\", \"gpt2\"); add it")
    task = settings.pop("task", None) or ("classify" if settings["model_type"] in ENCODER_TYPES else "causal")
    causal = task == "causal"
    if not causal:
        settings["num_labels"] = classes or 2
    settings.setdefault("loss_type", "ForCausalLM" if causal else "ForSequenceClassification")
    try:
        config = transformers.AutoConfig.for_model(**settings)
    except (KeyError, ValueError) as e:
        raise SpecError(f"model={source!r}: transformers cannot make a config of it ({e}); check model_type") from None
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification

    def make(device, dtype=None) -> nn.Module:
        with torch.device(device):
            model = auto.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
        model.config.use_cache = False
        return _Step(model, causal)

    try:
        module = make("meta")
    except ValueError as e:  # e.g. an encoder type with no causal-LM head
        raise SpecError(f"model={source!r}: {e}") from None
    vocab, positions = config.vocab_size, _positions(config)
    return Built(module, _own_loss, _tokens(vocab, causal), _fits(positions),
                 f"the model's own {'causal-LM' if causal else 'sequence-classification'} loss",
                 for_fake=_unpadded_masks, real=lambda device, w: make(device, _DTYPES.get(w.precision)),
                 configure=lambda m, w: _configure(m, w, source, causal))


FAKE_SDPA = "orchestrator_sdpa"
"""sdpa for fake traces: Hugging Face's own sdpa attention, with the mask a real run of our inputs gets."""


@functools.cache
def _register_fake_sdpa() -> None:
    """Fake tensors make transformers assume packed sequences (``is_tracing``) and build an explicit
    ``batch x 1 x seq x seq`` mask; on a card, our unpadded, unpacked inputs get none (causal LMs run
    ``is_causal``, encoders attend to every token) and grouped-query heads go to the kernel unrepeated.
    ``FAKE_SDPA`` is sdpa with that mask: none. Registered once per process."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(FAKE_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(FAKE_SDPA, lambda *args, **kwargs: None)


def _unpadded_masks(step: nn.Module) -> None:
    """``Built.for_fake``: a fake copy running sdpa attends as a real run of the same inputs does."""
    model = step.model.get_base_model() if hasattr(step.model, "get_base_model") else step.model
    if model.config._attn_implementation == "sdpa":
        _register_fake_sdpa()
        model.set_attn_implementation(FAKE_SDPA)


_DTYPES = {"bf16-pure": torch.bfloat16}
"""Precisions whose weights are built in a dtype (``Trainer`` with a model loaded in it, no autocast)."""


def _configure(step: "_Step", workload: Workload, source: str, causal: bool) -> "_Step":
    """The workload's weight dtype (``bf16-pure``), attention implementation, gradient checkpointing (non-reentrant, as Trainer's default
    ``gradient_checkpointing_kwargs`` leave it in recent releases) and LoRA adapters (peft, on ``lora_targets``,
    ``lora_alpha`` 2 x rank, no dropout: the base weights frozen)."""
    model = step.model
    dtype = _DTYPES.get(workload.precision)
    if dtype is not None and next(model.parameters()).dtype != dtype:  # meta: free; a real module is built in it
        model.to(dtype)
    if workload.attention != model.config._attn_implementation:
        model.set_attn_implementation(workload.attention)
    if workload.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": attention.checkpoint_contexts})  # recomputed as traced
    if workload.lora_rank:
        try:
            import peft
        except ImportError as e:
            raise SpecError(f"lora_rank={workload.lora_rank} needs peft: pip install -e '.[hf]'") from e
        targets = workload.lora_targets
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        config = peft.LoraConfig(r=workload.lora_rank, lora_alpha=2 * workload.lora_rank, lora_dropout=0.0,
                                 target_modules=targets, task_type="CAUSAL_LM" if causal else "SEQ_CLS")
        try:
            step.model = peft.get_peft_model(model, config)
        except ValueError as e:  # e.g. no module the targets match
            raise SpecError(f"lora_rank={workload.lora_rank}: peft cannot adapt {source} ({e}); use lora_rank 0") \
                from None
    return step


def _settings(name: str, source: str) -> dict:
    if name in ARCHITECTURES:
        return dict(ARCHITECTURES[name])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise SpecError(f"model={source!r}: {str(path)!r} does not exist; name a config.json, a folder with one, "
                            f"or one of {', '.join(ARCHITECTURES)}")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"model={source!r}: {str(path)!r} is not a JSON config ({e}); fix the file") from None
    return _cached_hub_config(name, source)


def _cached_hub_config(name: str, source: str) -> dict:
    """A hub id's config.json from the local Hugging Face cache (offline: nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    found = try_to_load_from_cache(name, "config.json") if try_to_load_from_cache and "/" in name else None
    if not isinstance(found, (str, os.PathLike)):
        raise SpecError(f"model={source!r} is not a named architecture ({', '.join(ARCHITECTURES)}), a config.json "
                        "or a hub id in the local Hugging Face cache; download its config.json first "
                        "(huggingface-cli download ID config.json) or name the file")
    return json.loads(Path(found).read_text())


def _positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokens(vocab: int, causal: bool):
    """``seq_len`` token ids per sample (every sample padded to ``seq_len``) and the labels: the ids themselves
    (causal LMs shift them inside the loss) or one class per sequence."""
    def make(workload: Workload, batch: int, device: torch.device, dtype: torch.dtype) -> tuple:
        ids = torch.randint(0, vocab, (batch, workload.seq_len), device=device)
        labels = ids if causal else torch.zeros(batch, dtype=torch.long, device=device)
        return ids, labels
    return make


def _fits(positions: int | None):
    def check(source: str, seq_len: int) -> None:
        if positions is not None and seq_len > positions:
            raise SpecError(f"seq_len={seq_len} is longer than {source}'s {positions} positions: use at most "
                            f"{positions}")
    return check


def _own_loss(outputs, workload: Workload, batch_size: int, surrogate: bool) -> torch.Tensor:
    return outputs  # _Step returns the model's own loss
