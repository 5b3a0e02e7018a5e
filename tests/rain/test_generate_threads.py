"""rain_generate from two threads at once on one model, each call with its own runner: each prompt gets the answer
it gets alone. The interleaving is forced: the first call's first forward is held until the second call is done."""
import threading

from fastalign.rain import RainConfig, rain_generate

from .tiny import PROMPTS, SHORT_JUDGE, tiny_llama, tokenizer

CONFIG = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=3)


def generate(model, prompts):
    run = rain_generate(model, tokenizer(), prompts, CONFIG, judge_prompt=SHORT_JUDGE, embedding="hidden",
                        sampler="keyed", runner_tokens=2048)
    return [(r.answer_ids, r.commits, r.error) for r in run.results]


def test_two_calls_in_two_threads_on_one_model_answer_as_each_alone():
    model = tiny_llama()
    alone = [generate(model, PROMPTS[:1]), generate(model, PROMPTS[1:])]
    entered, go, out = threading.Event(), threading.Event(), {}

    def hold(module, args):
        if threading.current_thread() is first and not entered.is_set():
            entered.set()
            assert go.wait(timeout=60)    # a guard against a hung test, not a synchronisation

    def body():
        out["first"] = generate(model, PROMPTS[:1])

    handle = model.get_input_embeddings().register_forward_pre_hook(hold)
    first = threading.Thread(target=body, daemon=True)
    try:
        first.start()
        assert entered.wait(timeout=60)
        second = generate(model, PROMPTS[1:])
    finally:
        go.set()
        first.join(timeout=60)
        handle.remove()
    assert [out["first"], second] == alone
    assert all(error is None for answers in alone for _, _, error in answers)
