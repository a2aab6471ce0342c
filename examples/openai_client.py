"""Ask a UniPrefill server (`make serve` or examples/serve.sh) through the `openai` client.

python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

import argparse

import openai

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Explain list comprehensions in two sentences."}],
        max_tokens=128,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
