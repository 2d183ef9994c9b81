"""The answer generator: prompts of both modes, the prompt budget, batched answers on a tiny random Qwen2."""

import pytest

from m2io_jax import cli, generator
from m2io_jax.models import tiny

TEXTS = [
    "The kettle is cleaned with a soft cloth and warm water.",
    "Press the power button for two seconds to switch the kettle on.",
    "Which sights can a visitor see in Pemelwick? The pink balloon stands in a snowy field.",
    "Answer the question in a few sentences, using only the passages. [context_1] [img1_caption] <img1> <img2>",
] * 4


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    path = tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("generator"), TEXTS, kind="qwen2", vocab_size=400)
    config = generator.get_generator_config()
    config.max_new_tokens = 12
    config.max_prompt_tokens = 400
    return path, config


def test_text_prompt_strips_image_markers_and_numbers_passages():
    messages = generator.prompt_messages("How do I clean it?", ["Wipe it.<PIC> Rinse it.", "Dry it <img2> well."])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "[context_1] Wipe it. Rinse it.\n[context_2] Dry it well." in user
    assert "<img" not in user and "<PIC>" not in user and "Question: How do I clean it?" in user


def test_llm_prompt_lists_captions_and_keeps_markers():
    user = generator.prompt_messages("How do I clean it?", ["Wipe it.<img1>"],
                                     [("img1", "a cloth"), ("img2", "a tap")])[1]["content"]
    assert "[context_1] Wipe it.<img1>" in user
    assert "[img1_caption] a cloth\n[img2_caption] a tap" in user
    assert "placeholder" in user


def test_fit_prompt_drops_last_passages_then_images(tiny_generator):
    path, _ = tiny_generator
    g = generator.Generator.from_pretrained(path, generator.get_generator_config())
    passages = ["The kettle is cleaned with a soft cloth. " * 6, "Press the power button. " * 6]
    full, none_dropped = generator.fit_prompt(g.tokenizer, "How?", passages, None, 10_000)
    assert none_dropped == 0
    one, dropped = generator.fit_prompt(g.tokenizer, "How?", passages, None, len(full) - 1)
    assert dropped == 1 and len(one) < len(full)
    assert one == generator.encode_prompt(g.tokenizer, generator.prompt_messages("How?", passages[:1]))
    images = [("img1", "a cloth " * 10), ("img2", "a button " * 10)]
    bare, _ = generator.fit_prompt(g.tokenizer, "How?", [], images[:1], 10_000)
    ids, dropped = generator.fit_prompt(g.tokenizer, "How?", passages, images, len(bare))
    assert dropped == 3 and ids == bare
    with pytest.raises(ValueError, match="max_prompt_tokens=5"):
        generator.fit_prompt(g.tokenizer, "How?", passages, None, 5)


def test_answers_are_batched_and_equal_unbatched(tiny_generator):
    path, config = tiny_generator
    questions = ["How is the kettle cleaned?", "How is it switched on?", "Which sights are there?"]
    passages = [[TEXTS[0], TEXTS[1]], [TEXTS[1]], [TEXTS[2], TEXTS[0], TEXTS[1], TEXTS[2]]]
    config.batch_size = 2
    batched = generator.Generator.from_pretrained(path, config).answer(questions, passages)
    config.batch_size = 1
    single = generator.Generator.from_pretrained(path, config).answer(questions, passages)
    assert len(batched) == 3 and batched == single
    for answer in batched:
        assert isinstance(answer.text, str) and 1 <= answer.num_tokens <= config.max_new_tokens
        assert "<|im_end|>" not in answer.text
    assert batched[2].prompt_tokens > batched[1].prompt_tokens  # top_k=3 of 4 passages shown


def test_llm_mode_prompts_include_the_images(tiny_generator):
    path, config = tiny_generator
    g = generator.Generator.from_pretrained(path, config)
    plain = g.answer(["How?"], [[TEXTS[0]]])[0]
    with_images = g.answer(["How?"], [[TEXTS[0]]], images=[[("img1", "a soft cloth")]])[0]
    assert with_images.prompt_tokens > plain.prompt_tokens


def test_bad_input_is_an_error_naming_it(tiny_generator):
    path, config = tiny_generator
    g = generator.Generator.from_pretrained(path, config)
    with pytest.raises(ValueError, match=r"questions\[1\] is empty"):
        g.answer(["How?", "  "], [[], []])
    with pytest.raises(ValueError, match="2 questions but passages for 1"):
        g.answer(["How?", "Why?"], [[]])


def test_checkpoint_path_says_what_to_run(tmp_path, tiny_generator):
    config = generator.get_generator_config()
    with pytest.raises(cli.UserError, match="python -m m2io_jax.train_generator"):
        generator.checkpoint_path(config, str(tmp_path), "llm")
    config.checkpoint = tiny_generator[0]
    assert generator.checkpoint_path(config, str(tmp_path)) == tiny_generator[0]
    config.checkpoint = str(tmp_path)
    with pytest.raises(cli.UserError, match="config.generator.checkpoint"):
        generator.checkpoint_path(config, str(tmp_path))


def test_generator_on_a_mesh_answers_as_on_one_device(tiny_generator):
    from m2io_jax import sharding

    path, config = tiny_generator
    questions, passages = ["How is the kettle cleaned?", "Which sights are there?"], [[TEXTS[0]], [TEXTS[2]]]
    single = generator.Generator.from_pretrained(path, config).answer(questions, passages)
    mesh = sharding.make_mesh({"fsdp": -1})
    sharded = generator.Generator.from_pretrained(path, config, mesh=mesh)
    assert len(sharded.model.embed_tokens[...].sharding.device_set) == 8
    assert sharded.answer(questions, passages) == single
