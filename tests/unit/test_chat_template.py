"""Chat templates: rendered as transformers renders them, sandboxed, refused clearly when absent or broken."""
from __future__ import annotations

import json
import shutil

import pytest

from router_service.model.tokenizer import Tokenizer
from router_service.serving.chat_template import ChatTemplate, ChatTemplateError

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Route me, é€"},
                {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Again"}]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_make_checkpoint_template_renders_and_tokenizes_as_transformers_does(tiny_checkpoint, add_generation_prompt):
    from transformers import AutoTokenizer  # the oracle: what a Hugging Face user of this checkpoint gets

    hf = AutoTokenizer.from_pretrained(tiny_checkpoint)
    template = ChatTemplate.from_dir(tiny_checkpoint)
    text = template.render(CONVERSATION, add_generation_prompt)
    assert text == hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = Tokenizer.from_dir(tiny_checkpoint).encode(text, add_special_tokens=False)
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ids == (expected if isinstance(expected, list) else expected["input_ids"])  # a BatchEncoding in v5
    assert ids[0] == 0 and ids.count(1) == len(CONVERSATION)  # <s> once, </s> closing every turn


def test_the_template_can_refuse_messages(tiny_checkpoint):
    with pytest.raises(ChatTemplateError, match="roles must be system, user or assistant, got tool"):
        ChatTemplate.from_dir(tiny_checkpoint).render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # the classic escape from a template
    "{% set _ = messages.append({'role': 'user'}) %}",  # mutating the caller's messages
    "{{ bos_token.__class__.__init__.__globals__ }}",
])
def test_templates_run_sandboxed(source):
    with pytest.raises(ChatTemplateError, match="sandbox forbids|failed on these messages"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def write(tmp_path, tiny_checkpoint, config: dict | None, jinja: str | None = None):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    (out / "tokenizer_config.json").unlink()
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    return out


def test_no_template_or_a_broken_one_gives_none(tmp_path, tiny_checkpoint, caplog):
    assert ChatTemplate.from_dir(write(tmp_path / "a", tiny_checkpoint, None)) is None
    assert ChatTemplate.from_dir(write(tmp_path / "b", tiny_checkpoint, {"eos_token": "</s>"})) is None
    assert ChatTemplate.from_dir(write(tmp_path / "c", tiny_checkpoint, {"chat_template": "{% for %}"})) is None
    assert "does not compile" in caplog.text


def test_named_templates_token_dicts_and_the_jinja_file(tmp_path, tiny_checkpoint):
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}
    assert ChatTemplate.from_dir(write(tmp_path / "a", tiny_checkpoint, config)).render([]) == "<s>D"
    beside = write(tmp_path / "b", tiny_checkpoint, config, jinja="J{{ eos_token }}")
    assert ChatTemplate.from_dir(beside).render([]) == "J</s>"  # transformers prefers the file too
