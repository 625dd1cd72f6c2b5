"""Chat templates the Hugging Face way: the checkpoint's Jinja `chat_template`, rendered sandboxed.

    tokenizer_config.json {"chat_template", "bos_token", "eos_token"} (or chat_template.jinja beside it)
      -> ChatTemplate (compiled once, at replica start)
      -> render(messages, add_generation_prompt) -> prompt text -> tokenizer (no special tokens added:
         the template writes bos_token itself, as transformers' apply_chat_template does)

The template comes from the checkpoint (the operator's), the messages from any caller, so it runs
in jinja2's ImmutableSandboxedEnvironment, as transformers does: no attribute access to Python
internals, no mutation of the messages, ranges capped. The names templates use are the ones
transformers provides: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception(message)`, and the `tojson` filter. A checkpoint without a template gets None
here, and the HTTP layer answers 400: we never guess a format the model was not trained on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The template refused these messages (its raise_exception) or failed on them; a client error."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _named_template(value) -> str | None:
    """A template string, or the "default" one of a list of named templates (transformers' format)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # trim_blocks / lstrip_blocks and loopcontrols: what transformers compiles templates with,
        # so whitespace renders as the model was trained on.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        self.template = env.from_string(source)  # a syntax error raises jinja2.TemplateSyntaxError here
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate | None":
        """The checkpoint's template, or None when it has none. A template that does not compile is
        logged and treated as none: chat is refused with the reason, gRPC and completions still serve."""
        path = Path(path)
        config_file, jinja_file = path / "tokenizer_config.json", path / "chat_template.jinja"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (OSError, ValueError) as e:
            log.error("%s cannot be read (%s): no chat template", config_file, e)
            return None
        source = jinja_file.read_text() if jinja_file.is_file() else _named_template(config.get("chat_template"))
        if source is None:
            return None
        try:
            return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
        except Exception as e:  # jinja2.TemplateError and whatever a broken template raises while compiling
            log.error("the chat template of %s does not compile (%s): chat completions are refused", path, e)
            return None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; ChatTemplateError when the template refuses the messages."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the chat template tried something its sandbox forbids: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

