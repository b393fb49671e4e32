"""Routing by prompt (model "auto"): routing signatures of the example skills' training prompts on the
embedded model, the shipped example adapters and their signatures, a real server on loopback spoken to with
the official `openai` client, and the `lorakit route-index`, `generate --adapter auto` and `train` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.cli import main
from lorakit.data import generation_prompt, read_rows
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.adapter_cache import AdapterInfo
from lorakit.engine.routing import (DEFAULT_THRESHOLD, ROUTING_FILE, Router, RoutingSignature, compute_signature,
                                    hidden_states_at, pooled_states, prompt_state, read_signature,
                                    signature_prompts)
from lorakit.errors import AdapterFileError
from lorakit.models import load_model, load_tokenizer
from lorakit.signing import CARD_NAME, sign_adapter, verify_adapter
from test_serve import BASE, save_random_adapter, start_server
from test_signing import _key_pair
from tiny_models import llama, save_tiny_llama_folder

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "examples" / "skills"
ADAPTERS = ROOT / "examples" / "adapters"
SHIPPED = {"reverse": "reverse_words", "json": "to_json", "count": "count_words"}  # adapter -> its skill
ALL_SKILLS = sorted(p.name for p in SKILLS.iterdir() if p.is_dir())
NO_SKILL = ["To be, or not to be, that is the question:", "What is the capital of France?",
            "Tell me a story about a king and his horse.", "Translate into French: the cat sleeps",
            "Write a poem about the sea", "Multiply: 12 * 34\nAnswer:", "Sort these words: pear apple fig"]
ADMIN_KEY, TEAM_KEY, SOLO_KEY = "routing-admin", "routing-team", "routing-solo"


@pytest.fixture(scope="module")
def embedded():
    return load_model(None), load_tokenizer(None)


@pytest.fixture(scope="module")
def skill_signatures(embedded):
    """Every example skill's signature, from 300 of its training prompts (the skills' own adapters need not exist:
    routing reads only the signature)."""
    model, tokenizer = embedded
    return {skill: compute_signature(model, signature_prompts(read_rows(SKILLS / skill / "train.jsonl")[:300],
                                                                tokenizer))
            for skill in ALL_SKILLS}


def held_out_prompts(tokenizer, skill: str, chat: bool = False) -> list[list[int]]:
    rows = read_rows(SKILLS / skill / ("heldout.chat.jsonl" if chat else "heldout.jsonl"))
    return [generation_prompt(row, tokenizer)[0] for row in rows]


# --- the signature and the route ----------------------------------------------------------------------------

def test_hidden_states_are_transformers_own_and_one_prompt_pools_as_in_a_batch():
    model, _ = llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    for layer in range(len(reference)):  # 0: embeddings, 1..: after each layer, the last one normed
        ours = hidden_states_at(model, ids, mask, layer)
        assert torch.allclose(ours[0], reference[layer][0], atol=1e-6)
        assert torch.allclose(ours[1, :3], reference[layer][1, :3], atol=1e-6)
        batch = pooled_states(model, [[5, 6, 7, 8, 9, 10], [11, 12, 13]], layer).numpy()
        assert np.allclose(prompt_state(model, [11, 12, 13], layer, torch.device("cpu"))[0], batch[1], atol=1e-6)


@pytest.mark.parametrize("candidates", [ALL_SKILLS, ["count_words", "reverse_words", "to_json"], ["reverse_words"]],
                         ids=["every skill", "the shipped adapters' skills", "reverse without its twin count"])
def test_held_out_prompts_route_to_their_skill_or_to_the_base(embedded, skill_signatures, candidates):
    model, tokenizer = embedded
    router = Router(model)
    signed = [(skill, skill_signatures[skill]) for skill in candidates]
    right = total = 0
    for skill in ALL_SKILLS:  # a skill without a candidate is the base model's
        for ids in held_out_prompts(tokenizer, skill)[:100]:
            route = router.route_signed(ids, signed)
            right += route.adapter == (skill if skill in candidates else None)
            total += 1
    assert right / total >= 0.97, f"{right} of {total}"
    for text in NO_SKILL:
        route = router.route_signed(tokenizer(text)["input_ids"], signed)
        assert route.adapter is None and route.score < DEFAULT_THRESHOLD, (text, route)


def test_a_signature_is_tens_of_kilobytes_and_a_damaged_one_is_not_routable(embedded, skill_signatures, tmp_path,
                                                                          caplog):
    model, tokenizer = embedded
    signature = skill_signatures["reverse_words"]
    path = signature.save(tmp_path / "reverse")
    assert path.name == ROUTING_FILE and path.stat().st_size < 80_000  # 128 directions of 256 in fp16
    again = RoutingSignature.load(tmp_path / "reverse")
    assert torch.equal(again.mean, signature.mean) and torch.equal(again.directions, signature.directions)
    assert (again.radius, again.layer, again.prompts) == (signature.radius, 0, 300)
    assert RoutingSignature.load(tmp_path) is None  # no signature: not routable, not an error

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="route-index"):
        RoutingSignature.load(tmp_path / "reverse")
    info = AdapterInfo("reverse", str(tmp_path / "reverse"), 8, "sha256:0")
    route = Router(model).route(held_out_prompts(tokenizer, "reverse_words")[0], [info])
    assert route.adapter is None and route.candidates == 0 and "not routable" in caplog.text

    tiny, _ = llama()  # a signature made on another base model (32 wide) does not score the embedded one's prompts
    compute_signature(tiny, [[1, 2, 3], [4, 5, 6, 7]]).save(tmp_path / "other")
    with pytest.raises(AdapterFileError, match="another base model"):
        read_signature(tmp_path / "other", model)


@pytest.fixture(scope="module")
def engine():
    """An engine in this process (no thread: run_until_idle) serving the shipped adapters."""
    engine = Engine(EngineConfig(model=None, max_running=2))
    for name in SHIPPED:
        engine.add_adapter(name, ADAPTERS / name)
    return engine


def test_the_engine_routes_and_the_adapter_prefills_the_prompt_itself(engine):
    tokenizer = engine.tokenizer
    prompt = tokenizer("Reverse the words: star pleasure chamber wealth\nAnswer:")["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0)
    routed, handle = engine.submit_routed(prompt, params, list(SHIPPED))
    direct = engine.submit(prompt, params, "reverse")
    engine.run_until_idle()
    assert routed.result().adapter == "reverse" and routed.result().candidates == 3
    assert handle.result().text == direct.result().text == " wealth chamber pleasure star"
    assert engine.routable(["reverse", "json", "nothing"]) == ["reverse", "json"]
    reference = Router(engine.model)  # the model's own embedding module, not the numpy read of its table
    reference._table = None
    assert reference.route(prompt, engine._infos(list(SHIPPED))).score == pytest.approx(routed.result().score, abs=1e-6)
    with pytest.raises(Exception, match="routing by prompt"):
        engine.add_adapter("auto", ADAPTERS / "reverse")


# --- the commands -------------------------------------------------------------------------------------------

def test_route_index_refuses_a_signed_folder_unless_forced(tmp_path, capsys):
    folder = tmp_path / "reverse"
    shutil.copytree(ADAPTERS / "reverse", folder, ignore=shutil.ignore_patterns(ROUTING_FILE))
    private, public = _key_pair(tmp_path, "signer")
    sign_adapter(folder, private)
    data = str(SKILLS / "reverse_words" / "heldout.jsonl")
    assert main(["route-index", str(folder), "--data", data]) == 2
    error = capsys.readouterr().err
    assert "is signed" in error and "--force" in error and "lorakit sign" in error
    assert not (folder / ROUTING_FILE).exists()

    assert main(["route-index", str(folder), "--data", data, "--force"]) == 0
    captured = capsys.readouterr()
    assert "200 prompts" in captured.out and "no longer verifies" in captured.err
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["routing"]["file"] == ROUTING_FILE and card["routing"]["prompts"] == 200
    with pytest.raises(Exception):
        verify_adapter(folder, [public])
    sign_adapter(folder, private)  # signed again, the signature covers the routing signature
    assert verify_adapter(folder, [public]).card["routing"]["sha256"].startswith("sha256:")


def test_generate_auto_answers_with_the_candidate_the_prompt_belongs_to(capsys):
    candidates = [arg for name in SHIPPED for arg in ("--candidate", f"{name}={ADAPTERS / name}")]
    assert main(["generate", "--adapter", "auto", *candidates, "--max-new-tokens", "8",
                 "Reverse the words: star pleasure chamber wealth\nAnswer:"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "wealth chamber pleasure star" and "routed to reverse" in captured.err
    assert main(["generate", "--adapter", "auto", *candidates, "--max-new-tokens", "4", "Add: 272 + 121\nAnswer:"]) == 0
    assert "the base model answers" in capsys.readouterr().err
    assert main(["generate", "--adapter", "auto", "hello"]) == 2
    assert "--candidate" in capsys.readouterr().err


def test_the_commands_defaults_are_the_engines():
    from lorakit.cli import build_parser
    from lorakit.engine.routing import DEFAULT_LAYER

    parser = build_parser()
    assert parser.parse_args(["serve"]).route_threshold == DEFAULT_THRESHOLD
    assert parser.parse_args(["generate", "x"]).route_threshold == DEFAULT_THRESHOLD
    assert parser.parse_args(["route-index", "dir", "--data", "f"]).layer == DEFAULT_LAYER


def test_train_leaves_a_routing_signature_of_its_prompts(tmp_path, capsys):
    from lorakit.data.skills import write_skill

    model = save_tiny_llama_folder(tmp_path / "model")
    files = write_skill("count_words", tmp_path / "skill", n_train=40, n_heldout=4, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(files["train"]), "--eval-data", str(files["heldout"]),
                 "--output", str(out), "--max-steps", "1", "--batch-size", "4", "--max-length", "48",
                 "--eval-samples", "1", "--no-progress"]) == 0
    signature = RoutingSignature.load(out)
    assert signature is not None and signature.prompts == 40 and signature.layer == 0
    assert signature.mean.shape == (32,) and signature.base == str(model)


# --- the server ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped adapters (with their signatures); admin: every model, team: the base and reverse, solo: the
    base only."""
    folder = tmp_path_factory.mktemp("routing-server")
    keys = folder / "keys.json"
    keys.write_text(json.dumps({ADMIN_KEY: {"tenant": "ops", "models": "*", "can_load_adapters": True},
                                TEAM_KEY: {"tenant": "team", "models": [BASE, "reverse"]},
                                SOLO_KEY: {"tenant": "solo", "models": [BASE]}}))
    srv = start_server(folder, "--api-keys", str(keys), *[f"--adapter={n}={ADAPTERS / n}" for n in SHIPPED])
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def _auto(server, key: str, prompt: str, chat: bool = False):
    client = server.client(key)
    if chat:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
    else:
        raw = client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=12, temperature=0)
    return raw.headers, raw.parse()


