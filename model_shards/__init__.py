"""gpt-oss itself: config, weights, the math, tokenizer and chat format. No ray, no web stack."""
