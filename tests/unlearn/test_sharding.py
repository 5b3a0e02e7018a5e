"""check_flat_root_unit on its own: which FSDP settings cannot flatten a frozen lm_head beside trainable embeddings
(the two-process runs, in test_distributed.py, show the error raised on every process and the runs it lets train)."""
import pytest

from fastalign.unlearn.sharding import check_flat_root_unit
from tests.unlearn.tiny import tiny_llama

accelerate = pytest.importorskip("accelerate")


@pytest.mark.parametrize("version,use_orig_params,frozen,refused", [
    (1, False, ["lm_head"], True),
    (1, True, ["lm_head"], False),            # FSDP1 keeping the original parameters mixes them in a unit
    (2, False, ["lm_head"], False),           # FSDP2 shards each parameter on its own
    (1, False, [], False),                    # reference='copy': every weight trains, in one parameter
])
def test_a_frozen_lm_head_beside_trainable_embeddings_is_refused_only_where_fsdp1_flattens(version, use_orig_params,
                                                                                           frozen, refused):
    model = tiny_llama(37)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not any(part in name for part in frozen))
    plugin = accelerate.FullyShardedDataParallelPlugin(fsdp_version=version, use_orig_params=use_orig_params)
    if refused:
        with pytest.raises(ValueError, match="FSDP version 1 without use_orig_params .* frozen lm_head.weight .* "
                                             "set use_orig_params"):
            check_flat_root_unit(model, plugin)
    else:
        check_flat_root_unit(model, plugin)
    check_flat_root_unit(model, None)   # no FSDP at all
