"""A PEFT model with its adapter off, as the KL's reference (unlearning's AdapterDisabledReference, CausalLMKLDiv's
reference="adapter") computes it at every call: PEFT's model.disable_adapter() walks every module of the model twice a
call (47,844 Python calls at Llama-3.2-1B with LoRA), where a toggle of its LoRA layers, found once, does the same."""
import contextlib


class AdapterOff:
    """AdapterOff(model)() -> a context in which the PEFT model `model` computes without its adapter, as in
    model.disable_adapter(): a toggle of its LoRA layers, found at the first call (the model may be wrapped or sharded
    before it) and again where its adapters changed since (an adapter added on other modules: its layers, left out,
    stayed on), where that is all disable_adapter does (lora_layers); PEFT's own where it does more (bias terms,
    modules_to_save copies, which it switches too), or where the layers are some enabled, some not (it warns, then
    enables them all)."""

    def __init__(self, model):
        self.model = model
        self._layers, self._found_for = None, None

    def __call__(self):
        adapters = [(name, id(config)) for name, config in getattr(self.model, "peft_config", {}).items()]
        if self._layers is None or adapters != self._found_for:
            self._layers, self._found_for = lora_layers(self.model) or (), adapters
        if not self._layers or len({layer.disable_adapters for layer in self._layers}) != 1:
            return self.model.disable_adapter()
        return _layers_off(self._layers)


def lora_layers(model):
    """The tuner layers of the PEFT model `model`, where its disable_adapter() does nothing but toggle them: LoRA
    adapters alone, without bias terms (PEFT warns about those) nor modules_to_save (wrappers it toggles too); else
    None."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return None
    configs = getattr(model, "peft_config", {}).values()
    if not configs or not all(isinstance(c, LoraConfig) and c.bias == "none" for c in configs):
        return None
    modules = list(model.modules())
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules):
        return None
    return [m for m in modules if isinstance(m, BaseTunerLayer)]   # the layers PEFT toggles


@contextlib.contextmanager
def _layers_off(layers):
    """What PeftModel.disable_adapter does to LoRA layers all enabled or all disabled: each one's
    enable_adapters(False) (which also stops its adapters' gradients), and enable_adapters(True) after where they
    were enabled."""
    enabled, disabled = not layers[0].disable_adapters, []
    try:
        for layer in layers:
            disabled.append(layer)   # first: one a Ctrl-C stopped half-way through the call is enabled again too
            layer.enable_adapters(False)
        yield
    finally:
        if enabled:   # those disabled so far, where a Ctrl-C stopped the loop (left off, they were frozen for good)
            for layer in disabled:
                layer.enable_adapters(True)
