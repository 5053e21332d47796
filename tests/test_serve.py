"""`python -m flaxlm.serve` (flaxlm/serve.py) against references computed here on a tiny run:
`models.decode.generate` called directly, `python -m flaxlm.generate --chat` itself, a plain
forward's log_softmax and `LoglikScorer`.

* /v1/completions: greedy text, tokens, logprobs and top alternatives equal a direct generate
  call for three prompts of different lengths; usage counts them; seeded sampling repeats and
  draws generate --seed's samples; echo + max_tokens 0 scores the prompt as a forward does (and
  lm-eval-harness's max_tokens 1 form); a stop string cuts the text; requests of other lengths
  in the same buckets compile nothing new;
* /v1/chat/completions: the answer generate --chat gives, ended by the end-of-turn token;
* bad requests get OpenAI's error object naming the field, a server error a 500, and the server
  answers the next request; requests go through a real socket, several at once; a request
  waits for the device lock while /health answers; a model on a 2-device mesh answers as on
  one device;
* batching: concurrent requests with the same sampling values and different prompts, seeds,
  max_tokens and logprobs K run as one generate call, each answered as when served alone;
  other sampling values are not merged; --max_batch_rows splits a burst; an exception in a
  batch is a 500 for each of its requests, and the next request is served.
"""

import json
import shutil
import threading
import urllib.error
import urllib.request
import warnings

import jax
import numpy as np
import pytest

from flaxlm import generate as cli
from flaxlm import serve
from flaxlm.evaluation.loglik import LoglikScorer
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate, prompt_keys
from flaxlm.models.transformer import forward
from flaxlm.train.checkpoint import Checkpointer
from tests.test_generate_cli_audit import ending_params

CFG = get_variant("tiny", vocab_size=512, n_layers=1, max_seq_len=64)
TEXTS = ["where does Kavo live", "the city", "say yes or no a number in Brel the city of 42"]
USER, SYSTEM = "where does Kavo live", "say yes or no"


@pytest.fixture(scope="module")
def run(tmp_path_factory, chat_tokenizer):
    """(run dir, tokenizer): random weights whose `<|end|>` logit is raised (every embedding
    shares a direction c; lm_head's `<|end|>` column is 0.7·c) so chat answers end."""
    tok_path, tok = chat_tokenizer
    params = ending_params(tok, np.random.default_rng(0), CFG)
    root = tmp_path_factory.mktemp("serve") / "tiny-sft"
    root.mkdir()
    shutil.copy(tok_path, root / "tokenizer.model")
    ck = Checkpointer(str(root), keep=1, async_save=False)
    meta = {"model_config": CFG.to_dict(), "head": "lm", "tokenizer": "tokenizer.model"}
    ck.save(1, {"params": params}, {}, meta)
    ck.close()
    return str(root), tok


@pytest.fixture(scope="module")
def state(run):
    st = serve.load_state(serve._parser().parse_args([run[0]]))
    st.logs = []
    st.log = st.logs.append
    return st


def _post(state, path, obj):
    return serve.handle(state, "POST", path, json.dumps(obj).encode())


def _ok(state, path, obj):
    status, body = _post(state, path, obj)
    assert status == 200, body
    return body


def _ids(tok, text):
    return tok.encode(text, bos=True)


