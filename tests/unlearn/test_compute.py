"""The FLOP estimate of one objective step, term by term against compute.py's formula written out by hand
for the tiny Llama (hidden 32, 2 layers, 4 heads of 8, 2 KV heads, MLP 64)."""
import itertools

import pytest
import torch

from fastalign.unlearn.batching import collate
from fastalign.unlearn.compute import ComputeTotals, ModelShape, batch_compute, cache_compute
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams


def test_flop_estimate_follows_the_documented_formula():
    tokenizer = byte_bpe_tokenizer()
    shape = ModelShape.of(tiny_llama(len(tokenizer)))
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64          # q, o; k, v; gate, up, down
    assert (shape.decoder_params, shape.num_layers, shape.hidden_size, shape.vocab_size, shape.attention_width) == \
        (2 * per_layer, 2, 32, len(tokenizer), 32)
    batch = tiny_streams(tokenizer).batch(0)
    f, m = batch.num_forget, batch.num_mismatch
    lengths = batch.tokens.attention_mask.sum(1).tolist()
    normal_lengths = lengths[f + m:]
    assert len(set(lengths)) > 1 and max(normal_lengths) < max(lengths)   # the normal rows are narrower

    def forward(rows, width):
        return 2.0 * shape.decoder_params * rows * width + 4.0 * 2 * 32 * rows * width ** 2

    answers = int(batch.tokens.target_mask.sum())
    normal_answers = sum(e.num_answer_targets for e in batch.examples[f + m:])
    vh = 2.0 * shape.vocab_size * 32
    for decoder_trains, head_trains, checkpointing, reference_forward, in_forward in itertools.product([True, False],
                                                                                                       repeat=5):
        got = batch_compute(shape, batch, decoder_trains=decoder_trains, lm_head_trains=head_trains,
                            checkpointing=checkpointing, reference_forward=reference_forward,
                            grads_in_forward=in_forward)
        policy = forward(len(lengths), max(lengths)) * (1 + (2 if decoder_trains else 1) + checkpointing)
        # per answer token: forward, recomputed in the backward (not with grads_in_forward), hidden gradient
        # (+ weight gradient); per normal answer token: the reference logits, forward and recomputed (not ...)
        head = vh * ((4 if head_trains else 3) * answers + 2 * normal_answers)
        if in_forward:
            head -= vh * (answers + normal_answers)
        reference = forward(len(normal_lengths), max(normal_lengths)) if reference_forward else 0.0
        assert got.flops == pytest.approx(policy + head + reference, rel=1e-12)
        assert got.reference_tokens == (sum(normal_lengths) if reference_forward else 0)
        assert got.answer_tokens == answers and got.tokens == sum(lengths)
        assert got.padded_slots == len(lengths) * max(lengths) > sum(lengths)   # the padding costs, so it counts


def test_attention_width_is_the_decoders_when_the_head_projects_it_down():
    """OPT-350m's decoder is 1024 wide, its lm_head reads a 512-wide projection: the attention term counted the
    head's width, half the decoder's."""
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=1,
                                     num_attention_heads=4, ffn_dim=128, max_position_embeddings=64))
    shape = ModelShape.of(model)
    assert (shape.hidden_size, shape.attention_width) == (32, 64)


MOE_SHAPE = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)
ATTENTION = 2 * 32 * 32 + 2 * 16 * 32   # q, o; k, v
EXPERT = 3 * 32 * 64   # gate, up, down


def mixtral(num_experts, top_k, listed=False):
    """A Mixtral of MOE_SHAPE with experts of MLP width 64, stacked over the experts or held as a list of MLPs."""
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(**MOE_SHAPE, intermediate_size=64, num_local_experts=num_experts,
                                             num_experts_per_tok=top_k))
    if listed:
        for layer in model.model.layers:
            layer.mlp.experts = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(32, 128, bias=False), torch.nn.Linear(64, 32, bias=False))
                for _ in range(num_experts))
    return model


