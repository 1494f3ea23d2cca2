"""Greedy generation with onnxruntime-genai, run by the interpreter of its own virtual environment
(it pins a CPU onnxruntime that must not meet onnxruntime-gpu): tests/test_genai.py drives it.

    python generate.py FOLDER REQUEST.json  ->  {"adapter": [token ids, prompt included], ...} on stdout

REQUEST: {"prompt": [ids], "max_length": N, "adapters": {"name": "path.onnx_adapter"}}; the adapter
named "" runs the graph's own default task.
"""

import json
import sys

import onnxruntime_genai as og


def generate(model, adapters, name, prompt, max_length):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    if name:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def main(folder, request_path):
    request = json.loads(open(request_path).read())
    model = og.Model(folder)
    adapters = og.Adapters(model)
    for name, path in request["adapters"].items():
        if name:
            adapters.load(path, name)
    print(json.dumps({name: generate(model, adapters, name, request["prompt"], request["max_length"])
                      for name in request["adapters"]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
