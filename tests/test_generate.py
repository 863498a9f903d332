"""Generation: greedy equals transformers, sampling is reproducible, streaming is UTF-8 safe,
stops on EOS and stop strings, and the context window is enforced with a clear outcome."""
import threading

import pytest
import torch

import qlite
from qlite.errors import QliteError
from qlite.generate import SamplingParams
from qlite.sampling import sample


@pytest.fixture(scope="module")
def dense(tiny_dense):
    return qlite.load(tiny_dense[0]), tiny_dense[1]


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_20_tokens_equal_transformers_generate(tiny_dense, tiny_moe, moe):
    path, ref = tiny_moe if moe else tiny_dense
    model = qlite.load(path)
    gen = model.generate("hello world", temperature=0, max_new_tokens=20, repetition_penalty=1.0)
    gen.text()
    ids = torch.tensor([gen.prompt_ids])
    want = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                        pad_token_id=0, repetition_penalty=1.0)[0, ids.shape[1]:].tolist()
    got = gen.stats.token_ids
    assert got == want[:len(got)] and (len(got) == 20 or gen.stats.finish_reason == "stop")


def test_seeded_sampling_is_reproducible_and_seeds_differ(dense):
    model, _ = dense
    run = lambda seed: model.generate("abc", temperature=1.0, top_p=1.0, top_k=0, seed=seed,
                                      max_new_tokens=12).text()
    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


def test_top_k_1_is_greedy():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    got = sample(logits, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert got.tolist() == [int(logits.argmax())]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, 0, 0.7, generator=g)) for _ in range(200)} == {0, 1}


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert int(sample(logits, 0.0, repetition_penalty=2.0, seen=seen)) == 1


def test_stream_never_splits_a_character(dense):
    model, _ = dense
    tok = model.tokenizer
    text = "naïve 中文 emoji 🤖🎉 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # byte-level: multi-byte characters span tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stops_on_a_stop_string_and_never_shows_it(dense, monkeypatch):
    model, _ = dense
    full = model.generate("x", temperature=0, max_new_tokens=30, repetition_penalty=1.0).text()
    stop = full[10:14]
    assert len(stop) == 4 and stop.strip()
    gen = model.generate("x", temperature=0, max_new_tokens=30, repetition_penalty=1.0,
                         stop=[stop])
    pieces = list(gen)
    assert "".join(pieces) == full[:full.find(stop)]
    assert gen.stats.finish_reason == "stop_string"


def test_stops_on_the_end_of_turn_token(dense, monkeypatch):
    model, _ = dense
    end = model.tokenizer.encode("<|im_end|>")
    assert len(end) == 1 and end[0] in model.tokenizer.stop_ids
    # Force the model to say <|im_end|> after 3 tokens by biasing its logits.
    real = model.lm_head.forward
    calls = []

    def biased(x):
        out = real(x)
        calls.append(1)
        if len(calls) == 4:
            out[..., end[0]] += 1e4
        return out

    monkeypatch.setattr(model.lm_head, "forward", biased)
    gen = model.generate("x", temperature=0, max_new_tokens=30)
    gen.text()
    assert gen.stats.finish_reason == "stop" and gen.stats.generated_tokens == 3


def test_cancel_keeps_the_partial_reply(dense):
    model, _ = dense
    cancel = threading.Event()
    gen = model.generate("x", temperature=0, max_new_tokens=50, cancel=cancel)
    cancel.set()
    gen.text()
    assert gen.stats.finish_reason == "cancelled" and gen.stats.generated_tokens == 1


def test_a_prompt_longer_than_the_context_is_a_clear_error(tiny_dense):
    model = qlite.load(tiny_dense[0], context=64)
    with pytest.raises(QliteError, match="context window is 64"):
        model.generate("word " * 200, raw=True).text()


def test_chat_drops_the_oldest_turns_to_fit_and_says_so(tiny_dense):
    model = qlite.load(tiny_dense[0], context=160)
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(8):
        messages += [{"role": "user", "content": f"question {i} " * 4},
                     {"role": "assistant", "content": f"answer {i} " * 4}]
    messages.append({"role": "user", "content": "last one"})
    gen = model.generate(messages, temperature=0, max_new_tokens=16)
    gen.text()
    assert gen.stats.dropped_messages > 0
    prompt = model.tokenizer.decode(gen.prompt_ids)
    assert "be brief" in prompt and "last one" in prompt and "question 0" not in prompt
    assert gen.stats.prompt_tokens + 16 <= 160


def test_generation_stops_at_the_context_window(tiny_dense):
    model = qlite.load(tiny_dense[0], context=40)
    gen = model.generate("ab", raw=True, temperature=0, max_new_tokens=1000,
                         repetition_penalty=1.0)
    gen.text()
    assert gen.stats.prompt_tokens + gen.stats.generated_tokens <= 40