def test_models_and_health(state, run):
    status, body = serve.handle(state, "GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["object"]) for m in body["data"]] == [("tiny-sft", "model")]
    assert body["object"] == "list"
    assert serve.handle(state, "GET", "/health")[0] == 200
    args = serve._parser().parse_args([run[0], "--served_model_name", "sft"])
    assert serve.load_state(args).model_name == "sft"


def test_greedy_completions_equal_generate_with_logprobs(state, run):
    tok = run[1]
    prompts = [_ids(tok, t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == 3
    body = _ok(state, "/v1/completions", {"model": "tiny-sft", "prompt": TEXTS, "max_tokens": 6,
                                          "temperature": 0, "logprobs": 3})  # fmt: skip
    out = generate(CFG, state.params, prompts, max_new_tokens=6, rng=jax.random.PRNGKey(0),
                   temperature=0.0, stop_tokens=(tok.eos_id,), top_logprobs=3)  # fmt: skip
    toks, lps, lengths = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)
    top_ids, top_lps = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for i, c in enumerate(body["choices"]):
        n = int(lengths[i])
        ids = toks[i, :n].tolist()
        stopped = ids[-1] == tok.eos_id
        assert c["text"] == tok.decode(ids[:-1] if stopped else ids)
        assert c["finish_reason"] == ("stop" if stopped else "length")
        lp = c["logprobs"]
        assert lp["tokens"] == [state.text_of(t) for t in ids]
        np.testing.assert_allclose(lp["token_logprobs"], lps[i, :n], atol=1e-5)
        for j, alts in enumerate(lp["top_logprobs"]):
            want = {state.text_of(int(a)): float(b) for a, b in zip(top_ids[i, j], top_lps[i, j])}
            assert list(alts)[:3] == list(want)  # the 3 alternatives, most likely first
            assert max(alts.values()) == alts[next(iter(alts))]
            np.testing.assert_allclose([alts[k] for k in want], list(want.values()), atol=1e-5)
        offsets = np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()
        assert lp["text_offset"] == offsets
    n_gen = int(lengths.sum())
    want = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": n_gen,
            "total_tokens": sum(map(len, prompts)) + n_gen}  # fmt: skip
    assert body["usage"] == want
    assert body["object"] == "text_completion" and body["model"] == "tiny-sft"


def test_seeded_sampling_repeats_and_draws_generate_seed_samples(state, run):
    tok = run[1]
    req = {"prompt": TEXTS[0], "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 7,
           "logprobs": 2}  # fmt: skip
    a, b = _ok(state, "/v1/completions", req), _ok(state, "/v1/completions", req)
    texts = [c["text"] for c in a["choices"]]
    assert len(texts) == 2 and texts == [c["text"] for c in b["choices"]]
    # sampled tokens: each position lists its 2 alternatives, most likely first, and the token
    lps = [c["logprobs"] for c in a["choices"]]
    for lp in lps:
        for token, value, alts in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert alts[token] == value and len(alts) <= 3
            assert next(iter(alts.values())) == max(alts.values())
    assert any(len(alts) == 3 for lp in lps for alts in lp["top_logprobs"])  # some not top-2
    # generate --seed 7 --num_samples 2: sample k of prompt 0 from fold_in(fold_in(key, 0), k)
    out = generate(CFG, state.params, [_ids(tok, TEXTS[0])], max_new_tokens=8,
                   rng=prompt_keys(jax.random.PRNGKey(7), [0]), temperature=1.0,
                   stop_tokens=(tok.eos_id,), num_samples=2)  # fmt: skip
    want = []
    for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        ids = row[:n].tolist()
        want.append(tok.decode(ids[:-1] if ids[-1] == tok.eos_id else ids))
    assert texts == want
    other = _ok(state, "/v1/completions", {**req, "seed": 8})
    assert [c["text"] for c in other["choices"]] != texts


def test_echo_scores_the_prompt_as_a_forward_does(state, run):
    tok = run[1]
    prompts = [_ids(tok, TEXTS[2]), _ids(tok, TEXTS[1])]
    # token-id prompts, as lm-eval-harness sends them with a tokenizer
    body = _ok(state, "/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True,
                                          "logprobs": 1, "temperature": 0})  # fmt: skip
    assert body["usage"]["completion_tokens"] == 0
    scorer = LoglikScorer(CFG, state.params)
    first_want = None
    for ids, c in zip(prompts, body["choices"]):
        lp = c["logprobs"]
        assert c["text"] == tok.decode(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == len(ids)
        logits = np.asarray(forward(CFG, state.params, np.asarray([ids])), np.float64)[0]
        ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want = [ref[j - 1, ids[j]] for j in range(1, len(ids))]
        first_want = want if first_want is None else first_want
        np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-5)
        for j, alts in enumerate(lp["top_logprobs"][1:], start=1):
            best = int(np.argmax(ref[j - 1]))
            assert next(iter(alts)) == state.text_of(best)
            assert abs(alts[state.text_of(best)] - ref[j - 1, best]) < 1e-5
        (score,) = scorer.score([(ids[:1], ids[1:])])
        assert abs(sum(lp["token_logprobs"][1:]) - score.logprob) < 1e-4
    # lm-eval-harness's loglikelihood form: echo, max_tokens 1, then drops the last token
    req = {"prompt": prompts[:1], "max_tokens": 1, "echo": True, "logprobs": 1, "seed": 1234,
           "temperature": 0}  # fmt: skip
    lp = _ok(state, "/v1/completions", req)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompts[0]) + 1
    assert lp["text_offset"][-1] == len(tok.decode(prompts[0]))  # the generated token's
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], first_want, atol=1e-5)


def test_a_stop_string_cuts_the_text(state):
    base = {"prompt": TEXTS[0], "max_tokens": 12, "temperature": 0}
    full = _ok(state, "/v1/completions", base)["choices"][0]
    assert full["finish_reason"] == "length" and len(full["text"]) >= 6, full
    stop = full["text"][4:6]
    cut = full["text"].find(stop)
    got = _ok(state, "/v1/completions", {**base, "stop": ["zzzz", stop]})["choices"][0]
    assert got["text"] == full["text"][:cut]
    assert got["finish_reason"] == "stop"


