"""engine/scheduler.py driven directly: an image prompt and a text prompt batched in the same steps, and
the scheduler's thinking budget on an image prompt. (The scheduler under the server's engine thread:
tests/api/test_worker.py.)"""

from __future__ import annotations

from batch_models import picture_prompt, vision_llm  # noqa: F401 (vision_llm: fixture)
from kawai.engine.sampling import SamplingParams


def test_an_image_prompt_and_a_text_prompt_in_the_same_steps(vision_llm):
    """engine.scheduler directly: both sequences admitted together, so every step of the image prompt's
    prefill and decode holds the text prompt's rows too (M-RoPE rows next to plain-RoPE rows); each gets
    its tokens alone, and the image's stats count its image rows and encoder time."""
    from kawai.engine.prefix_cache import OneCache
    from kawai.engine.scheduler import Request, Scheduler

    llm = vision_llm
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    image, text = picture_prompt(llm), llm.encode_chat([{"role": "user", "content": "Tell me more"}])
    alone = [[s.token_id for s in llm.generate(p, greedy)] for p in (image, text)]

    class TwoCaches:  # one cache per sequence, nothing shared
        def __init__(self):
            self.lenders = [OneCache(llm.new_cache()), OneCache(llm.new_cache())]

        def acquire(self, tenant, prompt, reuse=True):
            return next(lease for lender in self.lenders if (lease := lender.acquire(tenant, prompt, reuse)))

        def reserve(self, lease, n):
            return n <= lease.cache.max_seq

        def publish(self, lease):
            pass

        def release(self, lease, reusable=True):
            for lender in self.lenders:
                lender.release(lease, reusable)

    batch_sizes = []

    def counting_forward(chunks, caches):
        batch_sizes.append(len(chunks))
        return llm.forward_batch(chunks, caches)

    scheduler = Scheduler(llm, TwoCaches(), max_sequences=2, chunk=16, forward=counting_forward)
    seqs = [scheduler.admit(Request(p, greedy)) for p in (image, text)]
    got = {id(s): [] for s in seqs}
    while scheduler.running:
        for seq, step in scheduler.step():
            assert step is not None, seq.error
            got[id(seq)].append(step.token_id)
    assert [got[id(s)] for s in seqs] == alone
    assert max(batch_sizes) == 2 and batch_sizes.count(2) >= greedy.max_tokens
    stats = seqs[0].stats
    assert stats.image_tokens == image.image_tokens == 12 and stats.vision_seconds > 0
    assert stats.prefill_seconds >= stats.vision_seconds and seqs[1].stats.image_tokens == 0


def test_a_thinking_budget_closes_the_block_of_an_image_prompt(vision_llm):
    """The thinking budget is the scheduler's, so it works on image prompts too: after `budget` tokens in
    the <think> block the close is forced (fed at M-RoPE decode positions) and the reply goes on."""
    from kawai.engine.generate import ThinkingBudget
    from kawai.engine.prefix_cache import OneCache
    from kawai.engine.scheduler import Generation, Request, Scheduler

    llm = vision_llm
    prompt = picture_prompt(llm, suffix="<think>\n")  # an assistant prefill that opens the block
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cache = llm.new_cache()
    thinking = ThinkingBudget(3, llm.chat_format, start_text="<think>\n")
    gen = Generation(Scheduler(llm, OneCache(cache), max_sequences=1), Request(prompt, params, thinking=thinking))
    steps = list(gen)
    assert thinking.done and thinking.used == 3
    assert steps[2].text.endswith(thinking.close_text) and "</think>" not in "".join(s.text for s in steps[:2])
    assert len(steps) == params.max_tokens and steps[-1].finish_reason == "max_tokens"
    close = llm.tokenizer.encode(thinking.close_text)
    fed = cache.tokens[len(prompt.ids):]
    assert fed[3 : 3 + len(close)] == close  # the forced ids went into the cache after the 3rd token
    # the tokens before the budget ran out are the unconstrained ones
    free = [s.token_id for s in llm.generate(prompt, params)]
    assert [s.token_id for s in steps[:3]] == free[:3]


SYSTEM = ("You are a careful coding agent. Answer in one short sentence. Tools: read_file(path) reads a file; "
          "write_file(path, text) writes one; run(cmd) runs a shell command and returns its output. ") * 4


def test_two_sequences_sharing_a_prompt_prefix_in_place_answer_as_if_alone(default_model_path):
    """The real 0.5B model: the second sequence, admitted while the first runs, reads the first one's
    system-prompt blocks in place (its own cache holds only its own positions; the prefix is accounted
    once) and both produce, greedy, token for token, what each produces alone with nothing shared."""
    from kawai import engine
    from kawai.engine.prefix_cache import BLOCK_TOKENS
    from kawai.engine.scheduler import Request, Scheduler

    llm = engine.load(default_model_path, n_ctx=1024, threads=1)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [llm.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
               for question in ("How do I list the files here?", "Which tool shows a file's text?")]
    alone = [[s.token_id for s in llm.generate(p, greedy)] for p in prompts]

    pool = llm.prefix_cache(256 << 20)
    scheduler = Scheduler(llm, pool, max_sequences=2, chunk=64)
    first = scheduler.admit(Request(prompts[0], greedy, tenant="t"))
    got = {id(first): []}
    while first.prefilling:
        for seq, step in scheduler.step():
            assert step is not None, seq.error
            got[id(seq)].append(step.token_id)
    second = scheduler.admit(Request(prompts[1], greedy, tenant="t"))
    got[id(second)] = []
    common = next(i for i, (a, b) in enumerate(zip(prompts[0].ids, prompts[1].ids)) if a != b)
    shared = common // BLOCK_TOKENS * BLOCK_TOKENS
    assert shared >= 2 * BLOCK_TOKENS and second.cache.shared is first.cache and second.cache.base == shared
    while scheduler.running:
        stats = pool.stats()
        if len(scheduler.running) == 2:
            assert stats.shared_tokens == shared
            own = [max(len(s.request.prompt.ids), s.cache.length) - s.cache.base for s in (first, second)]
            blocks = sum(-(-n // BLOCK_TOKENS) for n in own)  # the prefix is counted once, in the first's
            assert stats.used_bytes == blocks * BLOCK_TOKENS * pool.bytes_per_token
        for seq, step in scheduler.step():
            assert step is not None, seq.error
            got[id(seq)].append(step.token_id)
    assert [got[id(first)], got[id(second)]] == alone