def test_chat_template_is_sandboxed(tmp_path):
    from conftest import save_tiny
    save_tiny(tmp_path, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    model = qlite.load(tmp_path)
    with pytest.raises(QliteError, match="chat template"):
        model.generate("hi").text()


def test_chatml_is_the_fallback_template(tiny_dense):
    model = qlite.load(tiny_dense[0])
    text = model.tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_generate_prints_the_completion_and_a_stats_line(tiny_dense, capsys):
    from qlite.cli import main
    main(["generate", "--model", str(tiny_dense[0]), "--prompt", "hi", "--temperature", "0",
          "--max-new-tokens", "5"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("prompt ") and "generated 5 tokens" in out[-1]
    assert "decode" in out[-1] and "tok/s" in out[-1]


def test_chunked_prefill_generates_the_same_tokens(tiny_moe, monkeypatch):
    import qlite.model
    model = qlite.load(tiny_moe[0])

    def greedy():
        gen = model.generate("a longer prompt, cut into chunks", temperature=0,
                             max_new_tokens=8, repetition_penalty=1.0)
        gen.text()
        return gen.stats

    whole = greedy()
    monkeypatch.setattr(qlite.model, "PREFILL_CHUNK", 5)
    model.cache.forget()  # no reuse of the first run's cache: prefill all of it, in chunks
    chunked = greedy()
    assert chunked.reused_tokens == 0
    assert chunked.prompt_tokens > 10 and len(whole.token_ids) == 8
    assert chunked.token_ids == whole.token_ids


def test_repl_keeps_the_conversation_across_turns(tiny_dense, monkeypatch, capsys):
    import io
    import qlite.generate
    from qlite.cli import main
    prompts = []
    real = qlite.generate.Generation.__init__

    def spy(self, model, prompt_ids, *args, **kwargs):
        prompts.append(model.tokenizer.decode(prompt_ids))
        real(self, model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(qlite.generate.Generation, "__init__", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n\n"))
    main(["repl", "--model", str(tiny_dense[0]), "--temperature", "0", "--max-new-tokens", "4",
          "--system", "be brief"])
    assert len(prompts) == 2
    assert "be brief" in prompts[1] and "first question" in prompts[1]
    assert prompts[1].count("<|im_start|>assistant") == 2  # the first reply is in the history


def test_next_chat_turn_prefills_only_what_the_cache_lacks(tiny_dense):
    model = qlite.load(tiny_dense[0], dtype="float32")
    greedy = dict(temperature=0, max_new_tokens=6, repetition_penalty=1.0)
    chat = [{"role": "user", "content": "hello there"}]
    first = model.generate(chat, **greedy)
    chat += [{"role": "assistant", "content": first.text()},
             {"role": "user", "content": "and once more"}]
    reused = model.generate(chat, **greedy)
    text = reused.text()
    # The first turn's prompt at least (its reply may tokenize differently once re-read).
    assert len(first.prompt_ids) <= reused.stats.reused_tokens < reused.stats.prompt_tokens
    assert f"({reused.stats.reused_tokens} from cache)" in reused.stats.summary()
    model.cache.forget()  # as a fresh model: the whole prompt prefilled
    fresh = model.generate(chat, **greedy)
    assert fresh.text() == text and fresh.stats.reused_tokens == 0
    assert fresh.stats.token_ids == reused.stats.token_ids


def test_any_other_cached_forward_forgets_the_reusable_prefix(tiny_dense):
    model = qlite.load(tiny_dense[0], dtype="float32")
    model.generate("hello there", temperature=0, max_new_tokens=4).text()
    assert model.cache.held[0]  # the prompt and the reply tokens fed back
    model(torch.tensor([[1, 2, 3]]), start=0)  # overwrites the first slots
    assert model.cache.held[0] == []
    gen = model.generate("hello there", temperature=0, max_new_tokens=4)
    gen.text()
    assert gen.stats.reused_tokens == 0


def test_a_long_prefill_reports_progress_chunk_by_chunk(tiny_dense, monkeypatch):
    import qlite.model
    model = qlite.load(tiny_dense[0], dtype="float32")
    monkeypatch.setattr(qlite.model, "PREFILL_CHUNK", 4)
    calls = []
    gen = model.generate("a prompt of a good many tokens", temperature=0, max_new_tokens=2,
                         progress=lambda *a: calls.append(a))
    gen.text()
    n = gen.stats.prompt_tokens
    assert n > 8
    assert calls == [("prefill", min(d, n), n) for d in range(4, n + 4, 4)]
    calls.clear()
    model.generate("hi", temperature=0, max_new_tokens=2, progress=lambda *a: calls.append(a))
    assert calls == []  # nothing shown until it runs...
    model.cache.forget()
    monkeypatch.setattr(qlite.model, "PREFILL_CHUNK", 512)
    model.generate("hi", temperature=0, max_new_tokens=2,
                   progress=lambda *a: calls.append(a)).text()
    assert calls == []  # ...and nothing for a prefill of one chunk


def test_the_token_layer_yields_the_ids_the_text_layer_decodes(dense):
    from qlite.generate import Tokens
    model, _ = dense
    params = SamplingParams(temperature=0, max_new_tokens=7, repetition_penalty=1.0)
    ids = model.tokenizer.encode("hello")
    model.cache.forget()
    tokens = list(Tokens(model, ids, params))
    model.cache.forget()
    gen = model.generate("hello", raw=True, temperature=0, max_new_tokens=7,
                         repetition_penalty=1.0)
    assert gen.text() == model.tokenizer.decode(tokens)
    assert gen.stats.token_ids == tokens
    # every yielded token is fed before the next is sampled, except the last one at "length"
    fed = tokens if gen.stats.finish_reason == "stop" else tokens[:-1]
    assert model.cache.held[0] == ids + fed


def test_decode_rate_is_a_dash_when_no_decode_step_ran():
    # the first token comes out of the prefill: one generated token means no decode step
    from qlite.generate import GenerationStats
    one = GenerationStats(prompt_tokens=4, generated_tokens=1, prefill_seconds=0.5)
    assert one.summary().endswith("decode –")
    five = GenerationStats(prompt_tokens=4, generated_tokens=5, prefill_seconds=0.5,
                           decode_seconds=2.0)
    assert five.summary().endswith("decode 2.0 tok/s")
