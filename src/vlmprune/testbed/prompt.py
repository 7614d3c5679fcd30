"""The testbed's prompt: the LLaVA-1.5 single-turn template and the encoding of a conversation.

One home for the template, used by the testbed's training recipe, the evaluation harness and ATP
training, so that training and evaluation tokenise a question the same way.
"""

from __future__ import annotations

#: a question about an image: LLaVA-1.5's conversation format, asking for a one-word answer
PROMPT_TEMPLATE = "USER: <image>\n{question} Answer with one word. ASSISTANT:"
#: a later turn of a conversation about the same image (the image is shown once, in the first turn)
FOLLOW_UP_TEMPLATE = PROMPT_TEMPLATE.replace("<image>\n", "")


def format_prompt(question: str) -> str:
    """The single-turn prompt for ``question`` (``PROMPT_TEMPLATE``, one ``<image>`` placeholder)."""
    return PROMPT_TEMPLATE.format(question=question)


def format_follow_up(question: str) -> str:
    """A later turn's prompt for ``question`` (``FOLLOW_UP_TEMPLATE``, no image)."""
    return FOLLOW_UP_TEMPLATE.format(question=question)


def prompt_ids(tokenizer, question: str, image_token_id: int, num_image_tokens: int) -> tuple[list[int], int]:
    """Token ids of the single-turn prompt with ``<image>`` expanded to ``num_image_tokens`` placeholders,
    and the index of the last image token; ``ValueError`` when the tokenizer does not produce them."""
    prompt = format_prompt(question).replace("<image>", "<image>" * num_image_tokens)
    ids = list(tokenizer(prompt)["input_ids"])
    img = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(img) != num_image_tokens:
        raise ValueError(f"the prompt tokenised to {len(img)} image tokens, expected {num_image_tokens}; does the "
                         f"tokenizer know '<image>' as token {image_token_id}?")
    return ids, img[-1]


def _answer_ids(tokenizer, answer: str) -> list[int]:
    """An answer's token ids as the model emits them after "ASSISTANT:" (leading space), then ``</s>``."""
    return list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def encode_turns(tokenizer, qa: list[tuple[str, str]], image_token_id: int,
                 num_image_tokens: int = 576) -> tuple[list[int], list[int], list[bool]]:
    """Token ids, labels and instruction mask (three lists of one length) of a conversation about one image.

    The first turn is tokenised exactly as the single-turn prompt (``prompt_ids``), later turns as
    ``format_follow_up``; each answer is followed by ``</s>``. ``labels`` is -100 except on the
    answers and their ``</s>``; the instruction mask is True on the first turn's tokens after the
    last image token (the question and "ASSISTANT:"), never on an answer.
    """
    ids, last_image = prompt_ids(tokenizer, qa[0][0], image_token_id, num_image_tokens)
    instruction = [i > last_image for i in range(len(ids))]
    labels = [-100] * len(ids)
    for k, (q, a) in enumerate(qa):
        if k > 0:
            turn = tokenizer(format_follow_up(q), add_special_tokens=False)["input_ids"]
            ids += turn
            labels += [-100] * len(turn)
            instruction += [False] * len(turn)
        ans = _answer_ids(tokenizer, a)
        ids += ans
        labels += ans
        instruction += [False] * len(ans)
    return ids, labels, instruction


def encode_independent_turns(tokenizer, qa: list[tuple[str, str]], image_token_id: int,
                             num_image_tokens: int = 576) -> dict[str, list[int]]:
    """One shared image prefix followed by turns that each see only the prefix and themselves.

    Every turn is tokenised exactly as its own single-turn prompt; the tokens up to and including
    the last image token are shared (checked: ``ValueError`` otherwise), the rest of each prompt
    plus the answer and ``</s>`` form the turn. Returns four lists of one length:
    ``input_ids``, ``labels`` (-100 except answers), ``position_ids`` (each turn continues from the
    prefix, as a single-turn prompt would) and ``segment`` (0 for the prefix, k for turn k; the
    recipe's ``segment_attention_mask`` builds the attention mask from it).
    """
    prefix = None
    ids, labels, positions, segment = [], [], [], []
    for k, (q, a) in enumerate(qa, start=1):
        full, last_image = prompt_ids(tokenizer, q, image_token_id, num_image_tokens)
        head, tail = full[: last_image + 1], full[last_image + 1:]
        if prefix is None:
            prefix = head
            ids += head
            labels += [-100] * len(head)
            positions += list(range(len(head)))
            segment += [0] * len(head)
        elif head != prefix:
            raise ValueError("the image prefix of two turns tokenised differently")
        ans = _answer_ids(tokenizer, a)
        turn = tail + ans
        ids += turn
        labels += [-100] * len(tail) + ans
        positions += list(range(len(prefix), len(prefix) + len(turn)))
        segment += [k] * len(turn)
    return dict(input_ids=ids, labels=labels, position_ids=positions, segment=segment)


def encode_conversation(processor, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation about one 576-token image (``encode_turns`` with the
    processor's tokenizer and its ``<image>`` token)."""
    tok = processor.tokenizer
    ids, labels, _ = encode_turns(tok, qa, tok.convert_tokens_to_ids("<image>"))
    return ids, labels
