"""FTII-style problems from step-by-step documents: paragraphs, windows, the problem as an insertion example,
the score, the rule baseline, and the tiny inserter's prompts end to end."""

import math

import pytest

from m2io_jax.data import mramg
from m2io_jax.eval import config as eval_config
from m2io_jax.inserter import evaluation, formats, ftii, pipeline
from m2io_jax.inserter.formats import Placement
from m2io_jax.inserter.task import decode_completion
from m2io_jax.models.qwen2_5_vl_processor import IMAGE_PAD
from tests.inserter.demo_setup import demo_setup

DOCUMENT = mramg.Document(
    "9", "<PIC>Intro text. Read it.<PIC> Step one.<PIC><PIC> Step two. Then wait.<PIC> Step three.<PIC> The end.",
    ("lead", "intro", "one_a", "one_b", "two", "three"), "tiny")
IMAGES = {name: mramg.ImageInfo(name, f"caption of {name}", f"/{name}.png") for name in DOCUMENT.images}


def _settings(**overrides):
    settings = eval_config.get_config().ftii
    settings.update(overrides)
    return settings


def test_paragraphs_follow_the_pic_markers():
    assert ftii.paragraphs(DOCUMENT) == [
        ftii.Paragraph("Intro text. Read it.", ("intro",)), ftii.Paragraph("Step one.", ("one_a", "one_b")),
        ftii.Paragraph("Step two. Then wait.", ("two",)), ftii.Paragraph("Step three.", ("three",)),
        ftii.Paragraph("The end.", ())]  # the leading image has nothing before it
    with pytest.raises(ValueError, match="document 9 \\(tiny\\): 6 <PIC> markers but 5 images"):
        ftii.paragraphs(mramg.Document("9", DOCUMENT.content, DOCUMENT.images[:5], "tiny"))


def test_windows_hold_at_most_max_images():
    parts = ftii.paragraphs(DOCUMENT)
    assert [(first, len(run)) for first, run in ftii.windows(parts, 3)] == [(0, 2), (2, 2)]
    assert [(first, len(run)) for first, run in ftii.windows(parts, 10)] == [(0, 4)]  # trailing text dropped
    with pytest.raises(ValueError, match="max_images=0"):
        ftii.windows(parts, 0)


def test_problem_is_an_insertion_example_with_paragraph_slots():
    (first, parts), _ = ftii.windows(ftii.paragraphs(DOCUMENT), 3)
    problem = ftii.build_problem(DOCUMENT, first, parts, IMAGES, shuffle_seed=0)
    example = problem.example
    assert problem.problem_id == "9:0" and example.question == ftii.QUESTION
    assert example.sentences == ("Intro text.", "Read it.", "Step one.")
    assert problem.paragraph_of_sentence == (0, 0, 1)
    names = [[example.candidates.image_map[i] for i in gold] for gold in problem.gold]
    assert names == [["intro"], ["one_a", "one_b"]]
    assert sorted(example.candidates.image_map.values()) == ["intro", "one_a", "one_b"]
    assert example.candidates.captions == tuple(f"caption of {example.candidates.image_map[i]}"
                                                for i in example.candidates.image_map)
    tag = example.candidates.name_to_tag
    assert example.gold_anchors == (Placement(tag["intro"], 1), Placement(tag["one_a"], 2),
                                    Placement(tag["one_b"], 2))
    # The gold placements, rendered and read back the way the inserter's answers are, score 1.
    inline = formats.assemble_inline(example.answer, example.gold_anchors)
    assert ftii.score([problem], [ftii.placements_of(inline)])["accuracy"] == 1.0


def test_score_counts_slots_by_paragraph():
    (first, parts), _ = ftii.windows(ftii.paragraphs(DOCUMENT), 3)
    problem = ftii.build_problem(DOCUMENT, first, parts, IMAGES, shuffle_seed=0)
    tag = problem.example.candidates.name_to_tag
    chosen = [Placement(tag["intro"], 0),  # after the first sentence of paragraph 0: still paragraph 0, right
              Placement(tag["one_b"], 2), Placement(tag["one_a"], 2),  # paragraph 1, both in the wrong order
              Placement(tag["one_a"], -1)]  # before everything: no paragraph
    scores = ftii.score([problem, problem], [chosen, None])
    assert scores["accuracy"] == pytest.approx(1 / 6) and scores["precision"] == pytest.approx(1 / 4)
    assert (scores["slots"], scores["placed"], scores["problems"], scores["over_budget"]) == (6, 4, 2, 1)
    empty = ftii.score([problem], [[]])
    assert empty["accuracy"] == 0.0 and math.isnan(empty["precision"])
    with pytest.raises(ValueError, match="1 placement lists for 2 problems"):
        ftii.score([problem, problem], [chosen])


