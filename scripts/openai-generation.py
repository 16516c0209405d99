"""The official `openai` client against `kiln serve` with a causal LM (the tiny GPT-2 fixture):
a completion, a chat completion and streams of both. Greedy completions must equal the PyTorch
reference's text, and every stream must concatenate to the non-streamed answer."""
import argparse
import json
import sys

import openai

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--fixture", required=True, help="the gpt2-tiny fixture folder")
p.add_argument("--model", required=True)
a = p.parse_args()

client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused")
ref = json.load(open(a.fixture + "/reference.json"))
failures = 0


def check(cond, what):
    global failures
    print(("ok   " if cond else "FAIL ") + what)
    failures += 0 if cond else 1


for case in ref["greedy_generation"]["results"]:
    prompt, want = case["prompt"], case["generated_text"]
    c = client.completions.create(model=a.model, prompt=prompt, max_tokens=16, temperature=0)
    check(c.choices[0].text == want, f"completion of {prompt!r} equals the reference")
    check(c.usage.completion_tokens == 16 and c.usage.prompt_tokens == len(case["prompt_ids"]),
          f"usage {c.usage}")
    check(c.choices[0].finish_reason == "length", "finish_reason length")
    parts = []
    for chunk in client.completions.create(model=a.model, prompt=prompt, max_tokens=16,
                                           temperature=0, stream=True):
        parts.append(chunk.choices[0].text if chunk.choices else "")
    check("".join(parts) == want, "streamed completion equals the non-streamed one")

messages = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about kilns."}]
chat = client.chat.completions.create(model=a.model, messages=messages, max_tokens=20,
                                      temperature=0)
check(chat.choices[0].message.role == "assistant", "chat answer from the assistant")
check(0 < chat.usage.completion_tokens <= 20, f"chat usage {chat.usage}")
streamed = []
usage = None
for chunk in client.chat.completions.create(model=a.model, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
check("".join(streamed) == chat.choices[0].message.content,
      "streamed chat equals the non-streamed chat")
check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens,
      f"stream usage {usage}")
seeded = [client.completions.create(model=a.model, prompt="kiln", max_tokens=12, temperature=1.0,
                                    seed=42).choices[0].text for _ in range(2)]
check(seeded[0] == seeded[1], "a seed repeats a sampled completion")
try:
    client.chat.completions.create(model=a.model, messages=[], max_tokens=4)
    check(False, "empty messages are refused")
except openai.UnprocessableEntityError as e:
    check("messages" in str(e), "empty messages are a 422 with a message")

sys.exit(1 if failures else 0)
