"""The model's own chat template decides the prompts and stop tokens (no per-family code), on the tiny
models."""

from sasft_ray.chat import load_tokenizer, render_prompt, turn_format


def test_llama_style_template(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    fmt = turn_format(tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert fmt.stop_user[0] == eot and fmt.stop_assistant[0] == eot
    assert tok.eos_token_id in fmt.stop_user
    assert "<|start_header_id|>" in fmt.markers
    assert render_prompt(tok, fmt, [], "user") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    history = [{"role": "user", "content": "Hi"}]
    assert render_prompt(tok, fmt, history, "assistant").endswith(
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    history.append({"role": "assistant", "content": "Hello"})
    assert render_prompt(tok, fmt, history, "user").endswith(
        "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")


def test_chatml_template_with_system_prompt(tiny_qwen2):
    tok = load_tokenizer(tiny_qwen2)
    fmt = turn_format(tok)
    assert fmt.stop_user[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.strip_bos == ""
    system = [{"role": "system", "content": "Be brief."}]
    assert render_prompt(tok, fmt, system, "user") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_tiny_model_generates_in_transformers(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM on CPU needs >= 32
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert answer.startswith("Sure! The answer is")  # the warm-up taught it the house style
    assert answer.rstrip().endswith("<|eot_id|>")     # ...and to end its turn