@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_a_mixture_of_experts_counts_the_experts_each_token_runs(layout):
    """Mixtral: a token runs num_experts_per_tok = 2 of 8 experts, so the estimate counts 2 experts' weights per
    layer, not 8 (3.3x its FLOPs); the router counts whole. Experts held as tensors stacked over the experts
    (transformers 5) or as a list of expert MLPs (earlier layouts, and models written so) count the same."""
    model = mixtral(8, 2, listed=layout == "list")
    assert ModelShape.of(model).decoder_params == 2 * (ATTENTION + 8 * 32 + 2 * EXPERT)


def test_shared_experts_count_whole_beside_the_routed_ones():
    """Qwen2-MoE: 2 of 6 routed experts (MLP width 48) per token, and a shared expert (width 40) with its gate,
    which every token runs."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**MOE_SHAPE, intermediate_size=64, moe_intermediate_size=48,
                                               shared_expert_intermediate_size=40, num_experts=6,
                                               num_experts_per_tok=2, decoder_sparse_step=1))
    per_layer = ATTENTION + 6 * 32 + 2 * (3 * 32 * 48) + 3 * 32 * 40 + 32
    assert ModelShape.of(model).decoder_params == 2 * per_layer


def test_the_cached_reference_is_counted_once_per_process_that_builds_it():
    """Every process builds the cache over the whole normal set: its tokens, FLOPs and device-seconds count once per
    process (test_distributed checks the tokens only)."""
    tokenizer = byte_bpe_tokenizer()
    shape = ModelShape.of(tiny_llama(len(tokenizer)))
    masks = [collate(tiny_streams(tokenizer).normal, 0).attention_mask, torch.ones(1, 3, dtype=torch.long)]
    one = cache_compute(shape, masks, seconds=2.0, num_processes=1)
    assert one.flops == pytest.approx(sum(shape.decoder_forward(mask) for mask in masks), rel=1e-12) and one.flops > 0
    assert one.reference_tokens == sum(int(mask.sum()) for mask in masks)
    three = cache_compute(shape, masks, seconds=2.0, num_processes=3)
    assert (three.flops, three.reference_tokens, three.device_seconds) == \
        (pytest.approx(3 * one.flops, rel=1e-12), 3 * one.reference_tokens, 6.0)


def test_a_packed_batch_is_counted_on_its_packed_rows():
    """A batch whose policy forward ran packed: the decoder's FLOPs and the slots are its packed rows' [P, W] (the
    rows' tokens, answers and the rest are the batch's own), fewer than its padded rows'."""
    from fastalign.unlearn.packing import RowPacker
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    shape, batch = ModelShape.of(model), tiny_streams(tokenizer).batch(0)
    packed = RowPacker(model, "on").plan(batch.tokens)
    rows, width = packed.shape
    common = dict(decoder_trains=True, lm_head_trains=True, checkpointing=False, reference_forward=False)
    padded = batch_compute(shape, batch, **common)
    got = batch_compute(shape, batch, **common, packed_shape=(rows, width))
    policy = shape.grid_forward(rows, width) * 3
    assert got.flops - policy == pytest.approx(padded.flops - 3 * shape.decoder_forward(batch.tokens.attention_mask),
                                               rel=1e-12)
    assert got.padded_slots == rows * width < padded.padded_slots
    assert (got.tokens, got.answer_tokens) == (padded.tokens, padded.answer_tokens)


def test_layers_with_their_own_head_size_count_their_mean():
    """Gemma 4's full-attention layers have heads twice as wide as its sliding ones (16 and 32 here, 4 heads): the
    model-wide head_dim is refused by transformers, and the estimate takes the mean over the layers (it failed)."""
    from tests.runtime.tiny_models import tiny_model
    model = tiny_model("gemma4-wide-full-layers-shared-kv")
    dims = [layer.head_dim for layer in model.config.per_layer_config]
    assert sorted(set(dims)) == [16, 32]
    assert ModelShape.of(model).attention_width == 4 * sum(dims) / len(dims)


