"""r3.evals.engine against naive references: full-sequence forwards for the log-likelihoods,
and plain generation + cutting for generate_until."""

import pytest
import torch

from r3.evals.engine import _cut, encode_pair, generate_until, loglikelihoods
from r3.sampler import generate


def naive_loglikelihood(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    tok = logp[pos, torch.tensor(cont)]
    greedy = bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())
    return float(tok.sum()), greedy


def test_loglikelihoods_equal_full_forwards(builtin):
    model, _ = builtin
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    items = []
    for n_ctx, lens in ((5, [1, 3, 7]), (12, [2, 2]), (1, [4, 1, 1, 6]), (30, [9])):
        ctx = torch.randint(0, V, (n_ctx,), generator=g).tolist()
        items.append((ctx, [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]))
    # The model's own greedy continuation of an item's context is "greedy" by construction.
    ctx = items[1][0]
    cont = generate(model, [ctx], max_new_tokens=4, temperature=0.0).tokens[0]
    items.append((ctx, [cont, cont[:2]]))
    for batch_size in (2, 8):
        got = loglikelihoods(model, items, batch_size=batch_size)
        assert [len(x) for x in got] == [len(c) for _, c in items]
        for (ctx, conts), res in zip(items, got):
            for cont, r in zip(conts, res):
                ref, greedy = naive_loglikelihood(model, ctx, cont)
                assert r.logprob == pytest.approx(ref, abs=2e-3, rel=1e-4)
                assert r.greedy == greedy
    assert got[-1][0].greedy and got[-1][1].greedy


def test_loglikelihoods_reject_empty():
    with pytest.raises(ValueError):
        loglikelihoods(None, [([], [[1]])])


def test_encode_pair_moves_trailing_spaces(builtin):
    _, tok = builtin
    ctx, cont = encode_pair(tok, "The answer is ", "blue")
    assert tok.decode(ctx) == "The answer is"
    assert tok.decode(cont) == " blue"
    ctx2, cont2 = encode_pair(tok, "The answer is", " blue")
    assert (ctx, cont) == (ctx2, cont2)


def test_cut_at_first_stop_string():
    assert _cut("a Question: b Question:", ["Question:"]) == ("a ", True)
    assert _cut("x</s>y\n\nz", ["\n\n", "</s>"]) == ("x", True)
    assert _cut("nothing here", ["Question:", ""]) == ("nothing here", False)


def test_generate_until_equals_generate_then_cut(builtin):
    model, tok = builtin
    prompts = [tok.encode(t, add_special_tokens=False)
               for t in ("Question: What is 2 + 3?\nAnswer:", "Once upon a time", "1, 2, 3, 4,", "The capital of France is")]
    n = 24
    full = generate(model, prompts, max_new_tokens=n, temperature=0.0).tokens
    for until in ([","], ["\n"], ["Question:", "\n\n"], []):
        got = generate_until(model, tok, prompts, until=until, max_new_tokens=n, batch_size=3)
        want = [_cut(tok.decode(t, skip_special_tokens=True), until)[0] for t in full]
        assert got == want, until
    # A stop id ends a row: the text stops before it.
    eos = full[1][5]
    got = generate_until(model, tok, prompts[1:2], until=[], max_new_tokens=n, stop_token_ids=[eos])
    k = full[1].index(eos)
    assert got == [tok.decode(full[1][:k], skip_special_tokens=True)]