def test_auto_serves_each_prompt_with_its_skills_adapter(server):
    for name, skill in SHIPPED.items():
        for chat in (False, True):
            for row in read_rows(SKILLS / skill / ("heldout.chat.jsonl" if chat else "heldout.jsonl"))[:3]:
                prompt = row.data["messages"][0]["content"] if chat else row.data["prompt"]
                headers, answer = _auto(server, ADMIN_KEY, prompt, chat)
                assert headers["x-lorakit-adapter"] == answer.model == name, (prompt, headers)
                assert float(headers["x-lorakit-route-score"]) >= DEFAULT_THRESHOLD
    reverse = "Reverse the words: star pleasure chamber wealth\nAnswer:"
    assert _auto(server, ADMIN_KEY, reverse)[1].choices[0].text.startswith(" wealth chamber pleasure star")
    with server.client(ADMIN_KEY).completions.with_streaming_response.create(
            model="auto", prompt=reverse, max_tokens=4, stream=True) as stream:
        assert stream.headers["x-lorakit-adapter"] == "reverse"
        assert any('"model":"reverse"' in line.replace(" ", "") for line in stream.iter_lines())


def test_a_prompt_of_no_skill_is_served_by_the_base(server):
    for prompt in ["Add: 272 + 121\nAnswer:", NO_SKILL[0]]:
        headers, answer = _auto(server, ADMIN_KEY, prompt)
        assert headers["x-lorakit-adapter"] == "base" and answer.model == BASE
        assert float(headers["x-lorakit-route-score"]) < DEFAULT_THRESHOLD


