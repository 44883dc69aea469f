"""Which generated tokens are a reply's content (kvcomm.plan.replies), the one rule every backend uses."""
from kvcomm.plan.replies import BlankTokens, reply_span


def test_reply_span_rule():
    blank = {9: True}
    is_blank = lambda t: blank.get(t, False)  # noqa: E731
    # stop token dropped, edge blanks trimmed; fed: the last content token (5) was fed back
    assert reply_span([9, 4, 5, 9, 2], {2}, is_blank) == (1, 3, True)
    # cut by max_tokens: the last content token was never fed back
    assert reply_span([4, 5], {2}, is_blank) == (0, 2, False)
    assert reply_span([2], {2}, is_blank) == (0, 0, False)
    assert reply_span([9, 9], {2}, is_blank) == (0, 0, False)


class _Tok:
    def __init__(self):
        self.calls = 0

    def decode(self, ids):
        self.calls += 1
        return {1: " ", 2: "\n", 3: "x"}[ids[0]]


def test_blank_tokens_decode_each_id_once():
    tok = _Tok()
    blank = BlankTokens(tok)
    assert [blank(t) for t in (1, 2, 3, 1, 3)] == [True, True, False, True, False]
    assert tok.calls == 3


def test_a_reply_generated_one_token_past_what_is_shown_is_fed_whole():
    """A backend that generated one token more than its client sees: the shown reply's last
    token was fed back."""
    is_blank = lambda t: t == 9   # noqa: E731
    assert reply_span([4, 5], {2}, is_blank, generated=3) == (0, 2, True)
    assert reply_span([4, 5], {2}, is_blank, generated=2) == (0, 2, False)
