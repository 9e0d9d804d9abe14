"""The simulator's thinking model and vLLM 0.32's reasoning split (``message.reasoning``; streamed
``delta.reasoning`` then ``delta.content``; ``chat_template_kwargs.enable_thinking``), and its
deterministic answer to a crop-describe prompt. Driven by the real openai SDK."""

from __future__ import annotations

import openai

from vlmpool.sim.server import running_sim

MSG = [{"role": "user", "content": "what is in the picture?"}]
THOUGHT = "sim thought about 0 image(s)"


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning")


async def test_thinking_model_without_a_parser_returns_the_raw_text(fast_config):
    async with running_sim(fast_config(thinking=True)) as url:
        r = await client(url).chat.completions.create(model="qwen-base", messages=MSG)
        m = r.choices[0].message
        # the template pre-fills <think>: the generated text has only the closing tag
        assert m.content.startswith(THOUGHT + "\n</think>\n\nsim:qwen-base") and reasoning_of(m) is None
        assert "reasoning_content" not in (m.model_extra or {}) and "tool_calls" not in (m.model_extra or {})
        r = await client(url).chat.completions.create(model="qwen-base", messages=MSG,
                                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert r.choices[0].message.content.startswith("sim:qwen-base")
        c = await client(url).completions.create(model="qwen-base", prompt="a cat")  # no chat template, no thought
        assert c.choices[0].text.startswith("sim:qwen-base")


async def test_reasoning_parser_splits_plain_and_streamed(fast_config):
    async with running_sim(fast_config(thinking=True, reasoning_parser="qwen3")) as url:
        c = client(url)
        r = await c.chat.completions.create(model="qwen-base", messages=MSG)
        m = r.choices[0].message
        assert reasoning_of(m) == THOUGHT + "\n" and m.content.startswith("\n\nsim:qwen-base")

        stream = await c.chat.completions.create(model="qwen-base", messages=MSG, stream=True)
        reasoning, content, order = [], [], []
        async for chunk in stream:
            for ch in chunk.choices:
                extra = ch.delta.model_extra or {}
                if extra.get("reasoning"):
                    reasoning.append(extra["reasoning"])
                    order.append("r")
                if ch.delta.content:
                    content.append(ch.delta.content)
                    order.append("c")
        assert "".join(reasoning) == reasoning_of(m) and "".join(content) == m.content  # same split as plain
        assert "think>" not in "".join(reasoning + content)  # the tags make no delta
        assert order == sorted(order, key=lambda k: k != "r")  # all reasoning before any content

        off = {"chat_template_kwargs": {"enable_thinking": False}}
        r = await c.chat.completions.create(model="qwen-base", messages=MSG, extra_body=off)
        assert reasoning_of(r.choices[0].message) is None
        assert r.choices[0].message.content.startswith("sim:qwen-base")
        r = await c.chat.completions.create(model="qwen-base", messages=MSG, extra_body={"include_reasoning": False})
        assert reasoning_of(r.choices[0].message) is None and r.choices[0].message.content.startswith("\n\nsim:")
        stream = await c.chat.completions.create(model="qwen-base", messages=MSG, stream=True,
                                                 extra_body={"include_reasoning": False})
        deltas = [ch.delta for chunk in [x async for x in stream] for ch in chunk.choices]
        assert not any((d.model_extra or {}).get("reasoning") for d in deltas)  # hidden, streamed too
        assert "".join(d.content or "" for d in deltas) == m.content


async def test_a_parser_on_a_model_that_does_not_think_makes_it_all_reasoning(fast_config):
    """vLLM 0.32's qwen3 parser starts in its reasoning state unless enable_thinking is false: without a
    </think> in the output, everything is reasoning and the content is null."""
    async with running_sim(fast_config(reasoning_parser="qwen3")) as url:
        r = await client(url).chat.completions.create(model="qwen-base", messages=MSG)
        m = r.choices[0].message
        assert m.content is None and reasoning_of(m).startswith("sim:qwen-base")


async def test_crop_prompt_is_answered_with_one_crops_line_per_panel(fast_config):
    prompt = ("Zoom panels:\n- A: class=person, bbox=[1, 2, 30, 40], confidence=0.90\n"
              "- B: class=red car, bbox=[50, 2, 90, 40]\nBefore SCENE, write a block CROPS:\nDescribe.")
    async with running_sim(fast_config()) as url:
        r = await client(url).chat.completions.create(model="qwen-base",
                                                      messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content.splitlines() == [
            "CROPS:", "A: person: sim saw panel A", "B: red car: sim saw panel B",
            "SCENE: sim:qwen-base images=0 panels=2"]


def test_cli_flags():
    import argparse

    from vlmpool.sim import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    cfg = cli.config_from_args(parser.parse_args(["m", "--thinking", "--reasoning-parser", "qwen3"]))
    assert cfg.thinking is True and cfg.reasoning_parser == "qwen3"
    cfg = cli.config_from_args(parser.parse_args(["m"]))
    assert cfg.thinking is False and cfg.reasoning_parser is None
