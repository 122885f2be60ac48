import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from learner.param_groups import group_of, set_trainable
from learner.types import GROUPS
from rollout.prompts import decode_images, image_token_ids, render_prompt
from services.data.synthetic import generate_problem


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl"])
def test_tiny_model_reloads_and_expands_images_once(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    problem = generate_problem("count", 0)
    text = render_prompt(processor, problem.question)
    assert text.count("<|im_start|>assistant") == 1 and "<think>" in text  # system prompt asks for it
    inputs = processor(text=[text], images=decode_images(problem.images), return_tensors="pt")
    image_tokens = sum(int((inputs["input_ids"] == t).sum()) for t in [model.config.image_token_id])
    assert image_tokens == 4  # 56 px, patch 14, 2x2 merge -> 4 tokens, expanded exactly once
    logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()
    assert set(image_token_ids(processor)) >= {model.config.image_token_id}


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl"])
def test_every_parameter_has_a_group_and_freezing_works(tiny_model_dir, arch):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(arch))
    groups = {group_of(model.config.model_type, n) for n, _ in model.named_parameters()}
    assert groups == set(GROUPS)
    counts = set_trainable(model, ["connector"])
    assert counts["connector"] > 0 and counts["vision"] == 0 and counts["llm"] == 0
    trainable = {group_of(model.config.model_type, n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}
    with pytest.raises(ValueError, match="subset"):
        set_trainable(model, ["adapter"])


def test_same_seed_same_weights(tmp_path):
    from learner.model_factory import make_model
    from safetensors.torch import load_file

    a = load_file(str(make_model(tmp_path / "a", "internvl", seed=3) / "model.safetensors"))
    b = load_file(str(make_model(tmp_path / "b", "internvl", seed=3) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reasoning_tags_survive_decoding_that_skips_special_tokens(tiny_model_dir):
    # vLLM decodes responses with skip_special_tokens=True; the format reward needs the tags in the text
    tok = AutoProcessor.from_pretrained(tiny_model_dir("internvl")).tokenizer
    text = "<think>I count 2 shapes.</think> \\boxed{2}"
    ids = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
