"""Model backends: what loads the tokenizer (the CPU tokenise stage) and the model (the
featurizer actors) of a ``FeaturizeConfig``, by ``FeaturizeConfig.backend``."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.featurize.model_ref import ModelRef, resolve_model


class HFBackend:
    """The default model backend: transformers' Auto classes on the model's local directory.
    Another backend (vLLM, or random weights built from a config for benchmarks) returns the
    same things from ``load`` and, to be used behind the CPU tokenise stage, ``load_tokenizer``."""

    def load_tokenizer(self, model_ref: ModelRef):
        """(tokenizer, model config): what the tokenise stage needs, without the weights."""
        path = model_ref.tokenizer_path()  # fetched (without weights) or converted once per node
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)

    def load(self, model_ref: ModelRef, *, device, dtype, with_head: bool):
        """(tokenizer, base model (its ``last_hidden_state`` is the pre-logit state), LM head
        or None, model config); the base model in eval mode on ``device``."""
        tokenizer, model_config = self.load_tokenizer(model_ref)
        path = model_ref.local_path()
        head = None
        if with_head:  # load the causal LM, keep both parts
            causal = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
            model, head = causal.base_model, causal.get_output_embeddings()
        else:
            model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        return tokenizer, model, head, model_config


# The model backends by ``FeaturizeConfig.backend``: classes whose instances have
# ``HFBackend.load``'s signature (and ``load_tokenizer``'s, to run behind the tokenise stage).
# Register another where the featurizer's workers import it.
BACKENDS = {"hf": HFBackend}


def model_ref_of(config: FeaturizeConfig) -> ModelRef:
    """The config's model as a ``ModelRef`` (resolved here when given as a name or path)."""
    return config.model if isinstance(config.model, ModelRef) else resolve_model(config.model)


def backend_of(config: FeaturizeConfig):
    """An instance of the backend ``config.backend`` names."""
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown model backend {config.backend!r}; registered: {', '.join(BACKENDS)}")
    return BACKENDS[config.backend]()
