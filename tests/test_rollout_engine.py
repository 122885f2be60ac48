"""The vLLM rollout engine (CPU build, in-process), checked against a transformers forward pass."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from rollout.prompts import decode_images, render_prompt
from rollout.types import RolloutRequest, SamplingConfig
from rollout.weight_transport import make_transport
from services.data.synthetic import generate_problem

from in_process_link import InProcessLink


@pytest.fixture(scope="module")
def engine(rollout_engine):
    return rollout_engine


def _hf_logprobs(model, processor, text, images):
    inputs = processor(text=[text], images=decode_images(images), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1]
    ids = inputs["input_ids"][0]
    return ids.tolist(), torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]


def test_generate_groups_logprobs_and_single_image_expansion(engine):
    problems = [generate_problem("count", i) for i in range(3)]
    requests = [RolloutRequest(p.id, render_prompt(engine.processor, p.question), p.images) for p in problems]
    trajs = engine.generate(requests, SamplingConfig(n=4, max_tokens=12, seed=1))
    assert len(trajs) == 12 and [t.sample_index for t in trajs[:4]] == [0, 1, 2, 3]
    expected_ids = engine.processor(text=[requests[0].prompt], images=decode_images(problems[0].images))["input_ids"][0]
    assert trajs[0].prompt_token_ids == list(expected_ids)  # the engine expanded the image once, like the processor
    banned = set(engine.banned_token_ids)
    for t in trajs:
        assert t.prompt_id in {p.id for p in problems}
        assert len(t.response_logprobs) == len(t.response_token_ids) > 0
        assert all(lp <= 0.0 for lp in t.response_logprobs)
        assert not banned & set(t.response_token_ids)  # image placeholders are never sampled
        assert t.finish_reason in ("stop", "length") and t.weights_version == engine.weights_version()


def test_weight_update_matches_transformers_and_versions_advance(engine, tiny_model_dir):
    path = tiny_model_dir("internvl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    problem = generate_problem("color", 0)
    text = render_prompt(engine.processor, problem.question) + "<think>It is red.</think> \\boxed{A}<|im_end|>"
    ids, hf = _hf_logprobs(model, engine.processor, text, problem.images)
    vllm_ids, lp = engine.prompt_logprobs(text, problem.images)
    assert vllm_ids == ids and (torch.tensor(lp) - hf).abs().max() < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _, hf_new = _hf_logprobs(model, engine.processor, text, problem.images)
    assert (hf_new - hf).abs().max() > 1e-2  # the perturbation matters
    version = engine.weights_version() + 1
    transport, link = make_transport("object_store", 64 << 10), InProcessLink([engine])
    transport.connect_sender(link)
    assert transport.send(version, model.state_dict().items(), link) == [version]
    _, lp_new = engine.prompt_logprobs(text, problem.images)
    assert (torch.tensor(lp_new) - hf_new).abs().max() < 1e-4
    with pytest.raises(ValueError, match="increase"):
        engine.receive_weights(version, iter([]))
