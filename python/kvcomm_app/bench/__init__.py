"""Benchmarks behind `kvcomm bench` and `kvcomm eval --sweep`.

    setting.py   the paper's TTFT setting: agents, prompts of exact token counts, token arithmetic
    texts.py     synthetic text of an exact number of tokens (round-trips through the tokenizer)
    ttft.py      dense vs KVCOMM time to first token per agent, in one run; scaling runs
    models.py    the model a benchmark runs on (SmolLM2, a local folder, Llama-3.1-8B-shaped random)
    output.py    the JSON document, the PNG, the markdown table
    sweep.py     gamma x capacity grid over the runtime's graphs (`kvcomm eval --sweep`)
"""
