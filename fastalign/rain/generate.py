"""`rain_generate`: RAIN answers for many prompts, searched concurrently with their model calls merged.

Each prompt's search is a generator of jobs (search.py). The scheduler keeps up to `concurrency` searches
in flight; each round it gathers the jobs every search is waiting on, hands all model jobs to the engine
at once (one engine run = shared batched calls) and all embedding jobs to the embedder at once, and
resumes the searches. A prompt that fails (bad input, an error inside its search) gets its error in its
result; the other prompts go on. One that runs out of KV room (PoolExhaustedError) beside other prompts is
searched again from the start once they are done, alone, as a run of it alone searches it: it keeps the error only
where it fails with the pool to itself.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, List, Literal, Optional, Sequence, Tuple, Union

from fastalign.evaluation.generation import before_end, eos_ids
from fastalign.model_context import model_positions
from fastalign.model_vocabulary import check_embedded, input_vocabulary
from fastalign.ops.checks import check_count, is_integer, refuse_one_string
from fastalign.prompt_templates import ChatTemplate, chat_option_problem
from fastalign.prompt_tokens import tokenize_prompts
from fastalign.runtime import PoolExhaustedError
from fastalign.runtime.hf_cache_argument import refuse_prompt_adapter_over_a_cache

from .config import RainConfig
from .dialogue import after_prefix, cut_at_turn, reply_lead
from .embeddings import CheckedEmbedder, make_embedder
from .jobs import EmbedJob, PromptContext
from .judge import JudgePrompt, JudgeTokens
from .ledger import EMPTY_KEY, TokenLedger, kept_apart
from .minimum import RequiredPrefixes
from .sampling import check_sampler, extend_key, make_sampler, prompt_sampler, seed_key
from .search import PromptSearch
from .stats import RainStats


@dataclass
class RainResult:
    """One prompt's answer: its text (cut before a new user turn, as the judge reads it), the committed
    tokens, the cost counters, each commit's decision, or the error that stopped this prompt. `model_prompt`: the
    prompt as the model read it after the generation prefix (in the chat template, with chat_template), None for a
    prompt refused before its search; a caller decoding other answers to it reuses it instead of rendering again."""
    index: int
    prompt: str
    answer: str = ""
    answer_ids: List[int] = field(default_factory=list)
    stats: RainStats = field(default_factory=RainStats)
    commits: List[dict] = field(default_factory=list)
    error: Optional[str] = None
    model_prompt: Optional[str] = None


@dataclass
class RainRun:
    """Per-prompt results (in prompt order) and the run's totals: `stats` adds the prompts' counters and
    the shared prefixes; its model_calls, time per phase and wall time are the run's own (the shared prefixes' calls
    included; "host": the wall time no phase took, which a prompt's stats have not). `ledger` (what was fed) and
    `required` (the tree's minimum) are kept for inspection: their keys are those of the prompts' starting
    sequences and of prompts that could share sequences with another (see ledger.py), the others' are dropped as
    each is done."""
    results: List[RainResult]
    stats: RainStats
    ledger: Optional[TokenLedger] = None
    required: Optional[RequiredPrefixes] = None


JUDGE_MARGIN = 8    # tokens of slack for re-tokenizing the reply in the judge prompt


def _context(model, runner) -> Optional[int]:
    """The longest sequence the search may feed: the model's context (model_positions), or the tree engine's
    runner's where that is shorter (LongRoPE's original length, which it refuses to run past)."""
    limits = [model_positions(model), getattr(runner, "max_context", None)]
    return min([n for n in limits if n], default=None)


def _prepare(index: int, name: int, prompt: str, tokenizer, judge: JudgeTokens, prefix: str, prefix_ids: List[int],
             config: RainConfig, context: Optional[int], required: RequiredPrefixes, prefix_key: int,
             template: Optional[ChatTemplate], lead: str, vocab: Optional[int]) -> Tuple[PromptContext, str]:
    """The context of the prompt at `index`, and the prompt's text as the model reads it; ValueError, naming the
    prompt by `name`, for a prompt that is not a string, is empty, holds a token id past the model's `vocab` input
    embeddings or leaves no room to answer (the answer is also kept short enough for its judge prompt to fit the
    model's context). With a chat `template` the prompt is a user message: the model reads its rendering (after the
    template's system turn), the judge reads it in JudgePrompt.dialogue followed by `lead` (see
    dialogue.reply_lead). The model reads it after the generation `prefix`'s `prefix_ids` (see
    dialogue.after_prefix)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {name} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"prompt {name} is empty")
    text = template.prompt(prompt) if template else prompt
    prompt_ids = after_prefix(tokenizer, prefix, prefix_ids, text)
    root_ids = list(prefix_ids) + prompt_ids
    head_text = judge.dialogue_text(prompt) + lead if template else prompt.lstrip()
    head_ids = judge.head_ids(head_text)
    check_embedded(prompt_ids + head_ids, vocab, f"prompt {name}")
    max_length = config.max_length
    if config.max_new_tokens:
        max_length = min(max_length, len(root_ids) + config.max_new_tokens)
    judge_limit = None   # the length at which the judge prompt around the conversation fills the context
    if context:
        judge_fixed = len(judge.prefix_ids) + len(head_ids) + max(map(len, judge.suffix_ids)) + JUDGE_MARGIN
        judge_limit = len(root_ids) + context - judge_fixed
        max_length = min(max_length, context, judge_limit)
    if len(root_ids) + 1 > max_length:
        judge_note = ""
        if judge_limit == max_length:
            judge_note = (f"; the judge prompt around this conversation takes {judge_fixed} of those tokens: pass a "
                          "shorter judge_prompt=JudgePrompt(...) (fastalign rain: --judge-template-file) if that is "
                          "what fills the context")
        raise ValueError(f"prompt {name} has {len(root_ids)} tokens (generation prefix included), which leaves "
                         f"no room to answer within max_length={config.max_length} and the model's context of "
                         f"{context} tokens{judge_note}")
    ctx = PromptContext(index, head_text, root_ids, head_ids, extend_key(seed_key(config.seed), root_ids),
                        max_length)
    ctx.gen_key = required.add(ctx.stats, "prompt", prefix_key, prompt_ids)
    ctx.stats.required_calls = 1                  # the prompt's state, before anything can be drawn
    ctx.head_key = required.add(ctx.stats, "judge", judge.prefix_key, head_ids)
    return ctx, text