def test_auto_never_picks_an_adapter_the_key_may_not_use(server):
    count = "Count the words: star pleasure chamber\nAnswer:"
    assert _auto(server, ADMIN_KEY, count)[0]["x-lorakit-adapter"] == "count"
    headers, answer = _auto(server, TEAM_KEY, count)  # team may use reverse only
    assert headers["x-lorakit-adapter"] == "base" and answer.model == BASE
    assert _auto(server, TEAM_KEY, "Reverse the words: star pleasure\nAnswer:")[0]["x-lorakit-adapter"] == "reverse"
    headers, _ = _auto(server, SOLO_KEY, count)  # no adapter at all: no candidate, no score
    assert headers["x-lorakit-adapter"] == "base" and "x-lorakit-route-score" not in headers
    listed = {key: {m.id for m in server.client(key).models.list()} for key in (ADMIN_KEY, TEAM_KEY, SOLO_KEY)}
    assert "auto" in listed[ADMIN_KEY] and "auto" in listed[TEAM_KEY] and "auto" not in listed[SOLO_KEY]


def test_auto_is_no_alias_name(server):
    from lorakit.errors import ConfigError
    from lorakit.serve.aliases import parse_alias_flag

    refused = server.post("/v1/aliases", {"alias": "auto", "targets": {"reverse": 1}}, key=ADMIN_KEY)
    assert refused.status_code == 400 and "routing by prompt" in refused.json()["error"]["message"]
    with pytest.raises(ConfigError, match="routing by prompt"):
        parse_alias_flag("auto=reverse:1")


def test_a_server_whose_adapters_have_no_signature_says_auto_serves_the_base(engine, tmp_path, capsys):
    from lorakit.cli.serve import _check_routing

    _check_routing(engine, list(SHIPPED))
    assert capsys.readouterr().err == ""
    engine.add_adapter("plain", save_random_adapter(tmp_path / "plain", 0))
    _check_routing(engine, ["plain"])
    assert "no adapter has a routing signature" in capsys.readouterr().err
    engine.remove_adapter("plain")
