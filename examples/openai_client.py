"""Ask a UniPrefill server (`make serve` or examples/serve.sh) through the `openai` client.

python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]

A long prompt (a whole Python module plus a question) is pruned by the server; per-request
controls travel in `vllm_xargs`: `uniprefill_p` (0 < p <= 1) or `uniprefill_enabled` (false).
A bad value is answered with HTTP 400 naming the field.
"""

import argparse
import inspect
import json.decoder

import openai

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    question = f"```python\n{inspect.getsource(json.decoder)}\n```\nWhich exception does "
    question += "`JSONDecoder.decode` raise when there is extra data after the document?"
    for xargs in ({}, {"uniprefill_p": 0.995}, {"uniprefill_enabled": False}):
        print(f"--- vllm_xargs={xargs}")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=64,
            temperature=0,
            stream=True,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )
        for chunk in stream:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
    try:
        client.completions.create(
            model=model, prompt="hi", max_tokens=4, extra_body={"vllm_xargs": {"uniprefill_p": 2}}
        )
    except openai.BadRequestError as error:
        print(f"--- a bad value is a 400: {error.message}")
