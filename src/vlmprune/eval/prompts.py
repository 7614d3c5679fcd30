"""How a question becomes a prompt: the processor's chat template when it has one, else a text template.

``prompt_style(processor, template)`` returns a ``PromptStyle``: ``build(question, images=1)`` -> the
prompt text (the image placeholders included: several images are placed one after the other
before the question), a description for the results file, and whether the
processor should add the tokenizer's special tokens (for a chat template: only when its rendering does
not start with BOS, as transformers decides for rendered chats).
The rule: an explicit ``template`` wins; else the processor's ``chat_template`` (one user turn: the
image(s) or the video, then the question; the generation prompt added); else the ShapesVQA template
(``testbed.prompt.PROMPT_TEMPLATE``), which is what the testbed, which has no chat template, is
trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PromptStyle", "prompt_style", "has_chat_template", "chat_adds_special_tokens"]


@dataclass(frozen=True)
class PromptStyle:
    """``build(question, images=1) -> prompt``; ``description`` for the results;
    ``add_special_tokens``; ``build_video(question)`` for a video (chat templates only, else None)."""

    build: Callable[..., str]
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
        return PromptStyle(_text_template(template), template)
    if has_chat_template(processor):
        def render(question: str, visual: str, count: int = 1) -> str:
            content = [{"type": visual}] * count + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        def build(question: str, images: int = 1) -> str:
            return render(question, "image", images)

        return PromptStyle(build, "the processor's chat template (user turn: image(s) or video, question; "
                           "generation prompt)", add_special_tokens=chat_adds_special_tokens(processor, build("?")),
                           chat=True, build_video=lambda question: render(question, "video"))
    from ..testbed.prompt import PROMPT_TEMPLATE

    return PromptStyle(_text_template(PROMPT_TEMPLATE), PROMPT_TEMPLATE)


def _text_template(template: str) -> Callable[..., str]:
    """``build`` of a text template: its ``<image>`` repeated once per image, one per line."""
    def build(question: str, images: int = 1) -> str:
        return template.replace("<image>", "\n".join(["<image>"] * images), 1).format(question=question)
    return build
