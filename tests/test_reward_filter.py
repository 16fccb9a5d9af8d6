import pytest

from seal.config import FilterConfig, RewardConfig
from seal.data import QA, Passage
from seal.filter import passages_without_kept, select
from seal.graders import make_grader
from seal.reward import QA_PROMPT, Rewarder, build_grader, reward

PASSAGES = [
    Passage("p1", "T1", "c1", [QA("Where was Ana born?", ["Oslo"]), QA("When?", ["1901"])]),
    Passage("p2", "T2", "c2", [QA("What colour?", ["blue", "navy"])]),
]


class EchoGenerator:
    """Answers from a dict keyed by question; records the adapter it was asked for."""

    def __init__(self, answers):
        self.answers, self.adapters, self.prompts = answers, [], []

    def generate(self, prompts, sampling, adapter=None):
        assert sampling.greedy and sampling.n == 1
        self.adapters.append(adapter)
        self.prompts.extend(prompts)
        return [[next(a for q, a in self.answers.items() if q in p)] for p in prompts]


def test_rewarder_scores_per_passage_in_one_batch(tokenizer):
    gen = EchoGenerator({"born": " She was born in Oslo. ", "When": "in 1950", "colour": "Navy!"})
    rewarder = Rewarder(gen, tokenizer, make_grader("contains"), RewardConfig())
    s1, s2 = rewarder.score(PASSAGES, adapter="ttt")
    assert gen.adapters == ["ttt"] and len(gen.prompts) == 3
    assert QA_PROMPT.format(question="When?") in gen.prompts[1] and "c1" not in gen.prompts[1]  # no context
    assert (
        s1.answers == ["She was born in Oslo.", "in 1950"] and s1.scores == [1.0, 0.0] and s1.accuracy == 0.5
    )
    assert s2.accuracy == 1.0 and s2.to_dict()["passage_id"] == "p2"


def test_reward_baseline_and_repeats():
    assert reward([0.5, 1.0], 0.25, RewardConfig()) == pytest.approx(0.5)
    assert reward([0.5, 1.0], 0.25, RewardConfig(reward_subtract_baseline=False)) == pytest.approx(0.75)
    assert reward([], 0.0, RewardConfig()) == 0.0


def test_local_judge_goes_through_generator(tokenizer):
    class Judge:
        def generate(self, prompts, sampling, adapter=None):
            return [["yes" if "Oslo" in p.split("Student")[-1] else "no"] for p in prompts]

    grader = build_grader(RewardConfig(reward_grader="judge"), Judge(), tokenizer)
    assert grader.grade(["Where?", "Where?"], ["Oslo", "Rome"], [["Oslo"], ["Oslo"]]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        build_grader(RewardConfig(reward_grader="judge"), None, tokenizer)


def row(pid, index, reward_, status="ok", adapted=0.0, base=0.0):
    return {
        "passage_id": pid,
        "index": index,
        "status": status,
        "reward": reward_,
        "adapted_accuracy": adapted,
        "base_accuracy": base,
    }


ROWS = [
    row("a", 0, 0.2, adapted=0.5, base=0.3),
    row("a", 1, 0.5, adapted=0.8, base=0.3),
    row("a", 2, 0.5, adapted=0.8, base=0.3),
    row("a", 3, 0.9, status="unparseable"),
    row("b", 0, -0.1, adapted=0.2, base=0.3),
    row("b", 1, 0.0, status="empty"),
]


def keys(rows):
    return [(r["passage_id"], r["index"]) for r in rows]


def test_filter_strategies():
    # the E-step default keeps rewarded samples only: b's best (-0.1) is not kept
    assert keys(select(ROWS, FilterConfig(filter_top_k=1))) == [("a", 1)]  # tie -> lower index
    unbounded = FilterConfig(filter_top_k=1, filter_min_reward=None)
    assert keys(select(ROWS, unbounded)) == [("a", 1), ("b", 0)]
    assert keys(select(ROWS, FilterConfig(filter_top_k=2, filter_min_reward=0.0))) == [("a", 1), ("a", 2)]
    assert keys(select(ROWS, FilterConfig(filter_strategy="threshold", filter_threshold=0.2))) == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
    ]
    assert keys(select(ROWS, FilterConfig(filter_strategy="gain", filter_min_gain=0.3))) == [
        ("a", 1),
        ("a", 2),
    ]
    with pytest.raises(ValueError, match="filter_strategy"):
        select(ROWS, FilterConfig(filter_strategy="best"))
    with pytest.raises(ValueError, match="filter_top_k"):
        select(ROWS, FilterConfig(filter_top_k=0))


def test_unrewarded_samples_are_never_kept_by_any_strategy():
    zero = [row("a", 0, 0.0, adapted=0.3, base=0.3), row("a", 1, 0.0, adapted=0.3, base=0.3)]
    assert select(zero, FilterConfig()) == []  # top_k: a passage whose self-edits all scored 0 keeps none
    assert select(zero, FilterConfig(filter_strategy="threshold", filter_threshold=0.0)) == []
    assert select(zero, FilterConfig(filter_strategy="gain", filter_min_gain=-1.0)) == []
    assert passages_without_kept(zero, []) == 1
    assert passages_without_kept(ROWS, select(ROWS, FilterConfig())) == 1  # b


def test_filter_beat_passage_keeps_only_self_edits_above_passage_only_ttt():
    rows = [
        {**row("a", 0, 0.5, adapted=0.8, base=0.3), "passage_accuracy": 0.8},  # ties passage-only: out
        {**row("a", 1, 0.4, adapted=0.7, base=0.3), "passage_accuracy": 0.6},
        {**row("b", 0, 0.2, adapted=0.5, base=0.3), "passage_accuracy": 0.9},
    ]
    cfg = FilterConfig(filter_beat_passage=True)
    assert keys(select(rows, cfg)) == [("a", 1)]
    with pytest.raises(ValueError, match="passage_accuracy"):
        select(ROWS, cfg)
