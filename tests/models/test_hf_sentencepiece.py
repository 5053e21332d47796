"""A SentencePiece model as an HF tokenizer.json (models/hf_sentencepiece.py): the `tokenizers`
package, reading the written JSON as transformers does (tokenizer_class PreTrainedTokenizerFast
loads it as it is), must give SentencePiece's own ids and text, leading, trailing and repeated
spaces, newlines, byte fallback and BOS included. transformers 5 built its own pipeline from a
bare tokenizer.model, which dropped the dummy "▁" of text starting with a space.
tests/fixtures/make_hf_fixtures.py --check runs transformers itself on an export.
"""

import io
import json
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTok

from flaxlm.data import tokenizer as T
from flaxlm.models.hf_sentencepiece import BPE, UNIGRAM, parse_model, tokenizer_json

WORDS = "where does Kavo live in Brel the city of 42 yes no a number say or".split()
FIXED = ["", " ", "  ", " x", " Kavo", "  where does", "Brel ", "the city  ", "a  b   c",
         "\n", "\nyes", " \n no", "line1\n\nline2", "\tsay", "où ☃ 你好 🙂", "  é", "1234 56",
         "▁", "▁▁ x", "<0x41>", "yes\r\nno", "\u3000no"]  # fmt: skip


def _strings(n=300, seed=0):
    """FIXED plus random mixes of the tokenizer's words, spaces, newlines and characters only
    byte fallback spells."""
    rng = random.Random(seed)
    parts = WORDS + [" ", "  ", "   ", "\n", "\t", "é", "☃", "你", "-", "."]
    out = list(FIXED)
    for _ in range(n):
        s = "".join(rng.choice(parts) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
        out.append(s)
    return out


def _converted(proto: bytes, special=(), bos_id=-1) -> HFTok:
    """The tokenizer transformers would load: tokenizer_json's dict, written and read back."""
    return HFTok.from_str(json.dumps(tokenizer_json(proto, set(special), bos_id)))


def _assert_same(proto: bytes, strings, special=()):
    sp = spm.SentencePieceProcessor(model_proto=proto)
    hf = _converted(proto, special, sp.bos_id())
    for s in strings:
        want = sp.encode(s, add_bos=sp.bos_id() >= 0)
        got = hf.encode(s).ids
        assert got == want, (s, [sp.id_to_piece(i) for i in want], [hf.id_to_token(i) for i in got])
        if sp.unk_id() not in want:  # (SentencePiece decodes it " ⁇ ", transformers skips it)
            assert hf.decode(want, skip_special_tokens=True) == sp.decode(want), s


def test_flaxlm_bpe_tokenizer_json_encodes_as_sentencepiece(chat_tokenizer):
    """flaxlm's own tokenizer (BPE, byte fallback, identity normaliser, the dummy "▁"
    always, chat tokens): the export's tokenizer.json gives the same ids for any text."""
    _, tok = chat_tokenizer
    specials = {i for i in tok.special_ids().values() if i >= 0}
    m = parse_model(tok.proto)
    assert m["model_type"] == BPE and m["byte_fallback"] and m["add_dummy_prefix"]
    assert not m["remove_extra_whitespaces"] and m["charsmap"] == b""
    _assert_same(tok.proto, _strings(), specials)
    hf = _converted(tok.proto, specials, tok.bos_id)
    # " x" keeps the dummy "▁" before its own space (transformers 5's Llama pipeline lost it)
    assert hf.encode(" Kavo").tokens[:3] == ["<s>", "▁", "▁Kavo"]
    # a segment after a special token gets its own "▁": SentencePiece on that segment alone
    end, user = tok.token_id("<|end|>"), tok.token_id("<|user|>")
    ids = hf.encode("<|user|>where does<|end|>").ids
    assert ids == [tok.bos_id, user, *tok.encode("where does"), end]
    assert {t.content for t in hf.get_added_tokens_decoder().values() if t.special} == {
        tok.sp.id_to_piece(i) for i in specials
    }


def test_unigram_and_normalising_models_encode_as_sentencepiece():
    """Other SentencePiece settings a run's tokenizer.model may have: Unigram (flaxlm's
    tokenizer_model_type), NFKC normalisation with extra whitespace removed (SentencePiece's
    defaults), no dummy prefix."""
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(400)]
    # (the characters of "<0x41>" known: a Unigram model then never takes the byte piece's name
    # in text for that piece; with one of them unknown it can, see hf_sentencepiece.py)
    lines += ["où ☃ ﬁ ① ｆｕｌｌ width"] * 3 + ["code <0x41> = x40 < 1 >"] * 40
    unigram = T.train(lines, 320, model_type="unigram").proto
    assert parse_model(unigram)["model_type"] == UNIGRAM
    # (a Unigram model can still differ where two splits of a run of one character score the
    # same: SentencePiece adds float32 scores, tokenizers float64; none of these strings does)
    _assert_same(unigram, _strings(150, 2))
    no_dummy = dict(add_dummy_prefix=False, byte_fallback=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False)  # fmt: skip
    for kw in (
        dict(model_type="bpe"),
        dict(model_type="unigram"),
        dict(model_type="bpe", **no_dummy),
    ):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                       vocab_size=420, minloglevel=2, hard_vocab_limit=False,
                                       **kw)  # fmt: skip
        m = parse_model(buf.getvalue())
        assert m["add_dummy_prefix"] == kw.get("add_dummy_prefix", True)
        if "normalization_rule_name" not in kw:  # SentencePiece's default: nmt_nfkc
            assert m["charsmap"] and m["remove_extra_whitespaces"]
        strings = _strings(150, 3) + ["ﬁ ①  ｆｕｌｌ", "  a  b  ", " \u3000 x"]
        _assert_same(buf.getvalue(), strings)


@pytest.mark.parametrize("model_type", ["word", "char"])
def test_models_tokenizer_json_cannot_express_get_none(model_type):
    lines = [" ".join(random.Random(i).choice(WORDS) for _ in range(8)) for i in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=40, model_type=model_type, minloglevel=2,
                                   use_all_vocab=True)  # fmt: skip
    assert tokenizer_json(buf.getvalue(), set()) is None


def test_the_exports_bos_setting_follows_the_tokenizer_and_its_unknown_piece_is_special(
    chat_tokenizer,
):
    """The export's tokenizer_config.json says add_bos_token as its tokenizer.json does it: a
    SentencePiece model without BOS (T5-style, bos_id -1) adds none and declares none. The
    UNKNOWN piece is a special added token even when the caller names no special ids."""
    from flaxlm.models.hf_tokenizer import sentencepiece_hf_files

    _, tok = chat_tokenizer

    class NoBos:  # the same model, its BOS off
        bos_id = -1

        def __getattr__(self, name):
            return getattr(tok, name)

        def special_ids(self):
            return {**tok.special_ids(), "bos": -1}

    for t, bos in ((tok, True), (NoBos(), False)):
        files = sentencepiece_hf_files(t)
        config = files["tokenizer_config.json"]
        assert config["add_bos_token"] is bos and ("bos_token" in config) is bos
        ids = HFTok.from_str(json.dumps(files["tokenizer.json"])).encode("yes").ids
        assert (ids[0] == tok.bos_id) is bos
    added = {t["content"]: t["special"] for t in tokenizer_json(tok.proto, set())["added_tokens"]}
    assert added[tok.sp.id_to_piece(tok.sp.unk_id())] is True