def test_requests_in_the_same_buckets_compile_nothing_new(state, run):
    tok = run[1]
    req = {"prompt": "where does", "max_tokens": 5, "temperature": 0}
    _ok(state, "/v1/completions", req)
    before = dict(state.programs)
    compiles = []

    def listen(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # another length in the same prompt bucket (8), max_tokens 7 rounds up to 8 as 5 does
        longer = "where does Kavo live"
        assert len(_ids(tok, "where does")) != len(_ids(tok, longer)) <= 8
        _ok(state, "/v1/completions", {**req, "prompt": longer, "max_tokens": 7})
        # near the context (64): 40 + 20 and 41 + 23 tokens both decode 32 steps
        near = {"prompt": [list(range(5, 45))], "max_tokens": 20, "temperature": 0}
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            _ok(state, "/v1/completions", near)
            before, compiles[:] = dict(state.programs), []
            more = {**near, "prompt": [list(range(5, 46))], "max_tokens": 23}
            _ok(state, "/v1/completions", more)
        # (the dropped steps pass max_seq_len; what the client asked for does not: no warning)
        assert not [w for w in warned if "max_seq_len" in str(w.message)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert state.programs == before and compiles == []
    assert any(m.startswith("compiling decode program") for m in state.logs)


def test_chat_answers_as_generate_chat_does(state, run, capsys):
    run_dir, tok = run
    sp = tok.special_ids()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    ids = [tok.bos_id, sp["<|system|>"], *tok.encode(SYSTEM), sp["<|end|>"], sp["<|user|>"],
           *tok.encode(USER), sp["<|end|>"], sp["<|assistant|>"]]  # fmt: skip
    body = _ok(state, "/v1/chat/completions", {"messages": msgs, "temperature": 0,
                                               "max_tokens": 40, "logprobs": True,
                                               "top_logprobs": 2})  # fmt: skip
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    cli.main([run_dir, "--chat", "--system", SYSTEM, "--prompt", USER, "--temperature", "0",
              "--max_new_tokens", "40", "--json"])  # fmt: skip
    rec = json.loads(capsys.readouterr().out)
    assert choice["message"] == {"role": "assistant", "content": rec["completion"]}
    # the answer ended at the end-of-turn token, listed last in the logprobs
    assert rec["stopped"] and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert len(content) == rec["n_tokens"] == body["usage"]["completion_tokens"]
    assert content[-1]["token"] == state.text_of(sp["<|end|>"])
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        ("/v1/completions", {"prompt": "a", "temprature": 0.5}, 400, "temprature",
         ["temprature"]),
        ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature", [">= 0"]),
        ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", ["(0, 1]"]),
        ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", ["[1, 128]"]),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", [">= 0"]),
        ("/v1/completions", {"prompt": "a", "max_tokens": "3"}, 400, "max_tokens", ["integer"]),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs", ["20"]),
        ("/v1/completions", {"prompt": "a", "stream": True}, 400, "stream", ["not supported"]),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 1}}, 400, "logit_bias", []),
        ("/v1/completions", {"prompt": "a " * 40, "max_tokens": 30}, 400, "prompt",
         ["30", "64"]),
        ("/v1/completions", {"prompt": [[1, 2, 512]]}, 400, "prompt", ["512", "vocabulary"]),
        ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", ["gpt-4"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                  "top_logprobs": 2}, 400, "top_logprobs", ["logprobs"]),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, 400,
         "messages", ["robot"]),
        ("/v1/nothing", {}, 404, None, ["/v1/nothing"]),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(state, path, body, status, param, words):
    got, err = _post(state, path, body)
    assert got == status, err
    assert set(err) == {"error"} and err["error"]["param"] == param
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] in (
        None, "model_not_found")  # fmt: skip
    for w in words:
        assert w in err["error"]["message"]
    assert _ok(state, "/v1/completions", {"prompt": "a", "max_tokens": 1})["choices"]


def test_bad_json_wrong_method_and_server_errors(state, monkeypatch):
    status, err = serve.handle(state, "POST", "/v1/completions", b'{"prompt": "a",, }')
    assert status == 400 and "char 15" in err["error"]["message"]
    status, err = serve.handle(state, "POST", "/v1/completions", b'{"prompt": NaN}')
    assert status == 400 and "NaN" in err["error"]["message"]
    assert serve.handle(state, "GET", "/v1/completions")[0] == 405
    assert serve.handle(state, "POST", "/v1/models", b"{}")[0] == 405

    def broken(*a, **k):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(serve, "_decode", broken)
    status, err = _post(state, "/v1/completions", {"prompt": "a"})
    assert status == 500 and "device on fire" in err["error"]["message"]
    monkeypatch.undo()
    assert _ok(state, "/v1/completions", {"prompt": "a", "max_tokens": 1})["choices"]


