"""The real demo model (Qwen2.5-Coder-0.5B-Instruct) against transformers' GGUF loader, float32.

FACTS.md: greedy decoding has top-2 logit margins down to ~0.016 on short chat prompts, so
float32 must match token for token; the logits themselves agree to ~1e-4 of their scale."""
import pytest
import torch

pytestmark = pytest.mark.demo

PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def test_demo_logits_match_transformers(demo_model, demo_reference):
    reference, _ = demo_reference
    ids = torch.tensor([demo_model.tokenizer.encode("def fibonacci(n):\n    # 中文 🙂")])
    with torch.no_grad():
        diff = (demo_model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-3  # logits reach ~30 in magnitude; 24 layers of fp32 summation order


def test_demo_greedy_32_tokens_equal_transformers(demo_model, demo_reference):
    reference, _ = demo_reference
    gen = demo_model.generate(PROMPT, temperature=0, max_new_tokens=32, repetition_penalty=1.0)
    text = gen.text()
    prompt = torch.tensor([gen.prompt_ids])
    want = reference.generate(prompt, max_new_tokens=32, do_sample=False, top_k=None,
                                   top_p=None, temperature=None)[0, prompt.shape[1]:].tolist()
    got = gen.stats.token_ids
    assert got == want[:len(got)] and len(got) == 32
    assert "def" in text


def test_demo_prompt_uses_the_models_chat_template(demo_model):
    text = demo_model.tokenizer.render_chat(PROMPT)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>assistant\n")