def rain_generate(model, tokenizer, prompts: Sequence[str], config: RainConfig = RainConfig(), *,
                  engine: Literal["tree", "slow"] = "tree", judge_prompt: JudgePrompt = JudgePrompt(),
                  embedding: Union[str, object] = "minilm", sampler: Union[str, object] = "torch",
                  generation_prefix: str = "", chat_template: bool = False, system: Optional[str] = None,
                  chat_template_kwargs: Optional[dict] = None, concurrency: int = 8, runner=None,
                  runner_tokens: int = 1 << 16,
                  on_result: Optional[Callable[[RainResult], None]] = None,
                  indices: Optional[Sequence[int]] = None) -> RainRun:
    """RAIN answers of `model` for `prompts`: dialogue texts ending where the assistant speaks, read as they
    are by the model and by the judge; or, with `chat_template`, user messages, which the model reads in the
    tokenizer's chat template (after a `system` turn when given, with the template variables
    `chat_template_kwargs`, which a judge prompt in the chat template, JudgePrompt.use_chat_template, is rendered
    with too) and the judge reads in the conversation format of its few-shot examples (JudgePrompt.dialogue), not
    as the template's special tokens.

    engine: "tree" (TreeRunner; pass `runner`, a TreeRunner of `model` itself, to reuse one, else one with
    `runner_tokens` of KV is made; a runner serves one call at a time, so calls in several threads need one each)
    or "slow" (the batch-1 reference).
    embedding: "minilm", "hidden" or an embedder object (`needs_hidden` and `embed(paths)`, see
    fastalign.rain.embeddings). sampler: "torch", "keyed" or a sampler object
    (`draw`, `draw_many` and `repeatable`, see fastalign.rain.sampling); each prompt draws from
    `sampler.for_prompt(index)` where it has that method (the torch sampler's: a generator seeded from config.seed
    and the prompt's index alone, so that a prompt's search does not depend on the others searched before or beside
    it). `on_result` is called as each prompt finishes (an exception it raises ends the call, the results of the
    prompts it has not been given with it: a caller that must not lose them catches its own). `indices` are what
    the results (RainResult.index), error messages and per-prompt samplers call the prompts (integers, default 0, 1,
    ...; a resumed `fastalign rain` searches some rows of a file and names them by their rows). An answer ends at
    the tokenizer's end of sequence, at any end token the model's generation config lists (as
    `model.generate` does) or at the end of turn of the tokenizer's chat template (see `eos_ids`).
    """
    config = config.validate()
    refuse_one_string("prompts", prompts)
    check_count("concurrency", concurrency, 1)
    names = list(range(len(prompts))) if indices is None else list(indices)
    if len(names) != len(prompts):
        raise ValueError(f"indices must name each of the {len(prompts)} prompts, got {len(names)} indices")
    if not all(map(is_integer, names)):   # each prompt's sampler is seeded from its index (1.9 was taken as 1)
        raise ValueError(f"indices must be integers, got {next(n for n in names if not is_integer(n))!r}")
    names = [int(n) for n in names]   # plain ints: RainResult.index is written to JSON (numpy's int64 is not)
    problem = chat_option_problem(chat_template, system, chat_template_kwargs, generation_prefix)
    if problem:
        raise ValueError(problem)
    if engine not in ("tree", "slow"):
        raise ValueError(f"engine must be 'tree' or 'slow', got {engine!r}")
    if runner is not None and engine != "tree":   # (the slow engine ignored it)
        raise ValueError(f"runner is the tree engine's: engine {engine!r} takes none")
    refuse_prompt_adapter_over_a_cache(model, "RAIN's search", kv_prefix=False)   # either engine
    if getattr(runner, "model", model) is not model:   # (one built for another model answered with it, silently)
        raise ValueError(f"runner must be a TreeRunner of `model` itself, got one of another "
                         f"{type(runner.model).__name__}")
    template = ChatTemplate(tokenizer, system, chat_template_kwargs) if chat_template else None   # checked once
    if template:
        template.check_prompting()
    judge = JudgeTokens(tokenizer, judge_prompt, chat_template_kwargs)
    lead = reply_lead(tokenizer, judge, template) if template else ""
    end_ids = frozenset(eos_ids(model, tokenizer))
    prefix_ids = tokenize_prompts(tokenizer, [generation_prefix])[0] if generation_prefix else []
    vocab = input_vocabulary(model)
    check_embedded(prefix_ids, vocab, "generation_prefix")
    check_embedded(judge.prefix_ids + [t for ids in judge.suffix_ids + judge.label_ids for t in ids], vocab,
                   "the judge prompt")
    embedder = CheckedEmbedder(make_embedder(embedding, "cpu") if isinstance(embedding, str) else embedding)
    draw = make_sampler(sampler, config.seed) if isinstance(sampler, str) else check_sampler(sampler)
    ledger = TokenLedger()
    required, shared = RequiredPrefixes(), RainStats()
    required.add(shared, "shared_prefix", EMPTY_KEY, judge.prefix_ids)
    prefix_key = required.add(shared, "shared_prefix", EMPTY_KEY, prefix_ids)
    start = time.perf_counter()
    runtime = _make_engine(engine, model, tokenizer, end_ids, judge, config, embedder.needs_hidden, ledger, prefix_ids,
                           runner, runner_tokens)
    context = _context(model, getattr(runtime, "runner", None))
    results = [RainResult(name, p if isinstance(p, str) else repr(p)) for name, p in zip(names, prompts)]
    queue = []
    for i, prompt in enumerate(prompts):
        try:
            own_draw = prompt_sampler(draw, names[i])   # by its name: a resumed run names it alike
            ctx, results[i].model_prompt = _prepare(i, names[i], prompt, tokenizer, judge, generation_prefix,
                                                    prefix_ids, config, context, required, prefix_key, template, lead,
                                                    vocab)
            ctx.sampler = own_draw
            queue.append(ctx)
        except ValueError as err:
            results[i].error = str(err)
            if on_result:
                on_result(results[i])
    apart, base_keys = kept_apart(queue, judge.prefix_ids)
    for keys in (ledger.fed_keys, required.keys):    # a prompt's own keys are dropped once it is done
        keys.keep_apart(apart, base_keys)
    try:
        runtime.prepare(queue)
        crowded_out = _schedule(queue, runtime, embedder, tokenizer, end_ids, judge, required, config, concurrency,
                                results, on_result, ledger)
        for ctx in crowded_out:   # from the start, as a run of it alone would (its stats go on counting)
            ctx.sampler, ctx.stats.committed_tokens = prompt_sampler(draw, names[ctx.index]), 0
            runtime.close()
            runtime.prepare([ctx])
            _schedule([ctx], runtime, embedder, tokenizer, end_ids, judge, required, config, 1, results, on_result,
                      ledger)
    finally:
        runtime.close()
    total = RainStats().add(shared) if queue else RainStats()   # no prompt searched: no prefix needed either
    for r in results:
        total.add(r.stats)
    total.model_calls = ledger.run.model_calls
    total.rows, total.tokens, total.recomputed_tokens = ledger.run.rows, ledger.run.tokens, ledger.run.recomputed_tokens
    total.wall_seconds = time.perf_counter() - start
    total.seconds = dict(ledger.run.seconds)     # the prompts' and the calls of shared prefixes, which are no prompt's
    total.seconds["host"] = max(total.wall_seconds - sum(total.seconds.values()), 0.0)   # the run's alone (stats.py)
    return RainRun(results, total, ledger, required)


