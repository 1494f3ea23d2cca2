"""Timed greedy generation in onnxruntime-genai, run by bench/generate.py with .venv-genai's python:

    python genai_generate.py FOLDER ADAPTER BATCH PROMPT NEW REPEATS THREADS -> {"seconds": [...], "tokens": [...]}

One adapter for the whole batch (genai activates adapters per generator, not per row); ADAPTER "-": none.
"""

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def main(folder, adapter, batch, prompt, new, repeats, threads):
    batch, prompt, new, repeats = int(batch), int(prompt), int(new), int(repeats)
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
    model = og.Model(config)
    adapters = og.Adapters(model)
    if adapter != "-":
        adapters.load(adapter, "task")
    ids = np.random.default_rng(0).integers(4, 1000, (batch, prompt)).astype(np.int32)
    seconds, tokens = [], None
    for _ in range(repeats + 1):  # the first run warms up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False,
                                  batch_size=batch)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        if adapter != "-":
            generator.set_active_adapter(adapters, "task")
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        seconds.append(time.perf_counter() - start)
        tokens = [generator.get_sequence(i).tolist() for i in range(batch)]
    print(json.dumps({"seconds": seconds[1:], "tokens": tokens}))


if __name__ == "__main__":
    main(*sys.argv[1:])
