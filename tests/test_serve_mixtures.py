"""Per-request adapter mixtures over HTTP: `"adapters": {"a": 0.7, "b": -0.3}` with `model` the base, sent by the
official `openai` client (`extra_body`) to a real `lorakit serve` on loopback; every generation names what
served it in the `x-lorakit-adapter` header; bad mixtures get a 400 or 404 naming the field or adapter."""

from __future__ import annotations

import copy
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer
from test_serve import ADMIN_KEY, BASE, PROMPT, TEAM_KEY, assert_openai_error, start_server

MIX = {"r4": 0.7, "r16": -0.3}  # mixed ranks, a negative weight
MIX3 = {"r16": 0.5, "rs8": 1.5, "r4": -0.25}  # with an rsLoRA adapter on q and v only
TOKENS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Adapters of ranks 4 and 16 (all-linear) and an rsLoRA one of rank 8 on q and v, on the embedded model,
    and MIX composed offline by `lorakit.compose` (exact linear)."""
    root = tmp_path_factory.mktemp("mixture-adapters")
    base = load_model(None)
    folders = {}
    for seed, (name, rank, extra) in enumerate([("r4", 4, {}), ("r16", 16, {}),
                                                ("rs8", 8, {"use_rslora": True, "target_modules": ["q_proj", "v_proj"]})]):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        config = {"target_modules": "all-linear", **extra}
        lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, **config))
        folders[name] = lorakit.save_adapter(model, root / name)
    folders["composed"] = lorakit.compose({n: folders[n] for n in MIX}, list(MIX.values())).save(root / "composed")
    return folders


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    """Two tenants: ops (every model) and team (the base and r4 only)."""
    folder = tmp_path_factory.mktemp("mixture-server")
    keys = folder / "keys.yaml"
    keys.write_text(f"{ADMIN_KEY}:\n  tenant: ops\n  models: '*'\n"
                    f"'sha256:{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}':\n  tenant: team\n"
                    f"  models: [{BASE}, r4]\n")
    adapters = [flag for name, path in folders.items() for flag in ("--adapter", f"{name}={path}")]
    srv = start_server(folder, "--api-keys", str(keys), "--max-running", "4", *adapters)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def merged_text(folders, mixture: dict[str, float], prompt: str = PROMPT) -> str:
    """Greedy text of the embedded model whose weights are W + Σ w·s·B A, merged here in fp64 (then fp32)."""
    model, tokenizer = load_model(None), load_tokenizer(None)
    with torch.no_grad():
        for name, weight in mixture.items():
            for module, factors in lorakit.Adapter.read(folders[name]).modules.items():
                target = model.get_submodule(module.removeprefix("base_model.model."))
                target.weight.copy_((target.weight.double()
                                     + weight * factors.scale * (factors.b.double() @ factors.a.double())).float())
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


def complete(server, model: str, adapters=None, key: str = ADMIN_KEY):
    """A greedy completion through the openai client: (text, x-lorakit-adapter header)."""
    extra = {"ignore_eos": True, **({"adapters": adapters} if adapters is not None else {})}
    raw = server.client(key).completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=TOKENS,
                                                                  temperature=0, extra_body=extra)
    return raw.parse().choices[0].text, raw.headers["x-lorakit-adapter"]


def test_base_adapter_and_mixture_requests_batched_together_give_the_merged_weights_text(server, folders):
    requests = [(BASE, None), ("r4", None), (BASE, MIX), (BASE, MIX3)]
    with ThreadPoolExecutor(len(requests)) as pool:  # sent at once: decoded in the same steps
        answers = list(pool.map(lambda request: complete(server, *request), requests))
    assert [header for _, header in answers] == ["base", "r4", "r4:0.7,r16:-0.3", "r16:0.5,rs8:1.5,r4:-0.25"]
    for (model, mixture), (text, _) in zip(requests, answers):
        expected = merged_text(folders, mixture or ({} if model == BASE else {model: 1.0}))
        assert text == expected, (model, mixture)


def test_a_mixture_is_token_identical_to_serving_the_adapter_composed_offline(server):
    assert complete(server, BASE, MIX)[0] == complete(server, "composed")[0]


def test_streamed_and_chat_answers_name_what_served_them(server):
    client = server.client()
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.with_raw_response.create(model=BASE, messages=messages, max_tokens=4,
                                                            extra_body={"adapters": MIX3})
    assert chat.headers["x-lorakit-adapter"] == "r16:0.5,rs8:1.5,r4:-0.25"
    assert chat.parse().choices[0].message.content is not None
    streamed = client.chat.completions.with_raw_response.create(model="r4", messages=messages, max_tokens=4,
                                                                stream=True)
    assert streamed.headers["x-lorakit-adapter"] == "r4"
    assert list(streamed.parse())[-1].choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.with_raw_response.create(model=BASE, prompt=PROMPT, max_tokens=4, stream=True,
                                                           extra_body={"adapters": {"r4": 1e-5}})
    assert streamed.headers["x-lorakit-adapter"] == "r4:1e-05"
    assert "".join(chunk.choices[0].text for chunk in streamed.parse() if chunk.choices)


@pytest.mark.parametrize("body, status, param, words", [
    ({"adapters": {"r4": 0.5, "nope": 0.5}}, 404, "adapters.nope", ["'nope'"]),
    ({"adapters": {}}, 400, "adapters", ["empty"]),
    ({"adapters": {f"a{i}": 0.1 for i in range(9)}}, 400, "adapters", ["at most 8"]),
    ({"adapters": {"r4": "0.5"}}, 400, "adapters", ["'r4'", "finite"]),
    ({"adapters": {"r4": 0.5, BASE: 0.5}}, 400, None, [repr(BASE), "adapters only"]),
    ({"model": "r4", "adapters": {"r16": 1.0}}, 400, "model", ["base model", repr(BASE)]),
    ({"adapters": [["r4", 1.0]]}, 400, "adapters", []),
])
def test_bad_mixtures_are_refused_naming_the_field_or_adapter(server, body, status, param, words):
    request = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, **body}
    error = assert_openai_error(server.post("/v1/completions", request), status)
    assert error["param"] == param and all(word in error["message"] for word in words), error


def test_a_non_finite_weight_is_refused(server):
    body = json.dumps({"model": BASE, "prompt": PROMPT, "adapters": {"r4": 0.5}}).replace("0.5", "NaN").encode()
    error = assert_openai_error(server.post("/v1/completions", body), 400)
    assert "'r4'" in error["message"] and "finite" in error["message"]


def test_a_key_mixes_only_adapters_it_may_use_and_cannot_tell_them_from_unknown_ones(server):
    request = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
    forbidden = assert_openai_error(server.post("/v1/completions", {**request, "adapters": {"r4": 0.5, "r16": 0.5}},
                                                key=TEAM_KEY), 404)
    unknown = assert_openai_error(server.post("/v1/completions", {**request, "adapters": {"r4": 0.5, "r17": 0.5}},
                                              key=TEAM_KEY), 404)
    assert forbidden["message"].replace("r16", "r17") == unknown["message"] and forbidden["param"] == "adapters.r16"
    assert complete(server, BASE, {"r4": 2.0}, key=TEAM_KEY)[1] == "r4:2.0"
