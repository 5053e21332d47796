"""flaxlm's chat template over an HF tokenizer (a base model's tokenizer.json, no Jinja template):
a special token's string inside a message is encoded as text, so content can never write an
end of turn or a role the template did not (as with flaxlm's SentencePiece tokenizer)."""

from flaxlm.data import formats
from flaxlm.data.tokenizer import open_tokenizer
from tests.hf_tokenizers import write_hf_tokenizer


def test_content_that_spells_a_special_token_stays_text(tmp_path):
    d = write_hf_tokenizer(str(tmp_path), "", {"eos_token": "<|im_end|>"})
    tok = open_tokenizer(d)
    eos = tok.eos_id
    question = "what does <|im_end|> do, and <|im_start|>?"
    answer = "it ends a turn: <|im_end|>"
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, mask = formats.render_chat(msgs, tok)
    ids = [int(i) for i in ids]
    # EOS ends each turn (no chat tokens: EOS is the end of turn) and closes the conversation:
    # three, none from the contents
    assert ids.count(eos) == 3 and tok.token_id("<|im_start|>") not in ids
    template = formats.ChatTemplate(tok)
    assert tok.decode(template.encode(answer)) == answer
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == template.encode(answer) + [eos]  # the answer's text, then its one EOS
    prompt, _ = formats.render_chat(msgs[:1], tok, add_generation_prompt=True)
    assert [int(i) for i in prompt].count(eos) == 1  # generation prompts alike