@pytest.fixture(scope="module")
def setup():
    return demo_setup()


def test_demo_problems_and_the_rule_baseline(setup):
    problems = ftii.build_problems(setup.dataset, "test", _settings(), setup.config.inserter.shuffle_seed)
    cited = {d for q in setup.dataset.questions_of("test") for d in q.provenance}
    assert {p.problem_id.split(":")[0] for p in problems} == cited
    assert all(1 <= sum(len(g) for g in p.gold) <= 6 for p in problems)
    assert sum(sum(len(g) for g in p.gold) for p in problems) == 14 * len(cited)  # every image of a manual
    assert len(ftii.build_problems(setup.dataset, "test", _settings(max_problems=2), 0)) == 2
    encoder = setup.retriever.encoder
    rule = ftii.score(problems, [ftii.rule_placements(p, encoder, threshold=-1.0) for p in problems])
    assert rule["placed"] == rule["slots"]  # threshold -1: every candidate is placed somewhere
    first = ftii.score(problems, [[Placement(i, 0) for i in p.example.candidate_ids] for p in problems])
    assert rule["accuracy"] > 1.5 * first["accuracy"]  # captions say something: better than all after sentence 1


def test_tiny_inserter_answers_ftii_prompts(setup):
    problems = ftii.build_problems(setup.dataset, "test", _settings(max_problems=3), 0)
    tokenizer = setup.processor.tokenizer
    prompts = [ftii.prompt_example(p, setup.dataset.images, setup.processor, setup.config.inserter, 4096)
               for p in problems]
    assert all(p is not None and p.images["image_grid_thw"].shape[0] == len(p.example.candidate_ids)
               for p in prompts)
    assert ftii.prompt_example(problems[0], setup.dataset.images, setup.processor, setup.config.inserter, 16) is None
    from m2io_jax import models

    model = models.from_pretrained(setup.checkpoint)
    stops = pipeline.stop_token_ids(tokenizer)
    completions = evaluation.greedy_completions(model, prompts, max_new_tokens=8, batch_size=3, stop_tokens=stops,
                                                suppress_tokens=(tokenizer.convert_tokens_to_ids(IMAGE_PAD),))
    placed = []
    for prompt, ids in zip(prompts, completions):
        parsed = formats.parse_completion(decode_completion(tokenizer, ids, stops), output_format="anchors",
                                          think=False, answer=prompt.example.answer,
                                          candidate_ids=prompt.example.candidate_ids)
        placed.append(ftii.placements_of(parsed.inline_text))
    scores = ftii.score(problems, placed)
    assert scores["problems"] == 3 and 0.0 <= scores["accuracy"] <= 1.0


def test_fit_prompts_cuts_documents_into_smaller_windows_under_the_budget(setup):
    inserter = setup.config.inserter
    settings = _settings()
    roomy, roomy_prompts = ftii.fit_prompts(setup.dataset, "test", settings, 0, processor=setup.processor,
                                            inserter=inserter, max_prompt_tokens=4096)
    assert [p.problem_id for p in roomy] == [p.problem_id for p in ftii.build_problems(setup.dataset, "test",
                                                                                       settings, 0)]
    assert all(p is not None for p in roomy_prompts)
    budget = sorted(len(p.prompt_ids) for p in roomy_prompts)[len(roomy_prompts) // 2]  # half the windows over it
    tight, tight_prompts = ftii.fit_prompts(setup.dataset, "test", settings, 0, processor=setup.processor,
                                            inserter=inserter, max_prompt_tokens=budget)
    assert len(tight) > len(roomy) and all(len(p.prompt_ids) <= budget for p in tight_prompts)
    slots = sum(sum(len(g) for g in p.gold) for p in tight)
    assert slots == sum(sum(len(g) for g in p.gold) for p in roomy)  # every image still has its slot
    none, none_prompts = ftii.fit_prompts(setup.dataset, "test", settings, 0, processor=setup.processor,
                                          inserter=inserter, max_prompt_tokens=10)
    assert all(p is None for p in none_prompts) and all(sum(len(g) for g in p.gold) == 1 for p in none)
