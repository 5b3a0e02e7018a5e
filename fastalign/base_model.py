"""The transformers model under the wrappers a caller may pass (torch.compile's, PEFT's), read the same way by the fused
losses, unlearning, model_context, model_vocabulary, model_devices and the runtime's cache argument."""


def base_causal_lm(model):
    """The transformers model under torch.compile's wrapper (its _orig_mod, whose forward's source is the model's) and
    a PEFT wrapper, or the model itself."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
