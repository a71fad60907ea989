"""lm-evaluation-harness against the live server, as users check a server: its `local-completions` model
(echo + logprobs over token ids) must score exactly what `lm-eval --model hf` scores on the same weights.

Fully offline: the tasks are YAML files in tests/lm_eval/, their data JSONL files written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.process import ServerProcess
from models.loader import converted_gguf, default_gguf

pytestmark = pytest.mark.slow

TASKS = ["tokenferry_lastword", "tokenferry_choice"]
TOLERANCE = 1e-3

LAST_WORDS = [
    "The capital of France is Paris",
    "She opened the door and stepped out into the cold morning air",
    "One, two, three, four, five, six, seven, eight, nine, ten",
    "The sun rises in the east and sets in the west",
    "He poured the milk into a tall glass and drank it",
    "Monday, Tuesday, Wednesday, Thursday, Friday",
    "The cat chased the mouse across the kitchen floor",
    "Water freezes at zero degrees Celsius",
    "January, February, March, April, May, June",
    "The children built a castle out of sand on the beach",
    "A triangle has three sides and a square has four sides",
    "The ferry crossed the river every hour, carrying cars and passengers",
    "She wrote the letter with a pen and sealed it in an envelope",
    "The doctor listened to his heart with a stethoscope",
    "Red, orange, yellow, green, blue, indigo, violet",
    "The library was quiet except for the turning of pages",
    "He locked the door with his key",
    "Birds build nests in the branches of trees",
    "The train arrived at the station exactly on time",
    "After the rain, a rainbow appeared in the sky",
    "The chef chopped the onions with a sharp knife",
    "Bees make honey from the nectar of flowers",
    "The moon orbits the Earth, and the Earth orbits the Sun",
    "She planted tomatoes and carrots in her vegetable garden",
]
CHOICES = [
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which animal says moo?", ["a dog", "a cat", "a cow", "a duck"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
    ("What is the opposite of hot?", ["cold", "warm", "big", "fast"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do you use to write on paper?", ["a spoon", "a shoe", "a pen", "a cup"], 2),
    ("How many days are in a week?", ["five", "ten", "three", "seven"], 3),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"], 0),
    ("Which season comes after winter?", ["autumn", "spring", "summer", "night"], 1),
    ("What do plants need from the sun?", ["sound", "rain", "light", "wind"], 2),
    ("What is two plus two?", ["three", "five", "six", "four"], 3),
    ("Where do fish live?", ["in water", "in trees", "in the sky", "in the desert"], 0),
    ("What do you wear on your feet?", ["a hat", "shoes", "gloves", "a scarf"], 1),
    ("Which fruit is yellow and long?", ["an apple", "a grape", "a banana", "a cherry"], 2),
    ("What do cows drink?", ["oil", "juice", "coffee", "water"], 3),
    ("What is the largest ocean?", ["the Pacific", "the Atlantic", "the Indian", "the Arctic"], 0),
    ("What do you call a baby dog?", ["a kitten", "a puppy", "a calf", "a chick"], 1),
    ("Which tool cuts paper?", ["a hammer", "a brush", "scissors", "a ladder"], 2),
    ("What shines in the sky at night?", ["the sun", "a rainbow", "a cloud", "the moon"], 3),
]


@pytest.fixture
def task_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder holds the tasks' data; the harness must not reach any hub."""
    with (tmp_path / "lastword.jsonl").open("w") as f:
        for text in LAST_WORDS:
            f.write(json.dumps({"text": text}) + "\n")
    with (tmp_path / "choice.jsonl").open("w") as f:
        for question, choices, answer in CHOICES:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    return Path(__file__).parent.parent / "lm_eval"


def evaluate(model: str, model_args: str, task_dir: Path) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)), batch_size=8
    )["results"]
    return {
        task: {k.split(",")[0]: v for k, v in results[task].items() if "stderr" not in k and isinstance(v, (int, float))}
        for task in TASKS
    }


def test_lm_eval_local_completions_scores_what_lm_eval_hf_scores(smol_server: ServerProcess, task_dir: Path) -> None:
    folder = converted_gguf(default_gguf())  # the weights and tokenizer the server serves, as a HF folder
    served = evaluate(
        "local-completions",
        f"model=SmolLM2-135M-Instruct,base_url={smol_server.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={folder},tokenized_requests=True,num_concurrent=4,max_retries=1",
        task_dir,
    )
    reference = evaluate("hf", f"pretrained={folder},dtype=float32,device=cpu", task_dir)
    print(json.dumps({"tokenferry": served, "hf": reference}, indent=1))
    for task in TASKS:
        assert set(served[task]) == set(reference[task]) and served[task]
        for metric, value in reference[task].items():
            assert math.isclose(served[task][metric], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), (task, metric)
    # The model is small, but not clueless: the tasks measure something.
    assert reference["tokenferry_choice"]["acc"] > 0.4
    assert reference["tokenferry_lastword"]["acc"] > 0.2
