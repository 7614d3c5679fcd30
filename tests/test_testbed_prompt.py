"""The testbed's prompt module: one template, a conversation encoded as its turns' prompts."""

import pytest

from vlmprune.testbed.model import build_tokenizer
from vlmprune.testbed.prompt import (FOLLOW_UP_TEMPLATE, PROMPT_TEMPLATE, encode_turns, format_follow_up,
                                     format_prompt, prompt_ids)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_templates_small_case():
    assert format_prompt("Is there a red star?") == \
        "USER: <image>\nIs there a red star? Answer with one word. ASSISTANT:"
    assert format_follow_up("How many stars are there?") == \
        "USER: How many stars are there? Answer with one word. ASSISTANT:"
    assert "<image>" not in FOLLOW_UP_TEMPLATE and PROMPT_TEMPLATE.count("<image>") == 1


def test_encode_turns_is_the_turns_prompts_and_answers(tok):
    """Two turns encode as prompt 1 (image expanded), answer 1, </s>, follow-up prompt 2, answer 2, </s>."""
    image_id = tok.convert_tokens_to_ids("<image>")
    qa = [("Is there a red star?", "yes"), ("How many stars are there?", "2")]
    ids, labels, instruction = encode_turns(tok, qa, image_id, num_image_tokens=4)
    first, last_image = prompt_ids(tok, qa[0][0], image_id, 4)
    eos = [tok.eos_token_id]
    answer = [tok(" " + a, add_special_tokens=False)["input_ids"] + eos for _, a in qa]
    follow = tok(format_follow_up(qa[1][0]), add_special_tokens=False)["input_ids"]
    assert ids == first + answer[0] + follow + answer[1]
    assert first == tok(format_prompt(qa[0][0]).replace("<image>", "<image>" * 4))["input_ids"]
    assert first.count(image_id) == 4 and first[last_image] == image_id and image_id not in first[last_image + 1:]
    n1 = len(first)
    assert labels == [-100] * n1 + answer[0] + [-100] * len(follow) + answer[1]
    assert instruction == [i > last_image for i in range(n1)] + [False] * (len(ids) - n1)


def test_prompt_ids_rejects_a_tokenizer_without_the_image_token(tok):
    with pytest.raises(ValueError, match="image tokens, expected 4"):
        prompt_ids(tok, "Is there a red star?", image_token_id=-5, num_image_tokens=4)