def test_a_request_through_a_socket(state):
    server = serve.make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        data = json.dumps({"prompt": TEXTS[0], "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        want = _ok(state, "/v1/completions", {"prompt": TEXTS[0], "max_tokens": 3,
                                              "temperature": 0})  # fmt: skip
        assert body["choices"][0]["text"] == want["choices"][0]["text"]
        # requests that arrive together (batched or not) each get their own answer
        answers = [None] * 4

        def ask(k):
            one = json.dumps({"prompt": TEXTS[k % 2], "max_tokens": 3, "temperature": 0})
            req = urllib.request.Request(f"{url}/v1/completions", data=one.encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                answers[k] = json.loads(r.read())["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        other = _ok(state, "/v1/completions", {"prompt": TEXTS[1], "max_tokens": 3,
                                               "temperature": 0})["choices"][0]["text"]  # fmt: skip
        assert answers == [want["choices"][0]["text"], other] * 2
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/v2/oops", timeout=60)
        assert e.value.code == 404 and "error" in json.loads(e.value.read())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_model_split_over_a_mesh_answers_alike(state, run):
    """--mesh data=2: the scoring rows are padded to the mesh (one prompt, two rows) and
    decode runs under it; the answers are the single device's, up to float rounding."""
    meshed = serve.load_state(serve._parser().parse_args([run[0], "--mesh", "data=2"]))
    req = {"prompt": [TEXTS[2]], "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}
    want, got = _ok(state, "/v1/completions", req), _ok(meshed, "/v1/completions", req)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    a, b = got["choices"][0]["logprobs"], want["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and a["token_logprobs"][0] is None
    np.testing.assert_allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], atol=1e-5)
    assert any(k[0] == "score" and dict(k[1:])["rows"] == 2 for k in meshed.programs)


def test_requests_wait_for_the_device_lock_and_health_does_not(state):
    done = []
    req = {"prompt": "a", "max_tokens": 1}
    with state.lock:  # another request on the device
        t = threading.Thread(target=lambda: done.append(_post(state, "/v1/completions", req)[0]))
        t.start()
        t.join(timeout=1.0)
        assert done == []
        assert serve.handle(state, "GET", "/health")[0] == 200
    t.join(timeout=60)
    assert done == [200]


# --- batching concurrent requests (flaxlm/serve_batch.py) --------------------------------------


def _count_generate(monkeypatch, fail: str = ""):
    """Wraps serve._generate: the list it returns gets each call's (padded) prompt count; with
    `fail`, every call raises a RuntimeError of that message instead."""
    calls, real = [], serve._generate

    def counted(state, prompts, *a, **k):
        calls.append(len(prompts))
        if fail:
            raise RuntimeError(fail)
        return real(state, prompts, *a, **k)

    monkeypatch.setattr(serve, "_generate", counted)
    return calls


def _together(state, reqs, path="/v1/completions"):
    """(status, body) of each request of `reqs`, sent from threads while the device lock is
    held, each queued before the next is sent (the queue in their order), the lock released
    once all of them are: they reach the worker together."""
    out = [None] * len(reqs)

    def ask(k):
        out[k] = _post(state, path, reqs[k])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(reqs))]
    with state.lock:
        for k, t in enumerate(threads):
            t.start()
            for _ in range(2000):
                if state.batcher.queued() == k + 1:
                    break
                threading.Event().wait(0.01)
            assert state.batcher.queued() == k + 1
    for t in threads:
        t.join(timeout=120)
    return out