def test_a_padded_grid_counts_every_row_at_the_longest_rows_width():
    """The forward runs over every row of the padded batch (a row of padding alone costs as much as any) and over the
    longest row's width (columns of padding alone past it are trimmed); an empty batch costs nothing."""
    shape = ModelShape(decoder_params=10, num_layers=2, hidden_size=4, vocab_size=7, attention_width=3)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert shape.decoder_forward(mask) == 2.0 * 10 * 3 * 3 + 4.0 * 2 * 3 * 3 * 3 ** 2
    assert shape.decoder_forward(torch.zeros(0, 5, dtype=torch.long)) == 0.0


def test_a_fractional_mean_attention_width_is_rounded_to_the_nearest():
    """Head sizes 16, 32, 32 over three layers, 4 heads: a mean width of 106.67, counted as 107."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    model = Gemma4ForCausalLM(Gemma4TextConfig(
        vocab_size=50, max_position_embeddings=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=10,
        vocab_size_per_layer_input=50, hidden_size_per_layer_input=8))
    assert [layer.head_dim for layer in model.config.per_layer_config] == [16, 32, 32]
    assert ModelShape.of(model).attention_width == 107


def test_num_experts_per_tok_past_the_number_of_experts_counts_each_expert_once():
    """A token runs at most every expert once: top 4 of 2 experts counts both experts whole, not twice."""
    assert ModelShape.of(mixtral(2, 4, listed=True)).decoder_params == 2 * (ATTENTION + 2 * 32 + 2 * EXPERT)


def test_only_a_module_named_experts_counts_at_the_routed_share():
    """A list of shared experts (every token runs them) beside the routed ones counts whole: the routed share is
    for the module named `experts` alone, not for any name that ends in or holds it."""
    model = mixtral(8, 2, listed=True)
    for layer in model.model.layers:
        layer.mlp.shared_experts = torch.nn.ModuleList(torch.nn.Linear(32, 32, bias=False) for _ in range(3))
    assert ModelShape.of(model).decoder_params == 2 * (ATTENTION + 8 * 32 + 2 * EXPERT + 3 * 32 * 32)


def _model_and_lookup_tables(family):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4))
        return model, [model.transformer.wte, model.transformer.wpe]
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128))
        return model, [model.model.decoder.embed_tokens, model.model.decoder.embed_positions]
    from tests.runtime.tiny_models import tiny_model
    model = tiny_model("gemma4-wide-full-layers-shared-kv")
    return model, [model.model.embed_tokens, model.model.embed_tokens_per_layer]


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma4"])
def test_lookup_tables_are_not_counted_as_matmul_weights(family):
    """P_dec counted every 2-D weight but the input embeddings: GPT-2's and OPT's position tables, and Gemma 4's
    per-layer input embeddings ([vocab, layers x 256], about as many entries as its matmul weights at real sizes:
    its FLOPs came out ~2x), are lookups too."""
    model, lookups = _model_and_lookup_tables(family)
    skip = {id(table.weight) for table in lookups}
    matmul = sum(p.numel() for p in model.base_model.parameters() if p.dim() >= 2 and id(p) not in skip)
    assert ModelShape.of(model).decoder_params == matmul


def test_totals_add_up_field_by_field():
    """A run's totals are the sums of its steps' (and of the cache's), every field of them."""
    fields = ("tokens", "padded_slots", "answer_tokens", "reference_tokens", "flops", "device_seconds")
    totals = ComputeTotals(*range(1, 7))
    totals.add(ComputeTotals(*range(10, 70, 10)))
    assert totals.to_dict() == dict(zip(fields, (11, 22, 33, 44, 55, 66)))
    assert ComputeTotals().to_dict() == dict.fromkeys(fields, 0)
