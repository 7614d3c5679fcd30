"""How a question becomes a prompt: the processor's chat template when it has one, else a text template.

``prompt_style(processor, template)`` returns a ``PromptStyle``: ``build(question)`` -> the prompt
text (the image placeholder included), a description for the results file, and whether the
processor should add the tokenizer's special tokens (for a chat template: only when its rendering does
not start with BOS, as transformers decides for rendered chats).
The rule: an explicit ``template`` wins; else the processor's ``chat_template`` (one user turn: the
image, then the question; the generation prompt added); else the ShapesVQA template
(``testbed.prompt.PROMPT_TEMPLATE``), which is what the testbed, which has no chat template, is
trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PromptStyle", "prompt_style", "has_chat_template", "chat_adds_special_tokens"]


@dataclass(frozen=True)
class PromptStyle:
    """``build(question) -> prompt``; ``description`` for the results; ``add_special_tokens``;
    ``build_video(question)`` for a video (chat templates only, else None)."""

    build: Callable[[str], str]
    description: str
    add_special_tokens: bool = True
    chat: bool = False
    build_video: Callable[[str], str] | None = None


def has_chat_template(processor: Any) -> bool:
    """Whether ``processor`` (a multimodal processor) carries a chat template."""
    return bool(getattr(processor, "chat_template", None))


def chat_adds_special_tokens(processor: Any, rendered: str) -> bool:
    """Whether a chat-template rendering still needs the tokenizer's special tokens: only when it
    does not already start with the BOS token (transformers' own rule for rendered chats), so BOS
    is there once whether or not the template writes it."""
    bos = getattr(processor.tokenizer, "bos_token", None)
    return not (bos and rendered.startswith(bos))


def prompt_style(processor: Any, template: str | None = None) -> PromptStyle:
    """The prompt rule for ``processor`` (see the module docstring). ``template`` must contain
    ``{question}`` and ``<image>``."""
    if template is not None:
        if "{question}" not in template or "<image>" not in template:
            from ..testbed.prompt import PROMPT_TEMPLATE

            raise ValueError("prompt_template must contain '{question}' and '<image>', e.g. " + repr(PROMPT_TEMPLATE))
        return PromptStyle(lambda q: template.format(question=q), template)
    if has_chat_template(processor):
        def render(question: str, visual: str) -> str:
            messages = [{"role": "user", "content": [{"type": visual}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        def build(question: str) -> str:
            return render(question, "image")

        return PromptStyle(build, "the processor's chat template (user turn: image or video, question; generation "
                           "prompt)", add_special_tokens=chat_adds_special_tokens(processor, build("?")), chat=True,
                           build_video=lambda question: render(question, "video"))
    from ..testbed.prompt import PROMPT_TEMPLATE

    return PromptStyle(lambda q: PROMPT_TEMPLATE.format(question=q), PROMPT_TEMPLATE)
