"""Token ids and loss masks per sample shape: exact ids, exact target spans."""

import pytest
from transformers import AutoTokenizer

from greentune.data.sources import ChatSample, PromptSample, TextSample
from greentune.data.templates import tokenize
from greentune.errors import UserError


def enc(tok, text, markup=False):
    return tok(text, add_special_tokens=False, split_special_tokens=not markup)["input_ids"]


def targets(tok, t):
    """The target tokens of `t`, decoded as maximal runs."""
    runs, run = [], []
    for i, m in zip(t.ids, t.mask):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run)), run.clear()
    return runs + ([tok.decode(run)] if run else [])


@pytest.fixture
def fresh_tokenizer(tokenizer_dir):
    """A private copy that a test may modify."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_text_all_tokens_are_targets_bos_is_not(tokenizer):
    [t] = tokenize([TextSample("def f(x):\n    return x", "o")], tokenizer)
    body = enc(tokenizer, "def f(x):\n    return x")
    assert t.ids == [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    assert t.mask == [False] + [True] * len(body) + [True]


def test_literal_special_token_text_stays_text(tokenizer):
    [t] = tokenize([TextSample("a </s> <s> b", "o")], tokenizer)
    assert t.ids.count(tokenizer.eos_token_id) == 1 and t.ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(t.ids[1:-1]) == "a </s> <s> b"


def test_prompt_completion_boundary_is_exact(tokenizer):
    [t] = tokenize([PromptSample("The answer is", " forty-two.", "o")], tokenizer)
    p, c = enc(tokenizer, "The answer is"), enc(tokenizer, " forty-two.")
    assert t.ids == [tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id]
    assert t.mask == [False] * (1 + len(p)) + [True] * (len(c) + 1)
    assert targets(tokenizer, t) == [" forty-two.</s>"]


def test_chat_template_only_assistant_turns_are_targets(tokenizer):
    conv = ChatSample(
        (
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Sum 2 and 2"),
            ("assistant", "4"),
        ),
        "o",
    )
    [t] = tokenize([conv], tokenizer)
    full = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in conv.messages], tokenize=False
    )
    assert tokenizer.decode(t.ids) == "<s>" + full + "</s>"
    assert targets(tokenizer, t) == ["Hello.<|end|>\n", "4<|end|>\n</s>"]
    assert t.mask[0] is False
    first_target = t.mask.index(True)
    assert tokenizer.decode(t.ids[:first_target]).endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")


def test_chat_ending_with_user_turn_leaves_tail_and_eos_out_of_loss(tokenizer):
    [t] = tokenize([ChatSample((("user", "a"), ("assistant", "b"), ("user", "c")), "o")], tokenizer)
    assert targets(tokenizer, t) == ["b<|end|>\n"]
    assert t.ids[-1] == tokenizer.eos_token_id and t.mask[-1] is False


def test_plain_template_when_tokenizer_has_no_chat_template(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.chat_template = None
    conv = ChatSample(
        (
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "More"),
            ("assistant", "No."),
        ),
        "o",
    )
    [t] = tokenize([conv], tok)
    assert tok.decode(t.ids) == (
        "<s>### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.</s>"
        "\n\n### User:\nMore\n\n### Assistant:\nNo.</s>"
    )
    assert targets(tok, t) == ["Hello.</s>", "No.</s>"]
    assert t.ids.count(tok.eos_token_id) == 2  # no extra EOS after the final reply's EOS


def test_template_that_renders_bos_gets_no_second_bos(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    [t] = tokenize([ChatSample((("user", "a"), ("assistant", "b")), "o")], tok)
    assert t.ids.count(tok.bos_token_id) == 1 and t.ids[0] == tok.bos_token_id
    assert targets(tok, t) == ["b<|end|>\n</s>"]


def test_template_that_is_not_prefix_stable_is_refused(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.chat_template = "{{ messages|length }}" + tok.chat_template  # the count changes every prefix
    with pytest.raises(UserError, match=r"^f\.jsonl:3: the tokenizer's chat template is not prefix-stable"):
        tokenize([ChatSample((("user", "a"), ("assistant", "b")), "f.jsonl:3")], tok)


def test_template_error_becomes_user_error(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        UserError,
        match=r"^f\.jsonl:9: the tokenizer's chat template fails on this conversation: "
        r"roles must alternate$",
    ):
        tokenize([ChatSample((("user", "a"), ("assistant", "b")), "f.jsonl:9")], tok)


def test_many_samples_tokenise_like_one_at_a_time(tokenizer):
    samples = [
        TextSample("x y", "a"),
        PromptSample("q", " r", "b"),
        TextSample("x y", "c"),
        ChatSample((("user", "u"), ("assistant", "v")), "d"),
    ]
    assert tokenize(samples, tokenizer) == [tokenize([s], tokenizer)[0] for s in samples]


def test_no_bos_added_when_tokenizer_has_none(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.bos_token = None
    assert tok.bos_token_id is None
    [t] = tokenize([TextSample("hello", "o")], tok)
    assert t.ids == enc(tok, "hello") + [tok.eos_token_id]