def test_generate_until_stops_at_a_special_token_given_as_text(builtin):
    """``until=["<|im_end|>"]`` stops where the instruct model ends its turn, as the stop id
    would: the token's text never appears in text decoded without special tokens."""
    from r3.chat import ChatFormat

    model, tok = builtin
    prompts = [ChatFormat(tok).prompt([{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "Say hi.")]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    free = generate(model, prompts, max_new_tokens=48, temperature=0.0).tokens
    assert all(end in t and t.index(end) < 40 for t in free)  # it ends its turn, then goes on
    by_text = generate_until(model, tok, prompts, until=["<|im_end|>"], max_new_tokens=48)
    by_id = generate_until(model, tok, prompts, until=[], stop_token_ids=[end], max_new_tokens=48)
    assert by_text == by_id == [tok.decode(t[:t.index(end)], skip_special_tokens=True) for t in free]


def test_encode_adds_the_tokenizers_bos_unless_the_prompt_already_starts_with_it():
    """The harness's Hugging Face backend: default special tokens (a Llama-style BOS), but none on
    a chat-formatted prompt that already begins with the BOS text (no doubled BOS)."""
    from r3.evals.engine import encode

    class LlamaStyle:
        bos_token = "<s>"

        def encode(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text.replace("<s>", "\x01")]
            return ([1] if add_special_tokens else []) + ids

    tok = LlamaStyle()
    assert encode(tok, "hi") == [1, ord("h"), ord("i")]
    assert encode(tok, "<s>hi") == [1, ord("h"), ord("i")]  # once


def test_finished_batches_go_back_to_their_items():
    """Batches run longest first: a batch read back from an interrupted run belongs to the items
    of that sorted order, not to the lowest indices (no model runs when every batch is finished)."""
    from types import SimpleNamespace

    from r3.errors import R3Error
    from r3.evals.engine import Loglikelihood

    # lengths (context + longest continuation) 3, 2, 5: order [2, 0, 1]; batches [2, 0] and [1]
    items = [([1, 2], [[1]]), ([1], [[1]]), ([1, 2, 3, 4], [[1], [2]])]
    finished = {0: [[[-2.0, False], [-3.0, True]], [[-1.0, True]]], 1: [[[-4.0, False]]]}
    got = loglikelihoods(SimpleNamespace(device="cpu"), items, batch_size=2, finished=finished)
    assert got == [[Loglikelihood(-1.0, True)], [Loglikelihood(-4.0, False)],
                   [Loglikelihood(-2.0, False), Loglikelihood(-3.0, True)]]
    tok = SimpleNamespace()  # (no generation runs either)
    texts = generate_until(None, tok, [[1, 2], [1], [1, 2, 3, 4]], until=[], max_new_tokens=4, batch_size=2,
                           finished={0: ["c", "a"], 1: ["b"]})
    assert texts == ["a", "b", "c"]
    # a batch read back with more (or fewer) results than its items is a damaged file
    for bad in ([[[-1.0, True]]] * 3, [[[-1.0, True]]]):
        with pytest.raises(R3Error, match="damaged"):
            loglikelihoods(SimpleNamespace(device="cpu"), items, batch_size=2, finished={0: bad, 1: finished[1]})


def test_loglikelihoods_scored_in_small_chunks_are_the_same(builtin, monkeypatch):
    """The LM head runs SCORE_CHUNK positions at a time: chunks that split choices (3 positions)
    give the numbers of one chunk."""
    import r3.evals.engine as engine

    model, _ = builtin
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    items = [(torch.randint(0, V, (4,), generator=g).tolist(), [torch.randint(0, V, (n,), generator=g).tolist()
                                                                  for n in (2, 5, 1)]) for _ in range(2)]
    whole = loglikelihoods(model, items)
    monkeypatch.setattr(engine, "SCORE_CHUNK", 3)
    chunked = loglikelihoods(model, items)
    for a, b in zip(whole, chunked):
        assert [x.greedy for x in a] == [x.greedy for x in b]
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-4)


def test_generate_until_texts_go_back_to_their_prompts_and_greedy_means_every_token(builtin):
    """Prompts run longest first: each text still lands at its own prompt when the shorter comes
    first. A continuation is ``greedy`` only when every one of its tokens is the argmax."""
    model, tok = builtin
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("1, 2,", "Once upon a time there was a")]
    assert len(prompts[0]) < len(prompts[1])
    got = generate_until(model, tok, prompts, until=[], max_new_tokens=4, batch_size=2)
    want = [tok.decode(generate(model, [p], max_new_tokens=4, temperature=0.0).tokens[0], skip_special_tokens=True)
            for p in prompts]
    assert got == want and got[0] != got[1]
    ctx = prompts[1]
    best = generate(model, [ctx], max_new_tokens=2, temperature=0.0).tokens[0]
    other = (best[1] + 1) % model.config.vocab_size  # not the argmax after the first token
    (res,) = loglikelihoods(model, [(ctx, [best, [best[0], other], best[:1]])])
    assert [r.greedy for r in res] == [True, False, True]


def test_encode_pair_takes_the_continuation_from_the_whole_text():
    """A SentencePiece-style tokenizer adds a BOS and encodes a text's first character by itself
    (its prefix space): the continuation's ids are those after the context's within the whole
    text, never the continuation encoded alone; trailing whitespace of any kind (a newline too)
    moves to the continuation."""

    class SentencePieceStyle:
        bos_token = "<s>"

        def encode(self, text, add_special_tokens=True):
            ids = [ord(c) + (1000 if k == 0 else 0) for k, c in enumerate(text)]
            return ([1] if add_special_tokens else []) + ids

    tok = SentencePieceStyle()
    context = [1, 1000 + ord("A")] + [ord(c) for c in "nswer:"]
    assert encode_pair(tok, "Answer:", " blue") == (context, [ord(c) for c in " blue"])
    assert encode_pair(tok, "Answer:\n", "blue") == (context, [ord(c) for c in "\nblue"])


def test_cut_at_a_stop_string_that_begins_the_text_and_empty_continuations_are_refused():
    assert _cut("Question: next", ["Question:"]) == ("", True)  # (an empty answer, not the whole text)
    with pytest.raises(ValueError, match="item 1: empty context or continuation"):
        loglikelihoods(None, [([1], [[2]]), ([1], [[2], []])])


def test_loglikelihoods_a_continuation_reaching_past_a_kv_bucket_sees_its_own_last_token(builtin):
    """The choices' forward reads the cache up to its last position + 1: a continuation whose
    last fed token sits at position 64 (one past a 64-slot KV bucket) is scored as the full
    forward scores it, not with that token blind to itself."""
    model, _ = builtin
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    ctx = torch.randint(0, V, (60,), generator=g).tolist()
    cont = torch.randint(0, V, (6,), generator=g).tolist()  # fed at positions 60..64
    (res,) = loglikelihoods(model, [(ctx, [cont])])
    assert res[0].logprob == pytest.approx(naive_loglikelihood(model, ctx, cont)[0], abs=2e-3, rel=1e-4)


def test_generate_until_and_loglikelihoods_report_progress_up_to_the_item_count(builtin):
    """The progress callback gets the documents done so far: a last, partial batch ends at the
    number of documents, never past it."""
    model, tok = builtin
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("1, 2,", "a b", "Once upon")]
    seen = []
    generate_until(model, tok, prompts, until=[], max_new_tokens=1, batch_size=2, progress=seen.append)
    assert seen == [2, 3]
    seen = []
    loglikelihoods(model, [(p, [[5]]) for p in prompts], batch_size=2, progress=seen.append)
    assert seen == [2, 3]