def _make_engine(kind, model, tokenizer, end_ids, judge, config, want_hidden, ledger, prefix_ids, runner,
                 runner_tokens):
    if kind == "slow":
        from .slow import SlowEngine
        return SlowEngine(model, tokenizer, end_ids, judge, config, want_hidden, ledger)
    from .tree_engine import TreeEngine   # kind "tree" (rain_generate checked it)
    if runner is None:
        from fastalign.runtime import TreeRunner
        runner = TreeRunner(model, max_tokens=runner_tokens)
    return TreeEngine(runner, tokenizer, end_ids, judge, config, want_hidden, ledger, prefix_ids)


class _Active:
    __slots__ = ("ctx", "search", "gen", "jobs", "started")

    def __init__(self, ctx, search):
        self.ctx, self.search, self.gen, self.jobs = ctx, search, search.run(), None
        self.started = time.perf_counter()


def _schedule(queue: List[PromptContext], engine, embedder, tokenizer, end_ids, judge, required, config, concurrency,
              results, on_result, ledger) -> List[PromptContext]:
    """Searches the `queue`'s prompts, up to `concurrency` at a time, and gives each its result. Returns, without
    results, those of several that ran out of KV room (PoolExhaustedError), which the others' spans or the starts they
    share may have taken: the caller searches each again alone."""
    pending = list(queue)
    active: List[_Active] = []
    crowded_out: List[PromptContext] = []

    def finish(a: _Active, output=None, error: Optional[BaseException] = None):
        a.ctx.stats.wall_seconds += time.perf_counter() - a.started
        if error is not None:
            a.gen.close()
        engine.finish(a.ctx)
        a.ctx.end_search()
        active.remove(a)
        if isinstance(error, PoolExhaustedError) and len(queue) > 1:   # searched beside others: again, alone
            crowded_out.append(a.ctx)
            return
        result = results[a.ctx.index]
        result.stats = a.ctx.stats
        if error is not None:
            result.error = f"{type(error).__name__}: {error}"
        else:
            result.answer_ids = output.answer_ids
            result.answer = cut_at_turn(tokenizer.decode(before_end(output.answer_ids, end_ids),
                                                         skip_special_tokens=True), config.turn_marker)
            result.commits = output.commits
        for keys in (ledger.fed_keys, required.keys):
            keys.forget(a.ctx.stats)
        if on_result:
            on_result(result)

    def advance(a: _Active, sent):
        try:
            a.jobs = a.gen.send(sent)
        except StopIteration as stop:
            finish(a, stop.value)
        except Exception as err:  # one prompt's failure must not lose the others
            finish(a, error=err)

    def settle(paired, sent_of):
        """Each search of `_isolated`'s pairs ends with its exception, or goes on with sent_of(its results)."""
        for a, out in paired:
            if isinstance(out, Exception):
                finish(a, error=out)
            else:
                advance(a, sent_of(out))

    while pending or active:
        fresh = []
        while pending and len(active) < concurrency:
            ctx = pending.pop(0)
            a = _Active(ctx, PromptSearch(ctx, config, tokenizer, end_ids, embedder, judge, required, engine.commit))
            active.append(a)
            fresh.append(a)
        settle(_isolated(lambda searches: _start(engine, searches), fresh, lambda a: [a]), lambda out: None)
        model_side = [a for a in list(active) if a.jobs and not isinstance(a.jobs[0], EmbedJob)]
        embed_side = [a for a in list(active) if a.jobs and isinstance(a.jobs[0], EmbedJob)]
        settle(_isolated(engine.run, model_side, lambda a: a.jobs), lambda out: out)
        if embed_side:
            with ledger.phase([a.ctx.stats for a in embed_side], "embed"):
                embedded = _isolated(embedder.embed, embed_side, lambda a: a.jobs[0].paths)
            settle(embedded, lambda vectors: [vectors])   # the search's one EmbedJob gets its vectors
    return crowded_out


def _start(engine, searches):
    """Starts the searches' prompts on the engine together (one result, None, per search)."""
    engine.start([a.ctx for a in searches], [a.search.tree.root for a in searches])
    return [None] * len(searches)


def _isolated(run, searches, items_of):
    """[(search, its results or the exception)]: `run` takes every search's items in one call (a flat list in,
    one result per item out); if that call fails, each search runs alone, so that only the failing ones get
    the error (a model call or an embedding batch shared by many prompts)."""
    if not searches:
        return []
    try:
        outs = run([item for a in searches for item in items_of(a)])
    except Exception as err:
        if len(searches) == 1:
            return [(searches[0], err)]
    else:
        pos, paired = 0, []
        for a in searches:
            n = len(items_of(a))
            paired.append((a, outs[pos:pos + n]))
            pos += n
        return paired
    paired = []
    for a in searches:
        try:
            paired.append((a, run(list(items_of(a)))))
        except Exception as err:
            paired.append((a, err))
    return paired