def _same_answer(got, want):
    """Two completions responses alike: text, finish_reason, tokens exactly, logprobs to float
    rounding (another program computed them)."""
    assert got["usage"] == want["usage"]
    assert len(got["choices"]) == len(want["choices"])
    for a, b in zip(got["choices"], want["choices"]):
        assert (a["index"], a["text"], a["finish_reason"]) == (
            b["index"], b["text"], b["finish_reason"])  # fmt: skip
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        np.testing.assert_allclose(a["logprobs"]["token_logprobs"],
                                   b["logprobs"]["token_logprobs"], atol=1e-5)  # fmt: skip
        assert [list(x) for x in a["logprobs"]["top_logprobs"]] == [
            list(x) for x in b["logprobs"]["top_logprobs"]]  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_concurrent_requests_decode_as_one_call_each_answer_as_alone(state, monkeypatch,
                                                                     temperature):  # fmt: skip
    prompts = [TEXTS[0], [TEXTS[1], TEXTS[2]], "the city of", "Brel"]
    reqs = [{"prompt": p, "max_tokens": m, "temperature": temperature, "n": 2, "seed": 11 + k,
             "logprobs": lp} for k, (p, m, lp) in enumerate(zip(prompts, [3, 6, 9, 14],
                                                                 [3, 4, 3, 4]))]  # fmt: skip
    calls = _count_generate(monkeypatch)
    alone = [_ok(state, "/v1/completions", r) for r in reqs]
    assert calls == [1, 2, 1, 1]
    calls.clear()
    got = _together(state, reqs)
    assert calls == [8]  # one call: 5 prompts, padded to 8 rows (x n = 2 samples each)
    for (status, body), want, req in zip(got, alone, reqs):
        assert status == 200, body
        _same_answer(body, want)
        for c in body["choices"]:  # each cut to its own max_tokens (the batch ran 16 steps)
            assert len(c["logprobs"]["tokens"]) <= req["max_tokens"]
    assert any(c["finish_reason"] == "length" and len(c["logprobs"]["tokens"]) == 3
               for c in got[0][1]["choices"])  # fmt: skip
    if temperature:  # the seeds matter: another seed draws another sample
        again = _together(state, [{**reqs[3], "seed": 99}, reqs[3]])
        _same_answer(again[1][1], got[3][1])
        assert again[0][1]["choices"] != got[3][1]["choices"]


def test_requests_with_other_sampling_values_are_not_merged(state, monkeypatch):
    calls = _count_generate(monkeypatch)
    reqs = [{"prompt": TEXTS[0], "max_tokens": 4, "temperature": t, "seed": 3}
            for t in (0.0, 0.7, 0.0)]  # fmt: skip
    got = _together(state, reqs)
    assert [g[0] for g in got] == [200] * 3
    assert calls == [2, 1]  # the two greedy ones together, the oldest's batch first
    assert got[0][1]["choices"][0]["text"] == got[2][1]["choices"][0]["text"]


def test_the_row_cap_splits_a_burst(state, monkeypatch):
    calls = _count_generate(monkeypatch)
    monkeypatch.setattr(state.batcher, "max_rows", 4)
    reqs = [{"prompt": TEXTS[k % 3], "max_tokens": 2, "temperature": 0} for k in range(5)]
    reqs.append({**reqs[0], "prompt": [TEXTS[0]] * 3})  # 3 rows: fits beside the 5th
    reqs.append({**reqs[0], "prompt": [TEXTS[1]] * 5})  # 5 rows: more than the cap, alone
    got = _together(state, reqs)
    assert all(status == 200 for status, _ in got)
    assert [len(b["choices"]) for _, b in got] == [1] * 5 + [3, 5]
    # [the first 4], [the 5th and the 3-prompt one], [the 5-prompt one, padded to 8 rows]
    assert calls == [4, 4, 8]
    want = _ok(state, "/v1/completions", reqs[5])
    assert [c["text"] for c in got[5][1]["choices"]] == [c["text"] for c in want["choices"]]


def test_an_exception_in_a_batch_fails_each_request_and_the_next_succeeds(state, monkeypatch):
    calls = _count_generate(monkeypatch, fail="device on fire")
    reqs = [{"prompt": TEXTS[k], "max_tokens": 3, "temperature": 0} for k in range(3)]
    got = _together(state, reqs)
    assert calls == [4]
    for status, body in got:
        assert status == 500 and "RuntimeError: device on fire" in body["error"]["message"]
        assert body["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert _ok(state, "/v1/completions", reqs[0])["choices"][0]["finish_reason"]


def test_a_client_that_leaves_does_not_break_the_worker(state):
    import socket

    server = serve.make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    body = json.dumps({"prompt": TEXTS[0], "max_tokens": 3, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\n\r\n").encode()  # fmt: skip
    try:
        with state.lock:  # the request queues, its client hangs up before the answer
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head + body)
                for _ in range(2000):
                    if state.batcher.queued() == 1:
                        break
                    threading.Event().wait(0.01)
                assert state.batcher.queued() == 1
        data = json.dumps({"prompt": TEXTS[1], "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=data)
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["choices"][0]["text"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert state.batcher._thread is None  # server_close stopped the worker
    assert _ok(state, "/v1/completions", {"prompt": "a", "max_tokens": 1})["choices"]  # restarts
